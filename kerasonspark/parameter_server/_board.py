"""What the driver sees of a run while it trains: the workers' progress and the epoch gate.

Plain Python, independent of HTTP (:mod:`.app` exposes it), like :mod:`.store`.

At each epoch boundary every worker *arrives* (with its epoch's training metrics) and waits for
the others; the last arrival fixes the epoch's center (a copy of the store's center, which cannot
move while every worker waits). Each worker then scores that center on its share of the
validation rows and reports *ready* (with its scores), and waits for the driver's *decision*
(stop, or the next epoch's learning rate), which the driver gives after its callbacks ran.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import ParameterServerError
from ._store import ParameterStore, RoundClosedError

MAX_LOG_LINES = 200
HISTORY_POINTS = 600


@dataclass
class WorkerProgress:
    """The latest progress report of one worker."""

    epoch: int = -1
    samples: int = 0  # done in ``epoch``
    steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    total_samples: int = 0  # over the run
    first_report: float = 0.0
    updated: float = 0.0
    reports: int = 0
    pid: int = 0  # the worker's process on its host

    @property
    def samples_per_second(self) -> float:
        return (
            self.total_samples / max(self.updated - self.first_report, 1e-9)
            if self.reports > 1
            else 0.0
        )


@dataclass
class _Epoch:
    arrivals: dict[int, dict[str, Any]] = field(default_factory=dict)
    center: np.ndarray | None = None
    ready: dict[int, dict[str, Any]] = field(default_factory=dict)
    decision: dict[str, Any] | None = None
    first_arrival: float = 0.0
    all_arrived: float = 0.0


class EpochBoard:
    """Progress reports and epoch barriers of one training run.

    Args:
        store: the run's parameter store (its center is the epoch's center).
        num_workers: workers that meet at every epoch boundary.
        terminate_on_nan: a non-finite loss in a progress report asks every worker to stop
            (``keras.callbacks.TerminateOnNaN`` is among the callbacks).
    """

    def __init__(
        self, store: ParameterStore, num_workers: int, terminate_on_nan: bool = False
    ) -> None:
        self.store = store
        self.num_workers = num_workers
        self.terminate_on_nan = terminate_on_nan
        self._cond = threading.Condition()
        self._epochs: dict[int, _Epoch] = {}
        self._progress: dict[int, WorkerProgress] = {}
        self._history: dict[int, deque[tuple[float, float, float]]] = {}
        self._logs: deque[tuple[int, str]] = deque(maxlen=MAX_LOG_LINES)
        self._failed: str | None = None
        self._joined: set[tuple[str, int]] = set()
        self._closed = False
        self.started = time.time()
        self.restarts = 0
        self.version_at_restart = -1  # the store's version when the last restart reopened the board
        self.epoch_logs: list[dict[str, float]] = []  # the driver's merged logs, for the stats page

    # -- workers ----------------------------------------------------------------------------
    def report_progress(
        self,
        worker: int,
        epoch: int,
        samples: int,
        steps: int,
        metrics: dict[str, float],
        logs: list[str] | None = None,
        pid: int = 0,
    ) -> None:
        """Record a worker's progress in ``epoch`` (``samples`` and ``steps`` done in it so far)."""
        self._check_worker(worker)
        now = time.time()
        with self._cond:
            progress = self._progress.setdefault(worker, WorkerProgress(first_report=now))
            done_before = progress.samples if epoch == progress.epoch else 0
            progress.total_samples += max(samples - done_before, 0)
            progress.epoch, progress.samples, progress.steps = epoch, samples, steps
            progress.metrics, progress.updated = dict(metrics), now
            progress.reports += 1
            progress.pid = pid
            loss = metrics.get("loss")
            if loss is not None:
                self._history.setdefault(worker, deque(maxlen=HISTORY_POINTS)).append(
                    (round(now - self.started, 3), epoch, float(loss))
                )
            for line in (logs or [])[:MAX_LOG_LINES]:
                self._logs.append((worker, str(line)[:2000]))
        if self.terminate_on_nan and loss is not None and not math.isfinite(loss):
            self.store.request_stop()

    def join(self, worker: int, stage: str) -> None:
        """A worker starts in training stage ``stage``; each worker starts once per stage.

        Raises:
            ParameterServerError: Spark ran this worker's task of the stage again (its own retry of
                a failed barrier stage), 409: the trainer restarts stages itself, from where the
                center is, and counts them in ``max_restarts``; a task re-run from the stage's
                start would train twice what the center already holds.
        """
        self._check_worker(worker)
        with self._cond:
            if (stage, worker) in self._joined:
                raise ParameterServerError(
                    f"Spark ran worker {worker}'s task of this training stage again (its own "
                    "retry of a failed barrier stage); kerasonspark restarts the stage itself "
                    "from the center (`max_restarts`).",
                    409,
                )
            self._joined.add((stage, worker))

    def arrive(
        self,
        worker: int,
        epoch: int,
        samples: int,
        metrics: dict[str, float],
        want_center: bool,
        steps: int = 0,
    ) -> np.ndarray | None:
        """A worker ended ``epoch`` after ``steps`` steps; waits for the others. Returns the
        epoch's center if asked for.

        Raises:
            ParameterServerError: the worker already arrived (409), or the run failed or is
                shutting down (503) while it waited.
        """
        self._check_worker(worker)
        with self._cond:
            state = self._epochs.setdefault(epoch, _Epoch())
            if worker in state.arrivals:
                raise ParameterServerError(f"Worker {worker} already ended epoch {epoch}.", 409)
            if not state.arrivals:
                state.first_arrival = time.time()
            state.arrivals[worker] = {"samples": samples, "steps": steps, "metrics": dict(metrics)}
            if len(state.arrivals) == self.num_workers:
                state.center = self.store.center.copy()
                state.all_arrived = time.time()
                self._cond.notify_all()
            self._wait(lambda: state.center is not None)
            return state.center if want_center else None

    def ready(
        self,
        worker: int,
        epoch: int,
        rows: int,
        scores: dict[str, float],
        learning_rate: float | None,
        rows_per_second: float | None = None,
    ) -> dict[str, Any]:
        """A worker scored the epoch's center on ``rows`` validation rows (and computed
        ``rows_per_second`` in the epoch); waits for the decision."""
        self._check_worker(worker)
        with self._cond:
            state = self._epochs.get(epoch)
            if state is None or worker not in state.arrivals:
                raise ParameterServerError(
                    f"Worker {worker} reported ready for epoch {epoch} before ending it.", 409
                )
            state.ready[worker] = {
                "rows": rows,
                "scores": dict(scores),
                "learning_rate": learning_rate,
                "rows_per_second": rows_per_second,
            }
            if len(state.ready) == self.num_workers:
                self._cond.notify_all()
            self._wait(lambda: state.decision is not None)
            assert state.decision is not None
            return state.decision

    def _wait(self, done: Any) -> None:
        while not done():
            if self._failed or self._closed:
                raise RoundClosedError(
                    self._failed or "The parameter server is shutting down.", 503
                )
            self._cond.wait(1.0)

    def _check_worker(self, worker: int) -> None:
        if not 0 <= worker < self.num_workers:
            raise ParameterServerError(
                f"Worker id must be in [0, {self.num_workers}). Received: worker={worker}.", 400
            )

    # -- the driver ---------------------------------------------------------------------------
    def wait_arrivals(self, epoch: int, timeout: float) -> dict[int, dict[str, Any]] | None:
        """Every worker's arrival in ``epoch``, or ``None`` when they are not all there within
        ``timeout``."""
        with self._cond:
            state = self._epochs.setdefault(epoch, _Epoch())
            self._cond.wait_for(
                lambda: state.center is not None or self._failed is not None, timeout
            )
            return dict(state.arrivals) if state.center is not None else None

    def wait_ready(self, epoch: int, timeout: float) -> dict[int, dict[str, Any]] | None:
        """Every worker's validation report of ``epoch``, or ``None`` if not all within
        ``timeout``."""
        with self._cond:
            state = self._epochs.setdefault(epoch, _Epoch())
            self._cond.wait_for(
                lambda: len(state.ready) == self.num_workers or self._failed is not None, timeout
            )
            return dict(state.ready) if len(state.ready) == self.num_workers else None

    def center(self, epoch: int) -> np.ndarray:
        """The center fixed when the last worker ended ``epoch``."""
        with self._cond:
            center = self._epochs[epoch].center
        if center is None:
            raise RuntimeError(f"Epoch {epoch} has not ended on every worker.")
        return center

    def barrier_seconds(self, epoch: int) -> float:
        """Seconds from the first worker's arrival in ``epoch`` to the last one's."""
        with self._cond:
            state = self._epochs.get(epoch)
            return (
                max(state.all_arrived - state.first_arrival, 0.0)
                if state and state.all_arrived
                else 0.0
            )

    def release(
        self,
        epoch: int,
        stop: bool,
        learning_rate: float | None,
        steps: Sequence[int] | None = None,
    ) -> None:
        """Hand the workers the driver's decision for the epoch after ``epoch`` (``steps``: each
        worker's steps in it, where the driver balances them)."""
        with self._cond:
            state = self._epochs.setdefault(epoch, _Epoch())
            state.decision = {"stop": bool(stop), "learning_rate": learning_rate}
            if steps is not None:
                state.decision["steps"] = {str(worker): int(k) for worker, k in enumerate(steps)}
            for old in [e for e in self._epochs if e < epoch]:
                del self._epochs[old]
            self._cond.notify_all()

    def fail(self, message: str) -> None:
        """Wake every waiter with an error (a worker failed)."""
        with self._cond:
            self._failed = message
            self._cond.notify_all()

    def reopen(self, epoch: int) -> None:
        """Clear a failed stage's failure and its unfinished epoch boundaries from ``epoch`` on,
        for a restarted stage; released decisions and progress stay."""
        with self._cond:
            self._failed = None
            self.restarts += 1
            self.version_at_restart = self.store.version
            for number in [
                e for e, state in self._epochs.items() if e >= epoch and state.decision is None
            ]:
                del self._epochs[number]
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter; the run is over."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def failed(self) -> str | None:
        """Why the run failed, once a worker reported its failure."""
        return self._failed

    def progress(self) -> dict[int, WorkerProgress]:
        """A copy of every worker's latest progress report."""
        with self._cond:
            return {w: WorkerProgress(**vars(p)) for w, p in self._progress.items()}

    def take_logs(self) -> list[tuple[int, str]]:
        """The workers' forwarded log lines since the last call, as ``(worker, line)``."""
        with self._cond:
            lines = list(self._logs)
            self._logs.clear()
            return lines

    def stats(self) -> dict[str, Any]:
        """JSON-ready figures for the live stats page (a NaN or Inf loss becomes ``null``: browsers
        refuse ``NaN`` in JSON)."""
        with self._cond:
            workers = {
                str(w): {
                    "epoch": p.epoch,
                    "samples": p.samples,
                    "steps": p.steps,
                    "metrics": _finite(p.metrics),
                    "pid": p.pid,
                    "samples_per_second": p.samples_per_second,
                    "seconds_since_report": time.time() - p.updated,
                    "loss_over_time": [
                        list(point) for point in self._history.get(w, ()) if math.isfinite(point[2])
                    ],
                }
                for w, p in sorted(self._progress.items())
            }
            return {
                "workers": workers,
                "epochs": [_finite(logs) for logs in self.epoch_logs],
                "failed": self._failed,
                "restarts": self.restarts,
                "version_at_restart": self.version_at_restart,
            }


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    return {k: v if math.isfinite(v) else None for k, v in values.items()}
