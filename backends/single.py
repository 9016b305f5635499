"""``backend="single"``: plain ``model.fit`` in the driver process, the reference for every engine.

The data is collected to the driver, so use it for data that fits there: it exists to measure
what the distributed engines gain over one process using all the driver's cores.
"""

from __future__ import annotations

import time

from kerasonspark.data import collect_arrays
from kerasonspark.engine import Engine, TrainingJob, TrainingResult
from kerasonspark.serialization import get_flat_weights


class SingleEngine(Engine):
    """Single-process Keras training on the driver."""

    name = "single"
    uses_spark_workers = False
    uses_parameter_server = False

    def run(self, job: TrainingJob) -> TrainingResult:
        x, y = collect_arrays(job.data.blocks)
        y = job.info.model_labels(y)
        validation = None
        if job.validation is not None:
            validation = (job.validation[0], job.info.model_labels(job.validation[1]))
        started = time.perf_counter()
        history = job.model.fit(x, y, batch_size=job.config.batch_size, epochs=job.config.epochs,
                                validation_data=validation, shuffle=True, verbose=0).history
        seconds = time.perf_counter() - started
        epochs = job.config.epochs
        train_keys = [k for k in history if not k.startswith("val_")]
        report = {
            "worker": 0, "samples": len(x), "steps": -(-len(x) // job.config.batch_size) * epochs, "seconds": seconds,
            "history": [{k: history[k][e] for k in train_keys} for e in range(epochs)],
            "val_history": [(len(validation[0]), {k[4:]: history[k][e] for k in history if k.startswith("val_")})
                            for e in range(epochs)] if validation is not None else [],
        }
        return job.result([report], get_flat_weights(job.model), seconds)
