"""``backend="sync"``: synchronous model averaging (local SGD).

Every worker trains ``sync_every`` local steps from the same weights, then all of them meet at a
round barrier, which averages their weights weighted by the samples each trained on; every worker
continues from the average with its own optimizer state. The whole fit is one barrier stage, so
data and model load once per worker.

The barrier is the driver's parameter server (``center="driver"``), or, with ``center="sharded"``,
every worker's: each serves one shard of the center and the rounds never cross the driver (see
:mod:`kerasonspark.parameter_server._shards`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kerasonspark._sharded import ShardedServerExchange
from kerasonspark._state import MovingStatistics
from kerasonspark.engine import (
    Engine,
    LearningRateScaling,
    ParameterStore,
    ScalingOptions,
    ServerExchange,
    TrainingJob,
    TrainingResult,
    check_positive_int,
    even_runs,
    get_flat_weights,
    global_step,
    set_flat_weights,
)
from kerasonspark.parameter_server._rules import OuterNesterov

__all__ = ["ShardedSyncExchange", "SyncEngine", "SyncExchange", "SyncOptions"]

CENTERS = ("auto", "driver", "sharded")
# From this many workers on, "auto" shards the center. The driver's link carries 2 n models a
# round, each worker's 2 (n - 1) / n under a sharded center: on emulated hosts at 1 Gbit/s a round
# of 2 workers took 0.136 s through the driver and 0.050 s sharded, and on local[2] (one machine,
# loopback) sharding cost nothing (2,839 against 2,767 samples/s, medians of 3).
SHARDED_FROM_WORKERS = 2


if TYPE_CHECKING:
    import keras


@dataclass
class SyncOptions(ScalingOptions):
    """Options of the ``sync`` engine (and :class:`~kerasonspark.engine.ScalingOptions`'
    ``lr_scale`` and ``warmup_steps``).

    Attributes:
        sync_every: local steps between two averagings (default 8: with the linear rate
            scaling, 2 workers on the reference CNN end 1 epoch at 0.9863 test accuracy every 8
            steps, 0.9855 every 16 and 0.9849 every 32, for 5 % fewer samples/s than every 16).
        barrier_timeout: seconds a round waits for a missing worker before failing the fit.
        outer_lr: the step the center takes toward each round's average (1: to it).
        outer_momentum: Nesterov momentum on the rounds' averaged changes (0: none); see
            :class:`~kerasonspark.parameter_server._rules.OuterNesterov`.
        center: where the rounds meet: ``"driver"`` (the driver's parameter server),
            ``"sharded"`` (each worker serves one shard of the center; the driver gets a copy
            every ``mirror_every`` rounds and at each epoch's end), or ``"auto"`` (sharded from 2
            workers on: faster on separate hosts, as fast on one).
        mirror_every: a sharded center's rounds between two copies to the driver: what a
            restart after a lost worker resumes from, so at most this many rounds are lost.
    """

    sync_every: int = 8
    barrier_timeout: float = 300.0
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    center: str = field(default="auto", metadata={"variant": True})  # sync:sharded
    mirror_every: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("sync_every", self.sync_every)
        check_positive_int("mirror_every", self.mirror_every)
        if self.center not in CENTERS:
            raise ValueError(
                f"Expected `center` to be one of {', '.join(map(repr, CENTERS))}. Received: "
                f"center={self.center!r}."
            )
        OuterNesterov(self.outer_lr, self.outer_momentum)  # validates both
        if not self.barrier_timeout > 0:
            raise ValueError(
                "Expected `barrier_timeout` > 0 seconds. Received: "
                f"barrier_timeout={self.barrier_timeout!r}."
            )


class SyncExchange(ServerExchange):
    """Worker side: meet at round ``r`` after each run of local steps and adopt the average."""

    holds_center = True  # the epoch's last round leaves every worker holding the center

    def __init__(
        self,
        url: str,
        secret: bytes,
        rounds_per_epoch: int,
        timeout: float,
        lr_scaling: LearningRateScaling | None = None,
        num_workers: int = 1,
    ) -> None:
        super().__init__(url, secret, timeout, timeout_name="barrier_timeout")
        self.rounds_per_epoch, self.lr_scaling = rounds_per_epoch, lr_scaling
        self.num_workers = num_workers
        self.round = 0
        self.moving: MovingStatistics | None = None
        self._run_start: np.ndarray | None = None
        self._steps_at = 0

    def start(self, model: keras.Model, worker: int) -> None:
        super().start(model, worker)
        self.moving = MovingStatistics(model)
        self._continue_from(model, get_flat_weights(model))

    def schedule(self, steps: int, epoch: int) -> list[int]:
        # Every worker must join every round, so every epoch is cut into the same number of runs.
        return even_runs(steps, self.rounds_per_epoch)

    def local_weights(self, model: keras.Model) -> np.ndarray:
        """The weights this worker brings to a round: the model's, its moving statistics
        advanced for every worker's steps since the last round (see
        :class:`~kerasonspark._state.MovingStatistics`)."""
        weights = get_flat_weights(model)
        if self.moving and self._run_start is not None:
            steps = global_step(model) - self._steps_at
            self.moving.advance(weights, self._run_start, steps, self.num_workers)
        return weights

    def _continue_from(self, model: keras.Model, center: np.ndarray) -> None:
        set_flat_weights(model, center)
        if self.moving:
            self._run_start, self._steps_at = center.copy(), global_step(model)

    def exchange(self, model: keras.Model, samples: int) -> None:
        average = self.client.barrier(self.round, self.local_weights(model), self.shapes, samples)
        self._continue_from(model, average)
        self.round += 1

    def epoch_center(self, model: keras.Model, center: np.ndarray) -> None:
        self._continue_from(model, center)

    def finish(self, model: keras.Model) -> dict[str, Any]:
        return {"rounds": self.round, **self.traffic()}


class ShardedSyncExchange(ShardedServerExchange, SyncExchange):
    """Worker side of a sharded center: serve one shard, meet every peer at each round's shards,
    copy the shard to the driver every ``mirror_every`` rounds and at each epoch's end."""

    def __init__(
        self,
        exchange: SyncExchange,
        num_workers: int,
        barrier_timeout: float,
        outer: tuple[float, float],
        mirror_every: int,
    ) -> None:
        SyncExchange.__init__(
            self,
            exchange.url,
            exchange.secret,
            exchange.rounds_per_epoch,
            exchange.timeout,
            exchange.lr_scaling,
            exchange.num_workers,
        )
        self.shard_over(num_workers, barrier_timeout)
        self.outer, self.mirror_every = outer, mirror_every
        self.round_seconds = 0.0

    def start(self, model: keras.Model, worker: int) -> None:
        super().start(model, worker)
        self.open_center(get_flat_weights(model), outer=OuterNesterov(*self.outer))

    def exchange(self, model: keras.Model, samples: int) -> None:
        started = time.perf_counter()
        self._continue_from(
            model, self.center.round(self.round, self.local_weights(model), samples)
        )
        self.round += 1
        self.round_seconds += time.perf_counter() - started
        if self.round % self.mirror_every == 0:
            self.center.mirror(self.round, rounds=self.round)

    def end_epoch(self, model: keras.Model, epoch: int) -> None:
        # before the epoch boundary: the driver's center of the epoch is whole when the last
        # worker arrives there
        self.center.mirror(self.round, rounds=self.round)

    def finish(self, model: keras.Model) -> dict[str, Any]:
        return self.sharded_figures(super().finish(model), self.round_seconds)


class SyncEngine(Engine):
    """Synchronous weight averaging every ``sync_every`` steps through a round barrier."""

    name = "sync"
    options_class = SyncOptions

    def run(self, job: TrainingJob) -> TrainingResult:
        config, options = job.config, self.options
        longest = math.ceil(max(job.partition_sizes) / config.batch_size)
        rounds_per_epoch = max(1, math.ceil(longest / options.sync_every))
        scaling = options.lr_scaling(job)
        outer = OuterNesterov(options.outer_lr, options.outer_momentum)
        store = ParameterStore(
            job.spec.weights,
            job.spec.shapes,
            config.num_workers,
            barrier_timeout=options.barrier_timeout,
            outer=outer,
        )
        center = options.center
        if center == "auto":
            center = "sharded" if config.num_workers >= SHARDED_FROM_WORKERS else "driver"

        def make_exchange(url: str, secret: bytes) -> SyncExchange:
            exchange = SyncExchange(
                url,
                secret,
                rounds_per_epoch,
                options.barrier_timeout + 60,
                scaling,
                job.config.num_workers,  # read when each stage starts, as below
            )
            if center == "driver":
                return exchange
            return ShardedSyncExchange(
                exchange,
                # read when each stage starts: a restart may go on with fewer workers
                job.config.num_workers,
                options.barrier_timeout,
                (options.outer_lr, options.outer_momentum),
                options.mirror_every,
            )

        outcome = job.serve(store, make_exchange)
        return job.result(
            outcome.reports,
            store.center,
            outcome.seconds,
            engine_stats={
                "rounds_per_epoch": rounds_per_epoch,
                "sync_every": options.sync_every,
                "lr_scale": scaling.factor if scaling else 1.0,
                "outer_lr": options.outer_lr,
                "outer_momentum": options.outer_momentum,
                "center": center,
                **({"mirror_every": options.mirror_every} if center == "sharded" else {}),
            },
        )
