"""``backend="elephas"``: Elephas 7.3 trains the job, behind the same interface as every engine.

    pip install --no-deps elephas==7.3.0 h5py
    SparkTrainer(model, backend="elephas", backend_options={"mode": "asynchronous", "frequency":
    "batch"})

Elephas pins numpy<2, pyspark<=4.0.0, flask==2.3.3 and tensorflow<2.20, which conflict with our
stack, yet runs on it: hence ``--no-deps``. The job's model, data partitions, batch size and
epochs go to an Elephas ``SparkModel`` (``mode="synchronous"``: one local epoch per worker and
an unweighted average of the changes) or ``AsynchronousSparkModel`` (``asynchronous`` or
``hogwild``, pushing after every ``batch`` or every ``epoch``, through Elephas's ``http`` or
``socket`` parameter server). Nothing of Elephas is patched; where it misbehaves on our stack the
adapter works around it:

- It runs Elephas one epoch at a time, with a fresh Elephas model built from the current weights,
  so the driver sees the model after every epoch (validation, epoch-level callbacks, the
  comparison's points). Elephas's own multi-epoch ``fit`` cannot be called twice (its HTTP server
  process cannot restart, and a new server starts from the weights it was built with).
- Its servers bind to the driver's address (loopback for a local master) instead of the host
  name's, through ``SPARK_LOCAL_IP`` while Elephas runs; each epoch gets a free port.
- The HTTP server runs Flask in debug mode by default: the adapter turns debug off. (Its request
  log lines go to the ``werkzeug`` logger, which ``kerasonspark compare`` and ``train`` quiet.)
- The socket server gives every connection a thread that spins forever once the client closes it
  (Elephas's client opens one per request): the adapter serves with a subclass whose threads end
  with their connection, and a client that connects to the driver's address.
- If an epoch fails, the adapter stops Elephas's server itself: ``fit`` leaves no Elephas thread or
  process behind.

Elephas's servers speak unauthenticated pickle over plain sockets, and unpickling is code
execution: the adapter warns once per process, and keeps them on the driver's bind address.
Stats: ``exchanges`` is counted from Elephas's loop (one average per epoch; one push per worker
per epoch, or per batch of a partition larger than one batch); ``history`` has training loss and
metrics for ``synchronous`` only (the asynchronous workers return none) and ``val_*`` whenever
validation data is given.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from kerasonspark._data import DataInfo
from kerasonspark._errors import ConfigurationError
from kerasonspark._session import check_weights_privacy
from kerasonspark.engine import (
    Engine,
    EngineOptions,
    TrainingJob,
    TrainingResult,
    WorkerReport,
    get_flat_weights,
    global_step,
    set_global_step,
)

__all__ = ["ElephasEngine", "ElephasOptions"]


logger = logging.getLogger(__name__)

INSTALL = "pip install --no-deps elephas==7.3.0 h5py"
MODES = ("synchronous", "asynchronous", "hogwild")
_BATCH_HOOKS = ("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")
_warned = threading.Event()


@dataclass
class ElephasOptions(EngineOptions):
    """Options of ``backend="elephas"``.

    Attributes:
        mode: ``synchronous``, ``asynchronous`` or ``hogwild`` (Elephas's modes).
        frequency: when asynchronous workers push: ``batch`` (the default, the closest to our
            windows) or ``epoch``. ``synchronous`` averages once per epoch only.
        parameter_server_mode: ``http`` (Flask) or ``socket``, for the asynchronous modes.
    """

    mode: str = field(default="synchronous", metadata={"variant": True})  # elephas:hogwild
    frequency: str | None = None
    parameter_server_mode: str = "http"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"`mode` must be one of {list(MODES)}. Received: {self.mode!r}.")
        if self.frequency not in (None, "epoch", "batch"):
            raise ValueError(
                f"`frequency` must be 'epoch' or 'batch'. Received: {self.frequency!r}."
            )
        if self.mode == "synchronous" and self.frequency == "batch":
            raise ValueError(
                "Elephas's synchronous mode averages once per epoch; `frequency='batch'` needs "
                "mode 'asynchronous' or 'hogwild'."
            )
        if self.parameter_server_mode not in ("http", "socket"):
            raise ValueError(
                f"`parameter_server_mode` must be 'http' or 'socket'. Received: "
                f"{self.parameter_server_mode!r}."
            )
        if self.frequency is None:
            self.frequency = "epoch" if self.mode == "synchronous" else "batch"


def _require_elephas() -> Any:
    try:
        import elephas.spark_model
    except ImportError as exc:
        raise ConfigurationError(
            f"backend='elephas' needs Elephas 7.3 ({exc}). Install it with: {INSTALL}"
        ) from None
    return elephas.spark_model


def _samples(
    info: Any, blocks: Iterator[tuple[np.ndarray, np.ndarray, Any]]
) -> Iterator[tuple[np.ndarray, Any]]:
    """Our ``(x, y, w)`` blocks (never weighted here) as the ``(features, label)`` rows Elephas
    trains on
    (labels as the loss takes them)."""
    for x, y, _ in blocks:
        yield from zip(x, info.model_labels(y), strict=True)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _bind_address(host: str) -> Iterator[None]:
    """Elephas's server on ``host``: it reads ``SPARK_LOCAL_IP``, else takes the host name's
    address."""
    saved = os.environ.get("SPARK_LOCAL_IP")
    os.environ["SPARK_LOCAL_IP"] = host
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SPARK_LOCAL_IP", None)
        else:
            os.environ["SPARK_LOCAL_IP"] = saved


def _socket_parts(host: str, port: int) -> tuple[type, type]:
    """Elephas's socket server and client, fixed: threads end with their connection, the client
    connects to the driver's address."""
    from elephas.parameter.client import SocketClient
    from elephas.parameter.server import SocketServer
    from elephas.utils.serialization import bytes_to_weights, weights_to_bytes
    from elephas.utils.sockets import recv_bytes, send_bytes

    class ClosingSocketServer(SocketServer):
        def action_listener(self, conn: socket.socket) -> None:
            with conn:
                while self.runs:
                    action = conn.recv(1)
                    if action == b"u":
                        self.update_parameters(conn)
                    elif action == b"g":
                        self.get_parameters(conn)
                    else:  # b"": the client closed its connection (Elephas loops on here forever)
                        return

        def run(self) -> None:
            while self.runs:
                try:
                    conn, _ = self.socket.accept()
                except OSError:  # stop_server closed the listening socket
                    return
                thread = threading.Thread(target=self.action_listener, args=(conn,), daemon=True)
                thread.start()
                self.connections.append(thread)

    class DriverSocketClient(SocketClient):
        def __init__(self) -> None:
            super().__init__(port)
            self.host = host

        def _connect(self) -> socket.socket:
            return socket.create_connection((self.host, self.port))

        def get_parameters(self) -> list:
            with self._connect() as sock:
                sock.sendall(b"g")
                return bytes_to_weights(recv_bytes(sock))

        def update_parameters(self, delta: list) -> None:
            with self._connect() as sock:
                sock.sendall(b"u")
                send_bytes(sock, weights_to_bytes(delta))

    return ClosingSocketServer, DriverSocketClient


def _stop_server(spark_model: Any) -> None:
    """Stop Elephas's server if an epoch ended without stopping it (its context manager does not on
    errors)."""
    server = getattr(spark_model, "parameter_server", None)
    process = getattr(server, "server", None)
    with contextlib.suppress(ValueError, AttributeError):  # a process already closed
        if process is not None and process.is_alive():
            process.terminate()
            process.join(10)
    if server is not None and getattr(server, "runs", False):
        server.stop()


class ElephasEngine(Engine):
    """Elephas 7.3 behind the common interface; see :class:`ElephasOptions` and the module's
    notes."""

    name = "elephas"
    options_class = ElephasOptions
    # Elephas takes the blocks, holds them in memory and brings its own server; `run` applies the
    # same privacy check as ours.
    trains_on = "spark"

    def check_fit(self, model: Any, callbacks: list[Any], weighted: bool) -> None:
        """Refuse what Elephas cannot train: several inputs or outputs and sample weights (it fits
        ``(features, label)`` rows), and callbacks with batch hooks (it runs whole epochs)."""
        import keras

        info = DataInfo.for_model(model, model.get_compile_config())
        if info.inputs or info.outputs:
            raise ConfigurationError(
                "Elephas trains models with one input and one output (it fits (features, label) "
                "rows); for several, choose sync, async, hogwild or single."
            )
        if weighted:
            raise ConfigurationError(
                "Backend 'elephas' cannot train with sample or class weights. Drop them or choose "
                "another backend (sync, async, hogwild and single take them)."
            )
        base = keras.callbacks.Callback
        batch_level = sorted(
            {
                type(cb).__name__
                for cb in callbacks
                if any(getattr(type(cb), hook) is not getattr(base, hook) for hook in _BATCH_HOOKS)
            }
        )
        if batch_level:
            raise ConfigurationError(
                "Backend 'elephas' trains each epoch inside Elephas, so the driver sees epoch "
                "boundaries only: callbacks with batch hooks cannot run "
                f"({', '.join(batch_level)}). Epoch-level callbacks (EarlyStopping, "
                "LearningRateScheduler, ReduceLROnPlateau, CSVLogger, ...) work."
            )
        super().check_fit(model, callbacks, weighted)

    def run(self, job: TrainingJob) -> TrainingResult:
        import keras

        spark_model_module = _require_elephas()
        options = self.options
        blocks = job.training_blocks()
        if options.mode != "synchronous":
            check_weights_privacy(dict(blocks.context.getConf().getAll()), job.server_host)
        if not _warned.is_set():
            _warned.set()
            logger.warning(
                "Elephas's parameter server speaks unauthenticated pickle (unpickling is code "
                "execution); it listens on %s only while an epoch trains.",
                job.server_host,
            )
        # from the cached blocks, each epoch
        samples = blocks.mapPartitions(partial(_samples, job.info))
        config = job.config
        callbacks = keras.callbacks.CallbackList(
            job.callbacks, model=job.model, epochs=config.epochs, verbose=0
        )
        validation = None
        if (local := job.local_validation()) is not None:
            validation = (local[0], job.info.model_labels(local[1]))
        sizes = job.partition_sizes
        reports = [
            WorkerReport(worker=w, samples=n, steps=0, seconds=0.0) for w, n in enumerate(sizes)
        ]
        train_seconds, exchanges = 0.0, 0
        job.model.stop_training = False
        step = global_step(job.model)
        callbacks.on_train_begin()
        for epoch in range(config.initial_epoch, config.epochs):
            callbacks.on_epoch_begin(epoch)
            started = time.perf_counter()
            histories = self._train_one_epoch(spark_model_module, job, samples)
            seconds = time.perf_counter() - started
            train_seconds += seconds
            exchanges += self._exchanges(sizes, config.batch_size)
            logs: dict[str, float] = {}
            for report, history in zip(reports, histories, strict=True):
                report.seconds += seconds
                report.steps += math.ceil(report.samples / config.batch_size)
                report.history.append({k: float(v[-1]) for k, v in (history or {}).items()})
            step += sum(math.ceil(n / config.batch_size) for n in sizes)
            set_global_step(job.model, step)  # Elephas's steps, for the callbacks below
            if validation is not None:
                scores = job.model.evaluate(
                    *validation, batch_size=256, verbose=0, return_dict=True
                )
                reports[0].val_samples = len(validation[0])
                reports[0].val_history.append({k: float(v) for k, v in scores.items()})
                logs.update({f"val_{k}": float(v) for k, v in scores.items()})
            train = [(r.samples, r.history[-1]) for r in reports if r.history[-1]]
            if train:
                total = sum(n for n, _ in train)
                logs.update({k: sum(n * h[k] for n, h in train) / total for k in train[0][1]})
            callbacks.on_epoch_end(epoch, logs)
            if job.model.stop_training:
                break
        callbacks.on_train_end()
        return job.result(
            reports,
            get_flat_weights(job.model),
            train_seconds,
            exchanges=exchanges,
            engine_stats={
                "mode": options.mode,
                "frequency": options.frequency,
                "parameter_server_mode": options.parameter_server_mode,
                "elephas_version": _elephas_version(),
            },
        )

    def _train_one_epoch(
        self, spark_model_module: Any, job: TrainingJob, samples: Any
    ) -> list[dict | None]:
        """One Elephas ``fit`` of one epoch from the model's current weights; each worker's
        history."""
        options, config = self.options, job.config
        custom_objects = dict(job.spec.custom_objects) or None
        with _bind_address(job.server_host):
            if options.mode == "synchronous":
                spark_model = spark_model_module.SparkModel(
                    job.model, custom_objects=custom_objects, batch_size=config.batch_size
                )
            else:
                port = _free_port(job.server_host)
                spark_model = spark_model_module.AsynchronousSparkModel(
                    job.model,
                    custom_objects=custom_objects,
                    batch_size=config.batch_size,
                    mode=options.mode,
                    frequency=options.frequency,
                    parameter_server_mode=options.parameter_server_mode,
                    port=port,
                )
                if options.parameter_server_mode == "socket":
                    server_class, client_class = _socket_parts(job.server_host, port)
                    spark_model.parameter_server = server_class(
                        spark_model.serialized_model,
                        port,
                        options.mode,
                        custom_objects=custom_objects,
                    )
                    spark_model.client = client_class()
                else:
                    spark_model.parameter_server.debug = False
            try:
                # Elephas prints ">>> Fit model" and the like
                with contextlib.redirect_stdout(None):
                    spark_model.fit(
                        samples,
                        epochs=1,
                        batch_size=config.batch_size,
                        verbose=0,
                        validation_split=0.0,
                    )
            finally:
                _stop_server(spark_model)
        histories = list(getattr(spark_model, "training_histories", []))
        return (
            histories[-len(job.partition_sizes) :]
            if histories
            else [None] * len(job.partition_sizes)
        )

    def _exchanges(self, sizes: list[int], batch_size: int) -> int:
        """Exchanges of one epoch, by Elephas's loop: workers with more rows than one batch push."""
        if self.options.mode == "synchronous":
            return 1
        active = [n for n in sizes if n > batch_size]
        if self.options.frequency == "epoch":
            return len(active)
        return sum(math.ceil(n / batch_size) for n in active)


def _elephas_version() -> str:
    from importlib.metadata import version

    return version("elephas")
