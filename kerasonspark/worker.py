"""What runs inside a Spark task: the local training loop every engine shares.

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
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import DataInfo
from .errors import KerasOnSparkError, WorkerError, from_spark_exception
from .parameter_server.client import ParameterClient
from .serialization import ModelSpec, set_flat_weights

if TYPE_CHECKING:
    import keras

    from .engine import TrainingJob

logger = logging.getLogger(__name__)

_MODEL_CACHE: "OrderedDict[str, keras.Model]" = OrderedDict()
_MODEL_CACHE_SIZE = 2
_TENSORFLOW_THREADS: int | None = None


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


def configure_tensorflow(threads: int | None = None) -> None:
    """Size TensorFlow's intra- and inter-op pools; effective only before TensorFlow first runs.

    Args:
        threads: pool size; ``None`` means the cores Spark gave the task, 0 leaves TensorFlow's
            defaults (every core of the machine).

    Call it before anything else touches TensorFlow in this process. Later calls are ignored:
    TensorFlow cannot resize a running pool.
    """
    global _TENSORFLOW_THREADS
    if _TENSORFLOW_THREADS is not None:
        return
    threads = task_cores() if threads is None else threads
    tune_allocator()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    with _native_start_up_lines_held():
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe prints here, not at the first step

    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        logger.debug("TensorFlow already initialised in this process; keeping its thread pools")
    _TENSORFLOW_THREADS = threads


@contextlib.contextmanager
def _native_start_up_lines_held() -> Iterator[None]:
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


def cached_model(key: str, spec_bytes: bytes, custom_objects: dict[str, Any]) -> "keras.Model":
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

    def __init__(self, model: "keras.Model", info: DataInfo) -> None:
        import keras
        import tensorflow as tf

        self.model, self.info = model, info
        label_shape = info.label_shape
        label_dtype = tf.int32 if info.label_mode == "sparse" else tf.float32
        self.graph = keras.backend.backend() == "tensorflow"
        if self.graph:
            @tf.function(input_signature=[tf.TensorSpec((None, None, *info.input_shape), tf.float32),
                                          tf.TensorSpec((None, None, *label_shape), label_dtype)])
            def train_run(xs, ys):
                for i in tf.range(tf.shape(xs)[0]):
                    model.train_step((xs[i], ys[i]))
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
        model.train_on_batch(x, y)  # builds the metrics
        if self.graph:
            self._train_run(x[None], y[None])
        for variable, value in zip(model.weights, weights):
            variable.assign(value)
        for variable, value in zip(model.optimizer.variables, fresh):
            variable.assign(value)
        model.reset_metrics()

    def run(self, x: np.ndarray, y: np.ndarray, index: np.ndarray, batch_size: int) -> None:
        """Train one step per ``batch_size`` samples of ``index`` (the last step may be smaller)."""
        full = len(index) // batch_size * batch_size
        if not self.graph:
            for start in range(0, len(index), batch_size):
                part = index[start:start + batch_size]
                self.model.train_function(iter([(x[part], y[part])]))
            return
        if full:
            head = index[:full]
            self._train_run(x[head].reshape(-1, batch_size, *x.shape[1:]), y[head].reshape(-1, batch_size, *y.shape[1:]))
        if full < len(index):
            tail = index[full:]
            self._train_run(x[tail][None], y[tail][None])

    def metrics(self) -> dict[str, float]:
        """The running means of the loss and metrics since the last ``reset_metrics``."""
        return _metric_logs(self.model.get_metrics_result())


_STEPS: dict[str, LocalSteps] = {}


def training_model(run_id: str, spec_bytes: bytes, custom_objects: dict[str, Any], info: DataInfo) -> LocalSteps:
    """This run's model with its traced multi-step function, built once per Python worker."""
    model = cached_model(run_id, spec_bytes, custom_objects)
    steps = _STEPS.get(run_id)
    if steps is None or steps.model is not model:
        _STEPS.clear()  # one training run at a time per Python worker
        steps = _STEPS[run_id] = LocalSteps(model, info)
    return steps


def inference_model(spec_bytes: bytes, custom_objects: dict[str, Any], threads: int | None) -> "keras.Model":
    """The model of ``spec_bytes`` with its weights, for evaluate and predict tasks.

    The architecture is rebuilt once per Python worker; the weights are set on every call,
    since the same architecture may come back with new weights.
    """
    configure_tensorflow(threads)
    spec = ModelSpec.from_bytes(spec_bytes, custom_objects)
    model = cached_model(f"inference-{spec.fingerprint}", spec_bytes, custom_objects)
    set_flat_weights(model, spec.weights)
    return model


def warm_up(spec_broadcast: Any, custom_objects: dict[str, Any], run_id: str, info: DataInfo,
            threads: int | None = None) -> None:
    """Import TensorFlow with the right pools, build this run's model and trace its training
    function, ahead of training (it runs while the data is scanned)."""
    configure_tensorflow(threads)
    training_model(run_id, spec_broadcast.value, custom_objects, info)


class Exchange:
    """An engine's worker-side hook: what happens between runs of local steps.

    Instances are created on the driver, pickled into the Spark task, and used by one worker.
    Every method but :meth:`exchange` has a do-nothing default.
    """

    def start(self, model: "keras.Model", worker: int) -> None:
        """Called once before training, with the worker's id (its partition index)."""

    def schedule(self, steps: int, epoch: int) -> list[int]:
        """Split an epoch's ``steps`` local steps into runs; :meth:`exchange` follows each run."""
        return [steps]

    def exchange(self, model: "keras.Model", samples: int) -> None:
        """Exchange weights with the others after a run of local steps over ``samples`` samples."""
        raise NotImplementedError

    def end_epoch(self, model: "keras.Model", epoch: int) -> None:
        """Called after the epoch's last exchange, before validation."""

    def finish(self, model: "keras.Model") -> dict[str, Any]:
        """Called after training; returns figures to merge into the worker's report."""
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
    """

    def __init__(self, url: str, secret: bytes, timeout: float) -> None:
        self.url, self.secret, self.timeout = url, secret, timeout
        self.worker = -1
        self.shapes: list[tuple[int, ...]] = []
        self._client: ParameterClient | None = None

    def start(self, model: "keras.Model", worker: int) -> None:
        self.worker = worker
        self.shapes = [tuple(w.shape) for w in model.weights]
        self._client = ParameterClient(self.url, self.secret, worker, timeout=self.timeout)

    @property
    def client(self) -> ParameterClient:
        """The worker's connection (after :meth:`start`)."""
        if self._client is None:
            raise RuntimeError("The exchange was used before start().")
        return self._client

    def traffic(self) -> dict[str, float]:
        """Seconds spent exchanging and megabytes moved, for the worker's report."""
        client = self.client
        return {"exchange_seconds": client.seconds, "mb_sent": client.bytes_sent / 1e6,
                "mb_received": client.bytes_received / 1e6,
                "exchange_mb_per_s": (client.bytes_sent + client.bytes_received) / 1e6 / max(client.seconds, 1e-9)}

    def report_failure(self, message: str) -> None:
        # A fresh connection: the worker's own may be broken mid-request, or busy in the background.
        with ParameterClient(self.url, self.secret, self.worker, timeout=10) as client:
            client.report_failure(message)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


@dataclass(frozen=True)
class StageSettings:
    """The small, picklable part of a training job that every worker needs."""

    run_id: str
    epochs: int
    batch_size: int
    num_workers: int
    seed: int | None
    info: DataInfo
    worker_threads: int | None = None


def _metric_logs(logs: dict[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in logs.items() if np.asarray(v).ndim == 0}


def _train(worker: int, blocks: Iterable[tuple[np.ndarray, np.ndarray]], spec_broadcast: Any,
           custom_objects: dict[str, Any], settings: StageSettings, exchange: Exchange,
           validation: Any) -> dict[str, Any]:
    configure_tensorflow(settings.worker_threads)
    steps_runner = training_model(settings.run_id, spec_broadcast.value, custom_objects, settings.info)
    model = steps_runner.model
    parts = list(blocks)
    n = sum(len(b[0]) for b in parts)
    x = np.concatenate([b[0] for b in parts]) if n else np.zeros((0, *settings.info.input_shape), np.float32)
    y = settings.info.model_labels(np.concatenate([b[1] for b in parts])) if n else np.zeros(0, np.int32)
    del parts
    rng = np.random.default_rng(None if settings.seed is None else settings.seed + worker)
    batch = settings.batch_size
    steps = math.ceil(n / batch)
    val_x = val_y = None
    if validation is not None:
        vx, vy = validation.value
        val_x, val_y = vx[worker::settings.num_workers], settings.info.model_labels(vy[worker::settings.num_workers])

    exchange.start(model, worker)
    history: list[dict[str, float]] = []
    val_history: list[tuple[int, dict[str, float]]] = []
    started = time.perf_counter()
    for epoch in range(settings.epochs):
        order = rng.permutation(n)
        model.reset_metrics()
        step = 0
        for run in exchange.schedule(steps, epoch):
            index = order[step * batch:(step + run) * batch]
            if len(index):
                steps_runner.run(x, y, index, batch)
            step += run
            exchange.exchange(model, len(index))
        exchange.end_epoch(model, epoch)
        history.append(steps_runner.metrics() if n else {})
        if val_x is not None and len(val_x):
            scores = model.evaluate(val_x, val_y, batch_size=max(batch, 256), verbose=0, return_dict=True)
            val_history.append((len(val_x), _metric_logs(scores)))
    seconds = time.perf_counter() - started
    report = {"worker": worker, "samples": n, "steps": steps * settings.epochs, "seconds": seconds,
              "history": history, "val_history": val_history}
    report.update(exchange.finish(model))
    return report


def train_partition(blocks: Iterable[tuple[np.ndarray, np.ndarray]], spec_broadcast: Any, custom_objects: dict[str, Any],
                    settings: StageSettings, exchange: Exchange, validation: Any) -> Iterator[dict[str, Any]]:
    """The body of one barrier task: train this partition; yields the worker's report."""
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is None:
        raise RuntimeError("train_partition runs inside a Spark task.")
    worker = context.partitionId()
    try:
        yield _train(worker, blocks, spec_broadcast, custom_objects, settings, exchange, validation)
    except BaseException as exc:
        detail = "".join(traceback.format_exception(exc))[-3000:]
        exchange.report_failure(f"{type(exc).__name__}: {exc}\n{detail}")
        if isinstance(exc, KerasOnSparkError) and not isinstance(exc, WorkerError):
            raise WorkerError(f"Worker {worker} failed: {type(exc).__name__}: {exc}", worker, detail) from exc
        if isinstance(exc, Exception):
            raise WorkerError(f"Worker {worker} failed: {type(exc).__name__}: {exc}", worker, detail) from exc
        raise
    finally:
        exchange.close()


def _lost_worker_error(exc: BaseException) -> WorkerError:
    """A WorkerError for a task that failed without a Python exception of its own (a crash)."""
    import re

    text = str(exc)
    task = re.search(r"ResultTask\(\d+, (\d+)\)", text)
    worker = int(task.group(1)) if task else -1
    signs = ("exited unexpectedly", "OutOfMemory", "Killed", "ExecutorLostFailure")
    reason = next((line.strip() for line in text.splitlines() if any(sign in line for sign in signs)), "")
    if reason.startswith("ExecutorLostFailure"):
        reason = f"its executor was lost: {reason}"
    who = f"Worker {worker}" if worker >= 0 else "A worker"
    return WorkerError(f"{who} failed: {reason or 'its Spark task failed'} (the Spark error follows as the cause; "
                       "the executor's log has the task's own output).", worker, text[-3000:])


def run_training_stage(job: "TrainingJob", exchange: Exchange) -> list[dict[str, Any]]:
    """Run :func:`train_partition` on every partition of ``job.data`` as one barrier stage.

    Raises:
        WorkerError: a task failed; the error names the worker and carries its message.
    """
    sc = job.spark.sparkContext
    settings = StageSettings(job.run_id, job.config.epochs, job.config.batch_size, job.config.num_workers,
                             job.config.seed, job.info, job.config.worker_threads)
    validation = sc.broadcast(job.validation) if job.validation is not None else None
    spec_broadcast, custom_objects = job.spec_broadcast, job.spec.custom_objects
    try:
        stage = job.data.blocks.barrier().mapPartitions(
            lambda blocks: train_partition(blocks, spec_broadcast, custom_objects, settings, exchange, validation))
        reports = stage.collect()
    except Exception as exc:
        recovered = from_spark_exception(exc)
        if isinstance(recovered, WorkerError):
            raise recovered from None
        raise _lost_worker_error(exc) from exc
    finally:
        if validation is not None:
            validation.destroy()
    return sorted(reports, key=lambda r: r["worker"])


def explain_failure(error: WorkerError, failures: dict[int, str]) -> WorkerError:
    """Name the worker whose failure started it all, from the parameter server's reports.

    When one worker fails, the others fail next (their round barrier is cancelled), and Spark
    may report any of them; the first report that is not such a consequence is the cause.
    """
    consequences = ("BarrierTimeoutError", "RoundClosedError", "ParameterServerError")
    causes = [(w, m) for w, m in failures.items() if not m.startswith(consequences)]
    if not causes:
        return error
    worker, message = causes[0]
    first_line = message.splitlines()[0] if message else "no message"
    return WorkerError(f"Worker {worker} failed: {first_line}", worker, message)
