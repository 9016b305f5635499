"""The parameter server inside the training stage, for a client the executors cannot reach.

With ``spark.kerasonspark.serverPlacement=stage`` (a Spark Connect client outside the cluster's
network: a laptop in front of a remote cluster, a notebook of a Connect-only service) nothing
listens on the client. Task 0 of the barrier stage serves the run's store on its executor's
address and steers the run beside it, as the client does otherwise
(:class:`~kerasonspark._steering.Steering`: the epoch boundaries, the Keras callbacks, the center
scored each epoch, ``EarlyStopping`` and learning-rate schedules). Every task learns the address
through the barrier (``allGather``) and trains against it as it would against the client's
server. The client gets back, in the stage's results, what a steered run leaves: the final
weights, the history as the callbacks left it, each callback's state (``EarlyStopping``'s
``stopped_epoch``), the epoch events' and the server's figures.

The callbacks travel to task 0 (pickled without their model), and what they write lands on that
executor. The client is not there for the rest: no live progress or batch hooks on the client,
no stats page it can open, and a lost worker ends ``fit`` (no restarts, no backups).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import ConfigurationError
from ._serialization import global_step, set_global_step

if TYPE_CHECKING:
    from ._executor import EpochGate
    from .engine import Exchange, TrainingJob, WorkerReport
    from .parameter_server._app import ServerConfig
    from .parameter_server._store import ParameterStore


def server_config(job: TrainingJob, secret: bytes, view_token: str | None) -> ServerConfig:
    """The settings of ``job``'s parameter server, wherever it runs: a payload cap of the
    model's weights plus 1 MiB."""
    from .parameter_server._app import ServerConfig

    return ServerConfig(
        secret, max_payload_bytes=job.spec.weights.nbytes + (1 << 20), view_token=view_token
    )


@dataclasses.dataclass
class StageServing:
    """What task 0 needs to serve and steer a run: it travels in the stage's closure.

    Attributes:
        job: the job without what stays on the client (its model, runner and data).
        store: the run's parameter store, as the engine made it.
        make_exchange: the engine's ``make_exchange(url, secret)``.
        gate: the workers' epoch gate, its URL and first learning rate set in the stage.
        secret: the run's secret.
        first_step: the model's global step when ``fit`` began.
        loopback: serve on loopback (local mode: every task runs on this machine).
    """

    job: TrainingJob
    store: ParameterStore
    make_exchange: Callable[[str, bytes], Exchange]
    gate: EpochGate
    secret: bytes
    first_step: int
    loopback: bool

    def lines_to(self, url: str, learning_rate: float | None) -> tuple[Exchange, EpochGate]:
        """A worker's exchange and epoch gate to the server at ``url``, the first epoch trained
        at ``learning_rate`` (what the callbacks set before it)."""
        gate = copy.copy(self.gate)
        gate.url, gate.learning_rate = url, learning_rate
        return self.make_exchange(url, self.secret), gate


@dataclasses.dataclass
class StageHostOutcome:
    """What task 0 returns besides its worker's report: the run as its steering left it."""

    center: np.ndarray
    weights: np.ndarray
    history: dict[str, list[float]]
    epochs_run: int
    events: dict[str, Any]
    server_stats: dict[str, Any]
    callbacks: list[Any]
    seconds: float
    server_url: str


def detached(callbacks: Iterable[Any]) -> list[Any]:
    """Copies of ``callbacks`` without their model, checked to pickle (they travel to task 0).

    Raises:
        ConfigurationError: a callback cannot be pickled; the message names it.
    """
    from pyspark import cloudpickle

    copies = []
    for callback in callbacks:
        clone = _without_model(callback)
        try:
            cloudpickle.dumps(clone)
        except Exception as exc:
            raise ConfigurationError(
                f"With the parameter server in the training stage "
                f"(`spark.kerasonspark.serverPlacement=stage`) the callbacks run in task 0, so "
                f"they must pickle; {type(callback).__name__} does not ({exc}). Drop it, or "
                "serve from the client (the default placement)."
            ) from None
        copies.append(clone)
    return copies


def check_stage_serving(callbacks: Iterable[Any], backs_up: bool) -> None:
    """Refuse, before any work, what the server in the stage cannot do.

    Raises:
        ConfigurationError: the run backs up (the client's steering writes the backups), or a
            callback cannot travel to task 0.
    """
    if backs_up:
        raise ConfigurationError(
            "Backups are written by the client's steering, and with "
            "`spark.kerasonspark.serverPlacement=stage` the run is steered in the training stage. "
            "Drop `checkpoint_dir` or BackupAndRestore, or serve from the client (the default "
            "placement)."
        )
    detached(callbacks)


def stage_serving(
    job: TrainingJob,
    store: ParameterStore,
    make_exchange: Callable[[str, bytes], Exchange],
    loopback: bool,
) -> StageServing:
    """What task 0 needs to serve ``job`` (see :func:`check_stage_serving` for what it
    refuses)."""
    from ._executor import EpochGate, learning_rate_of
    from ._steering import has_terminate_on_nan
    from .parameter_server._auth import new_secret

    config = job.config
    # what holds the session or the caller's model does not travel (TrainingJob.__getstate__)
    travelling = dataclasses.replace(
        job,
        callbacks=detached(job.callbacks),
        # the progress bar would print on an executor
        config=dataclasses.replace(config, verbose=0),
    )
    secret = new_secret()
    gate = EpochGate(
        "",
        secret,
        validation_freq=config.validation_freq,
        learning_rate=learning_rate_of(job.model),
        terminate_on_nan=has_terminate_on_nan(job.callbacks),
        timeout=config.failure.epoch_timeout,
    )
    return StageServing(
        travelling, store, make_exchange, gate, secret, global_step(job.model), loopback
    )


def serve_in_stage(
    blocks: Iterable[Any],
    serving: Any,
    train: Callable[..., Iterator[WorkerReport]],
) -> Iterator[Any]:
    """The body of each barrier task when the server lives in the stage: task 0 serves and
    steers (and yields a :class:`StageHostOutcome` after its report), every task trains its
    partition with ``train(blocks, exchange=..., gate=...)`` against task 0's server.

    ``serving`` is a share (``.value``) of a pickled :class:`StageServing`.
    """
    import pickle

    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    plan: StageServing = pickle.loads(serving.value)
    if context.partitionId() == 0:
        yield from _host(blocks, plan, train, context)
        return
    address = json.loads(context.allGather("")[0])
    exchange, gate = plan.lines_to(address["url"], address["learning_rate"])
    reports = list(train(blocks, exchange=exchange, gate=gate))
    context.barrier()  # task 0 keeps serving until every worker is done with it
    yield from reports


def _host(
    blocks: Iterable[Any],
    plan: StageServing,
    train: Callable[..., Iterator[WorkerReport]],
    context: Any,
) -> Iterator[Any]:
    from ._steering import Steering
    from .parameter_server._board import EpochBoard
    from .parameter_server._server import ParameterServer

    job, store = plan.job, plan.store
    model = job.spec.build()
    set_global_step(model, plan.first_step)
    job.model = model
    host = "127.0.0.1" if plan.loopback else context.getTaskInfos()[0].address.rsplit(":", 1)[0]
    board = EpochBoard(store, job.config.num_workers, terminate_on_nan=plan.gate.terminate_on_nan)
    steering = Steering(job, store, board)
    started = time.perf_counter()
    config = server_config(job, plan.secret, view_token=None)
    with ParameterServer(store, config, host=host, port=job.server_port, board=board) as server:
        learning_rate = steering.begin()
        context.allGather(json.dumps({"url": server.url, "learning_rate": learning_rate}))
        exchange, gate = plan.lines_to(server.url, learning_rate)

        def make_stage(
            first_epoch: int | None, resume: Mapping[int, int] | None
        ) -> Callable[[], list[WorkerReport]]:
            return lambda: list(train(blocks, exchange=exchange, gate=gate))

        reports = steering.drive(make_stage)
        context.barrier()
        center = store.center.copy()
        seconds = time.perf_counter() - started
        weights = steering.finish(center)
        outcome = StageHostOutcome(
            center,
            weights,
            steering.history,
            steering.epochs_run,
            steering.stats(),
            store.stats(),
            [_without_model(cb) for cb in job.callbacks],
            seconds,
            server.url,
        )
    yield from reports
    yield outcome


def _without_model(callback: Any) -> Any:
    clone = copy.copy(callback)
    clone.__dict__["_model"] = None
    return clone


class ReturnedSteering:
    """The client's view of a run steered in the stage: what
    :func:`kerasonspark._driver.assemble_result` reads of a :class:`~kerasonspark._steering.
    Steering`, from task 0's :class:`StageHostOutcome`.

    The client's callbacks take the state their copies ended with (``on_train_end`` ran there).
    """

    def __init__(self, outcome: StageHostOutcome, callbacks: Iterable[Any]) -> None:
        self.outcome = outcome
        self.history = dict(outcome.history)
        self.epochs_run = outcome.epochs_run
        for mine, theirs in zip(callbacks, outcome.callbacks, strict=True):
            mine.__dict__.update({k: v for k, v in vars(theirs).items() if k != "_model"})

    def finish(self, weights: np.ndarray) -> np.ndarray:
        """The weights ``fit`` returns: those task 0's callbacks left after ``on_train_end``."""
        return self.outcome.weights

    def stats(self) -> dict[str, Any]:
        return {
            **self.outcome.events,
            "server_placement": "stage",
            "server_url": self.outcome.server_url,
        }

    def restart_stats(self) -> dict[str, Any]:
        return {"restarts": 0, "lost_steps": 0, "redone_steps": 0, "restart_log": []}
