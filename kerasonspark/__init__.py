"""kerasonspark: train Keras 3 models on Apache Spark.

    import kerasonspark as ks

    spark = ks.start_session("local[2]")
    result = ks.SparkTrainer(ks.mnist_cnn(), backend="sync", num_workers=2).fit(train_df)

Everything a user needs is importable from here. The public modules beside it are
:mod:`kerasonspark.engine` (the SDK for writing an engine), :mod:`kerasonspark.ml` (Spark ML
pipelines), :mod:`kerasonspark.testing` (engines in-process, for tests) and
:mod:`kerasonspark.parameter_server` with its :mod:`~kerasonspark.parameter_server.client` and
:mod:`~kerasonspark.parameter_server.wire`; the engines live in :mod:`kerasonspark.backends`.
Modules whose names start with an underscore are internal and may change in any release.

The names below load on first use: a Spark task that imports ``kerasonspark._executor`` runs this
file too, and must not pull in the trainer, the cluster launcher or Flask with it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._errors import (
    BarrierTimeoutError,
    ConfigurationError,
    DataError,
    KerasOnSparkError,
    ParameterServerError,
    SparkEnvironmentError,
    WireFormatError,
    WorkerError,
)

if TYPE_CHECKING:
    from ._cluster import StandaloneCluster
    from ._compare import StrategyRow, compare_strategies, format_table, plot_comparison
    from ._config import DataConfig, FailureConfig, MlflowConfig, ResourceConfig
    from ._data import numpy_to_dataframe
    from ._datasets import load_mnist
    from ._models import MNIST_CNN_PARAMETERS, mnist_cnn
    from ._session import start_session
    from ._trainer import SparkTrainer
    from .engine import TrainingResult, WorkerReport, available_backends

__version__ = "0.1.0"

_LAZY = {
    "SparkTrainer": "_trainer",
    "FailureConfig": "_config",
    "DataConfig": "_config",
    "ResourceConfig": "_config",
    "MlflowConfig": "_config",
    "TrainingResult": "engine",
    "WorkerReport": "engine",
    "available_backends": "engine",
    "numpy_to_dataframe": "_data",
    "start_session": "_session",
    "StandaloneCluster": "_cluster",
    "compare_strategies": "_compare",
    "format_table": "_compare",
    "plot_comparison": "_compare",
    "StrategyRow": "_compare",
    "load_mnist": "_datasets",
    "mnist_cnn": "_models",
    "MNIST_CNN_PARAMETERS": "_models",
}

__all__ = [
    "MNIST_CNN_PARAMETERS",
    "BarrierTimeoutError",
    "ConfigurationError",
    "DataConfig",
    "DataError",
    "FailureConfig",
    "KerasOnSparkError",
    "MlflowConfig",
    "ParameterServerError",
    "ResourceConfig",
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
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
