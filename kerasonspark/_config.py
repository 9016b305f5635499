"""Settings: the rarely touched ones grouped by what they govern, each default and check written
once.

``SparkTrainer`` keeps the settings of ``model.fit`` flat (``num_workers``, ``batch_size``,
``epochs``, ``seed``, ``verbose``) and takes the rest as three small objects::

    SparkTrainer(model, backend="async", num_workers=4,
                 failure=FailureConfig(max_restarts=5, restart_with_fewer_workers=True),
                 data=DataConfig(partition_storage="stream"))

Each object checks its own fields when it is made, so a bad value fails at the line that wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._errors import ConfigurationError

PARTITION_STORAGE = ("auto", "memory", "stream")


def check_positive_int(name: str, value: Any) -> None:
    """Raise a :class:`ConfigurationError` unless ``value`` is an ``int`` >= 1 (``bool`` is not).

    Example:
        >>> check_positive_int("window", 5)
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(
            f"Expected `{name}` to be a positive integer. Received: {name}={value!r}."
        )


def _check_seconds(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConfigurationError(f"Expected `{name}` > 0 seconds. Received: {name}={value!r}.")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"Expected `{name}` to be True or False. Received: {value!r}.")


@dataclass(frozen=True)
class FailureConfig:
    """What ``fit`` does when a worker is lost, and how long it waits for workers.

    Args:
        max_restarts: times a training stage that lost a worker (its process died, its executor
            was lost, it raised) runs again from the parameter server's current center; 0 fails
            ``fit`` at once. The same error on the same worker twice ends ``fit`` without using
            the rest. Restarted workers start with a fresh optimizer state.
        restart_timeout: seconds a restart waits for a task slot for every worker (a lost
            executor coming back) before ``fit`` fails naming the missing slots.
        restart_with_fewer_workers: when a restart's slots do not all come back within
            ``restart_timeout``, go on with the workers the cluster can place (the data re-split
            among them, the epoch started again from the current center) instead of failing.
        registration_timeout: seconds ``fit`` waits for executors to register a slot for every
            worker on a cluster before it refuses to start.
        epoch_timeout: seconds a worker waits at an epoch boundary (for the slowest worker and
            the driver's callbacks) before it fails naming this setting.
    """

    max_restarts: int = 2
    restart_timeout: float = 120.0
    restart_with_fewer_workers: bool = False
    registration_timeout: float = 30.0
    epoch_timeout: float = 86_400.0

    def __post_init__(self) -> None:
        restarts = self.max_restarts
        if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
            raise ConfigurationError(
                f"Expected `max_restarts` to be an integer >= 0. Received: {restarts!r}."
            )
        for name in ("restart_timeout", "registration_timeout", "epoch_timeout"):
            _check_seconds(name, getattr(self, name))
        _check_flag("restart_with_fewer_workers", self.restart_with_fewer_workers)


@dataclass(frozen=True)
class DataConfig:
    """Where each worker keeps its partition, and how the epoch's steps are shared among workers.

    Args:
        partition_storage: ``"memory"``: each worker holds its partition as one array in memory
            (the fastest). ``"stream"``: the data is cached on the executors' disks; in the
            training stage each worker writes its partition, a block at a time, to a file on its
            executor's local disk, maps it, and gathers at most ``buffer_rows`` rows into memory
            at once, so its memory stays flat in the data's size (every epoch is still a full
            random permutation of the partition). ``"auto"``: streams when the largest partition
            is bigger than half the memory a worker may use (``spark.executor.pyspark.memory``,
            else the executor machine's available memory shared among its cores).
            ``stats["partition_storage"]`` says which ran. Engines that hand the data elsewhere
            (``single``, ``elephas``) hold it in memory.
        buffer_rows: the most rows a streamed worker gathers into memory at once.
        balance_workers: for clusters of unequal machines. From the second epoch on, each
            worker trains a number of steps in proportion to the rows per second it computed in
            the epoch before (the epoch's total unchanged), so fast workers do not idle at the
            epoch boundary or the round barrier waiting for a slow one. Rows stay where they are:
            a slow worker trains on a fresh random part of its partition each epoch, a fast one on
            its whole partition and a random part again, so an epoch no longer visits every row
            exactly once. A restarted stage starts again from even shares.
    """

    partition_storage: str = "auto"
    buffer_rows: int = 16_384
    balance_workers: bool = False

    def __post_init__(self) -> None:
        if self.partition_storage not in PARTITION_STORAGE:
            raise ConfigurationError(
                f"Expected `partition_storage` in {PARTITION_STORAGE}. Received: "
                f"{self.partition_storage!r}."
            )
        check_positive_int("buffer_rows", self.buffer_rows)
        _check_flag("balance_workers", self.balance_workers)


DEVICES = ("auto", "cpu")


@dataclass(frozen=True)
class ResourceConfig:
    """What each worker may use of the machine it runs on.

    Args:
        worker_threads: TensorFlow threads per worker: ``None`` sizes them to the task's cores
            (``spark.task.cpus``), 0 leaves TensorFlow's defaults (every core of the machine).
        devices: ``"auto"``: a task that Spark gave GPUs (``spark.task.resource.gpu.amount``)
            sees only those (``CUDA_VISIBLE_DEVICES`` set from ``TaskContext.resources()``
            before TensorFlow starts, with memory growth); a task without GPUs runs on the CPU.
            ``"cpu"``: every worker runs on the CPU, whatever it was given.
    """

    worker_threads: int | None = None
    devices: str = "auto"

    def __post_init__(self) -> None:
        if self.devices not in DEVICES:
            raise ConfigurationError(
                f"Expected `devices` in {DEVICES}. Received: devices={self.devices!r}."
            )
        threads = self.worker_threads
        if threads is not None and (
            not isinstance(threads, int) or isinstance(threads, bool) or threads < 0
        ):
            raise ConfigurationError(
                "Expected `worker_threads` to be None (the task's cores), 0 (TensorFlow's "
                f"defaults) or a positive integer. Received: worker_threads={threads!r}."
            )


@dataclass(frozen=True)
class MlflowConfig:
    """How ``fit`` logs to MLflow (``pip install "kerasonspark[mlflow]"``): one run per ``fit``
    with its parameters, every epoch's metrics at the global step, the run's figures and the
    trained model (see the guide's "Tracking with MLflow").

    Args:
        enabled: ``None``: log when MLflow is installed and in use (``MLFLOW_TRACKING_URI`` is
            set, ``mlflow.set_tracking_uri`` was called, or a run is active); ``True``: always
            (MLflow must be installed); ``False``: never.
        log_model: log the trained model with its signature (``mlflow.keras.log_model``), so
            ``mlflow.pyfunc.spark_udf`` can load it.
        registered_model_name: also register the logged model under this name.
        run_name: the name of the run ``fit`` starts (default ``kerasonspark-<backend>``); an
            active run is logged into instead, as MLflow's autologging does.
    """

    enabled: bool | None = None
    log_model: bool = True
    registered_model_name: str | None = None
    run_name: str | None = None

    def __post_init__(self) -> None:
        if self.enabled not in (None, True, False):
            raise ConfigurationError(
                f"Expected `enabled` to be None, True or False. Received: {self.enabled!r}."
            )
        _check_flag("log_model", self.log_model)


_GROUPS = {"failure": FailureConfig, "data": DataConfig, "resources": ResourceConfig}


@dataclass
class TrainingConfig:
    """What every engine trains with: the settings of ``model.fit`` and the three groups.

    Epochs run from ``initial_epoch`` to ``epochs - 1`` (as in Keras); the center is scored on the
    validation data after every ``validation_freq``-th epoch. ``class_weight`` holds one loss
    weight per class (``fit(class_weight=)`` made dense), or ``None``. ``failure``, ``data`` and
    ``resources`` are the :class:`FailureConfig`, :class:`DataConfig` and :class:`ResourceConfig`
    the trainer was given (their defaults when it was given none).
    """

    epochs: int = 1
    batch_size: int = 32
    num_workers: int = 2
    seed: int | None = None
    verbose: int = 1
    initial_epoch: int = 0
    validation_freq: int = 1
    class_weight: tuple[float, ...] | None = None
    failure: FailureConfig = field(default_factory=FailureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "num_workers", "validation_freq"):
            check_positive_int(name, getattr(self, name))
        epoch = self.initial_epoch
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ConfigurationError(
                f"Expected `initial_epoch` to be an integer >= 0. Received: {epoch!r}."
            )
        seed = self.seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ConfigurationError(
                f"Expected `seed` to be None or an integer >= 0. Received: seed={seed!r}."
            )
        if self.verbose not in (0, 1, 2):
            raise ConfigurationError(
                f"Expected `verbose` in (0, 1, 2). Received: verbose={self.verbose!r}."
            )
        for name, kind in _GROUPS.items():
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise ConfigurationError(
                    f"Expected `{name}` to be a kerasonspark.{kind.__name__}, e.g. "
                    f"{name}={kind.__name__}(...). Received: {type(value).__name__}."
                )
