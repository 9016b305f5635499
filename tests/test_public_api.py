"""The documented API is exactly what is importable without an underscore, and ``__all__`` names it.

A module added to the package without an underscore fails here until it is documented (and listed
below); a name added to or dropped from a public module's ``__all__`` fails until this table says
so.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

import pytest

import kerasonspark
import kerasonspark.backends

PUBLIC = {
    "kerasonspark": [
        "MNIST_CNN_PARAMETERS",
        "BarrierTimeoutError",
        "ConfigurationError",
        "DataConfig",
        "DataError",
        "FailureConfig",
        "KerasOnSparkError",
        "MlflowConfig",
        "ResourceConfig",
        "ParameterServerError",
        "SparkEnvironmentError",
        "SparkTrainer",
        "StandaloneCluster",
        "StrategyRow",
        "TrainingResult",
        "WireFormatError",
        "WorkerError",
        "WorkerReport",
        "available_backends",
        "compare_strategies",
        "format_table",
        "load_mnist",
        "mnist_cnn",
        "numpy_to_dataframe",
        "plot_comparison",
        "start_session",
    ],
    "kerasonspark.engine": [
        "ENTRY_POINT_GROUP",
        "Engine",
        "EngineOptions",
        "Exchange",
        "LearningRateScaling",
        "NoOptions",
        "ParameterStore",
        "Runner",
        "ScalingOptions",
        "ServerExchange",
        "StageOutcome",
        "TRAINS_ON",
        "TrainingConfig",
        "TrainingJob",
        "TrainingResult",
        "WorkerReport",
        "available_backends",
        "check_positive_int",
        "even_runs",
        "get_flat_weights",
        "global_step",
        "parse_options",
        "resolve_backend",
        "set_flat_weights",
        "set_global_step",
    ],
    "kerasonspark.testing": ["InProcessRunner", "fit_in_process"],
    "kerasonspark.ml": ["KerasEstimator", "KerasModel"],
    "kerasonspark.cli": ["main"],
    "kerasonspark.parameter_server": [
        "ParameterClient",
        "ParameterServer",
        "ParameterStore",
        "RULES",
        "ServerConfig",
        "UpdateRule",
        "create_app",
        "make_rule",
        "new_secret",
    ],
    "kerasonspark.parameter_server.client": ["ParameterClient"],
    "kerasonspark.parameter_server.wire": [
        "CONTENT_TYPE",
        "MAGIC",
        "MAX_ARRAYS",
        "MAX_DIMENSIONS",
        "MAX_HEADER_BYTES",
        "SPARSE_BELOW",
        "SPARSE_VERSION",
        "VERSION",
        "decode",
        "dtype_name",
        "encode",
        "encode_sparse",
        "encoded_size",
        "flatten",
        "nonzero_part",
        "to_dense",
        "unflatten",
    ],
    "kerasonspark.backends": [],
    "kerasonspark.backends.async_ps": ["AsyncEngine"],
    "kerasonspark.backends.elephas_adapter": ["ElephasEngine", "ElephasOptions"],
    "kerasonspark.backends.hogwild": ["HogwildEngine", "HogwildOptions"],
    "kerasonspark.backends.single": ["SingleEngine"],
    "kerasonspark.backends.sync": [
        "ShardedSyncExchange",
        "SyncEngine",
        "SyncExchange",
        "SyncOptions",
    ],
}


def _modules_without_underscore() -> set[str]:
    # The engines are installed as kerasonspark.backends from their own folder.
    found = {"kerasonspark", "kerasonspark.backends"}
    for package in (kerasonspark, kerasonspark.backends):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                found.add(info.name)
    return found


def test_only_documented_modules_are_importable_without_an_underscore():
    assert _modules_without_underscore() == set(PUBLIC)


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_all_is_exactly_the_documented_names_and_each_resolves(module):
    imported = importlib.import_module(module)
    assert sorted(getattr(imported, "__all__", [])) == sorted(PUBLIC[module])
    for name in PUBLIC[module]:
        assert getattr(imported, name) is not None, f"{module}.{name}"
    star: dict = {}
    exec(f"from {module} import *", star)
    assert sorted(k for k in star if k != "__builtins__") == sorted(PUBLIC[module])


def test_public_errors_name_the_package_in_tracebacks():
    for name in ("DataError", "WorkerError", "ConfigurationError"):
        assert getattr(kerasonspark, name).__module__ == "kerasonspark"
        assert repr(getattr(kerasonspark, name)("x")).startswith(f"{name}(")


def test_an_unknown_name_says_so():
    with pytest.raises(AttributeError, match="has no attribute 'Trainer'"):
        kerasonspark.Trainer  # noqa: B018


def test_the_docs_build_strictly_and_the_api_reference_lists_every_public_name(tmp_path):
    import subprocess
    import sys
    import zlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stdout + build.stderr
    inventory = (tmp_path / "objects.inv").read_bytes().split(b"zlib.\n", 1)[1]
    documented = {line.split()[0] for line in zlib.decompress(inventory).decode().splitlines()}
    # The engines are documented from their folder, backends/, as the repository holds them.
    wanted = {
        f"{module.replace('kerasonspark.backends', 'backends')}.{name}"
        for module, names in PUBLIC.items()
        for name in names
    }
    assert sorted(wanted - documented) == []
