"""``backend="single"``: plain ``model.fit`` in the driver process, the reference for every engine.

The data is collected to the driver, so use it for data that fits there: it exists to measure
what the distributed engines gain over one process using all the driver's cores. Callbacks,
``verbose``, ``initial_epoch`` and ``validation_freq`` go to ``model.fit`` as they are.
"""

from __future__ import annotations

import time

from kerasonspark.engine import Engine, TrainingJob, TrainingResult, WorkerReport, get_flat_weights

__all__ = ["SingleEngine"]


class SingleEngine(Engine):
    """Single-process Keras training on the driver."""

    name = "single"
    trains_on = "driver"  # one process trains on the collected data

    def run(self, job: TrainingJob) -> TrainingResult:
        info = job.info
        x, y, sample_weight = job.local_arrays()
        y = info.model_labels(y)
        validation = None
        if (local := job.local_validation()) is not None:
            validation = (
                info.model_inputs(local[0]),
                info.model_targets(info.model_labels(local[1])),
            )
        config = job.config
        started = time.perf_counter()
        keras_history = job.model.fit(
            info.model_inputs(x),
            info.model_targets(y),
            sample_weight=sample_weight,
            batch_size=config.batch_size,
            epochs=config.epochs,
            validation_data=validation,
            shuffle=True,
            verbose=config.verbose,
            callbacks=job.callbacks,
            initial_epoch=config.initial_epoch,
            validation_freq=config.validation_freq,
        ).history
        seconds = time.perf_counter() - started
        trained = len(keras_history.get("loss", []))
        epochs = range(trained)
        train_keys = [k for k in keras_history if not k.startswith("val_")]
        report = WorkerReport(
            worker=0,
            samples=len(x),
            steps=-(-len(x) // config.batch_size) * trained,
            seconds=seconds,
            history=[{k: keras_history[k][e] for k in train_keys} for e in epochs],
            val_samples=len(local[0]) if local is not None else 0,
            val_history=[
                {k: keras_history[f"val_{k}"][e] for k in train_keys if f"val_{k}" in keras_history}
                for e in range(len(keras_history.get("val_loss", [])))
            ],
        )
        return job.result([report], get_flat_weights(job.model), seconds, exchanges=0)
