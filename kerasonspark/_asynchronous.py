"""The pull / train / push loop shared by the asynchronous engines (``async`` and ``hogwild``).

Each worker starts from the center weights, trains ``window`` local steps with its own
optimizer, and pushes its change (or, for elastic averaging, its weights). The server applies
the push under the configured :class:`~kerasonspark.parameter_server.UpdateRule` and answers
with the weights the worker continues from, so one exchange is one round trip on one
keep-alive connection. Workers never wait for each other.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._sharded import ShardedServerExchange
from ._state import state_ranges
from .engine import (
    LearningRateScaling,
    ParameterStore,
    ScalingOptions,
    ServerExchange,
    TrainingJob,
    TrainingResult,
    check_positive_int,
    get_flat_weights,
    set_flat_weights,
)
from .parameter_server import wire
from .parameter_server._rules import RULES, DynSGD, UpdateRule, make_rule

if TYPE_CHECKING:
    import keras

DELTA_DTYPES = ("float32", "bfloat16")
CENTERS = ("driver", "sharded")


@dataclass
class AsyncOptions(ScalingOptions):
    """Options of the asynchronous engines (and :class:`~kerasonspark.engine.ScalingOptions`'
    ``lr_scale`` and ``warmup_steps``).

    Attributes:
        rule: ``"dynsgd"`` (default), ``"adag"`` (the 2017 Dist-Keras rule), ``"downpour"``,
            ``"sasgd"`` or ``"easgd"``. DynSGD with the linear rate scaling learned most per
            sample at 2 and at 4 workers on the reference CNN (ADAG trails it by 0.3 points);
            its floor is the rate factor (:class:`~kerasonspark.parameter_server._rules.DynSGD`).
        window: local steps between two exchanges (default 20: as accurate as 5 or 8 there, with
            a quarter or 40 % of the exchanges).
        alpha: elastic averaging's moving rate (``easgd``); default ``rho * elastic_lr``.
        rho: elastic averaging's coupling strength (``easgd``), default 5.0.
        elastic_lr: the learning rate ``rho`` is multiplied by (``easgd``), default 0.1.
        delta_dtype: ``"float32"`` or ``"bfloat16"``: the precision of what workers push.
            bfloat16 halves the upload (float16 is not offered: small deltas fall into its
            subnormal range, where they lose precision and NumPy converts them 50x slower);
            the center and the replies stay float32.
        overlap: send each push in the background while the next window trains (delta rules),
            at the price of one window of extra staleness. Off by default: on two shared cores
            the background push competes with training and gained nothing (measured); it is
            meant for clusters where the round trip is network latency, not CPU.
        timeout: seconds a worker waits for the parameter server before failing.
        center: ``"driver"`` (the driver's parameter server holds the center) or ``"sharded"``
            (each worker serves one shard of it and every push is split by shard; the driver
            gets a copy at each epoch's end, which a restart resumes from).
    """

    rule: str = field(default="dynsgd", metadata={"variant": True})  # async:adag
    window: int = 20
    alpha: float | None = None
    rho: float | None = None
    elastic_lr: float = 0.1
    delta_dtype: str = "float32"
    overlap: bool = False
    timeout: float = 300.0
    center: str = "driver"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.center not in CENTERS:
            raise ValueError(f"Expected `center` in {CENTERS}. Received: center={self.center!r}.")
        if self.rule not in RULES:
            raise ValueError(f"Expected `rule` in {sorted(RULES)}. Received: rule={self.rule!r}.")
        check_positive_int("window", self.window)
        if self.delta_dtype not in DELTA_DTYPES:
            raise ValueError(
                f"Expected `delta_dtype` in {DELTA_DTYPES}. Received: "
                f"delta_dtype={self.delta_dtype!r}."
            )
        if self.rule != "easgd" and (self.alpha is not None or self.rho is not None):
            raise ValueError(
                f"`alpha` and `rho` apply to rule 'easgd' only. Received: rule={self.rule!r}."
            )
        if self.rule == "easgd":
            make_rule("easgd", alpha=self.resolved_alpha)  # validates the range

    @property
    def resolved_alpha(self) -> float:
        """Elastic averaging's moving rate: ``alpha``, or ``rho * elastic_lr`` (``rho`` 5 by
        default)."""
        return (
            self.alpha
            if self.alpha is not None
            else (5.0 if self.rho is None else self.rho) * self.elastic_lr
        )

    def make_rule(self, lr_factor: float = 1.0) -> UpdateRule:
        """The configured update rule; ``lr_factor`` (the workers' rate multiplier) is DynSGD's
        floor."""
        if self.rule == "easgd":
            return make_rule("easgd", alpha=self.resolved_alpha)
        return (
            make_rule("dynsgd", floor=lr_factor) if self.rule == "dynsgd" else make_rule(self.rule)
        )


class PushPullExchange(ServerExchange):
    """Worker side: push every ``window`` steps, continue from the server's reply.

    With ``overlap`` (delta rules only) the push travels in a background thread while the next
    window trains; at the next exchange the worker adopts the center it answered plus the local
    progress made since (``center + local``), then pushes that progress. Every local change is
    pushed exactly once; the worker's view of the center is one window older, which the
    staleness counts show.
    """

    def __init__(
        self,
        url: str,
        secret: bytes,
        window: int,
        payload: str,
        delta_dtype: str,
        timeout: float,
        overlap: bool = False,
        lr_scaling: LearningRateScaling | None = None,
    ) -> None:
        super().__init__(url, secret, timeout)
        self.lr_scaling = lr_scaling
        self.window, self.payload, self.delta_dtype = window, payload, delta_dtype
        self.overlap = overlap and payload == "delta"
        self.synced = np.zeros(0, np.float32)
        self.pending: Future | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.pushes = 0
        self.staleness: list[int] = []

    def start(self, model: keras.Model, worker: int) -> None:
        super().start(model, worker)
        self.synced, _ = self.client.pull()
        set_flat_weights(model, self.synced)
        if self.overlap:
            self.pool = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"kerasonspark-push-{worker}"
            )

    def schedule(self, steps: int, epoch: int) -> list[int]:
        runs = [self.window] * (steps // self.window)
        return runs + [steps % self.window] if steps % self.window else runs

    def _push(self, update: np.ndarray, samples: int) -> np.ndarray:
        if self.delta_dtype == "bfloat16":
            update = wire.to_bfloat16(update)
        reply, header = self.client.push(update, self.shapes, window=self.window, samples=samples)
        self.pushes += 1
        self.staleness.append(header.get("staleness", 0))
        return reply

    def exchange(self, model: keras.Model, samples: int) -> None:
        if samples == 0:
            return
        weights = get_flat_weights(model)
        if self.payload == "weights":
            self.synced = self._push(weights, samples)
            set_flat_weights(model, self.synced)
            return
        weights -= self.synced  # now the local progress since the last exchange
        if self.pool is None:
            self.synced = self._push(weights, samples)
        else:
            center = self.pending.result() if self.pending is not None else self.synced
            self.pending = self.pool.submit(self._push, weights, samples)
            self.synced = center + weights
        set_flat_weights(model, self.synced)

    def _drain(self, model: keras.Model) -> None:
        if self.pending is not None:
            center = self.pending.result()
            self.pending = None
            self.synced = center + (get_flat_weights(model) - self.synced)
            set_flat_weights(model, self.synced)

    def end_epoch(self, model: keras.Model, epoch: int) -> None:
        self._drain(model)

    def epoch_center(self, model: keras.Model, center: np.ndarray) -> None:
        if self.payload == "weights":
            # elastic averaging: each worker keeps its own weights, tied to the center by the rule
            return
        self.synced = center.copy()
        set_flat_weights(model, self.synced)

    def finish(self, model: keras.Model) -> dict[str, Any]:
        self._drain(model)
        return {
            "pushes": self.pushes,
            **self.traffic(),
            "median_staleness": float(np.median(self.staleness)) if self.staleness else 0.0,
        }

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        super().close()


class ShardedPushPullExchange(ShardedServerExchange, PushPullExchange):
    """Worker side of a sharded center: each push split by shard, each shard applying the rule
    (with its own staleness) and answering its part of the weights to continue from. At each
    epoch's end every worker fences every shard; each owner then mirrors its shard, with the
    pushes it holds, to the driver."""

    def __init__(
        self,
        exchange: PushPullExchange,
        rule: UpdateRule,
        lock: bool,
        num_workers: int,
        state: list[tuple[int, int]],
    ) -> None:
        PushPullExchange.__init__(
            self,
            exchange.url,
            exchange.secret,
            exchange.window,
            exchange.payload,
            exchange.delta_dtype,
            exchange.timeout,
            exchange.overlap,
            exchange.lr_scaling,
        )
        self.shard_over(num_workers, exchange.timeout)
        self.rule, self.lock, self.state = rule, lock, state
        self.fences = 0
        self.push_seconds = 0.0

    def start(self, model: keras.Model, worker: int) -> None:
        super().start(model, worker)
        self.open_center(self.synced, rule=self.rule, lock=self.lock, state=self.state)

    def _push(self, update: np.ndarray, samples: int) -> np.ndarray:
        if self.delta_dtype == "bfloat16":
            update = wire.to_bfloat16(update)
        started = time.perf_counter()
        reply, staleness = self.center.push(update, self.window, samples)
        self.push_seconds += time.perf_counter() - started
        self.pushes += 1
        self.staleness.append(max(staleness))
        return reply

    def end_epoch(self, model: keras.Model, epoch: int) -> None:
        super().end_epoch(model, epoch)
        # every worker's last push of the epoch is in before the owner copies its shard
        self.center.fence_and_mirror(self.fences)
        self.fences += 1

    def finish(self, model: keras.Model) -> dict[str, Any]:
        return self.sharded_figures(super().finish(model), self.push_seconds)


def run_asynchronous(job: TrainingJob, options: AsyncOptions, lock: bool) -> TrainingResult:
    """Train ``job`` with workers that push to a driver-side parameter server without waiting.

    Args:
        lock: apply pushes under the server's lock (``async``) or without it (``hogwild``).
    """
    scaling = options.lr_scaling(job)
    factor = scaling.factor if scaling else 1.0
    rule = options.make_rule(max(factor, 1.0))
    # moving statistics travel past the rule (kerasonspark._state)
    state = state_ranges(job.model)
    store = ParameterStore(
        job.spec.weights, job.spec.shapes, job.config.num_workers, rule=rule, lock=lock, state=state
    )

    def make_exchange(url: str, secret: bytes) -> PushPullExchange:
        exchange = PushPullExchange(
            url,
            secret,
            options.window,
            rule.payload,
            options.delta_dtype,
            options.timeout,
            options.overlap,
            scaling,
        )
        if options.center == "driver":
            return exchange
        # the worker count is read when each stage starts: a restart may go on with fewer
        return ShardedPushPullExchange(exchange, rule, lock, job.config.num_workers, state)

    outcome = job.serve(store, make_exchange)
    return job.result(
        outcome.reports,
        store.center.copy(),
        outcome.seconds,
        engine_stats={
            "rule": rule.name,
            "window": options.window,
            "lr_scale": factor,
            "staleness_floor": rule.floor if isinstance(rule, DynSGD) else None,
            "center": options.center,
        },
    )
