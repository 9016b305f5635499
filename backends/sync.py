"""``backend="sync"``: synchronous model averaging (local SGD).

Every worker trains ``sync_every`` local steps from the same weights, then all of them meet at a
round barrier on the driver's parameter server, which averages their weights weighted by the
samples each trained on; every worker continues from the average with its own optimizer state.
The whole fit is one barrier stage, so data and model load once per worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kerasonspark.engine import Engine, EngineOptions, TrainingJob, TrainingResult
from kerasonspark.parameter_server import ParameterStore
from kerasonspark.serialization import get_flat_weights, set_flat_weights
from kerasonspark.worker import ServerExchange

if TYPE_CHECKING:
    import keras


@dataclass
class SyncOptions(EngineOptions):
    """Options of the ``sync`` engine.

    Attributes:
        sync_every: local steps between two averagings.
        barrier_timeout: seconds a round waits for a missing worker before failing the fit.
    """

    sync_every: int = 32
    barrier_timeout: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.sync_every, int) or isinstance(self.sync_every, bool) or self.sync_every < 1:
            raise ValueError(f"Expected `sync_every` to be a positive integer. Received: sync_every={self.sync_every!r}.")
        if not self.barrier_timeout > 0:
            raise ValueError(f"Expected `barrier_timeout` > 0 seconds. Received: barrier_timeout={self.barrier_timeout!r}.")


class SyncExchange(ServerExchange):
    """Worker side: meet at round ``r`` after each run of local steps and adopt the average."""

    def __init__(self, url: str, secret: bytes, rounds_per_epoch: int, timeout: float) -> None:
        super().__init__(url, secret, timeout)
        self.rounds_per_epoch = rounds_per_epoch
        self.round = 0

    def schedule(self, steps: int, epoch: int) -> list[int]:
        # Every worker must join every round, so the epoch is cut into the same number of runs
        # everywhere; a worker with a smaller partition just takes fewer steps per run.
        base, extra = divmod(steps, self.rounds_per_epoch)
        return [base + 1] * extra + [base] * (self.rounds_per_epoch - extra)

    def exchange(self, model: "keras.Model", samples: int) -> None:
        average = self.client.barrier(self.round, get_flat_weights(model), self.shapes, samples)
        set_flat_weights(model, average)
        self.round += 1

    def finish(self, model: "keras.Model") -> dict[str, Any]:
        return {"rounds": self.round, **self.traffic()}


class SyncEngine(Engine):
    """Synchronous weight averaging every ``sync_every`` steps through a round barrier."""

    name = "sync"
    options_class = SyncOptions

    def run(self, job: TrainingJob) -> TrainingResult:
        config, options = job.config, self.options
        longest = math.ceil(max(job.data.counts) / config.batch_size)
        rounds_per_epoch = max(1, math.ceil(longest / options.sync_every))
        store = ParameterStore(job.spec.weights, job.spec.shapes, config.num_workers, barrier_timeout=options.barrier_timeout)
        reports, seconds, server_stats = job.run_with_parameter_server(
            store, lambda url, secret: SyncExchange(url, secret, rounds_per_epoch, options.barrier_timeout + 60))
        return job.result(reports, store.center, seconds, {
            "rounds": server_stats["rounds"],
            "rounds_per_epoch": rounds_per_epoch,
            "sync_every": options.sync_every,
            "parameter_server": server_stats,
        })
