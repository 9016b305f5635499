"""The pull / train / push loop shared by the asynchronous engines (``async`` and ``hogwild``).

Each worker starts from the center weights, trains ``window`` local steps with its own
optimizer, and pushes its change (or, for elastic averaging, its weights). The server applies
the push under the configured :class:`~kerasonspark.parameter_server.UpdateRule` and answers
with the weights the worker continues from, so one exchange is one round trip on one
keep-alive connection. Workers never wait for each other.
"""

from __future__ import annotations

import math
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
        delta_fraction: the fraction of each delta's elements a worker pushes, largest magnitude
            first (1.0, the default, pushes whole deltas). Below 1 a push is sparse (positions and
            values, wire format version 2) and each worker keeps what it did not send, adding it
            to its next delta (error feedback: Strom 2015; Lin et al., "Deep Gradient
            Compression", 2018), so every change reaches the center in time. Delta rules with
            ``center="driver"`` only. Replies carry what changed since the worker's copy when
            that is little enough (see docs/guide/engines.md, "Sparse exchanges").
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
    delta_fraction: float = 1.0
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
        if not 0.0 < self.delta_fraction <= 1.0:
            raise ValueError(
                "Expected `delta_fraction` in (0, 1] (the fraction of each delta pushed). "
                f"Received: delta_fraction={self.delta_fraction!r}."
            )
        if self.delta_fraction < 1.0 and (self.rule == "easgd" or self.center != "driver"):
            raise ValueError(
                "`delta_fraction` below 1 compresses deltas pushed to the driver's server: it "
                "needs a delta rule (not 'easgd', whose workers push weights) and "
                f"center='driver'. Received: rule={self.rule!r}, center={self.center!r}."
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


class ErrorFeedback:
    """Top-k sparsification of deltas with error feedback (Strom 2015; Lin et al. 2018).

    Each call adds the new delta to what earlier calls kept back, sends the ``fraction`` of the
    sum's elements of largest magnitude and keeps the rest for the next call: nothing a worker
    learns is dropped, only delayed.

    Args:
        fraction: the fraction of elements sent, in (0, 1].
        size: the delta's number of elements.
    """

    def __init__(self, fraction: float, size: int) -> None:
        self.count = min(size, max(1, math.ceil(fraction * size)))
        self.residual = np.zeros(size, np.float32)

    def select(self, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(positions, values)`` to send for ``delta``: ascending uint32 positions, float32
        values; the rest of ``residual + delta`` stays in :attr:`residual`."""
        self.residual += delta
        size = self.residual.size
        positions = np.argpartition(np.abs(self.residual), size - self.count)[size - self.count :]
        positions.sort()
        values = self.residual[positions]  # fancy indexing copies
        self.residual[positions] = 0.0
        return positions.astype(np.uint32), values


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
        delta_fraction: float = 1.0,
    ) -> None:
        super().__init__(url, secret, timeout)
        self.lr_scaling = lr_scaling
        self.window, self.payload, self.delta_dtype = window, payload, delta_dtype
        self.delta_fraction = delta_fraction
        self.feedback: ErrorFeedback | None = None
        # this worker's copy of the center and its version, which sparse replies bring up to date
        self.center_copy = np.zeros(0, np.float32)
        self.center_version: int | None = None
        self.overlap = overlap and payload == "delta"
        self.synced = np.zeros(0, np.float32)
        self.pending: Future | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.pushes = 0
        self.staleness: list[int] = []

    def start(self, model: keras.Model, worker: int) -> None:
        super().start(model, worker)
        self.synced, self.center_version = self.client.pull()
        self.center_copy = self.synced
        set_flat_weights(model, self.synced)
        if self.delta_fraction < 1.0 and self.payload == "delta":
            self.feedback = ErrorFeedback(self.delta_fraction, self.synced.size)
        if self.overlap:
            self.pool = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"kerasonspark-push-{worker}"
            )

    def schedule(self, steps: int, epoch: int) -> list[int]:
        runs = [self.window] * (steps // self.window)
        return runs + [steps % self.window] if steps % self.window else runs

    def _push(self, update: np.ndarray, samples: int, whole: bool = False) -> np.ndarray:
        """Push ``update`` (compressed unless ``whole``; a delta that is mostly zeros travels as
        its nonzero part) and return the center to continue from."""
        if self.payload == "weights":
            return self._send(update, samples)[0]
        positions = None
        if self.feedback is not None and not whole:
            positions, update = self.feedback.select(update)
        elif (nonzero := wire.nonzero_part(update)) is not None:
            positions, update = nonzero
        reply, header = self._send(update, samples, positions, self.center_version)
        changed = header.get("indices")
        if changed is None:
            self.center_copy = reply
        else:
            if not self.center_copy.flags.writeable:  # a view of an earlier reply
                self.center_copy = self.center_copy.copy()
            self.center_copy[changed] = wire.as_float32(reply, header["dtype"])
        self.center_version = header["version"]
        return self.center_copy

    def _send(
        self,
        update: np.ndarray,
        samples: int,
        positions: np.ndarray | None = None,
        since: int | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if self.delta_dtype == "bfloat16":
            update = wire.to_bfloat16(update)
        reply, header = self.client.push(
            update, self.shapes, self.window, samples, indices=positions, since=since
        )
        self.pushes += 1
        self.staleness.append(header.get("staleness", 0))
        return reply, header

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
        if self.feedback is not None and self.feedback.residual.any():
            # what compression held back reaches the center before the epoch's center is read
            held_back = self.feedback.residual.copy()
            self.feedback.residual[:] = 0.0
            self.synced = self._push(held_back, 0, whole=True)
            set_flat_weights(model, self.synced)

    def epoch_center(self, model: keras.Model, center: np.ndarray) -> None:
        if self.payload == "weights":
            # elastic averaging: each worker keeps its own weights, tied to the center by the rule
            return
        self.synced = center.copy()
        # a copy of the center at a version this worker does not know: the next reply is whole
        self.center_copy, self.center_version = self.synced, None
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

    def _push(self, update: np.ndarray, samples: int, whole: bool = False) -> np.ndarray:
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
            options.delta_fraction,
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
