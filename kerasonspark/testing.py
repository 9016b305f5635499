"""An in-process runner for engine authors: an engine's workers as threads, no Spark.

The workers run the real worker loop (:func:`kerasonspark._executor.train_worker`) against the
real parameter server on loopback, and return the same :class:`~kerasonspark.engine.WorkerReport`
s as in a Spark stage, so an engine's tests take seconds::

    from kerasonspark.testing import fit_in_process

    result = fit_in_process(MyEngine(), model, x, y, num_workers=2, epochs=2)
    assert result.history["accuracy"][-1] > 0.9

What it does not test: pickling into Spark tasks, Spark's scheduling and its failures. Keep one
end-to-end test through ``SparkTrainer`` on ``local[2]`` for those.
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ._config import DataConfig
from ._data import Block, DataInfo, concatenate, validate_arrays
from ._driver import DriverRunner, worker_settings
from ._errors import ConfigurationError
from ._executor import EpochGate, LocalSteps, guarded, train_worker, validation_share
from ._serialization import ModelSpec
from .engine import (
    Engine,
    Exchange,
    TrainingConfig,
    TrainingJob,
    TrainingResult,
    WorkerReport,
    resolve_backend,
)

if TYPE_CHECKING:
    import keras

__all__ = ["InProcessRunner", "fit_in_process"]


class InProcessRunner(DriverRunner):
    """A :class:`~kerasonspark.engine.Runner` whose workers are threads of this process.

    Args:
        partitions: one ``(x, y, sample_weight)`` triple per worker (labels as given, weights or
            ``None``).
        engine_name: where the engine's figures go in ``stats``.
    """

    def __init__(self, partitions: list[Block], engine_name: str) -> None:
        super().__init__(engine_name)
        self.partitions = partitions

    def run_workers(
        self, job: TrainingJob, exchange: Exchange, gate: EpochGate | None = None
    ) -> list[WorkerReport]:
        settings = worker_settings(job)
        spec_bytes = job.spec.to_bytes()
        # Models are built here, one per worker, before any thread starts: Keras builds layers
        # and traces functions on the calling thread.
        bodies: list[Callable[[], WorkerReport]] = []
        # Each worker gets its own copy, as each Spark task unpickles its own.
        exchanges = [copy.deepcopy(exchange) for _ in self.partitions]
        gates = [copy.deepcopy(gate) for _ in self.partitions]
        for worker, (x, y, w) in enumerate(self.partitions):
            steps = LocalSteps(
                ModelSpec.from_bytes(spec_bytes, job.spec.custom_objects).build(), job.info
            )
            share = validation_share(job.validation, worker, settings)
            bodies.append(
                partial(
                    train_worker,
                    worker,
                    steps,
                    x,
                    job.info.model_labels(y),
                    settings,
                    exchanges[worker],
                    share,
                    gates[worker],
                    w,
                )
            )
        outcomes: list[WorkerReport | BaseException | None] = [None] * len(bodies)

        def run(worker: int) -> None:
            try:
                outcomes[worker] = guarded(worker, exchanges[worker], bodies[worker], gates[worker])
            except BaseException as exc:  # handed to the caller's thread below
                outcomes[worker] = exc

        threads = [
            threading.Thread(target=run, args=(w,), name=f"kerasonspark-worker-{w}", daemon=True)
            for w in range(len(bodies))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [o for o in outcomes if isinstance(o, WorkerReport)]

    def local_arrays(self, job: TrainingJob) -> Block:
        return concatenate(self.partitions)

    def training_blocks(self, job: TrainingJob) -> Any:
        raise ConfigurationError(
            f"Backend {self.engine_name!r} hands the data to Spark; it cannot run in process."
        )


def fit_in_process(
    engine: Engine | str,
    model: keras.Model,
    x: Any,
    y: Any,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    num_workers: int = 2,
    seed: int | None = None,
    validation_data: tuple[Any, Any] | None = None,
    custom_objects: Mapping[str, Any] | None = None,
    backend_options: Mapping[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    verbose: int = 0,
    sample_weight: Any = None,
    data: DataConfig | None = None,
) -> TrainingResult:
    """Train ``model`` on ``(x, y)`` with ``engine``, its workers as threads of this process.

    The data is checked as ``SparkTrainer.fit`` checks it and split into ``num_workers`` equal
    partitions in order; ``data`` is a :class:`~kerasonspark.DataConfig` (its ``balance_workers``
    applies here). Returns what ``SparkTrainer.fit`` returns, less the Spark-only figures
    (``wall_seconds``, ``prepare_seconds``).

    Raises:
        DataError: the data does not fit the model.
        WorkerError: a worker failed; the message names it.
    """
    engine = resolve_backend(engine, backend_options)
    engine.check_fit(model, list(callbacks or []), sample_weight is not None)
    config = TrainingConfig(
        epochs=epochs,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        verbose=verbose,
        data=DataConfig() if data is None else data,
    )
    info = DataInfo.for_model(model, model.get_compile_config())
    x, y, w = validate_arrays((x, y, sample_weight), info, "training")
    info = info.with_given_labels(
        y.shape[1] if y.ndim == 2 else 0, bool(np.issubdtype(y.dtype, np.integer))
    )
    validation = (
        validate_arrays(tuple(validation_data), info, "validation")[:2]
        if validation_data is not None
        else None
    )
    weights = np.array_split(w, num_workers) if w is not None else [None] * num_workers
    partitions = list(
        zip(np.array_split(x, num_workers), np.array_split(y, num_workers), weights, strict=True)
    )
    job = TrainingJob(
        spec=ModelSpec.from_model(model, dict(custom_objects or {})),
        model=model,
        info=info,
        config=config,
        runner=InProcessRunner(partitions, engine.name),
        run_id=uuid.uuid4().hex,
        partition_sizes=[len(p[0]) for p in partitions],
        validation=validation,
        callbacks=list(callbacks or []),
        trains_on=engine.trains_on,
    )
    return engine.run(job)
