"""``backend="hogwild"``: asynchronous updates applied without the server-side lock.

Like ``async``, but the server adds each push into the center in place while other pushes may
be doing the same (Recht et al., "Hogwild!", NIPS 2011). What can be lost: when two pushes
overlap, NumPy's in-place adds interleave element by element, so neither update is lost as a
whole, but an element read by one thread before the other's write lands keeps only one of the
two changes, and a pull during a write may see a half-applied update. The server counts
overlapping writes (``stats["overlapping_writes"]``); with few workers and a short apply they
are rare. Use it to measure what the lock costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from kerasonspark._asynchronous import AsyncOptions, run_asynchronous
from kerasonspark.engine import Engine, TrainingJob, TrainingResult

__all__ = ["HogwildEngine", "HogwildOptions"]


@dataclass
class HogwildOptions(AsyncOptions):
    """The options of ``async``, with window 5 by default: without the lock, longer windows make
    overlapping pushes lose more (4 workers at window 20 fell 1.2 points behind window 5)."""

    window: int = 5


class HogwildEngine(Engine):
    """Lock-free asynchronous updates; the options of ``async``, default window 5."""

    name = "hogwild"
    options_class = HogwildOptions

    def run(self, job: TrainingJob) -> TrainingResult:
        return run_asynchronous(job, self.options, lock=False)
