"""The engine SDK: everything an engine author reads, in one module.

An engine decides only how workers cooperate. It is a class with one method, :meth:`Engine.run`,
that receives a :class:`TrainingJob` and returns a :class:`TrainingResult`; the job carries a
:class:`Runner` (Spark's barrier stage, or :mod:`kerasonspark.testing`'s threads) that runs the
shared worker loop and hosts a parameter server. Between runs of local steps each worker calls the
engine's :class:`Exchange`; every worker returns a :class:`WorkerReport`.

The driver side of a complete engine, model averaging ``rounds`` times an epoch through the
parameter server's round barrier (its worker side, ``EpochAveragingExchange``, is a
:class:`ServerExchange` whose ``exchange`` calls ``self.client.barrier``)::

    class EpochAveragingEngine(Engine):
        name = "epoch_averaging"

        def run(self, job):
            store = ParameterStore(job.spec.weights, job.spec.shapes, job.config.num_workers)
            exchange = lambda url, secret: EpochAveragingExchange(url, secret, rounds=1)
            outcome = job.serve(store, exchange)
            return job.result(outcome.reports, store.center, outcome.seconds)

(``examples/custom_engine.py`` has it whole, with its exchange and a test.) Engines register in the
``kerasonspark.backends`` entry-point group; the core looks names up there and nowhere else, so a
third-party engine plugs in with one line of its own ``pyproject.toml``::

    [project.entry-points."kerasonspark.backends"]
    mine = "my_package.engine:MyEngine"

This module imports neither the driver side (Spark stages, the Flask server) nor the executor side
(TensorFlow); only the parameter server's client, store and wire codec, used on both sides.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

import numpy as np

from ._config import TrainingConfig, check_positive_int
from ._errors import ConfigurationError
from ._serialization import (
    ModelSpec,
    get_flat_weights,
    global_step,
    set_flat_weights,
    set_global_step,
)
from .parameter_server._store import ParameterStore
from .parameter_server.client import ParameterClient

if TYPE_CHECKING:
    import keras

    from ._data import DataInfo

__all__ = [
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
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kerasonspark.backends"
"""The entry-point group engines register in; the core finds engines there and nowhere else."""


def even_runs(steps: int, runs: int) -> list[int]:
    """Cut ``steps`` into exactly ``runs`` runs, as even as they come, longest first.

    For :meth:`Exchange.schedule` when workers meet after every run: each worker cuts its epoch
    into the same number of runs, and a worker with a smaller partition takes fewer steps a run.

    Example:
        >>> even_runs(10, 3)
        [4, 3, 3]
    """
    base, extra = divmod(steps, runs)
    return [base + 1] * extra + [base] * (runs - extra)


@dataclass
class WorkerReport:
    """What one worker returns when its training loop ends.

    Attributes:
        worker: the worker's id (its partition index).
        samples: rows in its partition (trained once per epoch).
        steps: local training steps over all epochs.
        seconds: wall seconds of its training loop.
        history: per epoch, the running means of its loss and metrics.
        val_samples: validation rows it scored after each epoch (0 without validation data).
        val_history: per epoch, its loss and metrics on those rows.
        figures: the engine's own per-worker figures (what :meth:`Exchange.finish` returned).
    """

    worker: int
    samples: int
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    val_samples: int = 0
    val_history: list[dict[str, float]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        """Samples trained per wall second, over all epochs."""
        epochs = max(len(self.history), 1)
        return self.samples * epochs / max(self.seconds, 1e-9)

    def as_stats(self) -> dict[str, Any]:
        """The report as the JSON-ready entry of ``stats["workers"]`` (histories left out)."""
        return {
            "worker": self.worker,
            "samples": self.samples,
            "steps": self.steps,
            "seconds": self.seconds,
            "samples_per_second": self.samples_per_second,
            **self.figures,
        }


@dataclass
class TrainingResult:
    """What ``fit`` returns.

    Attributes:
        model: the trained ``keras.Model`` (the object passed to ``SparkTrainer``, now trained).
        history: per-epoch lists, like ``keras.callbacks.History.history`` (``loss``, metrics, and
            ``val_*`` when validation data was given).
        stats: figures of the run. Every engine fills ``backend``, ``samples``, ``epochs``,
            ``num_workers``, ``train_seconds``, ``samples_per_second``, ``exchanges`` (pushes or
            rounds; 0 for an engine that exchanges nothing) and ``workers`` (per-worker figures);
            the trainer adds ``wall_seconds`` and ``prepare_seconds``. An engine's own figures sit
            under its name (``stats["sync"]["rounds_per_epoch"]``), the parameter server's under
            ``parameter_server``.
    """

    model: keras.Model
    history: dict[str, list[float]]
    stats: dict[str, Any]


class StageOutcome(NamedTuple):
    """What a training stage served by a parameter server returns (see
    :meth:`TrainingJob.serve`)."""

    reports: list[WorkerReport]
    seconds: float
    server_stats: dict[str, Any]


@dataclass(frozen=True)
class LearningRateScaling:
    """A multiplier on the learning rate the user's optimizer and callbacks set, ramped up linearly.

    Data-parallel workers that average their changes take one step's worth of progress where one
    process would take ``num_workers``: Goyal et al., "Accurate, Large Minibatch SGD: Training
    ImageNet in 1 Hour" (2017), scale the rate by the worker count (the *linear scaling rule*) and
    ramp up to it over the first steps, because a large rate on fresh weights diverges. The
    worker multiplies, so schedules set by callbacks keep the shape and the engine the size.

    Attributes:
        factor: the multiplier after the warm-up.
        warmup_steps: local steps over which the multiplier rises from 1 to ``factor``.
    """

    factor: float = 1.0
    warmup_steps: int = 0

    def multiplier(self, step: int) -> float:
        """The multiplier for a run of steps that starts after ``step`` local steps."""
        if step >= self.warmup_steps:
            return self.factor
        return 1.0 + (self.factor - 1.0) * step / self.warmup_steps


class Exchange:
    """An engine's worker-side hook: what happens between runs of local steps.

    Instances are created on the driver, copied into each worker (pickled into the Spark task),
    and used by that worker alone. Every method but :meth:`exchange` does nothing by default.

    Attributes:
        holds_center: whether the worker's model holds the run's center after the epoch's last
            exchange (a round barrier's average). If not, the driver sends the epoch's center to
            the worker at each epoch boundary (see :meth:`epoch_center`).
        lr_scaling: the multiplier the worker loop puts on the optimizer's learning rate before
            each run of steps, or ``None`` (see :class:`ScalingOptions`).
    """

    holds_center: ClassVar[bool] = False
    lr_scaling: LearningRateScaling | None = None

    def start(self, model: keras.Model, worker: int) -> None:
        """Called once before training, with the worker's id (its partition index)."""

    def schedule(self, steps: int, epoch: int) -> list[int]:
        """Split an epoch's ``steps`` local steps into runs; :meth:`exchange` follows each run.

        Every worker's schedule of an epoch is computed from its own ``steps``; an engine whose
        workers must meet (a round barrier) must give every worker as many runs.
        """
        return [steps]

    def exchange(self, model: keras.Model, samples: int) -> None:
        """Exchange weights with the others after a run of local steps over ``samples`` samples."""
        raise NotImplementedError

    def end_epoch(self, model: keras.Model, epoch: int) -> None:
        """Called after the epoch's last exchange, before the epoch boundary's meeting with the
        driver."""

    def epoch_center(self, model: keras.Model, center: np.ndarray) -> None:
        """Called at each epoch boundary with the center the driver validated and checkpointed
        (the center when the last worker ended the epoch). By default the worker continues from
        it."""
        set_flat_weights(model, center)

    def should_stop(self) -> bool:
        """Whether the driver asked every worker to stop now (checked after each exchange); the
        worker then ends its epoch early and meets the driver at the epoch boundary."""
        return False

    def announce_stop(self) -> None:
        """Called when this worker learns that training stops before its peers may know (the
        driver's answer to a progress report said so, or its own loss is not finite), so that
        peers waiting for it at an exchange the driver does not host are released. Does nothing by
        default: the driver's server releases its own rounds."""

    def finish(self, model: keras.Model) -> dict[str, Any]:
        """Called after training; returns the engine's figures for the :class:`WorkerReport`."""
        return {}

    def report_failure(self, message: str) -> None:
        """Called when this worker fails, so others do not wait for it."""

    def close(self) -> None:
        """Release connections; called last, also after a failure."""


class ServerExchange(Exchange):
    """An exchange through the run's parameter server, over one keep-alive connection per worker.

    Subclasses implement :meth:`schedule` and :meth:`exchange` with :attr:`client`; opening the
    connection, traffic figures, failure reports and closing are shared.

    Args:
        url: the parameter server's base URL.
        secret: the run's secret.
        timeout: seconds a request may wait for the server (a round barrier waits on purpose).
        timeout_name: the engine option ``timeout`` comes from, named when the wait expires.
    """

    def __init__(
        self, url: str, secret: bytes, timeout: float, timeout_name: str = "timeout"
    ) -> None:
        self.url, self.secret, self.timeout, self.timeout_name = url, secret, timeout, timeout_name
        self.worker = -1
        self.shapes: list[tuple[int, ...]] = []
        self._client: ParameterClient | None = None

    def start(self, model: keras.Model, worker: int) -> None:
        self.worker = worker
        self.shapes = [tuple(w.shape) for w in model.weights]
        self._client = ParameterClient(
            self.url,
            self.secret,
            worker,
            timeout=self.timeout,
            timeout_name=f"backend_options['{self.timeout_name}']",
        )

    @property
    def client(self) -> ParameterClient:
        """The worker's connection (after :meth:`start`)."""
        if self._client is None:
            raise RuntimeError("The exchange was used before start().")
        return self._client

    def should_stop(self) -> bool:
        return self._client is not None and self._client.stop_requested

    def traffic(self) -> dict[str, float]:
        """Seconds spent exchanging and megabytes moved, for the worker's figures."""
        client = self.client
        return {
            "exchange_seconds": client.seconds,
            "mb_sent": client.bytes_sent / 1e6,
            "mb_received": client.bytes_received / 1e6,
            "exchange_mb_per_s": (client.bytes_sent + client.bytes_received)
            / 1e6
            / max(client.seconds, 1e-9),
        }

    def report_failure(self, message: str) -> None:
        # A fresh connection: the worker's own may be broken mid-request, or busy in the background.
        with ParameterClient(self.url, self.secret, self.worker, timeout=10) as client:
            client.report_failure(message)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class Runner(Protocol):
    """What runs an engine's workers; the driver puts one in every :class:`TrainingJob`.

    ``kerasonspark`` ships two: Spark's (one barrier task per worker) and the in-process runner of
    :mod:`kerasonspark.testing` (one thread per worker, no Spark). Engines call them through the
    job's methods, never directly.
    """

    def run_workers(
        self, job: TrainingJob, exchange: Exchange, gate: Any = None
    ) -> list[WorkerReport]:
        """Run the shared worker loop on every partition at once; reports ordered by worker id.

        ``gate`` (an ``executor.EpochGate``, given by :meth:`serve`) is each worker's line to the
        driver's epoch events.

        Raises:
            WorkerError: a worker failed; the message names it and carries its error.
        """
        ...

    def serve(
        self,
        job: TrainingJob,
        store: ParameterStore,
        make_exchange: Callable[[str, bytes], Exchange],
    ) -> StageOutcome:
        """Serve ``store`` on the driver with a fresh secret while :meth:`run_workers` runs.

        Raises:
            WorkerError: naming the worker whose failure started it.
        """
        ...

    def result(
        self,
        job: TrainingJob,
        reports: list[WorkerReport],
        weights: np.ndarray,
        train_seconds: float,
        exchanges: int,
        engine_stats: Mapping[str, Any] | None,
        server_stats: Mapping[str, Any] | None,
    ) -> TrainingResult:
        """Set ``weights`` on the caller's model and assemble the :class:`TrainingResult`."""
        ...

    def local_arrays(self, job: TrainingJob) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The training data as one ``(x, y, sample_weight)`` triple on the driver (labels as the
        user gave them; ``sample_weight`` is ``None`` without weights)."""
        ...

    def training_blocks(self, job: TrainingJob) -> Any:
        """The training data as a Spark RDD of ``(x, y, sample_weight)`` blocks, one partition per
        worker.

        Raises:
            ConfigurationError: the runner trains without Spark.
        """
        ...


@dataclass
class TrainingJob:
    """Everything an engine needs to train one model on one dataset.

    Attributes:
        spec: the model to train, as plain data (architecture, compile config, weights).
        model: the caller's model object; engines that train on the driver may use it directly.
        info: what the model expects of features and labels.
        config: epochs, batch size, workers, seed, verbosity.
        runner: runs the workers (see :class:`Runner`); call it through the methods below.
        run_id: unique per ``fit``.
        validation: validation arrays ``(x, y)`` on the driver (NumPy input), or ``None``.
        validation_blocks: validation data that stays on the executors (a DataFrame, a Parquet
            path or an RDD given to a Spark engine): a DataFrame of ``(x, y, None)`` blocks
            (:data:`kerasonspark._stages.BLOCK_SCHEMA`), one cached partition per worker, which
            the shared worker loop scores there; or ``None``.
            Engines that score on the driver call :meth:`local_validation` instead.
        server_host: the address a driver-side server binds.
        server_port: the port it listens on (0: any free port).
        partition_sizes: rows per worker.
        callbacks: the ``keras.callbacks.Callback`` objects of ``fit``. Engines served through
            :meth:`serve` need not look at them: the driver runs them at every epoch boundary.
            An engine that trains otherwise runs them itself (``single`` hands them to
            ``model.fit``) or refuses them in :meth:`Engine.check_fit`.
        streamed: whether the workers stream their partitions through a local spill file
            instead of holding them in memory (decided from ``config.data.partition_storage`` and
            the partitions' measured size; only :meth:`run_workers` streams).
        trains_on: the engine's :attr:`Engine.trains_on`: which of the methods below it may call.
    """

    spec: ModelSpec
    model: keras.Model
    info: DataInfo
    config: TrainingConfig
    runner: Runner
    run_id: str
    partition_sizes: list[int]
    validation: tuple[np.ndarray, np.ndarray] | None = None
    validation_blocks: Any = None
    server_host: str = "127.0.0.1"
    server_port: int = 0
    callbacks: list[Any] = field(default_factory=list)
    streamed: bool = False
    trains_on: str = "workers"
    _server_stats: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        # A job travels to the training stage when the server lives there (an engine's
        # `make_exchange` reads it); what holds the session or the caller's model stays here.
        return {
            **self.__dict__,
            "runner": None,
            "model": None,
            "validation": None,
            "validation_blocks": None,
        }

    def _require(self, trains_on: str, method: str) -> None:
        if self.trains_on != trains_on:
            raise ConfigurationError(
                f"job.{method}() is for engines with `trains_on = {trains_on!r}`; this engine "
                f"declares {self.trains_on!r}. Set the engine class's `trains_on` to what it "
                "trains through: `fit` prepares the data and checks the cluster by it."
            )

    @property
    def num_samples(self) -> int:
        """Training rows over all workers."""
        return sum(self.partition_sizes)

    @property
    def has_validation(self) -> bool:
        """Whether ``fit`` was given validation data (on the driver or on the executors)."""
        return self.validation is not None or self.validation_blocks is not None

    def local_validation(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The validation data as ``(x, y)`` on the driver, for engines that score there; data
        that stays on the executors is collected once (the shared worker loop never does)."""
        if self.validation is None and self.validation_blocks is not None:
            from ._data import collect_arrays

            x, y, _ = collect_arrays(self.validation_blocks, self.info.input_shape)
            self.validation = (x, y)
        return self.validation

    def run_workers(self, exchange: Exchange) -> list[WorkerReport]:
        """Run the shared worker loop on every partition at once, ``exchange`` between runs of
        steps.

        Without :meth:`serve` the driver has no line to the workers: no callbacks, no live
        progress, and each worker scores its own model on its validation rows.

        Raises:
            WorkerError: a worker failed; the message names it and carries its error.
            ConfigurationError: the job has callbacks, which need :meth:`serve`.
        """
        self._require("workers", "run_workers")
        if self.callbacks:
            raise ConfigurationError(
                "This engine trains without the parameter server (`job.serve`), so the driver "
                "cannot run callbacks between epochs. Drop `callbacks`, or refuse them in the "
                "engine's `check_fit`."
            )
        return self.runner.run_workers(self, exchange)

    def serve(
        self, store: ParameterStore, make_exchange: Callable[[str, bytes], Exchange]
    ) -> StageOutcome:
        """Serve ``store`` on the driver for one training stage, with a fresh secret.

        ``make_exchange(url, secret)`` builds the engine's worker-side hook. The server and all
        its threads are stopped when this returns or raises.

        Raises:
            WorkerError: naming the worker whose failure started it (from the server's reports).
        """
        self._require("workers", "serve")
        outcome = self.runner.serve(self, store, make_exchange)
        self._server_stats = outcome.server_stats
        return outcome

    def result(
        self,
        reports: list[WorkerReport],
        weights: np.ndarray,
        train_seconds: float,
        *,
        exchanges: int | None = None,
        engine_stats: Mapping[str, Any] | None = None,
    ) -> TrainingResult:
        """Set ``weights`` on the caller's model and assemble the result.

        Each epoch's training metrics are averaged over the workers weighted by their samples
        (validation metrics by their validation rows). ``exchanges`` counts pushes or rounds; after
        :meth:`serve` it defaults to the server's count of both, and the server's figures land in
        ``stats["parameter_server"]``. ``engine_stats`` lands under the engine's name in ``stats``.

        Raises:
            ConfigurationError: ``exchanges`` is missing for a job that was not served.
        """
        server_stats = self._server_stats
        if exchanges is None:
            if server_stats is None:
                raise ConfigurationError(
                    "Pass `exchanges=` to job.result(): the job was not served, so it has "
                    "no server count to take."
                )
            exchanges = int(server_stats["rounds"]) + int(server_stats["updates"])
        return self.runner.result(
            self, reports, weights, train_seconds, exchanges, engine_stats, server_stats
        )

    def local_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The training data as one ``(x, y, sample_weight)`` triple on the driver, for engines that
        train there (``sample_weight`` is ``None`` without weights; ``fit``'s class weights are
        folded into it)."""
        from ._data import class_weighted

        self._require("driver", "local_arrays")
        x, y, weights = self.runner.local_arrays(self)
        return x, y, class_weighted(y, weights, self.config.class_weight)

    def training_blocks(self) -> Any:
        """The training data as a Spark RDD of ``(x, y, sample_weight)`` blocks (labels as given;
        ``sample_weight`` is ``None`` without weights), one partition
        per worker and cached, for engines that hand it to another Spark library.

        Raises:
            ConfigurationError: the job runs without Spark (:mod:`kerasonspark.testing`).
        """
        self._require("spark", "training_blocks")
        return self.runner.training_blocks(self)


class EngineOptions:
    """Base for an engine's options dataclass: validate in ``__post_init__``, raising
    ``ValueError``."""


LR_SCALE_RULES = ("linear", "sqrt")


@dataclass
class ScalingOptions(EngineOptions):
    """Learning-rate scaling with warm-up, for engines whose workers average their progress.

    Attributes:
        lr_scale: what the workers multiply the optimizer's learning rate by: ``"linear"``
            (the default: the worker count, Goyal et al. 2017), ``"sqrt"`` (its square root, the
            rule Malladi et al. 2022 derive for adaptive optimizers such as Adam when gradients
            are averaged), or a number (1 trains at the optimizer's own rate). Measured on the
            reference CNN with Adam, averaging engines learn as much per sample as one process
            only with the linear rule: averaging N workers' changes takes one step's worth of
            progress from N steps' worth of samples.
        warmup_steps: local steps over which the multiplier ramps up from 1 (0: none; use a
            few hundred where the scaled rate diverges on fresh weights).
    """

    lr_scale: float | str = "linear"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        scale = self.lr_scale
        if scale not in LR_SCALE_RULES and (
            isinstance(scale, (bool, str)) or not isinstance(scale, (int, float)) or not scale > 0
        ):
            raise ValueError(
                f"Expected `lr_scale` to be a number > 0 or one of {LR_SCALE_RULES}. Received: "
                f"lr_scale={scale!r}."
            )
        if (
            not isinstance(self.warmup_steps, int)
            or isinstance(self.warmup_steps, bool)
            or self.warmup_steps < 0
        ):
            raise ValueError(
                f"Expected `warmup_steps` to be an integer >= 0. Received: "
                f"warmup_steps={self.warmup_steps!r}."
            )

    def lr_scaling(self, job: TrainingJob) -> LearningRateScaling | None:
        """The workers' multiplier for ``job`` (``None`` when it is 1 throughout).

        Raises:
            ConfigurationError: scaling asked for a model whose optimizer's rate is a schedule.
        """
        workers = job.config.num_workers
        scale = self.lr_scale
        factor = float(workers if scale == "linear" else workers**0.5 if scale == "sqrt" else scale)
        if factor == 1.0:
            return None
        return LearningRateScaling(factor, self.warmup_steps)

    def check_model(self, model: keras.Model) -> None:
        """Refuse scaling for a model whose optimizer follows a ``LearningRateSchedule``.

        Raises:
            ConfigurationError: ``lr_scale`` is not 1 and the rate is a schedule.
        """
        import keras

        rate = getattr(getattr(model, "optimizer", None), "_learning_rate", None)
        if self.lr_scale != 1 and isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            raise ConfigurationError(
                "`lr_scale` multiplies a fixed learning rate, and this model's optimizer "
                "computes it with a LearningRateSchedule. Scale the schedule itself, or give the "
                "optimizer a number and shape it with a callback "
                "(keras.callbacks.LearningRateScheduler)."
            )


@dataclass
class NoOptions(EngineOptions):
    """An engine without options."""


def parse_options(options_class: type, options: Mapping[str, Any] | None, engine: str) -> Any:
    """Build an engine's options dataclass, naming the valid options when one is unknown.

    Raises:
        ConfigurationError: an unknown option, or one that fails the class's validation.
    """
    options = dict(options or {})
    names = {f.name for f in dataclasses.fields(options_class)}
    # The engine's own options first, then what it inherits (lr_scale, ...): the order users read.
    valid = list(
        dict.fromkeys(
            n
            for cls in options_class.__mro__
            for n in vars(cls).get("__annotations__", {})
            if n in names
        )
    )
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigurationError(
            f"Unknown option(s) {unknown} for backend '{engine}'. Valid options: {valid or 'none'}."
        )
    try:
        return options_class(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"Invalid `backend_options` for backend '{engine}': {exc}"
        ) from None


TRAINS_ON = ("workers", "driver", "spark")
"""The values of :attr:`Engine.trains_on`."""


class Engine:
    """Base class of every training engine.

    Subclasses set :attr:`name` (and :attr:`options_class`, :attr:`trains_on` when not the
    defaults) and implement :meth:`run`.

    Attributes:
        name: the backend name users pass to ``SparkTrainer(backend=...)``; the key of the
            engine's own figures in ``stats``.
        options_class: a dataclass for ``backend_options``, validated on construction. The field
            whose metadata holds ``{"variant": True}`` is what a strategy's variant sets in
            ``kerasonspark compare`` (``"async:adag"`` sets ``rule``).
        trains_on: which of the job's data the engine trains through, and so what ``fit``
            prepares and checks for it. ``"workers"`` (the default): the shared worker loop in
            Spark tasks, through :meth:`TrainingJob.serve` or :meth:`TrainingJob.run_workers`
            (partitions may stream from disk, weights travel through the driver's parameter
            server, callbacks run on the driver). ``"driver"``: one process on the driver,
            through :meth:`TrainingJob.local_arrays`. ``"spark"``: the data handed to another
            Spark library, through :meth:`TrainingJob.training_blocks`. A job refuses the
            other methods, naming this attribute.
    """

    name: ClassVar[str] = "engine"
    options_class: ClassVar[type] = NoOptions
    trains_on: ClassVar[str] = "workers"

    def __init__(self, **options: Any) -> None:
        if self.trains_on not in TRAINS_ON:
            raise ConfigurationError(
                f"Expected {type(self).__name__}.trains_on in {TRAINS_ON}. "
                f"Received: {self.trains_on!r}."
            )
        self.options = parse_options(self.options_class, options, self.name)

    def check_fit(self, model: keras.Model, callbacks: list[Any], weighted: bool) -> None:
        """Refuse what this engine cannot do in this ``fit``, before any work: the model, the
        callbacks, or sample and class weights (``weighted``). The default asks the options
        (:meth:`ScalingOptions.check_model`) when they have such a check.

        Raises:
            ConfigurationError: what to change, and how.
        """
        check = getattr(self.options, "check_model", None)
        if check is not None:
            check(model)

    def run(self, job: TrainingJob) -> TrainingResult:
        """Train ``job.spec`` on the job's data and return the result (``job.result(...)``).

        The engine must leave nothing running (servers, threads) when it returns or raises.
        """
        raise NotImplementedError

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
            raise ConfigurationError(
                "Pass `backend_options` only with a backend name; an engine object is already "
                "configured."
            )
        return backend
    if not isinstance(backend, str):
        raise TypeError(
            f"Expected `backend` to be a name or an Engine. Received: backend={backend!r}."
        )
    engines = available_backends()
    if backend not in engines:
        raise ConfigurationError(
            f"Unknown backend {backend!r}. Installed backends: {sorted(engines)}. "
            f"Engines register in the '{ENTRY_POINT_GROUP}' entry-point group; reinstall "
            "kerasonspark if it is empty."
        )
    return engines[backend](**dict(options or {}))
