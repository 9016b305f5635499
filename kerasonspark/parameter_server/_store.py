"""The state behind the parameter server: center weights, versions, round barriers, statistics.

The store is independent of HTTP so its logic can be tested directly; :mod:`.app` exposes it.
Updates are validated (shape, dtype, finiteness) before they touch the center, and so is what
they would make of it: a finite update whose result overflows float32 is refused too (422), so a
bad request never corrupts the weights. Only workers ``0 .. num_workers - 1`` push or meet.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import BarrierTimeoutError, ParameterServerError, WireFormatError
from ._rules import OuterNesterov, UpdateRule
from .wire import shapes_size, to_dense

FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class _Round:
    sum: np.ndarray | None = None
    bound: float = 0.0  # the sum of the contributions' largest magnitudes: |sum| stays below it
    samples: dict[int, int] = field(default_factory=dict)
    result: np.ndarray | None = None
    failed: str | None = None


def _overflow(what: str) -> WireFormatError:
    return WireFormatError(
        f"The update is finite, but {what} would overflow float32 (beyond ±3.4e38): it was refused "
        "and the center weights are unchanged. The worker's weights have diverged; lower the "
        "learning rate.",
        status=422,
    )


class RoundClosedError(ParameterServerError):
    """The server is shutting down; no more rounds complete."""


class ParameterStore:
    """Center weights shared by the workers of one training run.

    Args:
        weights: the initial weights, flat float32.
        shapes: the model's weight shapes (for validating pushes).
        num_workers: how many workers take part in each round barrier.
        rule: how pushes update the center (asynchronous engines); ``None`` allows only barriers.
        lock: apply pushes under a lock; ``False`` is hogwild (overlapping writes are counted).
        barrier_timeout: seconds a round barrier waits for the missing workers.
        outer: how a completed round's average moves the center; ``None`` makes it the center.
        state: element ranges ``(start, stop)`` of the weights that are layer state, not
            parameters (a ``BatchNormalization``'s moving statistics, which the forward pass
            updates, not the optimizer; :func:`kerasonspark._state.state_ranges`). A push's
            state bypasses the rule: a delta is added as the worker made it (never divided by
            staleness or window), pushed weights are taken as they are.
    """

    def __init__(
        self,
        weights: np.ndarray,
        shapes: Sequence[Sequence[int]],
        num_workers: int,
        rule: UpdateRule | None = None,
        lock: bool = True,
        barrier_timeout: float = 600.0,
        outer: OuterNesterov | None = None,
        state: Sequence[tuple[int, int]] = (),
    ) -> None:
        self.shapes = [tuple(s) for s in shapes]
        self.size = shapes_size(self.shapes)
        if weights.dtype != np.float32 or weights.shape != (self.size,):
            raise ValueError(
                f"Expected flat float32 weights of {self.size} elements. Received: {weights.dtype} "
                f"{weights.shape}."
            )
        self._center = weights.copy()
        self.num_workers = num_workers
        self.rule = rule
        self.use_lock = lock
        self.barrier_timeout = barrier_timeout
        self.outer = outer
        self.state = [(int(a), int(b)) for a, b in state if 0 <= a < b <= self.size]
        self.version = 0
        self._cond = threading.Condition()
        self._rounds: dict[int, _Round] = {}
        self._closed = False
        self.stop_requested = False
        self._applying = 0
        self.started = time.time()
        self.counters: dict[str, int] = defaultdict(int)
        # staleness -> pushes; bounded, unlike a list per push
        self.staleness: Counter[int] = Counter()
        self.worker_pushes: dict[int, int] = defaultdict(int)
        self.worker_samples: dict[int, int] = defaultdict(int)
        self.worker_pull_version: dict[int, int] = {}
        self.failures: dict[int, str] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        # A sharded center (see `publish_shard` and `mirror`): the shard servers' addresses of
        # this stage, the mirrored shards of rounds not yet whole, the rounds earlier stages held.
        self._shard_urls: dict[int, str] = {}
        self._mirrors: dict[int, dict[int, tuple[np.ndarray, int, dict[int, int]]]] = {}
        self._mirrored_key = -1
        self._before_stage: tuple[int, dict[int, int]] = (0, {})  # rounds, pushes per worker
        self._fences: dict[int, set[int]] = {}
        self._adopted: dict[str, Any] | None = None  # the figures of a copy served in the stage
        # What changed when, for replies of only the elements a worker's copy lacks: the version
        # of each element's last sparse push (made on the first), and the version below which a
        # copy may lack any element (after a whole push, a round, a mirror, an adoption).
        self._changed: np.ndarray | None = None
        self._whole_since = 0

    # -- counters: changed under the lock, since every request thread changes them ---------
    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` (``refused_auth``, ``refused_shape``, ...)."""
        with self._cond:
            self.counters[name] += n

    def count_bytes(self, received: int = 0, sent: int = 0) -> None:
        """Add request and reply bytes to the traffic figures."""
        with self._cond:
            self.bytes_in += received
            self.bytes_out += sent

    # -- validation ---------------------------------------------------------------------
    def check_update(
        self,
        shapes: Sequence[Sequence[int]],
        update: np.ndarray,
        indices: np.ndarray | None = None,
    ) -> np.ndarray:
        """Validate a pushed array against the model; returns its values as float32.

        With ``indices`` the update is sparse (the values at those positions of a delta, the
        rest zero; :mod:`~kerasonspark.parameter_server.wire`), refused where pushes carry
        weights; :meth:`push` takes the values with their positions.

        Raises:
            WireFormatError: wrong shapes, a sparse update of weights (status 400) or NaN/Inf
                values (status 422).
        """
        if [tuple(s) for s in shapes] != self.shapes:
            self.count("refused_shape")
            raise WireFormatError(
                f"Update shapes do not match the model: expected {len(self.shapes)} arrays with "
                f"shapes {self.shapes[:4]}{'...' if len(self.shapes) > 4 else ''}. Received: "
                f"{list(shapes)[:4]}."
            )
        values = self._finite(update, "Update")
        if indices is None:
            return values
        if self.rule is not None and self.rule.payload == "weights":
            self.count("refused_sparse")
            raise WireFormatError(
                f"Rule {self.rule.name!r} takes each worker's whole weights; a sparse push carries "
                "a delta. Push whole arrays, or choose a delta rule."
            )
        return values

    def _finite(self, values: np.ndarray, what: str) -> np.ndarray:
        values = values.astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            self.count("refused_nonfinite")
            raise WireFormatError(
                f"{what} holds {int((~np.isfinite(values)).sum())} NaN or Inf values; it was "
                "refused and the center weights are unchanged. Lower the learning rate or clip "
                "gradients.",
                status=422,
            )
        return values

    def __getstate__(self) -> dict[str, Any]:
        # A store travels to the training stage when the server lives there; its lock does not.
        return {**self.__dict__, "_cond": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _cond=threading.Condition())

    def adopt(self, center: np.ndarray, figures: Mapping[str, Any]) -> None:
        """Take the center and the figures of a copy of this store served elsewhere (in the
        training stage): :attr:`center` then holds ``center`` and :meth:`stats` returns
        ``figures``."""
        if center.dtype != np.float32 or center.shape != (self.size,):
            raise ValueError(f"Expected flat float32 weights of {self.size} elements.")
        with self._cond:
            self._center = center.copy()
            self._adopted = dict(figures)
            self._whole_since = self.version + 1  # the version did not move; the center did

    # -- pull / push ----------------------------------------------------------------------
    @property
    def center(self) -> np.ndarray:
        """The current center weights (do not modify)."""
        return self._center

    def pull(self, worker: int) -> tuple[np.ndarray, int]:
        """Current center and its version; remembers the version for the worker's staleness."""
        with self._cond:
            self.worker_pull_version[worker] = self.version
            self.counters["pulls"] += 1
            return self._center, self.version

    def push(
        self,
        worker: int,
        update: np.ndarray,
        window: int,
        samples: int,
        positions: np.ndarray | None = None,
    ) -> tuple[np.ndarray, int, int]:
        """Apply a validated update with the rule; returns ``(reply, version, staleness)``.

        With ``positions`` the push is sparse: ``update`` holds the delta's values there, zero
        elsewhere. A rule that adds a multiple of the delta (:meth:`UpdateRule.scale`) is
        applied at those positions only, and :meth:`changed_since` then knows what changed; any
        other rule sees the whole delta, and the push counts as one that may change everything.

        Raises:
            ParameterServerError: no update rule is configured (409), the worker id is out of
                range (400), the store is closed (503), or the result would overflow (422).
        """
        if self.rule is None:
            raise ParameterServerError(
                "This run has no update rule; pushes are not accepted (use the round barrier).", 409
            )
        self._check_worker(worker)
        if self._closed:
            raise RoundClosedError("The parameter server is shutting down.", 503)
        if positions is not None:
            if self.rule.scale(0, max(window, 1)) is not None:
                return self._push_at(worker, positions, update, window, samples)
            # another rule may change any element: a whole push from here on
            update, positions = to_dense(positions, update, self.size), None
        if self.use_lock:
            with self._cond:
                staleness = self.version - self.worker_pull_version.get(worker, 0)
                # an overflow is refused just below
                with np.errstate(over="ignore", invalid="ignore"):
                    new_center, reply = self.rule.apply(self._center, update, staleness, window)
                    self._carry_state(self._state_of(self._center), update, new_center, reply)
                if not np.isfinite(new_center).all() or (
                    reply is not new_center and not np.isfinite(reply).all()
                ):
                    self.counters["refused_overflow"] += 1
                    raise _overflow("the new center")
                self._center = new_center
                self._record_push(worker, staleness, samples, None)
                self.worker_pull_version[worker] = self.version
                return reply, self.version, staleness
        with self._lock_free(worker, self._center, update, samples, None) as staleness:
            # the state as it was, since the rule writes into the center itself
            kept = [part.copy() for part in self._state_of(self._center)]
            reply = self.rule.apply_in_place(self._center, update, staleness, window)
            self._carry_state(kept, update, self._center, reply)
        return reply, self.version, staleness

    @contextlib.contextmanager
    def _lock_free(
        self,
        worker: int,
        written: np.ndarray,
        update: np.ndarray,
        samples: int,
        positions: np.ndarray | None,
    ) -> Iterator[int]:
        """Around a hogwild write of ``update`` into the center's elements ``written``: refuses
        what could overflow, counts overlapping writers, yields the push's staleness and records
        the push however the write ends.

        No lock is held around the arithmetic. Concurrent writers are counted, not prevented, so
        the result cannot be checked before it lands: the bound is checked instead. A push moves
        the center by at most max|update| + max|center| (true of every rule here), and at most
        num_workers pushes overlap, so the center stays below FLOAT32_MAX / 2 + what they add.
        """
        largest = float(np.abs(written).max(initial=0.0))
        if (
            largest + self.num_workers * (float(np.abs(update).max(initial=0.0)) + largest)
            > FLOAT32_MAX / 2
        ):
            self.count("refused_overflow")
            raise _overflow("the center, with lock-free pushes overlapping it,")
        with self._cond:
            staleness = self.version - self.worker_pull_version.get(worker, 0)
            if self._applying:
                self.counters["overlapping_writes"] += 1
            self._applying += 1
        try:
            yield staleness
        finally:
            with self._cond:
                self._applying -= 1
                self._record_push(worker, staleness, samples, positions)
                self.worker_pull_version[worker] = self.version

    def _push_at(
        self, worker: int, positions: np.ndarray, values: np.ndarray, window: int, samples: int
    ) -> tuple[np.ndarray, int, int]:
        """A sparse push under a rule that adds ``scale * delta``: only ``positions`` are read
        and written (the locked path still copies the center, which replies may be sending)."""
        rule = self.rule
        assert rule is not None
        in_state = np.zeros(len(positions), bool)
        for a, b in self.state:  # moving statistics are added as pushed, past the rule
            in_state |= (positions >= a) & (positions < b)

        def scaled(staleness: int) -> np.ndarray:
            step = values * np.float32(rule.scale(staleness, window))
            step[in_state] = values[in_state]
            return step

        if self.use_lock:
            with self._cond:
                staleness = self.version - self.worker_pull_version.get(worker, 0)
                with np.errstate(over="ignore", invalid="ignore"):
                    moved = self._center[positions] + scaled(staleness)
                if not np.isfinite(moved).all():
                    self.counters["refused_overflow"] += 1
                    raise _overflow("the new center")
                new_center = self._center.copy()
                new_center[positions] = moved
                self._center = new_center
                self._record_push(worker, staleness, samples, positions)
                self.worker_pull_version[worker] = self.version
                return new_center, self.version, staleness
        written = self._center[positions]  # the bound over the elements this push writes
        with self._lock_free(worker, written, values, samples, positions) as staleness:
            self._center[positions] += scaled(staleness)
        return self._center, self.version, staleness

    def _state_of(self, weights: np.ndarray) -> list[np.ndarray]:
        """``weights``' state ranges (views)."""
        return [weights[a:b] for a, b in self.state]

    def _carry_state(
        self,
        before: list[np.ndarray],
        update: np.ndarray,
        new_center: np.ndarray,
        reply: np.ndarray,
    ) -> None:
        """Set the state ranges of ``new_center`` (and of ``reply``) past the rule: ``before``
        (the center's state ranges before the push) plus the pushed delta, or the pushed
        weights."""
        taken = self.rule is not None and self.rule.payload == "weights"
        for (a, b), was in zip(self.state, before, strict=True):
            new_center[a:b] = update[a:b] if taken else was + update[a:b]
            if reply is not new_center:
                reply[a:b] = new_center[a:b]

    def _record_push(
        self, worker: int, staleness: int, samples: int, positions: np.ndarray | None
    ) -> None:
        self.version += 1
        if positions is None:
            self._whole_since = self.version
        else:
            if self._changed is None:
                self._changed = np.zeros(self.size, np.uint32)
            self._changed[positions] = self.version
        self.counters["updates"] += 1
        self.staleness[staleness] += 1
        self.worker_pushes[worker] += 1
        self.worker_samples[worker] += samples

    def changed_since(self, version: int, most: int) -> np.ndarray | None:
        """Positions of the center's elements that changed after ``version`` (ascending), or
        ``None`` when that is not known element by element or is more than ``most`` of them:
        then the whole center is the answer.

        The marks only grow, so a push landing meanwhile can add positions, never hide one: a
        worker given the values at these positions holds the center as of the current version.
        """
        with self._cond:
            changed = self._changed
            if changed is None or version < self._whole_since:
                return None
        newer = changed > version
        if int(np.count_nonzero(newer)) > most:
            return None
        return np.flatnonzero(newer).astype(np.uint32)

    # -- round barrier --------------------------------------------------------------------
    def barrier(
        self,
        round: int,
        worker: int,
        weights: np.ndarray,
        samples: int,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Contribute to round ``round`` and wait for the sample-weighted average of all workers.

        A worker with ``samples == 0`` takes part but does not weigh in; when no worker has
        samples the center is returned unchanged.

        Raises:
            BarrierTimeoutError: the round did not fill in time (the message names the missing
                workers), or another waiter already failed it.
            ParameterServerError: the worker already arrived in this round (409) or its id is
                out of range (400).
        """
        self._check_worker(worker)
        if not 0 <= samples < 2**53:
            raise ParameterServerError(
                f"`samples` must be an integer from 0 to 2**53 - 1. Received: samples={samples}.",
                400,
            )
        # Weighed before the round sees it, so a refused arrival leaves no trace and may come again.
        with np.errstate(over="ignore"):  # an overflow is refused just below
            contribution = weights * np.float32(samples) if samples else None
        largest = float(np.abs(contribution).max(initial=0.0)) if contribution is not None else 0.0
        if not np.isfinite(largest):
            self.count("refused_overflow")
            raise _overflow(f"the weights times their {samples} samples")
        deadline = time.monotonic() + (self.barrier_timeout if timeout is None else timeout)
        with self._cond:
            if self._closed:
                raise RoundClosedError("The parameter server is shutting down.", 503)
            state = self._rounds.setdefault(round, _Round())
            if self.stop_requested:
                return self._center  # training is stopping: no worker waits for the others
            if self.failures and state.failed is None and state.result is None:
                # A worker that failed never arrives: a round opened after its report cannot
                # complete either.
                state.failed = (
                    f"Round {round} cannot complete: worker(s) {sorted(self.failures)} failed."
                )
            if state.failed:
                raise BarrierTimeoutError(state.failed, round, tuple(self._missing(state)))
            if worker in state.samples:
                raise ParameterServerError(
                    f"Worker {worker} already arrived in round {round}.", 409
                )
            if state.bound + largest > FLOAT32_MAX:
                self.counters["refused_overflow"] += 1
                raise _overflow(f"round {round}'s sum")
            state.samples[worker] = samples
            if contribution is not None:
                state.bound += largest
                if state.sum is None:
                    state.sum = contribution
                else:
                    state.sum += contribution
            if len(state.samples) == self.num_workers:
                total = sum(state.samples.values())
                if total and state.sum is not None:
                    state.sum /= np.float32(total)
                    self._center = (
                        state.sum
                        if self.outer is None
                        else self.outer.step(self._center, state.sum)
                    )
                state.result = self._center
                state.sum = None
                self.version += 1
                self._whole_since = self.version
                self.counters["rounds"] += 1
                for w, n in state.samples.items():
                    self.worker_samples[w] += n
                for old in [r for r in self._rounds if r < round]:
                    del self._rounds[old]
                self._cond.notify_all()
            while state.result is None and state.failed is None and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = self._missing(state)
                    state.failed = (
                        f"Round {round} timed out after waiting for worker(s) {missing} "
                        f"({len(state.samples)} of {self.num_workers} arrived). A worker died or "
                        "is stuck; its Spark task log says why."
                    )
                    self.counters["failed_rounds"] += 1
                    self._cond.notify_all()
                    break
                self._cond.wait(remaining)
            if state.result is not None:
                return state.result
            if self._closed:
                raise RoundClosedError("The parameter server shut down during the round.", 503)
            raise BarrierTimeoutError(
                state.failed or "round failed", round, tuple(self._missing(state))
            )

    # -- a sharded center: the directory of shard servers, and their mirrored copies ------------
    def publish_shard(self, worker: int, url: str, timeout: float) -> list[str]:
        """Record where ``worker`` serves its shard of the center; waits for every worker's and
        returns their addresses in worker order.

        Raises:
            BarrierTimeoutError: some workers did not publish within ``timeout`` seconds.
            ParameterServerError: the worker already published in this stage (409), its id is out
                of range (400), or the store is closed (503).
        """
        self._check_worker(worker)
        deadline = time.monotonic() + timeout
        with self._cond:
            if worker in self._shard_urls:
                raise ParameterServerError(
                    f"Worker {worker} already published its shard's address in this stage.", 409
                )
            self._shard_urls[worker] = url
            self._cond.notify_all()
            self._wait_for_every_worker(
                self._shard_urls.keys(),
                "The shard servers' directory",
                -1,
                deadline,
                lambda missing: (
                    f"Worker(s) {missing} did not publish their shard's address "
                    f"within {timeout:g} s."
                ),
            )
            return [self._shard_urls[w] for w in range(self.num_workers)]

    def mirror(
        self,
        worker: int,
        key: int,
        offset: int,
        values: np.ndarray,
        rounds: int,
        pushes: Mapping[int, int] | None = None,
    ) -> bool:
        """Take ``worker``'s copy of its shard of the center, the ``key``-th of this stage, which
        holds ``rounds`` rounds and ``pushes[w]`` pushes of each worker ``w`` of this stage.

        When every shard of ``key`` has arrived they become the center, and what it holds (what a
        restart resumes from) is the earlier stages' plus the least any shard holds. Returns
        whether this copy completed the center.

        Raises:
            WireFormatError: the shard is not the worker's (offset or length, 400) or holds NaN or
                Inf (422).
            ParameterServerError: ``key`` is not newer than the last complete one (409).
        """
        self._check_worker(worker)
        start, stop = shard_bounds(self.size, self.num_workers)[worker]
        if offset != start or values.shape != (stop - start,):
            self.count("refused_shape")
            raise WireFormatError(
                f"Worker {worker} of {self.num_workers} owns elements {start} to {stop} of the "
                f"center. Received: {values.size} elements from offset {offset}."
            )
        values = self._finite(values, "The mirrored shard")
        with self._cond:
            if key <= self._mirrored_key:
                raise ParameterServerError(
                    f"Mirror {key} is not newer than the center's ({self._mirrored_key}).", 409
                )
            shards = self._mirrors.setdefault(key, {})
            shards[worker] = (values.copy(), rounds, dict(pushes or {}))
            if len(shards) < self.num_workers:
                return False
            self._center = np.concatenate([shards[w][0] for w in range(self.num_workers)])
            self.version += 1
            self._whole_since = self.version
            rounds_before, pushes_before = self._before_stage
            self.counters["rounds"] = rounds_before + min(r for _, r, _ in shards.values())
            for w in {w for _, _, held in shards.values() for w in held}:
                self.worker_pushes[w] = pushes_before.get(w, 0) + min(
                    held.get(w, 0) for _, _, held in shards.values()
                )
            self.counters["updates"] = sum(self.worker_pushes.values())
            self.counters["mirrors"] += 1
            self._mirrored_key = key
            for old in [k for k in self._mirrors if k <= key]:
                del self._mirrors[old]
            return True

    def fence(self, key: int, worker: int, wait: bool, timeout: float | None = None) -> None:
        """``worker`` sent everything it sends before fence ``key``; with ``wait``, wait until
        every worker has (a shard's owner then holds their last pushes, and mirrors them).

        Raises:
            BarrierTimeoutError: the fence did not fill in time, or a worker failed.
        """
        self._check_worker(worker)
        deadline = time.monotonic() + (self.barrier_timeout if timeout is None else timeout)
        with self._cond:
            arrived = self._fences.setdefault(key, set())
            arrived.add(worker)
            self._cond.notify_all()
            if wait:
                self._wait_for_every_worker(
                    arrived,
                    f"Fence {key}",
                    key,
                    deadline,
                    lambda missing: f"Fence {key} timed out waiting for worker(s) {missing}.",
                )
            for old in [k for k in self._fences if k < key]:
                del self._fences[old]

    def _wait_for_every_worker(
        self,
        arrived: Collection[int],
        what: str,
        key: int,
        deadline: float,
        late: Callable[[list[int]], str],
    ) -> None:
        """Wait, holding the lock, until every worker is in ``arrived``; ``late(missing)`` says
        why when the deadline passes.

        Raises:
            RoundClosedError: the store closed (503).
            BarrierTimeoutError: a worker failed, or the deadline passed; names the missing.
        """
        while len(arrived) < self.num_workers:
            missing = tuple(w for w in range(self.num_workers) if w not in arrived)
            if self._closed:
                raise RoundClosedError("The parameter server is shutting down.", 503)
            if self.failures:
                raise BarrierTimeoutError(
                    f"{what} cannot complete: worker(s) {sorted(self.failures)} failed.",
                    key,
                    missing,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BarrierTimeoutError(late(list(missing)), key, missing)
            self._cond.wait(remaining)

    def _check_worker(self, worker: int) -> None:
        if not 0 <= worker < self.num_workers:
            raise ParameterServerError(
                f"Worker id must be in [0, {self.num_workers}). Received: worker={worker}.", 400
            )

    def wait_for_arrivals(self, round: int, count: int, timeout: float) -> list[int]:
        """Wait until ``count`` workers wait in ``round`` (or it completed); returns who arrived.

        Raises:
            TimeoutError: fewer arrived within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                state = self._rounds.get(round)
                arrived = sorted(state.samples) if state is not None else []
                if len(arrived) >= count:
                    return arrived
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{len(arrived)} of {count} workers arrived in round {round} within "
                        f"{timeout} s."
                    )
                # Arrivals do not notify (the barrier's hot path stays as it was): look again
                # shortly.
                self._cond.wait(min(remaining, 0.05))

    def _missing(self, state: _Round) -> list[int]:
        return [w for w in range(self.num_workers) if w not in state.samples]

    # -- failures, stops, stats, lifecycle --------------------------------------------------
    def request_stop(self) -> None:
        """Ask every worker to stop at its next exchange (a callback set ``model.stop_training``).

        Open rounds complete at once with the center as it is, and so does every later round,
        so workers that are mid-epoch meet at the epoch boundary without waiting for each other.
        Replies carry ``"stop": true`` from now on.
        """
        with self._cond:
            self.stop_requested = True
            for state in self._rounds.values():
                if state.result is None and state.failed is None:
                    state.result = self._center
            self._cond.notify_all()

    def report_failure(self, worker: int, message: str) -> None:
        """Record that a worker failed; fails every open round so no one waits for it."""
        with self._cond:
            self.failures[worker] = message[-4000:]
            for number, state in self._rounds.items():
                if state.result is None and state.failed is None:
                    state.failed = f"Round {number} cannot complete: worker {worker} failed."
            self._cond.notify_all()

    def applied_exchanges(self, worker: int) -> int:
        """Exchanges of ``worker`` the center holds: its applied pushes, or the completed rounds."""
        with self._cond:
            return self.worker_pushes.get(worker, 0) + self.counters["rounds"]

    def snapshot(self) -> tuple[np.ndarray, dict[int, int]]:
        """A copy of the center and each worker's applied exchanges, taken together."""
        with self._cond:
            return self._center.copy(), {
                w: self.worker_pushes.get(w, 0) + self.counters["rounds"]
                for w in range(self.num_workers)
            }

    def reopen(self) -> None:
        """Forget a failed stage's failure reports and open rounds, so a restarted stage can meet.

        The center, its version and every counter carry over: the restarted workers continue
        from them. Round numbers start again at 0, and a sharded center's directory is emptied
        (the restarted workers serve its shards anew).
        """
        with self._cond:
            self.failures.clear()
            self._rounds.clear()
            self._shard_urls.clear()
            self._mirrors.clear()
            self._fences.clear()
            self._mirrored_key = -1
            self._before_stage = (self.counters["rounds"], dict(self.worker_pushes))
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter; no further round completes."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stats(self) -> dict:
        """JSON-ready statistics of the run so far."""
        if self._adopted is not None:
            return dict(self._adopted)
        with self._cond:
            staleness = staleness_summary(self.staleness)
            elapsed = max(time.time() - self.started, 1e-9)
            return {
                "version": self.version,
                "updates": self.counters["updates"],
                "rounds": self.counters["rounds"],
                "mirrors": self.counters["mirrors"],
                "pulls": self.counters["pulls"],
                "refused": {
                    k[len("refused_") :]: v
                    for k, v in self.counters.items()
                    if k.startswith("refused_")
                },
                "refused_total": sum(
                    v for k, v in self.counters.items() if k.startswith("refused_")
                ),
                "failed_rounds": self.counters["failed_rounds"],
                "overlapping_writes": self.counters["overlapping_writes"],
                "staleness": staleness,
                "worker_pushes": {str(k): v for k, v in sorted(self.worker_pushes.items())},
                "worker_samples": {str(k): v for k, v in sorted(self.worker_samples.items())},
                "failures": {str(k): v for k, v in self.failures.items()},
                "mb_in": self.bytes_in / 1e6,
                "mb_out": self.bytes_out / 1e6,
                "mb_per_s": (self.bytes_in + self.bytes_out) / 1e6 / elapsed,
                "elapsed_s": elapsed,
            }


def shard_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each of ``parts`` contiguous shards of a flat array of ``size``
    elements, the first ``size % parts`` one element longer (as ``numpy.array_split``)."""
    if parts < 1:
        raise ValueError(f"Expected at least 1 shard. Received: parts={parts}.")
    base, extra = divmod(size, parts)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + base + (part < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def staleness_summary(counts: Counter[int]) -> dict:
    """min / median / max and the histogram (first 64 values) of a staleness count."""
    values = sorted(counts)
    if not values:
        return {"min": 0, "median": 0, "max": 0, "histogram": {}}
    half, seen, median = sum(counts.values()) // 2, 0, values[-1]
    for value in values:
        seen += counts[value]
        if seen > half:
            median = value
            break
    return {
        "min": values[0],
        "median": median,
        "max": values[-1],
        "histogram": {str(k): counts[k] for k in values[:64]},
    }
