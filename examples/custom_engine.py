"""A complete engine in one screen, written against the engine SDK alone: per-epoch model averaging.

Every worker trains its partition for a stretch of local steps, then all of them meet at the
parameter server's round barrier, which averages their weights weighted by the samples each
trained on; ``rounds_per_epoch`` such meetings cut every epoch (1: once per epoch, one-shot
averaging in the manner of Zinkevich et al., "Parallelized Stochastic Gradient Descent", 2010).

Use it by object, or register it in your own ``pyproject.toml`` to use it by name::

    SparkTrainer(model, backend=EpochAveragingEngine(rounds_per_epoch=2)).fit(df)

    [project.entry-points."kerasonspark.backends"]
    epoch_averaging = "custom_engine:EpochAveragingEngine"

``tests/test_custom_engine.py`` trains it on ``local[2]`` and with ``kerasonspark.testing``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kerasonspark.engine import (
    Engine,
    EngineOptions,
    ParameterStore,
    ServerExchange,
    TrainingJob,
    TrainingResult,
    check_positive_int,
    even_runs,
    get_flat_weights,
    set_flat_weights,
)


@dataclass
class EpochAveragingOptions(EngineOptions):
    """``rounds_per_epoch``: how many times a worker's epoch is averaged with the others'."""

    rounds_per_epoch: int = 1

    def __post_init__(self) -> None:
        check_positive_int("rounds_per_epoch", self.rounds_per_epoch)


class EpochAveragingExchange(ServerExchange):
    """Worker side: train a stretch, meet the others at round ``r``, continue from the average."""

    holds_center = True  # the epoch's last round leaves every worker with the center

    def __init__(self, url: str, secret: bytes, rounds_per_epoch: int) -> None:
        super().__init__(url, secret, timeout=600)
        self.rounds_per_epoch, self.round = rounds_per_epoch, 0

    def schedule(self, steps: int, epoch: int) -> list[int]:
        # The same number of runs on every worker, or some would wait at a round the others skip.
        return even_runs(steps, self.rounds_per_epoch)

    def exchange(self, model: Any, samples: int) -> None:
        set_flat_weights(model, self.client.barrier(self.round, get_flat_weights(model), self.shapes, samples))
        self.round += 1

    def finish(self, model: Any) -> dict[str, Any]:
        return {"rounds": self.round}


class EpochAveragingEngine(Engine):
    """Model averaging ``rounds_per_epoch`` times an epoch."""

    name = "epoch_averaging"
    options_class = EpochAveragingOptions

    def run(self, job: TrainingJob) -> TrainingResult:
        rounds = self.options.rounds_per_epoch
        store = ParameterStore(job.spec.weights, job.spec.shapes, job.config.num_workers, barrier_timeout=300)
        outcome = job.serve(store, lambda url, secret: EpochAveragingExchange(url, secret, rounds))
        return job.result(outcome.reports, store.center, outcome.seconds, exchanges=outcome.server_stats["rounds"],
                          engine_stats={"rounds_per_epoch": rounds})
