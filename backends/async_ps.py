"""``backend="async"``: asynchronous parameter-server training (the 2017 Dist-Keras setup).

Workers pull the center weights, train ``window`` steps, push their change; the driver's server
applies it under a rule: DOWNPOUR adds it, ADAG divides it by the window, DynSGD divides it by
(staleness + 1), elastic averaging pulls worker and center toward each other. Pushes are applied
one at a time under a lock, and the staleness of every push is counted.

    SparkTrainer(model, backend="async", backend_options={"rule": "adag", "window": 5})
"""

from __future__ import annotations

from kerasonspark._asynchronous import AsyncOptions, run_asynchronous
from kerasonspark.engine import Engine, TrainingJob, TrainingResult

__all__ = ["AsyncEngine"]


class AsyncEngine(Engine):
    """Asynchronous updates through a locked parameter server; see :class:`AsyncOptions`."""

    name = "async"
    options_class = AsyncOptions

    def run(self, job: TrainingJob) -> TrainingResult:
        return run_asynchronous(job, self.options, lock=True)
