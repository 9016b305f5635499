"""Shared fixtures: one real local[2] Spark session, small learnable data, small models."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Every JVM the tests start (the session's, and the masters, workers, executors and drivers of the
# cluster tests, which inherit the environment) lives seconds and does little but move bytes: the
# quick compiler alone and the serial collector nearly halve their start-up CPU on a 2-core machine.
os.environ.setdefault("JAVA_TOOL_OPTIONS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")

import numpy as np
import pytest

CUSTOM_OBJECTS = Path(__file__).parent / "custom_objects"
# The benchmarks' tooling (emulated hosts, the stats-page watcher) is not part of the library; the
# tests that need it import it from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The fast tier (-m "not spark") starts no Spark: a test that takes the session is a Spark test.
    for item in items:
        if "spark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.spark)


@pytest.fixture(scope="session")
def spark():
    from kerasonspark import start_session
    from kerasonspark._shipping import ensure_executors_ready

    session = start_session("local[2]", "kerasonspark-tests")
    session.sparkContext.setLogLevel("ERROR")
    # The application's one check of what its executors import is a job of its own; run it here, so
    # it is not counted against whichever test happens to use the session first.
    ensure_executors_ready(session)
    yield session
    session.stop()


def code_blocks(text: str, language: str) -> list[str]:
    """The bodies of the fenced ``language`` blocks of a Markdown text, in order."""
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def readme_blocks(section: str, language: str) -> list[str]:
    """The ``language`` blocks under README's ``## {section}`` (up to the next section)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = code_blocks(body, language)
    assert blocks, f"README's '{section}' section has no {language} block"
    return blocks


def make_blobs(
    n: int = 1200, classes: int = 4, dim: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian clusters: a trained model scores ~1.0, an untrained one
    ~1/classes."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(classes, dim))
    y = rng.integers(0, classes, size=n)
    x = centers[y] + rng.normal(size=(n, dim))
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture
def blobs():
    return make_blobs()


def small_model(
    dim: int = 16, classes: int = 4, loss: str = "sparse_categorical_crossentropy", seed: int = 0
):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((dim,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), loss, metrics=["accuracy"])
    return model


@pytest.fixture
def user_code(tmp_path):
    """The user's script run in this process's `__main__`, and their helper module importable on the
    driver alone (from the script's folder, as `python script.py` puts it on the driver's path)."""
    main = sys.modules["__main__"]
    before = set(vars(main))
    exec(
        compile((CUSTOM_OBJECTS / "user_script.py").read_text(), "user_script.py", "exec"),
        vars(main),
    )
    shutil.copy(CUSTOM_OBJECTS / "custom_parts.py", tmp_path / "custom_parts.py")
    sys.path.insert(0, str(tmp_path))
    try:
        helper = importlib.import_module("custom_parts")
        yield main, helper
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("custom_parts", None)
        for name in set(vars(main)) - before:
            delattr(main, name)


@pytest.fixture
def no_leaked_threads():
    """Fails the test if it leaves parameter-server threads running."""
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("kerasonspark-ps")]
    assert not leaked, f"threads left running: {leaked}"


class CrashingExchange:
    """Wraps an engine's exchange; worker `worker` raises `error` at its `at`-th exchange."""

    def __init__(self, inner, worker, at, error):
        self.inner, self.worker, self.at, self.error, self.calls = inner, worker, at, error, 0

    def __getattr__(self, name):
        if name == "inner":  # during unpickling, before __dict__ is restored
            raise AttributeError(name)
        return getattr(self.inner, name)

    def start(self, model, worker):
        self.me = worker
        self.inner.start(model, worker)

    def exchange(self, model, samples):
        self.calls += 1
        if self.me == self.worker and self.calls == self.at:
            raise self.error
        self.inner.exchange(model, samples)


class FailsOnce(CrashingExchange):
    """Worker `worker` fails at its `at`-th exchange the first time only (a marker file remembers,
    since every stage unpickles a fresh exchange in a fresh task)."""

    def __init__(self, inner, worker, at, marker, kill=False):
        super().__init__(inner, worker, at, None)
        self.marker, self.kill = marker, kill

    def exchange(self, model, samples):
        self.calls += 1
        if self.me == self.worker and self.calls == self.at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            if self.kill:
                os._exit(3)  # the Python process is gone: no traceback, no report
            raise RuntimeError("flaky disk")
        self.inner.exchange(model, samples)


def crashing(engine_name, wrap, **options):
    """An engine of `engine_name` whose exchange is wrapped by `wrap` (e.g. a CrashingExchange)."""
    import sys

    from pyspark import cloudpickle

    from kerasonspark import available_backends

    # executors cannot import test modules
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    class Crashing(available_backends()[engine_name]):
        def run(self, job):
            serve = job.serve
            job.serve = lambda store, make_exchange: serve(
                store, lambda url, secret: wrap(make_exchange(url, secret))
            )
            return super().run(job)

    return Crashing(**options)


def run_driver_program(script: str, *args: str, timeout: float = 400) -> dict:
    """Run the driver program ``tests/<script>`` (a Spark driver needs a process of its own when
    the test process holds a local session) and return the JSON of its ``REPORT`` line."""
    tests = Path(__file__).parent
    run = subprocess.run(
        [sys.executable, str(tests / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tests,
        env=dict(os.environ, PYTHONPATH=str(tests)),
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    return json.loads(lines[0][len("REPORT ") :])


def report_connect_client(spark, report: dict) -> None:
    """Record whether the Spark Connect client ``spark`` has a SparkContext (it must not: the
    library cannot have used one), stop it, and print ``report`` as the ``REPORT`` line
    :func:`run_driver_program` reads."""
    try:
        spark.sparkContext  # noqa: B018  # a Connect client has none: this must raise
        report["spark_context"] = True
    except Exception as exc:  # the error Connect gives
        report["spark_context"] = type(exc).__name__
    spark.stop()
    print("REPORT " + json.dumps(report))


def emulated_or_skip(network):
    """``network`` (an ``EmulatedNetwork``) entered, or the test skipped where this machine cannot
    emulate hosts (not root, no iproute2, no new devices allowed)."""
    from kerasonspark import SparkEnvironmentError

    try:
        network.__enter__()
    except SparkEnvironmentError as exc:
        if "need" in str(exc) or "not permitted" in str(exc):
            pytest.skip(f"emulated hosts are not possible here: {exc}")
        raise
    return network
