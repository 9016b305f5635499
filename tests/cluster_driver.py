"""A driver program for tests/test_cluster.py: trains on the standalone cluster named on the
command line and prints what happened as JSON (a Spark driver needs a process of its own, since
the test process already holds a local session)."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import keras
from ship_driver import ship_report

from kerasonspark import FailureConfig, SparkTrainer, WorkerError, start_session
from kerasonspark._cluster import ClusterState, master_status
from kerasonspark._session import server_host

from conftest import make_blobs, small_model


def main(master_url: str, web_ui: str) -> None:
    spark = start_session(master_url, "kerasonspark-cluster-test")
    x, y = make_blobs(1200)
    import kerasonspark

    report = {
        "master": spark.sparkContext.master,
        "server_host": server_host(spark),
        "package": kerasonspark.__file__,
    }
    trainer = SparkTrainer(
        small_model(), backend="sync", num_workers=2, spark=spark, epochs=2, verbose=0
    )
    result = trainer.fit(x, y)
    report["sync"] = {
        "accuracy": trainer.evaluate(x, y)["accuracy"],
        "worker_samples": [w["samples"] for w in result.stats["workers"]],
    }
    status = master_status(ClusterState(master_url, web_ui, [], ""))
    report["apps"] = [{"name": a["name"], "cores": a["cores"]} for a in status["activeapps"]]
    report["workers_busy"] = [w["coresused"] for w in status["workers"]]
    report["lost_executor"] = kill_an_executor_while_training(
        spark, x, y, failure=FailureConfig(max_restarts=0), epochs=400
    )
    report["restarted"] = kill_an_executor_while_training(
        spark, x, y, failure=FailureConfig(max_restarts=2), epochs=150
    )
    # The cluster has 3 workers: a 3-worker run loses one for good and goes on with the other two,
    # then a 2-worker run loses another and cannot restart (the cluster keeps one worker).
    report["shrunk"] = lose_a_worker_for_good(
        spark, x, y, num_workers=3, restart_with_fewer_workers=True
    )
    report["no_slot"] = lose_a_worker_for_good(spark, x, y, num_workers=2)
    spark.stop()
    # Last (a process's first session lends its settings to the later ones, so these come after
    # it), on the worker left: applications whose executors lack kerasonspark (it ships itself, and
    # `async` trains with it) or Keras (refused).
    report["ship"] = ship_report(master_url)
    print("REPORT " + json.dumps(report))


def processes_with(marker: bytes) -> list[int]:
    """Process ids whose command line holds ``marker`` (read from /proc, as pgrep would)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return sorted(pids)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def kill_while_training(spark, victims) -> threading.Thread:
    """A started thread that SIGKILLs the processes ``victims()`` names two seconds into the
    training stage; ``killer.killed`` records what it killed, and whether the stage was still
    running then."""
    tracker = spark.sparkContext.statusTracker()

    def training_stages() -> list[int]:
        return [
            s
            for s in tracker.getActiveStageIds()  # SparkRunner.run_workers's collect
            if tracker.getStageInfo(s) and "kerasonspark/_driver.py" in tracker.getStageInfo(s).name
        ]

    def kill_when_training() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if training_stages():
                time.sleep(2)
                pids = victims()
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killer.killed = {"pids": pids, "stage_running": bool(training_stages())}
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_training)
    killer.killed = None
    killer.start()
    return killer


class StopAfterTheKill(keras.callbacks.Callback):
    """Stops the run a few epochs after the kill: the epochs before the budget runs out are there
    to outlast the kill, and a few after it show that training went on."""

    def __init__(self, killer: threading.Thread, epochs_after: int = 5) -> None:
        super().__init__()
        self.killer, self.epochs_after, self.after_kill = killer, epochs_after, 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.killer.killed is not None:
            self.after_kill += 1
            if self.after_kill >= self.epochs_after:
                self.model.stop_training = True


def lose_a_worker_for_good(spark, x, y, num_workers: int = 2, **options) -> dict:
    """SIGKILL a worker daemon and its executor mid-training: no slot comes back; the restart gives
    up,
    or with ``restart_with_fewer_workers`` goes on with the other worker."""

    def worker_and_its_executors() -> list[int]:
        worker = processes_with(b"org.apache.spark.deploy.worker.Worker")[0]
        return [worker, *(p for p in executor_pids() if parent_of(p) == worker)]

    killer = kill_while_training(spark, worker_and_its_executors)
    started = time.monotonic()
    outcome: dict = {"error": None}
    # One round an epoch (19 steps a worker): hundreds of epochs are there to outlast the kill, not
    # to train.
    trainer = SparkTrainer(
        small_model(),
        backend="sync",
        spark=spark,
        verbose=0,
        failure=FailureConfig(restart_timeout=5, **options),
        backend_options={"sync_every": 32},
        epochs=400,
        num_workers=num_workers,
    )
    try:
        result = trainer.fit(x, y, callbacks=[StopAfterTheKill(killer)])
        outcome.update(
            num_workers=result.stats["num_workers"],
            epochs=len(result.history["loss"]),
            restarts=result.stats["restarts"],
            accuracy=trainer.evaluate(x, y)["accuracy"],
            worker_samples=[w["samples"] for w in result.stats["workers"]],
        )
    except Exception as exc:
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    outcome["seconds"] = time.monotonic() - started
    killer.join()
    outcome["killed"] = killer.killed
    outcome["threads"] = [
        t.name for t in threading.enumerate() if t.name.startswith("kerasonspark-")
    ]
    return outcome


def executor_pids() -> list[int]:
    """Process ids of the executor JVMs on this machine."""
    return processes_with(b"CoarseGrainedExecutorBackend")


def kill_an_executor_while_training(spark, x, y, failure: FailureConfig, epochs: int) -> dict:
    """SIGKILL one executor JVM two seconds into the training stage; report how fit ended."""
    killer = kill_while_training(spark, lambda: executor_pids()[:1])
    started = time.monotonic()
    outcome = {"error": None}
    # Three workers, one on each executor: whichever executor is killed was training.
    trainer = SparkTrainer(
        small_model(),
        backend="async",
        num_workers=3,
        spark=spark,
        epochs=epochs,
        verbose=0,
        failure=failure,
    )
    try:
        result = trainer.fit(x, y, callbacks=[StopAfterTheKill(killer)])
        outcome.update(
            restarts=result.stats["restarts"],
            causes=[r["cause"] for r in result.stats["restart_log"]],
            epochs=len(result.history["loss"]),
            accuracy=trainer.evaluate(x, y)["accuracy"],
        )
    except WorkerError as exc:
        outcome = {"error": str(exc), "worker": exc.worker}
    outcome["seconds"] = time.monotonic() - started
    killer.join()
    outcome["threads"] = [
        t.name for t in threading.enumerate() if t.name.startswith("kerasonspark-ps")
    ]
    return outcome


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
