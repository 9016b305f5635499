"""Driver side: Spark's runner, parameter-server hosting, result assembly, and Spark's errors
mapped.

:class:`SparkRunner` is the :class:`~kerasonspark.engine.Runner` the trainer puts in every job:
it runs the workers as one barrier stage and hosts the parameter server beside it.
:func:`spark_errors` is the one place that turns Spark's wrapped task failures into
kerasonspark's exceptions; every Spark call of the trainer goes through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import secrets
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _errors as errors
from ._classic import interrupt_jobs, job_description, share, to_partitions, training_rdd
from ._errors import KerasOnSparkError, WorkerError
from ._executor import (
    EpochGate,
    WorkerSettings,
    learning_rate_of,
    partition_rows,
    train_partition,
)
from ._serialization import set_flat_weights
from ._session import check_slots, is_local
from ._stages import partition_stage, run_on_partitions, stage_results
from ._steering import Steering, has_terminate_on_nan, weighted_mean
from .engine import Exchange, StageOutcome, TrainingJob, TrainingResult, WorkerReport
from .parameter_server._store import ParameterStore

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from ._backup import BackupPlan
    from ._stage_host import ReturnedSteering
    from .parameter_server._board import EpochBoard

logger = logging.getLogger(__name__)

JOB_TAG = "kerasonspark"
STATS_PAGE_MESSAGE = "Live training stats: %s"


# Failures that follow another worker's failure (their round was cancelled), not causes.
_CONSEQUENCES = ("BarrierTimeoutError", "RoundClosedError", "ParameterServerError")


def _recover(exc: BaseException) -> KerasOnSparkError | None:
    """The kerasonspark exception a Spark task raised, rebuilt from Spark's error text, or ``None``.

    Spark reports a Python task's failure as text; the last ``kerasonspark.<Name>: message`` line
    names it (the errors carry the package as their module).
    """
    text = str(exc)
    matches = re.findall(r"kerasonspark\.(\w+Error): (.*)", text)
    if not matches:
        return None
    name, message = matches[-1]
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, KerasOnSparkError)):
        return None
    if cls is WorkerError:
        worker = re.match(r"Worker (\d+)", message)
        detail = text[text.rfind("Traceback") :][-3000:] if "Traceback" in text else ""
        return WorkerError(message, int(worker.group(1)) if worker else -1, detail)
    return cls(message)


def _lost_worker_error(exc: BaseException) -> WorkerError:
    """A WorkerError for a training task that failed without a Python exception of its own (a
    crash)."""
    text = str(exc)
    task = re.search(r"ResultTask\(\d+, (\d+)\)", text)
    worker = int(task.group(1)) if task else -1
    signs = ("exited unexpectedly", "OutOfMemory", "Killed", "ExecutorLostFailure")
    reason = next(
        (line.strip() for line in text.splitlines() if any(sign in line for sign in signs)), ""
    )
    if reason.startswith("ExecutorLostFailure"):
        reason = f"its executor was lost: {reason}"
    who = f"Worker {worker}" if worker >= 0 else "A worker"
    return WorkerError(
        f"{who} failed: {reason or 'its Spark task failed'} (the Spark error follows as the cause; "
        "the executor's log has the task's own output).",
        worker,
        text[-3000:],
    )


@contextlib.contextmanager
def spark_job(spark: SparkSession, description: str) -> Iterator[None]:
    """Tag the Spark jobs this thread starts inside the block ``kerasonspark`` (what
    ``spark.interruptTag`` stops, on a classic session and over Connect), and name them so the
    Spark UI reads like the training: ``kerasonspark fit sync (5 epochs, 2 workers)`` (on a
    classic session, as job group ``kerasonspark``). When the block fails or is interrupted
    (``KeyboardInterrupt``), its jobs are interrupted before the error goes on, so none keeps
    running on the cluster. What the thread had before comes back afterwards."""
    own = f"{JOB_TAG}-{secrets.token_hex(6)}"  # this block's jobs only, not another fit's
    had_tag = JOB_TAG in spark.getTags()
    spark.addTag(JOB_TAG)
    try:
        with job_description(spark, JOB_TAG, description, tag=own):
            yield
    except BaseException:
        with contextlib.suppress(Exception):
            interrupt_jobs(spark, own)
        raise
    finally:
        if not had_tag:
            spark.removeTag(JOB_TAG)


@contextlib.contextmanager
def spark_errors(training: bool = False) -> Iterator[None]:
    """Map Spark's errors to kerasonspark's inside the block.

    A kerasonspark exception raised in a task (a ``DataError`` while converting a partition, a
    ``WorkerError`` from the worker loop) comes back as itself, without Spark's wrapping. With
    ``training``, a task that failed without one (its process died, its executor was lost) becomes
    a ``WorkerError`` naming the worker, with Spark's error as its cause.
    """
    try:
        yield
    except KerasOnSparkError:
        raise
    except Exception as exc:
        recovered = _recover(exc)
        if recovered is not None:
            raise recovered from None
        if training:
            raise _lost_worker_error(exc) from exc
        raise


def explain_failure(error: WorkerError, failures: Mapping[int, str]) -> WorkerError:
    """Name the worker whose failure started it all, from the parameter server's reports.

    When one worker fails, the others fail next (their round barrier is cancelled), and Spark
    may report any of them; the first report that is not such a consequence is the cause.
    """
    causes = [(w, m) for w, m in failures.items() if not m.startswith(_CONSEQUENCES)]
    if not causes:
        return error
    worker, message = causes[0]
    first_line = message.splitlines()[0] if message else "no message"
    return WorkerError(f"Worker {worker} failed: {first_line}", worker, message)


class StageRestarts:
    """Restarts of a training stage after a lost worker: the budget, the repeated-error check, the
    figures.

    A restarted stage resumes from the parameter server's center: each worker at its place in
    its epoch's order after its last applied exchange (``sync``: the last completed round). What
    a worker trained after that exchange is lost and trained again; it is counted from the
    workers' progress reports (at most ``progress_interval`` old), so the counts are lower bounds.

    Args:
        job: the training job (partition sizes, batch size, epochs).
        store: the run's parameter store; its center and counters outlive a stage.
        board: the run's progress and epoch gate.
        exchange: the engine's exchange (its ``schedule`` says which runs a count of exchanges
            covers).
        fence: shuts out the failed stage's tasks that still run (the server's secret changes).
        offsets: per worker, the exchanges the first stage skipped (a run resumed from a backup
            taken mid-epoch); the store counts only those made in this ``fit``.
    """

    def __init__(
        self,
        job: TrainingJob,
        store: ParameterStore,
        board: EpochBoard,
        exchange: Exchange,
        fence: Callable[[], None],
        offsets: Mapping[int, int] | None = None,
    ) -> None:
        self.job, self.store, self.board, self.exchange, self.fence = (
            job,
            store,
            board,
            exchange,
            fence,
        )
        self.offsets = dict(offsets or {})
        self.limit = job.config.failure.max_restarts
        self.count = 0
        self.lost_steps = 0
        self.last_cause = ""
        self.log: list[dict[str, Any]] = []
        self._causes: set[tuple[int, str]] = set()

    def after(self, error: BaseException, epoch: int) -> dict[int, int]:
        """Account for a failed stage; returns each worker's applied exchanges, or raises to end
        ``fit``.

        Raises:
            WorkerError: the failure is not a worker's, the same error failed the same worker
                before (a bug restarting cannot fix), or the budget of restarts is spent.
        """
        if not isinstance(error, WorkerError):
            raise error
        explained = explain_failure(error, self.store.failures)
        cause = explained.args[0].splitlines()[0] if explained.args else str(explained)
        key = (explained.worker, cause.split(": ", 1)[-1])
        if key in self._causes:
            raise WorkerError(
                f"{cause} (the same error as before the last restart, so restarting again cannot "
                f"help; {self.count} restart(s) made)",
                explained.worker,
                explained.detail,
            ) from error
        if self.count >= self.limit:
            if self.limit == 0:
                if explained is error:
                    raise error  # keeps the Spark error it carries as its cause
                raise explained from error
            raise WorkerError(
                f"{cause} (after {self.count} restart(s), the limit `max_restarts={self.limit}`)",
                explained.worker,
                explained.detail,
            ) from error
        self._causes.add(key)
        self.fence()
        applied = {w: self.store.applied_exchanges(w) for w in range(self.job.config.num_workers)}
        resume = {w: n + self.offsets.get(w, 0) for w, n in applied.items()}
        lost = self._lost_steps(applied, epoch)
        self.count += 1
        self.lost_steps += lost
        self.last_cause = cause
        self.log.append(
            {
                "epoch": epoch,
                "worker": explained.worker,
                "cause": cause,
                "lost_steps": lost,
                "resume_exchanges": resume,
                "at": time.time(),
            }
        )
        self.store.reopen()
        self.board.reopen(epoch)
        return resume

    def in_epoch(self, applied: Mapping[int, int], epoch: int) -> dict[int, int]:
        """Each worker's exchanges the center holds, counted from the start of ``epoch``, given the
        store's counts (which start at this ``fit``)."""
        config = self.job.config
        positions = {}
        for worker, count in applied.items():
            steps = -(-self.job.partition_sizes[worker] // config.batch_size)
            before = sum(
                len(self.exchange.schedule(steps, e)) for e in range(config.initial_epoch, epoch)
            )
            positions[worker] = max(count + self.offsets.get(worker, 0) - before, 0)
        return positions

    def _lost_steps(self, resume: Mapping[int, int], epoch: int) -> int:
        config, progress = self.job.config, self.board.progress()
        lost = 0
        for worker, applied in self.in_epoch(resume, epoch).items():
            steps = -(-self.job.partition_sizes[worker] // config.batch_size)
            runs = self.exchange.schedule(steps, epoch)
            applied_steps = sum(runs[:applied])
            report = progress.get(worker)
            trained = report.steps if report is not None and report.epoch == epoch else 0
            lost += max(trained - applied_steps, 0)
        return lost

    def stats(self) -> dict[str, Any]:
        """``restarts``, ``lost_steps``, ``redone_steps`` (equal: a restarted worker trains again
        exactly what was lost) and the log of restarts."""
        return {
            "restarts": self.count,
            "lost_steps": self.lost_steps,
            "redone_steps": self.lost_steps,
            "restart_log": list(self.log),
        }


def host_parameter_server(
    job: TrainingJob,
    store: ParameterStore,
    make_exchange: Callable[[str, bytes], Exchange],
    run_workers: Callable[[Exchange, EpochGate], list[WorkerReport]],
    backup: BackupPlan | None = None,
    before_restart: Callable[[], list[int] | None] | None = None,
) -> tuple[StageOutcome, Steering]:
    """Serve ``store`` with a fresh secret on ``job.server_host`` while ``run_workers`` trains, and
    steer the run from this thread (callbacks, progress, the center validated each epoch,
    restarts after a lost worker).

    The server and its threads are stopped when this returns or raises. The live stats page's
    URL, with its read-only token, is logged at INFO.

    Raises:
        WorkerError: naming the worker whose failure started it (from the server's reports), when
            the restarts (``max_restarts``) cannot save the run.
    """
    from ._stage_host import server_config
    from .parameter_server._auth import new_secret
    from .parameter_server._board import EpochBoard
    from .parameter_server._server import ParameterServer

    secret = new_secret()
    config = server_config(job, secret, view_token=secrets.token_urlsafe(16))
    board = EpochBoard(
        store, job.config.num_workers, terminate_on_nan=has_terminate_on_nan(job.callbacks)
    )
    steering = Steering(job, store, board, backup)
    with ParameterServer(
        store, config, host=job.server_host, port=job.server_port, board=board
    ) as server:
        logger.info(STATS_PAGE_MESSAGE, server.dashboard_url)
        template = make_exchange(server.url, secret)

        def make_stage(
            first_epoch: int | None, resume: Mapping[int, int] | None
        ) -> Callable[[], list[WorkerReport]]:
            if first_epoch is None:
                exchange = template
            # a restarted stage gets the secret `fence` put in place, and exchanges made with it
            else:
                sizes = before_restart() if before_restart is not None else None
                if sizes is not None:  # fewer workers: the data re-split, the epoch from its start
                    logger.warning(
                        "Going on with %d of %d workers; epoch %d starts again from the current "
                        "center",
                        len(sizes),
                        job.config.num_workers,
                        first_epoch + 1,
                    )
                    job.config = dataclasses.replace(job.config, num_workers=len(sizes))
                    job.partition_sizes = list(sizes)
                    store.num_workers = board.num_workers = len(sizes)
                    resume = None
                exchange = make_exchange(server.url, config.secret)
            gate = EpochGate(
                server.url,
                config.secret,
                validation_freq=job.config.validation_freq,
                learning_rate=learning_rate_of(job.model),
                terminate_on_nan=board.terminate_on_nan,
                timeout=job.config.failure.epoch_timeout,
                first_epoch=first_epoch,
                resume=resume,
            )
            return partial(run_workers, exchange, gate)

        def fence() -> None:
            # A task of the failed stage may still run for a while (Spark kills tasks lazily); with
            # a fresh secret its pushes, rounds and reports are refused, and a push it sent just
            # before lands before the driver counts what the center holds: nothing is applied twice.
            if not server.rotate_secret(new_secret()):
                logger.warning(
                    "A push of the failed stage was still running 10 s after the restart began; "
                    "the resume positions may be off by its exchange."
                )

        steering.begin()
        started = time.perf_counter()
        # A worker's failure reaches the caller through StageRestarts, which names the worker that
        # started it.
        offsets = (
            backup.resumed.resume if backup is not None and backup.resumed is not None else None
        )
        reports = steering.drive(
            make_stage, StageRestarts(job, store, board, template, fence, offsets)
        )
        return StageOutcome(reports, time.perf_counter() - started, store.stats()), steering


def merge_history(reports: list[WorkerReport], epochs: int) -> dict[str, list[float]]:
    """Each epoch's metrics over the workers: training ones weighted by samples, ``val_*`` by
    validation rows; a worker without rows (or without that epoch) does not count."""
    history: dict[str, list[float]] = {}
    for epoch in range(epochs):
        train = weighted_mean(
            [(r.samples, r.history[epoch]) for r in reports if epoch < len(r.history)]
        )
        val = weighted_mean(
            [(r.val_samples, r.val_history[epoch]) for r in reports if epoch < len(r.val_history)]
        )
        for key, value in [*train.items(), *((f"val_{k}", v) for k, v in val.items())]:
            history.setdefault(key, []).append(value)
    return history


def assemble_result(
    job: TrainingJob,
    name: str,
    reports: list[WorkerReport],
    weights: np.ndarray,
    train_seconds: float,
    exchanges: int,
    engine_stats: Mapping[str, Any] | None,
    server_stats: Mapping[str, Any] | None = None,
    steering: Steering | ReturnedSteering | None = None,
) -> TrainingResult:
    """Set ``weights`` on the caller's model and build the result every runner returns.

    ``engine_stats`` goes under the engine's ``name`` in ``stats``; the parameter server's
    figures (``server_stats``, for a served job) go to ``stats["parameter_server"]``.
    After a steered run the history is the one the callbacks saw, and ``on_train_end`` runs
    with the final weights in the model (a callback may change them).
    """
    if steering is not None:
        weights = steering.finish(weights)
        history, epochs = steering.history, steering.epochs_run
    else:
        epochs = max((len(r.history) for r in reports), default=0)
        history = merge_history(reports, epochs)
    set_flat_weights(job.model, weights)
    samples = job.num_samples * epochs
    own = dict(engine_stats or {})
    stats: dict[str, Any] = {
        "backend": name,
        "samples": samples,
        "epochs": epochs,
        "num_workers": job.config.num_workers,
        "train_seconds": train_seconds,
        "samples_per_second": samples / train_seconds if train_seconds > 0 else 0.0,
        "exchanges": int(exchanges),
        "workers": [r.as_stats() for r in sorted(reports, key=lambda r: r.worker)],
    }
    if server_stats is not None:
        stats["parameter_server"] = dict(server_stats)
    if steering is not None:
        stats["epoch_events"] = steering.stats()
        stats.update(steering.restart_stats())
    stats[name] = own
    return TrainingResult(job.model, history, stats)


def worker_settings(job: TrainingJob) -> WorkerSettings:
    """The picklable settings every worker of ``job`` trains with."""
    config = job.config
    return WorkerSettings(
        job.run_id,
        config.epochs,
        config.batch_size,
        config.num_workers,
        config.seed,
        job.info,
        config.resources,
        config.initial_epoch,
        config.class_weight,
        job.streamed,
        config.data.buffer_rows,
    )


def _is_installed(path: str) -> bool:
    """Whether a module file belongs to Python's own library or an installed distribution."""
    file = Path(path).resolve()
    roots = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(file.is_relative_to(Path(root).resolve()) for root in roots)


def is_installed_module(name: str) -> bool:
    """Whether module ``name`` (imported here) comes from an installed distribution or Python's
    own library, so another process with the same install imports it too (Keras, TensorFlow and
    kerasonspark count as installed: the executors have them)."""
    if name.split(".")[0] in ("keras", "kerasonspark", "tensorflow"):
        return True
    path = getattr(sys.modules.get(name), "__file__", None)
    return path is not None and _is_installed(path)


def ship_by_value(obj: Any) -> None:
    """Make Spark pickle ``obj``'s module by value when executors may not have it.

    Classes and functions from the driver's ``__main__`` are pickled by value already; those of a
    module beside the user's script (imported from the script's folder, not installed) would be
    pickled by reference and fail to import on the executors, so their module travels whole.
    """
    from pyspark import cloudpickle

    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    if module is None or module.__name__ == "__main__" or not path or _is_installed(path):
        return
    if module.__name__.split(".")[0] in ("keras", "kerasonspark", "tensorflow"):
        return
    if module.__name__ not in cloudpickle.list_registry_pickle_by_value():
        logger.debug("Custom objects of module %s travel by value", module.__name__)
        cloudpickle.register_pickle_by_value(module)


class DriverRunner:
    """What every driver-side runner shares: the parameter server and the result. Subclasses run
    the workers (:meth:`run_workers`) and hand over the data (:meth:`local_arrays`).

    Args:
        engine_name: where the engine's figures go in ``stats``.
    """

    def __init__(self, engine_name: str, backup: BackupPlan | None = None) -> None:
        self.engine_name = engine_name
        self.backup = backup
        self._steering: Steering | ReturnedSteering | None = None

    def run_workers(
        self, job: TrainingJob, exchange: Exchange, gate: EpochGate | None = None
    ) -> list[WorkerReport]:
        raise NotImplementedError

    def serve(
        self,
        job: TrainingJob,
        store: ParameterStore,
        make_exchange: Callable[[str, bytes], Exchange],
    ) -> StageOutcome:
        outcome, self._steering = host_parameter_server(
            job,
            store,
            make_exchange,
            partial(self.run_workers, job),
            self.backup,
            partial(self.before_restart, job),
        )
        return outcome

    def before_restart(self, job: TrainingJob) -> list[int] | None:
        """Called before a restarted stage starts. Returns the new partition sizes when the stage
        goes on with fewer workers, else ``None``; does nothing by default."""
        return None

    def result(
        self,
        job: TrainingJob,
        reports: list[WorkerReport],
        weights: np.ndarray,
        train_seconds: float,
        exchanges: int,
        engine_stats: Mapping[str, Any] | None,
        server_stats: Mapping[str, Any] | None = None,
    ) -> TrainingResult:
        steering, self._steering = self._steering, None
        return assemble_result(
            job,
            self.engine_name,
            reports,
            weights,
            train_seconds,
            exchanges,
            engine_stats,
            server_stats,
            steering,
        )


def paired_blocks(training: DataFrame, validation: DataFrame, workers: int) -> DataFrame:
    """Training and validation blocks in one frame with a ``held_out`` column, partition ``i``
    holding training partition ``i`` and validation partition ``i``, each in its order."""
    from pyspark.sql import functions as F

    tagged = [
        frame.select(
            "*",
            F.spark_partition_id().alias("worker"),
            F.lit(held_out).alias("held_out"),
            F.monotonically_increasing_id().alias("order"),
        )
        for frame, held_out in ((training, False), (validation, True))
    ]
    return to_partitions(tagged[0].unionByName(tagged[1]), "worker", workers).drop("worker")


class SparkRunner(DriverRunner):
    """Runs a job's workers as one Spark barrier stage, one task per partition of ``blocks``.

    Args:
        spark: the session.
        blocks: the prepared training data, a DataFrame of blocks with one partition per worker.
        spec_broadcast: the model spec's bytes, shared once per ``fit``
            (:func:`kerasonspark._classic.share`).
        engine_name: where the engine's figures go in ``stats``.
        backup: how the run is backed up and what it resumed from, or ``None``.
        placement: where the parameter server lives: ``"client"`` (this process) or
            ``"stage"`` (task 0 of the training stage; see :mod:`kerasonspark._stage_host`).
    """

    def __init__(
        self,
        spark: SparkSession,
        blocks: DataFrame,
        spec_broadcast: Any,
        engine_name: str,
        backup: BackupPlan | None = None,
        placement: str = "client",
    ) -> None:
        super().__init__(engine_name, backup)
        self.spark, self.blocks, self.spec_broadcast = spark, blocks, spec_broadcast
        self.placement = placement
        self._validation: Any = None

    def run_workers(
        self, job: TrainingJob, exchange: Exchange, gate: EpochGate | None = None
    ) -> list[WorkerReport]:
        # an engine of the user's own travels like their custom objects
        ship_by_value(type(exchange))
        reports = self._training_stage(
            job, partial(self._train_body(job), exchange=exchange, gate=gate)
        )
        return sorted(reports, key=lambda r: r.worker)

    def serve(
        self,
        job: TrainingJob,
        store: ParameterStore,
        make_exchange: Callable[[str, bytes], Exchange],
    ) -> StageOutcome:
        """Serve from the client (:func:`host_parameter_server`), or with
        ``serverPlacement=stage`` from task 0 of the training stage
        (:mod:`kerasonspark._stage_host`)."""
        if self.placement != "stage":
            return super().serve(job, store, make_exchange)
        from pyspark import cloudpickle

        from ._stage_host import ReturnedSteering, StageHostOutcome, serve_in_stage, stage_serving

        ship_by_value(make_exchange)
        for callback in job.callbacks:  # they run in task 0
            ship_by_value(type(callback))
        # pickled here, by cloudpickle: a broadcast pickles with pickle, which refuses closures
        plan = stage_serving(job, store, make_exchange, is_local(self.spark))
        serving = share(self.spark, cloudpickle.dumps(plan))
        try:
            body = partial(serve_in_stage, serving=serving, train=self._train_body(job))
            results = self._training_stage(job, body)
        finally:
            serving.destroy()
        outcome = next(r for r in results if isinstance(r, StageHostOutcome))
        reports = sorted(
            (r for r in results if not isinstance(r, StageHostOutcome)), key=lambda r: r.worker
        )
        store.adopt(outcome.center, outcome.server_stats)
        self._steering = ReturnedSteering(outcome, job.callbacks)
        return StageOutcome(reports, outcome.seconds, outcome.server_stats)

    def _train_body(self, job: TrainingJob) -> Callable[..., Iterator[WorkerReport]]:
        """:func:`train_partition` with everything but the exchange and the epoch gate."""
        # One share for every stage of the fit: a restarted stage's tasks may land in Python
        # workers whose killed tasks still hold the previous one.
        if self._validation is None and job.validation is not None:
            self._validation = share(self.spark, job.validation)
        return partial(
            train_partition,
            spec_broadcast=self.spec_broadcast,
            custom_objects=job.spec.custom_objects,
            settings=worker_settings(job),
            validation=self._validation,
            paired=job.validation_blocks is not None,
        )

    def _training_stage(
        self, job: TrainingJob, body: Callable[[Iterator[Any]], Iterable[Any]]
    ) -> list[Any]:
        """Run ``body`` as the barrier stage over the training blocks; what the tasks yielded."""
        config = job.config
        # A barrier stage without a slot for every task waits, not fails: an executor lost since
        # `fit` checked (during the data's preparation) must not leave the stage hanging.
        check_slots(
            self.spark, config.num_workers, registration_timeout=config.failure.registration_timeout
        )
        description = (
            f"kerasonspark fit {self.engine_name} ({config.epochs - config.initial_epoch} epochs, "
            f"{config.num_workers} workers)"
        )
        # Each task's validation share comes with its training blocks, never via the driver.
        paired = job.validation_blocks is not None
        blocks = (
            paired_blocks(self.blocks, job.validation_blocks, config.num_workers)
            if paired
            else self.blocks
        )
        stage = partition_stage(blocks, body, job.info.input_shape, barrier=True, held_out=paired)
        with spark_errors(training=True), spark_job(self.spark, description):
            # collected here: the Spark UI names the training stage after this line
            return stage_results(stage.collect())

    def before_restart(self, job: TrainingJob) -> list[int] | None:
        """Wait up to ``restart_timeout`` for a task slot for every worker (a lost executor coming
        back).

        With ``restart_with_fewer_workers``, when fewer slots come back, the data is re-split
        among the workers that can be placed (its blocks shuffled into as many partitions) and
        their sizes returned.

        Raises:
            SparkEnvironmentError: the slots did not come back (and the run may not shrink, or no
                slot is left); the message names how many are missing.
        """
        from ._session import task_slots

        config = job.config
        try:
            check_slots(
                self.spark, config.num_workers, registration_timeout=config.failure.restart_timeout
            )
            return None
        except errors.ConfigurationError as exc:
            slots = task_slots(self.spark)
            if not config.failure.restart_with_fewer_workers or slots < 1:
                raise errors.SparkEnvironmentError(
                    f"The restart needs {config.num_workers} task slots at once, and the cluster "
                    "did not offer them within "
                    f"restart_timeout={config.failure.restart_timeout:.0f} s: {exc}"
                ) from None
        # A shuffle, not coalesce(): a barrier stage refuses ancestors with another partition count.
        self.blocks = self.blocks.repartition(slots)
        if job.validation_blocks is not None:
            job.validation_blocks = job.validation_blocks.repartition(slots)
        with spark_errors(), spark_job(self.spark, "kerasonspark re-split the data"):
            return run_on_partitions(self.blocks, partition_rows, job.info.input_shape)

    def release(self) -> None:
        """Destroy what the fit's stages shared (the validation broadcast)."""
        if self._validation is not None:
            self._validation.destroy()
            self._validation = None

    def training_blocks(self, job: TrainingJob) -> Any:
        return training_rdd(self.blocks, job.info.input_shape)

    def local_arrays(self, job: TrainingJob) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        from ._data import collect_arrays

        with spark_errors():
            return collect_arrays(self.blocks, job.info.input_shape)
