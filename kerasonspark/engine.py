"""The contract between :class:`~kerasonspark.SparkTrainer` and the engines that train.

An engine is a class with one method, :meth:`Engine.run`, that receives a :class:`TrainingJob`
and returns a :class:`TrainingResult`. Engines register in the ``kerasonspark.backends``
entry-point group; the core looks names up there and nowhere else, so a third-party engine plugs
in with one line of its own ``pyproject.toml``::

    [project.entry-points."kerasonspark.backends"]
    mine = "my_package.engine:MyEngine"
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .errors import ConfigurationError, WorkerError
from .serialization import ModelSpec

if TYPE_CHECKING:
    import keras
    from pyspark.sql import SparkSession

    from .data import DataInfo, PreparedData
    from .parameter_server import ParameterStore
    from .worker import Exchange

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kerasonspark.backends"


@dataclass
class TrainingConfig:
    """What every engine trains with; the arguments of ``SparkTrainer`` that mirror ``model.fit``."""

    epochs: int = 1
    batch_size: int = 32
    num_workers: int = 2
    seed: int | None = None
    verbose: int = 1
    worker_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"Expected `{name}` to be a positive integer. Received: {name}={value!r}.")
        threads = self.worker_threads
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 0):
            raise ConfigurationError(
                f"Expected `worker_threads` to be None (the task's cores), 0 (TensorFlow's defaults) or a positive "
                f"integer. Received: worker_threads={threads!r}.")


@dataclass
class TrainingResult:
    """What ``fit`` returns.

    Attributes:
        model: the trained ``keras.Model`` (the object passed to ``SparkTrainer``, now trained).
        history: per-epoch lists, like ``keras.callbacks.History.history`` (``loss``, metrics, and
            ``val_*`` when validation data was given).
        stats: figures of the run: ``wall_seconds``, ``prepare_seconds`` (data conversion, checks
            and worker warm-up), ``train_seconds``, ``samples_per_second``,
            ``samples``, engine counters (``rounds``, ``updates``...) and ``workers`` (per-worker
            samples and seconds).
    """

    model: "keras.Model"
    history: dict[str, list[float]]
    stats: dict[str, Any]


@dataclass
class TrainingJob:
    """Everything an engine needs to train one model on one dataset.

    Attributes:
        spark: the active session.
        spec: the model to train, as plain data.
        model: the caller's model object; engines that train on the driver may use it directly.
        data: the training data, one partition per worker.
        info: what the model expects of features and labels.
        config: epochs, batch size, workers, seed, verbosity.
        validation: validation arrays ``(x, y)`` on the driver, or ``None``.
        server_host: the address a driver-side server should bind.
        progress: called with small dicts as training advances (driver side).
    """

    spark: "SparkSession"
    spec: ModelSpec
    model: "keras.Model"
    data: "PreparedData"
    info: "DataInfo"
    config: TrainingConfig
    run_id: str = ""
    spec_broadcast: Any = None
    validation: tuple[np.ndarray, np.ndarray] | None = None
    server_host: str = "127.0.0.1"
    progress: Callable[[dict[str, Any]], None] = field(default=lambda event: None)

    def run_workers(self, exchange: "Exchange") -> list[dict[str, Any]]:
        """Run the shared worker loop on every partition in one barrier stage.

        ``exchange`` is the engine's worker-side hook (see :class:`~kerasonspark.worker.Exchange`);
        returns each worker's report, ordered by worker id.

        Raises:
            WorkerError: a worker failed; the message names it and carries its error.
        """
        from .worker import run_training_stage

        return run_training_stage(self, exchange)

    def run_with_parameter_server(self, store: "ParameterStore",
                                  make_exchange: Callable[[str, bytes], "Exchange"]) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
        """Serve ``store`` on the driver for one training stage, with a fresh secret.

        ``make_exchange(url, secret)`` builds the engine's worker-side hook. The server and all
        its threads are stopped when this returns or raises.

        Returns:
            ``(reports, seconds, server_stats)``: the workers' reports, the stage's wall seconds,
            and the store's statistics at the end.

        Raises:
            WorkerError: naming the worker whose failure started it (from the server's reports).
        """
        from .parameter_server import ParameterServer, ServerConfig, new_secret
        from .worker import explain_failure

        secret = new_secret()
        config = ServerConfig(secret, max_payload_bytes=self.spec.weights.nbytes + (1 << 20))
        with ParameterServer(store, config, host=self.server_host) as server:
            exchange = make_exchange(server.url, secret)
            started = time.perf_counter()
            try:
                reports = self.run_workers(exchange)
            except WorkerError as exc:
                explained = explain_failure(exc, store.failures)
                if explained is exc:
                    raise  # keeps the Spark error it carries as its cause
                raise explained from exc
            return reports, time.perf_counter() - started, store.stats()

    def result(self, reports: list[dict[str, Any]], weights: np.ndarray, train_seconds: float,
               engine_stats: Mapping[str, Any] | None = None) -> TrainingResult:
        """Assemble the :class:`TrainingResult` from worker reports and the final weights.

        Sets ``weights`` on the caller's model, averages each epoch's training metrics over the
        workers weighted by their samples (validation metrics by their validation rows), and
        fills ``stats`` with the figures every engine reports.
        """
        from .serialization import set_flat_weights

        set_flat_weights(self.model, weights)
        history: dict[str, list[float]] = {}
        for epoch in range(self.config.epochs):
            for key, value in _weighted_mean(
                    [(r["samples"], r["history"][epoch]) for r in reports if epoch < len(r["history"])]).items():
                history.setdefault(key, []).append(value)
            for key, value in _weighted_mean(
                    [r["val_history"][epoch] for r in reports if epoch < len(r.get("val_history", []))]).items():
                history.setdefault(f"val_{key}", []).append(value)
        samples = self.data.num_samples * self.config.epochs
        for report in reports:
            report["samples_per_second"] = report["samples"] * self.config.epochs / max(report["seconds"], 1e-9)
        stats: dict[str, Any] = {
            "backend": "",
            "samples": samples,
            "epochs": self.config.epochs,
            "num_workers": self.config.num_workers,
            "train_seconds": train_seconds,
            "samples_per_second": samples / train_seconds if train_seconds > 0 else 0.0,
            "workers": [{k: v for k, v in r.items() if k not in ("history", "val_history")} for r in reports],
        }
        stats.update(engine_stats or {})
        return TrainingResult(self.model, history, stats)


def _weighted_mean(entries: list[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    total = sum(n for n, logs in entries if logs)
    if not total:
        return {}
    keys = [k for k in next(logs for n, logs in entries if logs)]
    return {k: sum(n * logs[k] for n, logs in entries if logs and k in logs) / total for k in keys}


class EngineOptions:
    """Base for an engine's options dataclass: validates in ``__post_init__``."""


@dataclass
class NoOptions(EngineOptions):
    """An engine without options."""


def parse_options(options_class: type, options: Mapping[str, Any] | None, engine: str) -> Any:
    """Build an engine's options dataclass, naming the valid options when one is unknown.

    Raises:
        ConfigurationError: an unknown option, or one that fails the class's validation.
    """
    options = dict(options or {})
    valid = [f.name for f in dataclasses.fields(options_class)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigurationError(
            f"Unknown option(s) {unknown} for backend '{engine}'. Valid options: {valid or 'none'}."
        )
    try:
        return options_class(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"Invalid `backend_options` for backend '{engine}': {exc}") from None


class Engine:
    """Base class of every training engine.

    Subclasses set :attr:`name` and :attr:`options_class` and implement :meth:`run`.

    Attributes:
        name: the backend name users pass to ``SparkTrainer(backend=...)``.
        options_class: a dataclass for ``backend_options``, validated on construction.
        uses_spark_workers: whether the engine trains in Spark tasks (one per worker); the
            trainer then checks the cluster has a slot for each before starting.
        uses_parameter_server: whether weights travel through the driver's parameter server
            (plain HTTP); the trainer then refuses a cluster that encrypts its own traffic
            unless cleartext weights are allowed (see :func:`~kerasonspark.session.check_weights_privacy`).
    """

    name: ClassVar[str] = "engine"
    options_class: ClassVar[type] = NoOptions
    uses_spark_workers: ClassVar[bool] = True
    uses_parameter_server: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        self.options = parse_options(self.options_class, options, self.name)

    def setup(self, job: TrainingJob) -> None:
        """Called before :meth:`run`; does nothing by default."""

    def run(self, job: TrainingJob) -> TrainingResult:
        """Train ``job.spec`` on ``job.data`` and return the result.

        The engine must leave nothing running (servers, threads) when it returns or raises.
        """
        raise NotImplementedError

    def teardown(self, job: TrainingJob) -> None:
        """Called after :meth:`run`, also when it raised; does nothing by default."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


@lru_cache(maxsize=1)
def available_backends() -> dict[str, type[Engine]]:
    """The installed engines by name, read once from the ``kerasonspark.backends`` entry points."""
    engines: dict[str, type[Engine]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            engines[ep.name] = ep.load()
        except Exception as exc:  # one broken plug-in must not hide the others
            logger.warning("Backend %r could not be loaded: %s", ep.name, exc)
    return engines


def resolve_backend(backend: str | Engine, options: Mapping[str, Any] | None = None) -> Engine:
    """Turn a backend name (or a configured engine) into an engine instance.

    Raises:
        ConfigurationError: unknown name (the message lists the installed ones), or options
            given together with an engine instance.
        TypeError: ``backend`` is neither a string nor an :class:`Engine`.
    """
    if isinstance(backend, Engine):
        if options:
            raise ConfigurationError("Pass `backend_options` only with a backend name; an engine object is already configured.")
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"Expected `backend` to be a name or an Engine. Received: backend={backend!r}.")
    engines = available_backends()
    if backend not in engines:
        raise ConfigurationError(
            f"Unknown backend {backend!r}. Installed backends: {sorted(engines)}. "
            f"Engines register in the '{ENTRY_POINT_GROUP}' entry-point group; reinstall kerasonspark if it is empty."
        )
    return engines[backend](**dict(options or {}))
