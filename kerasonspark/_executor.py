"""Executor side: what runs inside a Spark task (or a worker thread of :mod:`kerasonspark.testing`).

TensorFlow set-up, the model cache, the multi-step runner, the worker loop every engine shares,
and the task bodies for training, evaluation and prediction. Nothing here serves or launches:
this module imports no Flask, no trainer, no cluster code.

Each Spark task is one worker. It sizes TensorFlow's thread pools to the task's cores (two
single-threaded workers on two cores train 1.26x faster than one process on both; with default
pools they fight and fall to 0.63x), rebuilds the model once per Python worker (Spark reuses
Python workers, so the ~2 s TensorFlow import and the rebuild happen once), and trains its
partition. Every few steps it calls its engine's :class:`Exchange`, which is all that differs
between synchronous averaging and the asynchronous rules.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import secrets
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ._config import ResourceConfig
from ._data import Block, DataInfo, class_weighted, concatenate
from ._errors import ConfigurationError, DataError, WorkerError
from ._serialization import ModelSpec, get_flat_weights, set_flat_weights
from .engine import Exchange, WorkerReport
from .parameter_server.client import ParameterClient

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

_MODEL_CACHE: OrderedDict[str, keras.Model] = OrderedDict()
_MODEL_CACHE_SIZE = 2
_TENSORFLOW_THREADS: int | None = None
_DEVICES: dict[str, Any] = {}  # what configure_tensorflow started TensorFlow on
_DEVICE_NOTES: list[str] = []  # what a worker logs once it forwards its log to the driver


def task_cores() -> int:
    """CPU cores Spark gave the current task (1 outside a task)."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    try:
        return max(1, int(ctx.cpus())) if ctx is not None else 1
    except Exception:  # older Spark without TaskContext.cpus()
        return 1


def tune_allocator() -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the kernel.

    Each exchange allocates several 4 MB arrays; with glibc's defaults each one is a fresh mmap
    whose pages fault in on first touch, which made subtracting two weight vectors 3x slower
    than copying one. Applied in Spark's Python workers only (processes kerasonspark drives),
    never in the user's driver. Returns whether it applied (glibc only).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 64 << 20) and libc.mallopt(m_trim_threshold, 512 << 20)
        return bool(ok and libc.mallopt(m_top_pad, 64 << 20))
    except (OSError, AttributeError):
        return False


def task_gpus() -> list[str]:
    """The GPU addresses Spark gave the current task (``TaskContext.resources()["gpu"]``); none
    outside a task or where the task was given no GPU."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return []
    try:
        gpu = ctx.resources().get("gpu")
    except Exception:  # a context without resources
        return []
    return list(gpu.addresses) if gpu is not None else []


def cuda_visible_devices(addresses: list[str], inherited: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a task given the GPUs ``addresses``, as TorchDistributor sets
    it: where the executor already has a ``CUDA_VISIBLE_DEVICES`` (``inherited``: YARN and
    Kubernetes set one), each address is an index into it.

    Raises:
        ConfigurationError: an address is not a CUDA device index, or points past ``inherited``.
    """
    if not all(a.isdigit() and (a == "0" or not a.startswith("0")) for a in addresses):
        raise ConfigurationError(
            f"Spark gave this task the GPU addresses {addresses}; CUDA_VISIBLE_DEVICES needs "
            "device indices (0, 1, ...): make the discovery script report those."
        )
    if not inherited:
        return ",".join(addresses)
    visible = [d.strip() for d in inherited.split(",")]
    outside = [a for a in addresses if int(a) >= len(visible)]
    if outside:
        raise ConfigurationError(
            f"Spark gave this task the GPU addresses {addresses}, but the executor's "
            f"CUDA_VISIBLE_DEVICES={inherited!r} holds {len(visible)} devices: the discovery "
            "script must report indices into it."
        )
    return ",".join(visible[int(a)] for a in addresses)


def configure_tensorflow(resources: ResourceConfig | None = None, phase: str = "training") -> None:
    """Start TensorFlow in this process on the task's devices, with pools sized to its cores;
    effective only before TensorFlow first runs.

    Args:
        resources: the worker's :class:`~kerasonspark.ResourceConfig`. ``worker_threads``:
            ``None`` means the cores Spark gave the task, 0 leaves TensorFlow's defaults.
            ``devices="auto"`` pins the GPUs Spark gave the task (``CUDA_VISIBLE_DEVICES``,
            memory growth; a task given none sees what its executor sees); ``"cpu"`` hides
            every GPU.
        phase: what started TensorFlow (``"training"``, ``"warm-up"``, ``"inference"``), for
            :func:`device_figures`.

    Call it before anything else touches TensorFlow in this process. Later calls change
    nothing: TensorFlow cannot resize a running pool nor move to other devices (a later task
    given other GPUs is told so once, in the log and in :func:`device_figures`).
    """
    global _TENSORFLOW_THREADS
    resources = resources or ResourceConfig()
    gpus = task_gpus() if resources.devices == "auto" else []
    if _TENSORFLOW_THREADS is not None:
        _check_pin(gpus)
        return
    threads = task_cores() if resources.worker_threads is None else resources.worker_threads
    tune_allocator()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(
            gpus, os.environ.get("CUDA_VISIBLE_DEVICES")
        )
    elif resources.devices == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    with native_start_up_lines_held():
        import tensorflow as tf

        found = tf.config.list_physical_devices("GPU")  # the CUDA probe prints here
    for device in found:
        try:
            tf.config.experimental.set_memory_growth(device, True)
        except (RuntimeError, ValueError):
            logger.debug("TensorFlow already initialised %s; keeping its memory policy", device)
    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        logger.debug("TensorFlow already initialised in this process; keeping its thread pools")
    _TENSORFLOW_THREADS = threads
    _DEVICES.update(
        spark_gpus=gpus,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        device=f"GPU x{len(found)}" if found else "CPU",
        started_by=phase,
    )
    if gpus and not found:
        _DEVICE_NOTES.append(
            f"Spark gave this task GPU {','.join(gpus)}, but TensorFlow finds no GPU (a CPU-only "
            "build, or no CUDA driver): it runs on the CPU."
        )


def _check_pin(gpus: list[str]) -> None:
    """Tell, once per address set, that this process's TensorFlow keeps the devices it started
    on although this task was given ``gpus``."""
    pinned = _DEVICES.get("spark_gpus", [])
    if not gpus or gpus == pinned or _DEVICES.get("moved_from") == gpus:
        return
    _DEVICES["moved_from"] = gpus
    _DEVICE_NOTES.append(
        f"This Python worker's TensorFlow started on GPU {','.join(pinned) or 'none'}; Spark gave "
        f"this task GPU {','.join(gpus)}. TensorFlow cannot change devices in a running process, "
        "so it stays where it started: set spark.python.worker.reuse=false, or give each "
        "executor one GPU, for tasks to always run on their own."
    )


def device_figures() -> dict[str, Any]:
    """What this process's TensorFlow runs on: the GPUs Spark gave the task that started it
    (``spark_gpus``), the ``CUDA_VISIBLE_DEVICES`` it set, the ``device`` TensorFlow found, what
    started it (``started_by``), and where a later task was given other GPUs, the current
    task's (``assigned_gpus``)."""
    from pyspark import TaskContext

    if TaskContext.get() is None:  # threads of one process (kerasonspark.testing) tell nothing
        return {}
    figures = {k: v for k, v in _DEVICES.items() if k != "moved_from"}
    current = task_gpus()
    if current and current != figures.get("spark_gpus"):
        figures["assigned_gpus"] = current
    return figures


@contextlib.contextmanager
def native_start_up_lines_held() -> Iterator[None]:
    """Hold what native code writes to stderr while TensorFlow starts; print it only on failure.

    TensorFlow's C++ start-up lines (oneDNN notice, CUDA probes on a machine without a GPU) come
    before its logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` does not silence them, and
    every Spark worker would print them into the driver's console.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cached_model(key: str, spec_bytes: bytes, custom_objects: dict[str, Any]) -> keras.Model:
    """The model for ``key``, rebuilt from ``spec_bytes`` only the first time in this process."""
    model = _MODEL_CACHE.get(key)
    if model is None:
        model = ModelSpec.from_bytes(spec_bytes, custom_objects).build()
        _MODEL_CACHE[key] = model
        while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
            _MODEL_CACHE.popitem(last=False)
    _MODEL_CACHE.move_to_end(key)
    return model


class LocalSteps:
    """Runs a run of training steps in one TensorFlow call.

    Calling the compiled step once per batch costs about 1.6 ms of dispatch per step on one
    thread; looping inside the graph trains the reference CNN 14% faster. The function is traced
    (and the optimizer and metrics built) on a dummy batch ahead of training, then the model's
    weights and the optimizer's state are put back, so the first real step starts fresh.
    """

    def __init__(self, model: keras.Model, info: DataInfo) -> None:
        import keras
        import tensorflow as tf

        self.model, self.info = model, info
        label_shape = info.label_shape
        # several outputs: packed float32
        label_dtype = tf.int32 if info.label_mode == "sparse" else tf.float32
        self.graph = keras.backend.backend() == "tensorflow"
        if self.graph:
            # Sample weights always go in (ones when the data has none: the same loss and metrics),
            # so one traced function serves weighted and unweighted data.
            @tf.function(
                input_signature=[
                    tf.TensorSpec((None, None, *info.input_shape), tf.float32),
                    tf.TensorSpec((None, None, *label_shape), label_dtype),
                    tf.TensorSpec((None, None), tf.float32),
                ]
            )
            def train_run(xs, ys, ws):
                for i in tf.range(tf.shape(xs)[0]):
                    model.train_step((info.model_inputs(xs[i]), info.model_targets(ys[i]), ws[i]))
                return tf.shape(xs)[0]

            self._train_run = train_run
        self._trace(label_shape)

    def _trace(self, label_shape: tuple[int, ...]) -> None:
        model = self.model
        weights = [v.numpy() for v in model.weights]
        model.optimizer.build(model.trainable_variables)
        fresh = [v.numpy() for v in model.optimizer.variables]
        x = np.zeros((2, *self.info.input_shape), np.float32)
        y = self.info.model_labels(np.zeros((2, *label_shape), np.float32))
        # builds the metrics
        model.train_on_batch(self.info.model_inputs(x), self.info.model_targets(y))
        if self.graph:
            self._train_run(x[None], y[None], np.ones((1, 2), np.float32))
        for variable, value in zip(model.weights, weights, strict=True):
            variable.assign(value)
        self._fresh_optimizer = fresh
        self.reset_optimizer()
        model.reset_metrics()

    def reset_optimizer(self) -> None:
        """Put the optimizer's state (moments, step count, rate) back as it was built."""
        for variable, value in zip(
            self.model.optimizer.variables, self._fresh_optimizer, strict=True
        ):
            variable.assign(value)

    def run(
        self,
        x: np.ndarray,
        y: np.ndarray,
        index: np.ndarray,
        batch_size: int,
        weights: np.ndarray | None = None,
        max_rows: int | None = None,
    ) -> None:
        """Train one step per ``batch_size`` samples of ``index`` (the last step may be smaller),
        each sample's loss scaled by its weight in ``weights`` (as ``model.fit(sample_weight=)``),
        gathering at most ``max_rows`` rows (rounded down to whole batches) at a time."""
        if max_rows is not None and len(index) > max_rows:
            chunk = max(1, max_rows // batch_size) * batch_size
            for start in range(0, len(index), chunk):
                self.run(x, y, index[start : start + chunk], batch_size, weights)
            return
        full = len(index) // batch_size * batch_size
        w = weights[index] if weights is not None else np.ones(len(index), np.float32)
        if not self.graph:
            for start in range(0, len(index), batch_size):
                part = index[start : start + batch_size]
                self.model.train_function(
                    iter(
                        [
                            (
                                self.info.model_inputs(x[part]),
                                self.info.model_targets(y[part]),
                                w[start : start + batch_size],
                            )
                        ]
                    )
                )
            return
        if full:
            head = index[:full]
            self._train_run(
                x[head].reshape(-1, batch_size, *x.shape[1:]),
                y[head].reshape(-1, batch_size, *y.shape[1:]),
                w[:full].reshape(-1, batch_size),
            )
        if full < len(index):
            tail = index[full:]
            self._train_run(x[tail][None], y[tail][None], w[full:][None])

    def metrics(self) -> dict[str, float]:
        """The running means of the loss and metrics since the last ``reset_metrics``."""
        return _metric_logs(self.model.get_metrics_result())


_STEPS: dict[str, LocalSteps] = {}


def training_model(
    run_id: str, spec_bytes: bytes, custom_objects: dict[str, Any], info: DataInfo
) -> LocalSteps:
    """This run's model with its traced multi-step function, built once per Python worker.

    Traced again only when ``info`` differs from the warm-up's (a loss of the user's own, whose
    labels' shape and dtype are read off the data after the warm-up ran).
    """
    model = cached_model(run_id, spec_bytes, custom_objects)
    steps = _STEPS.get(run_id)
    if steps is None or steps.model is not model or steps.info != info:
        _STEPS.clear()  # one training run at a time per Python worker
        steps = _STEPS[run_id] = LocalSteps(model, info)
    return steps


def inference_model(
    spec_bytes: bytes, custom_objects: dict[str, Any], resources: ResourceConfig, version: str
) -> keras.Model:
    """The model of ``spec_bytes`` with its weights, for evaluate and predict tasks.

    Built once per Python worker per model ``version`` (a digest of ``spec_bytes`` the driver
    computes once): the tasks of one prediction reuse the model without setting weights again.
    """
    configure_tensorflow(resources, "inference")
    return cached_model(f"inference-{version}", spec_bytes, custom_objects)


def warm_up(
    spec_broadcast: Any,
    custom_objects: dict[str, Any],
    run_id: str,
    info: DataInfo,
    resources: ResourceConfig,
) -> None:
    """Import TensorFlow with the right pools, build this run's model and trace its training
    function, ahead of training (it runs while the data is scanned).

    Skipped in a task that Spark gave GPUs: TensorFlow would take the data pass's GPUs for the
    life of this Python worker, and the training task it later runs may own others.
    """
    if resources.devices == "auto" and task_gpus() and _TENSORFLOW_THREADS is None:
        return
    configure_tensorflow(resources, "warm-up")
    training_model(run_id, spec_broadcast.value, custom_objects, info)


@dataclass(frozen=True)
class WorkerSettings:
    """The small, picklable part of a training job that every worker needs."""

    run_id: str
    epochs: int
    batch_size: int
    num_workers: int
    seed: int | None
    info: DataInfo
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    initial_epoch: int = 0
    class_weight: tuple[float, ...] | None = None
    streamed: bool = False
    buffer_rows: int = 16_384


class _ForwardedLogs(logging.Handler):
    """Collects the warnings of kerasonspark's loggers on this worker's thread, for the driver's
    log."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.lines: deque[str] = deque(maxlen=50)

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    def take(self) -> list[str]:
        lines = list(self.lines)
        self.lines.clear()
        return lines


@dataclass(frozen=True)
class EpochDecision:
    """What the driver decided at an epoch boundary: stop, the learning rate its callbacks set,
    and with ``balance_workers`` the steps this worker trains next epoch (``None``: its own)."""

    stop: bool
    learning_rate: float | None
    steps: int | None = None


class EpochGate:
    """A worker's line to the driver: progress reports, the epoch boundary, the driver's decisions.

    Created on the driver (it travels in the Spark task), used by one worker over its own
    connection to the parameter server.

    Args:
        url: the parameter server's base URL.
        secret: the run's secret.
        validation_freq: score the center after every ``validation_freq``-th epoch.
        learning_rate: the rate to train the first epoch with (callbacks may have set it), or
            ``None`` to keep the optimizer's.
        terminate_on_nan: stop at once when the running loss is not finite
            (``keras.callbacks.TerminateOnNaN`` is among the callbacks).
        progress_interval: seconds between two progress reports.
        timeout: seconds a request may wait (the epoch boundary waits for the slowest worker).
        first_epoch: the epoch a restarted stage resumes in (``None``: the run's first).
        resume: per worker, the exchanges the center already holds; a restarted worker skips the
            runs of steps they came from, so it resumes at its place in its epoch's order.
    """

    def __init__(
        self,
        url: str,
        secret: bytes,
        validation_freq: int = 1,
        learning_rate: float | None = None,
        terminate_on_nan: bool = False,
        progress_interval: float = 1.0,
        timeout: float = 86_400.0,
        first_epoch: int | None = None,
        resume: Mapping[int, int] | None = None,
    ) -> None:
        self.url, self.secret, self.timeout = url, secret, timeout
        self.first_epoch, self.resume = first_epoch, dict(resume or {})
        self.stage = secrets.token_hex(8)  # each training stage's gates share it
        self.validation_freq, self.learning_rate = validation_freq, learning_rate
        self.terminate_on_nan, self.progress_interval = terminate_on_nan, progress_interval
        self.seconds = 0.0
        self._client: ParameterClient | None = None
        self._logs: _ForwardedLogs | None = None
        self._last_report = 0.0
        self._position: tuple[int, int, int, Callable[[], dict[str, float]]] | None = None
        self.worker = -1
        self.stop_requested = False  # a progress report's answer said the driver stops the run

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_logs": None, "_position": None}

    @property
    def client(self) -> ParameterClient:
        if self._client is None:
            raise RuntimeError("The epoch gate was used before start().")
        return self._client

    def start(self, worker: int) -> None:
        """Open the worker's connection and start forwarding its warnings."""
        self.worker = worker
        self._client = ParameterClient(
            self.url, self.secret, worker, timeout=self.timeout, timeout_name="epoch_timeout"
        )
        self._client.post_json("/v1/epochs/join", {"stage": self.stage})
        self._logs = _ForwardedLogs()
        logging.getLogger("kerasonspark").addHandler(self._logs)
        self._last_report = 0.0  # the first exchange reports at once

    def validates(self, epoch: int) -> bool:
        """Whether the center is scored at the end of ``epoch`` (``validation_freq`` as in
        Keras)."""
        return (epoch + 1) % self.validation_freq == 0

    def progress(
        self,
        epoch: int,
        samples: int,
        steps: int,
        metrics: Callable[[], dict[str, float]],
        force: bool = False,
    ) -> None:
        """Report progress in ``epoch``, at most once per ``progress_interval`` unless ``force``."""
        self._position = (epoch, samples, steps, metrics)
        now = time.monotonic()
        if not force and now - self._last_report < self.progress_interval:
            return
        self._last_report = now
        self._position = None
        logs = self._logs.take() if self._logs is not None else []
        reply = self.client.post_json(
            "/v1/progress",
            {
                "epoch": epoch,
                "samples": samples,
                "steps": steps,
                "metrics": metrics(),
                "logs": logs,
                "pid": os.getpid(),
            },
        )
        self.stop_requested = self.stop_requested or bool(reply.get("stop"))

    def flush(self) -> None:
        """Report the last position not reported yet (a failing worker's steps trained, so the
        driver counts what the failure lost). Never raises."""
        if self._position is None or self._client is None:
            return
        try:
            self.progress(*self._position, force=True)
        except Exception:  # the worker is already failing; its own error is what matters
            pass

    def end_epoch(
        self,
        epoch: int,
        samples: int,
        metrics: dict[str, float],
        want_center: bool,
        steps: int = 0,
    ) -> np.ndarray | None:
        """Arrive at the end of ``epoch`` after ``steps`` steps and wait for every worker; the
        epoch's center if wanted."""
        started = time.perf_counter()
        if self._logs is not None and self._logs.lines:
            self.progress(epoch, samples, 0, lambda: metrics, force=True)
        center = self.client.end_epoch(epoch, samples, metrics, want_center, steps)
        self.seconds += time.perf_counter() - started
        return center

    def ready(
        self,
        epoch: int,
        rows: int,
        scores: dict[str, float],
        learning_rate: float | None,
        rows_per_second: float | None = None,
    ) -> EpochDecision:
        """Report the center's scores on this worker's validation rows, and the rows per second it
        computed this epoch; wait for the driver's decision."""
        started = time.perf_counter()
        reply = self.client.post_json(
            f"/v1/epochs/{epoch}/ready",
            {
                "rows": rows,
                "scores": scores,
                "learning_rate": learning_rate,
                "rows_per_second": rows_per_second,
            },
        )
        self.seconds += time.perf_counter() - started
        steps = (reply.get("steps") or {}).get(str(self.worker))
        return EpochDecision(bool(reply.get("stop")), reply.get("learning_rate"), steps)

    def close(self) -> None:
        """Stop forwarding warnings and close the connection."""
        if self._logs is not None:
            logging.getLogger("kerasonspark").removeHandler(self._logs)
            self._logs = None
        if self._client is not None:
            self._client.close()
            self._client = None


def learning_rate_of(model: keras.Model) -> float | None:
    """The optimizer's current learning rate, or ``None`` when a schedule computes it per step."""
    import keras

    optimizer = model.optimizer
    if isinstance(
        getattr(optimizer, "_learning_rate", None), keras.optimizers.schedules.LearningRateSchedule
    ):
        return None
    return float(np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate)))


def set_learning_rate(model: keras.Model, rate: float | None) -> None:
    """Set the optimizer's learning rate (the traced training function reads it as a variable)."""
    if rate is not None and learning_rate_of(model) is not None:
        model.optimizer.learning_rate = rate


def _metric_logs(logs: dict[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in logs.items() if np.asarray(v).ndim == 0}


def validation_share(
    validation: tuple[np.ndarray, np.ndarray] | None, worker: int, settings: WorkerSettings
) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows of the validation set that ``worker`` scores: every ``num_workers``-th, from its
    id."""
    if validation is None:
        return None
    vx, vy = validation
    share = slice(worker, None, settings.num_workers)
    return vx[share], settings.info.model_labels(vy[share])


def _score(
    model: keras.Model,
    weights: np.ndarray | None,
    validation: tuple[np.ndarray, np.ndarray],
    batch_size: int,
    info: DataInfo,
) -> dict[str, float]:
    """Loss and metrics on ``validation`` (packed features, model labels) of ``weights`` (the
    model's own when ``None``); the model's weights are left as they were."""
    local = None
    if weights is not None:
        local = get_flat_weights(model)
        set_flat_weights(model, weights)
    try:
        return _metric_logs(
            model.evaluate(
                info.model_inputs(validation[0]),
                info.model_targets(validation[1]),
                batch_size=max(batch_size, 256),
                verbose=0,
                return_dict=True,
            )
        )
    finally:
        if local is not None:
            set_flat_weights(model, local)


def train_worker(
    worker: int,
    steps_runner: LocalSteps,
    x: np.ndarray,
    y: np.ndarray,
    settings: WorkerSettings,
    exchange: Exchange,
    validation: tuple[np.ndarray, np.ndarray] | None,
    gate: EpochGate | None = None,
    weights: np.ndarray | None = None,
) -> WorkerReport:
    """The worker loop every engine shares: shuffle, train runs of local steps, exchange, meet the
    driver.

    Each epoch visits every row of ``x`` once in a fresh order (seeded by ``settings.seed`` plus
    the worker id), in runs of steps that ``exchange.schedule`` cuts; ``exchange.exchange`` follows
    every run, also an empty one, so workers with fewer rows still meet the others. With a
    ``gate`` the worker reports progress as it trains, and at each epoch boundary waits for the
    others, scores the epoch's center on its validation rows and takes the driver's decision
    (stop, a new learning rate). Without one (an engine that trains without the parameter
    server), it scores its own model after each epoch.

    Args:
        steps_runner: the worker's model with its multi-step training function.
        x: features; ``y``: labels as the model's loss takes them.
        validation: this worker's share of the validation set, or ``None``.
        gate: the worker's line to the driver, or ``None``.
        weights: each row's sample weight, or ``None`` (every row weighs 1).
    """
    model = steps_runner.model
    weights = class_weighted(y, weights, settings.class_weight)
    n = len(x)
    rng = np.random.default_rng(None if settings.seed is None else settings.seed + worker)
    batch = settings.batch_size
    steps = math.ceil(n / batch)
    first_epoch, skip = settings.initial_epoch, 0
    if gate is not None:
        gate.start(worker)  # first: warnings from the exchange's start reach the driver too
    while _DEVICE_NOTES:
        logger.warning(_DEVICE_NOTES.pop(0))
    if gate is not None:
        # The center of this moment (the start, or where a restarted stage resumes), with a fresh
        # optimizer: a restarted worker's optimizer state is not kept.
        set_flat_weights(model, gate.client.center())
        steps_runner.reset_optimizer()
        set_learning_rate(model, gate.learning_rate)
        first_epoch = gate.first_epoch if gate.first_epoch is not None else first_epoch
        skip = gate.resume.get(worker, 0)
    exchange.start(model, worker)
    scaling = exchange.lr_scaling
    # The rate the optimizer and the driver's callbacks set; the engine's scaling multiplies it.
    base_rate = learning_rate_of(model) if gate is not None or scaling is not None else None
    report = WorkerReport(
        worker, n, 0, 0.0, val_samples=len(validation[0]) if validation is not None else 0
    )
    rates: list[float | None] = []
    shares: list[int] = []  # steps trained each epoch, where the driver balanced them
    planned = steps  # this epoch's steps: the partition's, until the driver balances them
    started = time.perf_counter()
    for epoch in range(settings.initial_epoch, settings.epochs):
        # drawn for skipped epochs too, so a resumed epoch keeps its order
        order = rng.permutation(n)
        if planned != steps:
            order = balanced_order(order, planned * batch, rng)
        schedule = exchange.schedule(planned, epoch)
        if epoch < first_epoch:
            skip -= len(schedule)
            continue
        model.reset_metrics()
        rates.append(base_rate if gate is not None else None)
        step, stopped, computing = 0, False, 0.0
        for run in schedule:
            index = order[step * batch : (step + run) * batch]
            step += run
            if skip > 0:  # the center holds this run's exchange already
                skip -= 1
                continue
            if scaling is not None and base_rate is not None:
                set_learning_rate(model, base_rate * scaling.multiplier(report.steps))
            if len(index):
                began = time.perf_counter()
                steps_runner.run(
                    x, y, index, batch, weights, settings.buffer_rows if settings.streamed else None
                )
                computing += time.perf_counter() - began
            report.steps += run
            done = min(step * batch, len(order))
            if gate is not None:
                if gate.terminate_on_nan and len(index) and not _finite_loss(steps_runner):
                    # the driver stops every worker
                    gate.progress(epoch, done, step, steps_runner.metrics, force=True)
                    exchange.announce_stop()
                    stopped = True
                    break
                # before the exchange: steps trained
                gate.progress(epoch, done, step, steps_runner.metrics)
                if gate.stop_requested:
                    exchange.announce_stop()
            exchange.exchange(model, len(index))
            if exchange.should_stop():
                stopped = True
                break
        if step != planned and not stopped:
            raise RuntimeError(
                f"The exchange scheduled {step} steps for an epoch of {planned}; "
                "`Exchange.schedule` must return runs that add up to `steps`."
            )
        exchange.end_epoch(model, epoch)
        metrics = steps_runner.metrics() if n else {}
        report.history.append(metrics)
        if gate is None:
            if report.val_samples and validation is not None:
                report.val_history.append(_score(model, None, validation, batch, settings.info))
            continue
        trained = min(step * batch, len(order))
        center = gate.end_epoch(
            epoch, trained, metrics, want_center=stopped or not exchange.holds_center, steps=step
        )
        rows, scores = 0, {}
        if report.val_samples and validation is not None and gate.validates(epoch):
            rows, scores = (
                report.val_samples,
                _score(model, center, validation, batch, settings.info),
            )
            report.val_history.append(scores)
        if center is not None:
            exchange.epoch_center(model, center)
        decision = gate.ready(
            epoch, rows, scores, rates[-1], trained / computing if computing > 0 else None
        )
        if decision.stop or stopped:
            break
        if decision.learning_rate is not None:
            base_rate = decision.learning_rate
            set_learning_rate(model, base_rate)
        if decision.steps is not None:
            planned = decision.steps
            shares.append(planned)
    report.seconds = time.perf_counter() - started
    report.figures.update(exchange.finish(model))
    # the most memory this Python worker has held (a reused worker's earlier tasks included)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    report.figures["peak_rss_mb"] = round(peak / (1e6 if sys.platform == "darwin" else 1e3))
    if devices := device_figures():
        report.figures["device"] = devices
    if gate is not None:
        report.figures.update(learning_rates=rates, epoch_gate_seconds=gate.seconds)
    if shares:
        report.figures["balanced_steps"] = shares
    return report


def balanced_order(order: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """The first ``rows`` rows of ``order`` followed, where it is too short, by fresh permutations
    of the partition (a worker given more steps than its rows fill visits some rows twice)."""
    n = len(order)
    if rows <= n or not n:
        return order[:rows]
    return np.concatenate([order, *(rng.permutation(n) for _ in range(-(-rows // n) - 1))])[:rows]


def _finite_loss(steps_runner: LocalSteps) -> bool:
    loss = steps_runner.metrics().get("loss")
    return loss is None or math.isfinite(loss)


def guarded(
    worker: int, exchange: Exchange, body: Callable[[], WorkerReport], gate: EpochGate | None = None
) -> WorkerReport:
    """Run a worker's ``body``; on failure tell the others (through the exchange) and raise a
    :class:`WorkerError` naming the worker, with its traceback's tail. Closes the exchange and
    the gate."""
    try:
        return body()
    except BaseException as exc:
        detail = "".join(traceback.format_exception(exc))[-3000:]
        if gate is not None:
            gate.flush()
        exchange.report_failure(f"{type(exc).__name__}: {exc}\n{detail}")
        if isinstance(exc, WorkerError):
            raise
        if isinstance(exc, Exception):
            raise WorkerError(
                f"Worker {worker} failed: {type(exc).__name__}: {exc}", worker, detail
            ) from exc
        raise
    finally:
        exchange.close()
        if gate is not None:
            gate.close()


def train_partition(
    blocks: Iterable[Any],
    spec_broadcast: Any,
    custom_objects: dict[str, Any],
    settings: WorkerSettings,
    exchange: Exchange,
    validation: Any,
    gate: EpochGate | None = None,
    paired: bool = False,
) -> Iterator[WorkerReport]:
    """The body of one barrier task: train this partition; yields the worker's report.

    With ``paired`` the partition comes as ``(held_out, block)`` pairs, its validation blocks
    among them (the validation data stayed on the executors); otherwise ``validation`` is a
    share of the driver's validation arrays or ``None``.
    """
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is None:
        raise RuntimeError("train_partition runs inside a Spark task.")
    worker = context.partitionId()
    held_out: list[Block] = []

    def training_blocks() -> Iterator[Block]:
        for flagged, block in cast("Iterable[tuple[bool, Block]]", blocks):
            if flagged:
                held_out.append(block)
            else:
                yield block

    def body() -> WorkerReport:
        configure_tensorflow(settings.resources, "training")
        steps_runner = training_model(
            settings.run_id, spec_broadcast.value, custom_objects, settings.info
        )
        training = training_blocks() if paired else cast("Iterable[Block]", blocks)
        if settings.streamed:
            # each worker writes its partition to its executor's disk, one block at a time
            x, y, weights = open_spilled(
                next(spill_partition(settings.info, training)), settings.info
            )
        else:
            x, y, weights = concatenate_blocks(training, settings.info)
        share: tuple[np.ndarray, np.ndarray] | None
        if paired:
            vx, vy, _ = concatenate_blocks(held_out, settings.info)
            share = (vx, vy)
        else:
            share = validation_share(
                validation.value if validation is not None else None, worker, settings
            )
        return train_worker(worker, steps_runner, x, y, settings, exchange, share, gate, weights)

    yield guarded(worker, exchange, body, gate)


def partition_rows(blocks: Iterable[Block]) -> Iterator[int]:
    """A partition's row count (a task body: it runs on the executors, so it lives here)."""
    yield sum(len(block[0]) for block in blocks)


@dataclass(frozen=True)
class SpilledPartition:
    """Where :func:`spill_partition` wrote a partition, and the layout of its arrays."""

    directory: str
    rows: int
    label_dtype: str
    label_shape: tuple[int, ...]
    weighted: bool


def spill_partition(info: DataInfo, blocks: Iterable[Block]) -> Iterator[SpilledPartition]:
    """Write a partition's blocks, one at a time, to files on the executor's local disk (Spark's
    local directories); yields the one :class:`SpilledPartition` that says where.

    A streamed worker's memory stays flat in its partition's size: it holds one block while it
    writes, then maps the files (:func:`open_spilled`) and gathers rows batch by batch.
    Labels are written as the model's loss takes them; weights as ones where a block has none.
    """
    root = (os.environ.get("SPARK_LOCAL_DIRS") or tempfile.gettempdir()).split(",")[0]
    directory = tempfile.mkdtemp(prefix="kerasonspark-spill-", dir=root)
    empty = info.model_labels(np.zeros(0, np.int32))
    rows, weighted, label_dtype, label_shape = 0, False, str(empty.dtype), tuple(empty.shape[1:])
    try:
        with (
            open(os.path.join(directory, "x"), "wb") as xs,
            open(os.path.join(directory, "y"), "wb") as ys,
            open(os.path.join(directory, "w"), "wb") as ws,
        ):
            for x, y, w in blocks:
                if not len(x):
                    continue
                labels = info.model_labels(y)
                xs.write(np.ascontiguousarray(x, np.float32).data)
                ys.write(np.ascontiguousarray(labels).data)
                ws.write(
                    np.ascontiguousarray(w if w is not None else np.ones(len(x)), np.float32).data
                )
                rows, weighted = rows + len(x), weighted or w is not None
                label_dtype, label_shape = str(labels.dtype), tuple(labels.shape[1:])
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    yield SpilledPartition(directory, rows, label_dtype, label_shape, weighted)


def open_spilled(part: SpilledPartition, info: DataInfo) -> Block:
    """The arrays of a spilled partition, mapped from their files; the files are removed at once
    (the mappings keep them readable), so nothing is left behind when the worker ends.

    Mapped pages belong to the kernel's page cache, not the worker's heap: the kernel keeps
    them while memory allows and reads them again from disk when it does not.
    """
    try:
        if not part.rows:
            return (
                np.zeros((0, *info.input_shape), np.float32),
                np.zeros((0, *part.label_shape), part.label_dtype),
                None,
            )
        path = partial(os.path.join, part.directory)
        x = np.memmap(path("x"), np.float32, "r", shape=(part.rows, *info.input_shape))
        y = np.memmap(
            path("y"), np.dtype(part.label_dtype), "r", shape=(part.rows, *part.label_shape)
        )
        w = np.memmap(path("w"), np.float32, "r", shape=(part.rows,)) if part.weighted else None
        return x, y, w
    finally:
        shutil.rmtree(part.directory, ignore_errors=True)


def concatenate_blocks(blocks: Iterable[Block], info: DataInfo) -> Block:
    """A partition's blocks as one ``(x, y, w)`` triple, labels as the model's loss takes them."""
    parts = list(blocks)
    if not any(len(b[0]) for b in parts):
        return (
            np.zeros((0, *info.input_shape), np.float32),
            info.model_labels(np.zeros(0, np.int32)),
            None,
        )
    x, y, w = concatenate(parts)
    return x, info.model_labels(y), w


def evaluate_partition(
    blocks: Iterable[Block],
    spec_broadcast: Any,
    custom_objects: dict[str, Any],
    info: DataInfo,
    resources: ResourceConfig,
    batch_size: int,
    version: str,
) -> Iterator[tuple[int, dict[str, float]]]:
    """The body of one evaluation task: ``(rows, scores)`` for each non-empty block."""
    model = inference_model(spec_broadcast.value, custom_objects, resources, version)
    for x, y, w in blocks:
        if len(x):
            scores = model.evaluate(
                info.model_inputs(x),
                info.model_targets(info.model_labels(y)),
                sample_weight=w,
                batch_size=batch_size,
                verbose=0,
                return_dict=True,
            )
            yield len(x), _metric_logs(scores)


def prediction_arrays(out: np.ndarray, kind: str) -> list[Any]:
    """The model's outputs for a batch (rows x width) as the Arrow columns of prediction ``kind``.

    ``"array"``: one ``array<float>`` column of the raw outputs. ``"class"``: the predicted class
    index (double) and the class probabilities (``array<double>``). ``"binary"``: for one sigmoid
    output, the class (p >= 0.5) and ``[1 - p, p]``. ``"value"``: one double per row (a one-wide
    output), or the outputs as ``array<double>``.
    """
    import pyarrow as pa

    def lists(values: np.ndarray) -> Any:
        offsets = np.arange(0, values.size + 1, values.shape[1], dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.ravel()))

    if kind == "array":
        return [lists(out.astype(np.float32, copy=False))]
    out = out.astype(np.float64)
    if kind == "class":
        return [pa.array(out.argmax(axis=1).astype(np.float64)), lists(out)]
    if kind == "binary":
        p = out[:, :1]
        return [pa.array((p[:, 0] >= 0.5).astype(np.float64)), lists(np.hstack([1.0 - p, p]))]
    if kind == "value":
        return [pa.array(out[:, 0]) if out.shape[1] == 1 else lists(out)]
    raise ValueError(f"Unknown prediction kind {kind!r}.")


def output_sizes(model: keras.Model) -> list[int]:
    """Values of one sample's prediction, per output of ``model``."""
    shapes = (
        [tuple(t.shape) for t in model.outputs]
        if getattr(model, "outputs", None)
        else [tuple(model.output_shape)]
    )
    return [math.prod(int(d) for d in shape[1:]) for shape in shapes]


def predict_rows(model: keras.Model, x: np.ndarray, batch_size: int, info: DataInfo) -> np.ndarray:
    """``model.predict`` of packed features ``x`` by ``predict_on_batch`` on slices of
    ``batch_size`` rows: 11 % more rows/s than ``predict`` for the reference CNN on one thread (it
    skips the data adapter and callbacks). Several outputs come side by side, flattened, in
    ``model.output_names``' order."""
    if not len(x):
        return np.zeros((0, sum(output_sizes(model))), np.float32)

    def one(batch: np.ndarray) -> np.ndarray:
        out = model.predict_on_batch(info.model_inputs(batch))
        if isinstance(out, dict):
            out = [out[name] for name in model.output_names]
        if isinstance(out, (list, tuple)):
            return np.concatenate([np.asarray(o).reshape(len(batch), -1) for o in out], axis=1)
        return np.asarray(out)

    return np.concatenate([one(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def predict_batches(
    arrays: Iterable[Any],
    spec_bytes: bytes,
    custom_objects: dict[str, Any],
    info: DataInfo,
    resources: ResourceConfig,
    batch_size: int,
    outputs: list[str],
    kind: str,
    version: str,
) -> Iterator[Any]:
    """The body of a prediction UDF: for each Arrow array of feature lists, the model's outputs as
    a struct array of the fields ``outputs`` (see :func:`prediction_arrays` for each ``kind``; a
    model with several outputs gives one ``"array"`` field each)."""
    import pyarrow as pa

    model = inference_model(spec_bytes, custom_objects, resources, version)
    bounds = np.cumsum([0, *output_sizes(model)])
    for features in arrays:
        rows = len(features)
        x = (
            features.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            if rows
            else np.zeros(0)
        )
        if x.size != rows * info.feature_size or features.null_count:
            raise DataError(
                f"Feature arrays must have {info.feature_size} values each for input shape "
                f"{info.input_shape}."
            )
        out = predict_rows(model, x.reshape((rows, *info.input_shape)), batch_size, info).reshape(
            rows, -1
        )
        if info.outputs:
            columns = [
                prediction_arrays(out[:, a:b], kind)[0]
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
        else:
            columns = prediction_arrays(out, kind)
        yield pa.StructArray.from_arrays(columns, names=outputs)
