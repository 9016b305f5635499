"""Driver side: the run's epoch events, where the driver sees and steers training while it runs.

While the training stage runs (in a background thread), the driver's thread waits at each epoch
boundary for every worker (:class:`~kerasonspark.parameter_server._board.EpochBoard`), merges
their metrics and their scores of the epoch's center, puts the center into the caller's model,
runs the Keras callbacks with Keras's own ``CallbackList``, and hands the workers its decision
(stop, the next epoch's learning rate) before any of them starts the next epoch. Between
boundaries it shows the workers' progress.

Which hooks fire when:

- ``on_train_begin``, ``on_epoch_begin(initial_epoch)``: before the stage starts (a rate set here
  trains the first epoch);
- ``on_epoch_end(e, logs)``: when every worker ended epoch ``e``; ``logs`` holds the training
  metrics weighted by samples and ``val_*`` of the center weighted by validation rows; the model
  holds the epoch's center;
- ``on_epoch_begin(e + 1)``: right after, unless a callback stopped training;
- ``on_train_batch_begin/end(batch, logs)``: once per round of progress reports (about every
  ``progress_interval`` seconds), with ``batch`` the steps all workers took this epoch and
  ``logs`` their running metrics; the model then holds the current center. Setting
  ``model.stop_training`` here stops every worker at its next exchange;
- ``on_train_end``: after the stage, with the final center in the model (so
  ``EarlyStopping(restore_best_weights=True)`` decides what ``fit`` returns).

Before each hook the model's ``optimizer.iterations`` holds the run's global step: the steps of
``batch_size`` every worker took, summed (what plain Keras counts on the same data), on top of
the count the model had when ``fit`` began. ``ModelCheckpoint(save_freq=N)``, MLflow's
``MlflowCallback`` and TensorBoard's batch summaries count those steps.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ._executor import learning_rate_of
from ._progress import ProgressBar
from ._serialization import get_flat_weights, global_step, set_flat_weights, set_global_step
from .engine import TrainingJob, WorkerReport
from .parameter_server._board import EpochBoard
from .parameter_server._store import ParameterStore

if TYPE_CHECKING:
    import keras

    from ._backup import BackupPlan

logger = logging.getLogger(__name__)


class RestartPolicy(Protocol):
    """Decides whether a failed training stage runs again (see ``driver.StageRestarts``)."""

    count: int
    limit: int
    last_cause: str

    def after(self, error: BaseException, epoch: int) -> dict[int, int]:
        """Account for the failure; return each worker's applied exchanges, or raise to end
        ``fit``."""
        ...

    def in_epoch(self, applied: Mapping[int, int], epoch: int) -> dict[int, int]:
        """Each worker's applied exchanges counted from the start of ``epoch``."""
        ...

    def stats(self) -> dict[str, Any]:
        """The restart figures for ``stats``."""
        ...


worker_logger = logging.getLogger("kerasonspark.worker")

_BATCH_HOOKS = ("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")


def weighted_mean(entries: list[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    """Each key's mean over ``(weight, values)`` entries; entries with no weight do not count."""
    entries = [(n, logs) for n, logs in entries if logs and n > 0]
    total = sum(n for n, _ in entries)
    if not total:
        return {}
    keys = [k for k in entries[0][1] if all(k in logs for _, logs in entries)]
    return {k: sum(n * logs[k] for n, logs in entries) / total for k in keys}


def balanced_steps(
    partition_sizes: Sequence[int], batch_size: int, rows_per_second: Sequence[float | None]
) -> list[int]:
    """Each worker's steps for an epoch in proportion to its speed, their sum the epoch's steps.

    The epoch's steps are those of the partitions (``ceil(rows / batch_size)`` each); a worker
    whose speed is unknown (``None``: it trained nothing) keeps its own, and the others share the
    rest by largest remainder, at least one step each.

    Example:
        >>> balanced_steps([640, 640], 32, [300.0, 100.0])
        [30, 10]
    """
    own = [math.ceil(rows / batch_size) for rows in partition_sizes]
    speeds = {w: speed for w, speed in enumerate(rows_per_second) if speed and own[w]}
    shares = list(own)
    if len(speeds) < 2:
        return shares
    known = list(speeds)
    budget = sum(own[w] for w in known)
    exact = {w: max(budget * speed / sum(speeds.values()), 1.0) for w, speed in speeds.items()}
    for w in known:
        shares[w] = int(exact[w])
    left = budget - sum(shares[w] for w in known)
    for w in sorted(known, key=lambda w: exact[w] - int(exact[w]), reverse=True)[: max(left, 0)]:
        shares[w] += 1
    return shares


def uses_batch_hooks(callbacks: list[keras.callbacks.Callback]) -> bool:
    """Whether any callback overrides a batch-level hook of ``keras.callbacks.Callback``."""
    import keras

    return any(
        getattr(type(cb), hook) is not getattr(keras.callbacks.Callback, hook)
        for cb in callbacks
        for hook in _BATCH_HOOKS
    )


def has_terminate_on_nan(callbacks: list[keras.callbacks.Callback]) -> bool:
    """Whether ``keras.callbacks.TerminateOnNaN`` is among the callbacks (workers then check their
    loss)."""
    import keras

    return any(isinstance(cb, keras.callbacks.TerminateOnNaN) for cb in callbacks)


class Steering:
    """The driver's loop over a run's epoch boundaries.

    Args:
        job: the training job (its model, callbacks, config and validation data).
        store: the run's parameter store (the center, the stop flag, the exchange counters).
        board: the run's progress reports and epoch gate.
    """

    def __init__(
        self,
        job: TrainingJob,
        store: ParameterStore,
        board: EpochBoard,
        backup: BackupPlan | None = None,
    ) -> None:
        import keras

        self.job, self.store, self.board, self.backup = job, store, board, backup
        self._saved_at = 0  # exchanges at the last backup
        config = job.config
        self.steps_per_epoch = sum(-(-n // config.batch_size) for n in job.partition_sizes)
        user_callbacks = list(job.callbacks)
        self.callbacks = keras.callbacks.CallbackList(
            user_callbacks,
            add_history=True,
            add_progbar=False,
            model=job.model,
            verbose=config.verbose,
            epochs=config.epochs,
            steps=self.steps_per_epoch,
        )
        # Keras's own History (the user's, or the one CallbackList adds last) records the logs as
        # every callback left them (ReduceLROnPlateau adds `learning_rate`).
        self.keras_history = next(
            cb for cb in self.callbacks.callbacks if isinstance(cb, keras.callbacks.History)
        )
        self.batch_hooks = uses_batch_hooks(user_callbacks)
        self.bar = ProgressBar(config.verbose, config.epochs, job.num_samples)
        self.callback_seconds = 0.0
        self.barrier_seconds = 0.0
        self.shares: list[list[int]] = []  # per epoch, each worker's steps (balance_workers)
        self.epochs_run = 0
        self.stopped_early = False
        self.restart_policy: RestartPolicy | None = None
        self.backups = 0
        self.backup_seconds = 0.0
        self._reports_seen = 0
        self._bar_epoch = -1
        self.first_step = 0  # the model's step when fit began
        self.epoch_steps = 0  # every worker's steps in the epochs that ended

    @property
    def validates(self) -> bool:
        return self.job.has_validation

    def _timed(self, hook: Callable[..., None], *args: Any) -> None:
        started = time.perf_counter()
        hook(*args)
        self.callback_seconds += time.perf_counter() - started

    def begin(self) -> float | None:
        """Run ``on_train_begin`` and the first ``on_epoch_begin``; returns the first epoch's
        learning rate."""
        model, config = self.job.model, self.job.config
        model.stop_training = False
        self.first_step = global_step(model)
        if self.backup is not None and self.backup.resumed is not None:
            # the history continues the backup's
            for (
                key,
                values,
            ) in self.backup.resumed.history.items():
                self.keras_history.history[key] = list(values)
        self._timed(self.callbacks.on_train_begin)
        if config.initial_epoch < config.epochs:
            self._timed(self.callbacks.on_epoch_begin, config.initial_epoch)
        return learning_rate_of(model)

    def drive(
        self,
        make_stage: Callable[
            [int | None, Mapping[int, int] | None], Callable[[], list[WorkerReport]]
        ],
        restarts: RestartPolicy | None = None,
    ) -> list[WorkerReport]:
        """Run the training stage in a background thread and steer it from this one.

        ``make_stage(first_epoch, resume)`` gives the stage to run: ``(None, None)`` the first;
        after a failure ``restarts`` decides: it raises (no restart), or returns where each worker
        resumes, and a stage made for that runs from the current center while the epoch loop goes
        on where it was. Returns the last stage's reports; if this thread is interrupted, every
        worker is told the run failed before the error propagates.
        """
        self.restart_policy = restarts
        config = self.job.config
        resumed = self.backup.resumed if self.backup is not None else None
        # a backup taken mid-epoch: each worker where it was
        if resumed is not None and resumed.resume:
            stage = make_stage(config.initial_epoch, resumed.resume)
        else:
            stage = make_stage(None, None)
        epoch = config.initial_epoch
        while True:
            outcome: dict[str, Any] = {}

            def run(
                stage: Callable[[], list[WorkerReport]] = stage, outcome: dict[str, Any] = outcome
            ) -> None:
                try:
                    outcome["reports"] = stage()
                except BaseException as exc:  # handed to the driver's thread below
                    outcome["error"] = exc

            thread = threading.Thread(target=run, name="kerasonspark-stage", daemon=True)
            thread.start()
            try:
                while epoch < config.epochs:
                    verdict = self._epoch(epoch, thread)
                    if verdict == "failed":
                        break
                    epoch += 1
                    if verdict == "stop":
                        break
            except BaseException as exc:
                self.board.fail(f"The driver stopped the run: {type(exc).__name__}: {exc}")
                raise
            finally:
                thread.join()
                self._forward_logs()
            if "error" not in outcome:
                return outcome["reports"]
            if restarts is None:
                raise outcome["error"]
            resume = restarts.after(outcome["error"], epoch)  # raises when the run cannot go on
            logger.warning(
                "Restarting the training stage (restart %d of %d) from the current center, epoch "
                "%d: %s",
                restarts.count,
                restarts.limit,
                epoch + 1,
                restarts.last_cause,
            )
            stage = make_stage(epoch, resume)

    def _wait(self, epoch: int, wait: Callable[[int, float], Any], thread: threading.Thread) -> Any:
        while True:
            found = wait(epoch, 0.25)
            self._forward_logs()
            if found is not None:
                return found
            if not thread.is_alive() or self.board.failed:
                return None
            self._progress(epoch)
            self._maybe_save_mid_epoch(epoch)

    def _epoch(self, epoch: int, thread: threading.Thread) -> str:
        """Steer one epoch boundary; returns ``"next"``, ``"stop"`` or ``"failed"`` (the stage ended
        first)."""
        model, config = self.job.model, self.job.config
        if self._bar_epoch != epoch:
            self.bar.start_epoch(epoch)
            self._bar_epoch = epoch
        arrivals = self._wait(epoch, self.board.wait_arrivals, thread)
        if arrivals is None:
            return "failed"
        logs = weighted_mean([(a["samples"], a["metrics"]) for a in arrivals.values()])
        ready = self._wait(epoch, self.board.wait_ready, thread)
        if ready is None:
            return "failed"
        validation = weighted_mean([(r["rows"], r["scores"]) for r in ready.values()])
        logs.update({f"val_{k}": v for k, v in validation.items()})
        self.barrier_seconds += self.board.barrier_seconds(epoch)
        self.epoch_steps += sum(int(a.get("steps", 0)) for a in arrivals.values())
        self._step_to(0)
        set_flat_weights(model, self.board.center(epoch))
        self._timed(self.callbacks.on_epoch_end, epoch, logs)
        self.epochs_run += 1
        stop = bool(model.stop_training or self.store.stop_requested)
        if not stop and epoch + 1 < config.epochs:
            self._timed(self.callbacks.on_epoch_begin, epoch + 1)
            stop = bool(model.stop_training)
        self.stopped_early = stop and epoch + 1 < config.epochs
        self.board.epoch_logs.append({"epoch": epoch + 1, **logs})
        shares = (
            self._balance(ready)
            if config.data.balance_workers and not stop and epoch + 1 < config.epochs
            else None
        )
        self.board.release(epoch, stop, learning_rate_of(model), shares)
        if self.backup is not None and self.backup.save_freq == "epoch":
            self._save(epoch + 1, self.board.center(epoch), {})
        self.bar.end_epoch({**logs, **self._exchange_figures()})
        return "stop" if stop else "next"

    def _balance(self, ready: Mapping[int, Mapping[str, Any]]) -> list[int]:
        """Each worker's steps next epoch, from the rows per second each reported
        (``balance_workers``)."""
        config = self.job.config
        sizes = self.job.partition_sizes or [0] * config.num_workers
        shares = balanced_steps(
            sizes, config.batch_size, [ready[w].get("rows_per_second") for w in range(len(sizes))]
        )
        self.shares.append(shares)
        return shares

    def _exchanges(self) -> int:
        stats = self.store.stats()
        return int(stats["updates"] + stats["rounds"])

    def _save(self, epoch: int, center: np.ndarray, resume: Mapping[int, int]) -> None:
        from ._backup import RunState

        assert self.backup is not None
        started = time.perf_counter()
        exchanges = self._exchanges()
        self.backup.store.save(
            RunState(
                epoch=epoch,
                center=center,
                resume=dict(resume),
                history=self.history,
                exchanges=exchanges,
                settings=self.backup.settings,
            )
        )
        self._saved_at = exchanges
        self.backup_seconds += time.perf_counter() - started
        self.backups += 1

    def _maybe_save_mid_epoch(self, epoch: int) -> None:
        backup, policy = self.backup, self.restart_policy
        if backup is None or not isinstance(backup.save_freq, int) or policy is None:
            return
        if self._exchanges() - self._saved_at < backup.save_freq:
            return
        center, applied = self.store.snapshot()
        self._save(epoch, center, policy.in_epoch(applied, epoch))

    def _exchange_figures(self) -> dict[str, float]:
        stats = self.store.stats()
        if stats["updates"]:
            return {"pushes": stats["updates"], "staleness": stats["staleness"]["median"]}
        return {"rounds": stats["rounds"]} if stats["rounds"] else {}

    def _progress(self, epoch: int) -> None:
        progress = [p for p in self.board.progress().values() if p.epoch == epoch]
        reports = sum(p.reports for p in progress)
        if not progress or reports == self._reports_seen:
            return
        self._reports_seen = reports
        samples = sum(p.samples for p in progress)
        running = weighted_mean([(p.samples, p.metrics) for p in progress])
        if self.batch_hooks:
            batch = sum(p.steps for p in progress)
            self._step_to(batch)
            set_flat_weights(self.job.model, self.store.center.copy())
            self._timed(self.callbacks.on_train_batch_begin, batch)
            self._timed(self.callbacks.on_train_batch_end, batch, running)
            if self.job.model.stop_training:
                self.store.request_stop()
        self.bar.update(samples, {**running, **self._exchange_figures()})

    def _step_to(self, in_epoch: int) -> None:
        """Put the global step (``in_epoch`` steps into the current epoch) in the model, and in
        TensorBoard's batch counter (it counts its own hook calls, once per step in Keras)."""
        import keras

        step = self.first_step + self.epoch_steps + in_epoch
        set_global_step(self.job.model, step)
        for cb in self.callbacks.callbacks:
            if isinstance(cb, keras.callbacks.TensorBoard) and hasattr(cb, "_global_train_batch"):
                cb._global_train_batch = step - 1  # its on_train_batch_begin adds the 1

    def _forward_logs(self) -> None:
        for worker, line in self.board.take_logs():
            worker_logger.warning("worker %d: %s", worker, line)

    @property
    def history(self) -> dict[str, list[float]]:
        """Per-epoch logs as the callbacks left them, like ``model.fit(...).history``."""
        return dict(self.keras_history.history)

    def finish(self, weights: np.ndarray) -> np.ndarray:
        """Put the final center in the model, run ``on_train_end``; returns the weights ``fit``
        returns
        (a callback such as ``EarlyStopping(restore_best_weights=True)`` may have changed them)."""
        set_flat_weights(self.job.model, weights)
        self._timed(self.callbacks.on_train_end)
        if self.backup is not None and self.backup.delete_when_done:
            self.backup.store.clear()  # the run completed, as Keras's BackupAndRestore does
        return get_flat_weights(self.job.model)

    def restart_stats(self) -> dict[str, Any]:
        """``restarts``, ``lost_steps``, ``redone_steps`` and the restart log, for ``stats``."""
        if self.restart_policy is None:
            return {"restarts": 0, "lost_steps": 0, "redone_steps": 0, "restart_log": []}
        return self.restart_policy.stats()

    def stats(self) -> dict[str, Any]:
        """The figures of the run's epoch events, for ``stats["epoch_events"]``."""
        return {
            "epochs_run": self.epochs_run,
            "global_step": self.first_step + self.epoch_steps,
            "stopped_early": self.stopped_early,
            "callback_seconds": self.callback_seconds,
            "epoch_barrier_seconds": self.barrier_seconds,
            "backups": self.backups,
            "backup_seconds": self.backup_seconds,
            "balanced_steps": self.shares,
            "resumed_from_epoch": (
                self.backup.resumed.epoch
                if self.backup is not None and self.backup.resumed is not None
                else None
            ),
        }
