"""A complete engine in one screen, written against the engine SDK alone: per-epoch model averaging.

Workers train their partitions for a stretch of local steps, then meet at the parameter server's
round barrier, which averages their weights weighted by samples; ``rounds_per_epoch`` meetings cut
every epoch (1: one-shot averaging, Zinkevich et al. 2010). Use it by object, or by name once
registered in your own ``pyproject.toml``::

    SparkTrainer(model, backend=EpochAveragingEngine(rounds_per_epoch=2)).fit(df)

    [project.entry-points."kerasonspark.backends"]
    epoch_averaging = "custom_engine:EpochAveragingEngine"

``tests/test_custom_engine.py`` trains it on ``local[2]`` and with ``kerasonspark.testing``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import kerasonspark.engine as sdk


@dataclass
class EpochAveragingOptions(sdk.EngineOptions):
    """``rounds_per_epoch``: how many times a worker's epoch is averaged with the others'."""

    rounds_per_epoch: int = 1

    def __post_init__(self) -> None:
        sdk.check_positive_int("rounds_per_epoch", self.rounds_per_epoch)


class EpochAveragingExchange(sdk.ServerExchange):
    """Worker side: train a stretch, meet the others at round ``r``, continue from the average."""

    holds_center = True  # the epoch's last round leaves every worker with the center

    def __init__(self, url: str, secret: bytes, rounds_per_epoch: int) -> None:
        super().__init__(url, secret, timeout=600)
        self.rounds_per_epoch, self.round = rounds_per_epoch, 0

    def schedule(self, steps: int, epoch: int) -> list[int]:
        # The same number of runs on every worker, or some would wait at a round the others skip.
        return sdk.even_runs(steps, self.rounds_per_epoch)

    def exchange(self, model: Any, samples: int) -> None:
        center = self.client.barrier(self.round, sdk.get_flat_weights(model), self.shapes, samples)
        sdk.set_flat_weights(model, center)
        self.round += 1

    def finish(self, model: Any) -> dict[str, Any]:
        return {"rounds": self.round}


class EpochAveragingEngine(sdk.Engine):
    """Model averaging ``rounds_per_epoch`` times an epoch (driver side)."""

    name = "epoch_averaging"
    options_class = EpochAveragingOptions

    def run(self, job: sdk.TrainingJob) -> sdk.TrainingResult:
        rounds = self.options.rounds_per_epoch
        store = sdk.ParameterStore(job.spec.weights, job.spec.shapes, job.config.num_workers)
        outcome = job.serve(store, lambda url, secret: EpochAveragingExchange(url, secret, rounds))
        stats = {"rounds_per_epoch": rounds}
        return job.result(outcome.reports, store.center, outcome.seconds, engine_stats=stats)
