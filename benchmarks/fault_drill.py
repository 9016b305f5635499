"""A fault drill anyone can run: kill a worker (or the driver) mid-epoch on a real cluster, and see
the run survive.

    python benchmarks/fault_drill.py --data ../shared/data/mnist --backend async
    python benchmarks/fault_drill.py --data ../shared/data/mnist --backend sync --repeat 3
    python benchmarks/fault_drill.py --data ../shared/data/mnist --backend async --center sharded
    python benchmarks/fault_drill.py --data ../shared/data/mnist --kill driver

Starts a real Spark standalone cluster on this machine (``--workers`` workers of one core each),
trains the reference CNN on an MNIST subset uninterrupted (the baseline), then the same run (same
seed) while a worker's Python process is killed with SIGKILL mid-epoch (its process id read from
the live stats page, as an operator would), and prints one JSON line per run with ``completed``,
``restarts``, ``lost_steps``, ``redone_steps``, ``recovery_seconds`` (from the kill to the first
exchange after the restart), ``test_accuracy``, ``baseline_accuracy`` and ``leftover_processes``
(Spark or Python processes of the run alive after the drill stopped its cluster).

With ``--kill driver`` the training runs in a driver process of its own with
``keras.callbacks.BackupAndRestore`` (a backup every ``--backup-every`` exchanges); the drill
kills that process mid-epoch, runs it again, and the second run resumes from the backup;
``lost_steps`` then counts the steps trained after the last backup.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from stats_page import StatsPageWatcher, stats_page_url

SPARK_MARKERS = (
    b"pyspark.daemon",
    b"pyspark.worker",
    b"CoarseGrainedExecutorBackend",
    b"org.apache.spark.deploy",
)


def _stats(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


def spark_processes(marker: bytes) -> list[int]:
    """Processes on this machine whose command line holds one of Spark's markers and ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and any(m in cmdline for m in SPARK_MARKERS):
            found.append(int(entry.name))
    return found


def _leftovers(work: Path, grace: float = 15.0) -> list[int]:
    """The run's Spark and Python processes still alive ``grace`` seconds after its cluster stopped
    (a process that is exiting gets that long)."""
    deadline = time.monotonic() + grace
    while True:
        found = sorted(
            set(spark_processes(str(work).encode()) + spark_processes(b"pyspark.daemon"))
        )
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _load(args: argparse.Namespace):
    from kerasonspark import load_mnist
    from kerasonspark._executor import configure_tensorflow

    configure_tensorflow(0)
    (x, y), (test_x, test_y) = load_mnist(args.data)
    return (x[: args.limit], y[: args.limit]), (test_x, test_y)


def _trainer(args: argparse.Namespace, spark, **extra):
    from kerasonspark import SparkTrainer, mnist_cnn

    options: dict = (
        {"sync_every": 16, "mirror_every": args.mirror_every}
        if args.backend == "sync"
        else {"window": 5}
    )
    if args.center != "auto":
        options["center"] = args.center
    return SparkTrainer(
        mnist_cnn(seed=0),
        backend=args.backend,
        num_workers=args.workers,
        epochs=args.epochs,
        seed=0,
        spark=spark,
        verbose=0,
        backend_options=options,
        **extra,
    )


def kill_a_worker(args: argparse.Namespace, spark, data, test, catcher: StatsPageWatcher) -> dict:
    """Train once, killing one worker's Python process 40 % into the first epoch."""
    events: dict = {}

    def killer() -> None:
        while catcher.stats_url is None:
            time.sleep(0.1)
        url = catcher.stats_url
        while True:
            try:
                live = _stats(url)["live"]
            except OSError:
                return
            workers = live["workers"]
            done = sum(w["samples"] for w in workers.values() if w["epoch"] == 0)
            if len(workers) == args.workers and done > 0.4 * len(data[0]):
                victim = workers[str(args.workers - 1)]["pid"]
                os.kill(victim, signal.SIGKILL)
                events["killed"], events["victim"] = time.monotonic(), victim
                break
            time.sleep(0.1)
        while True:  # the first exchange the restarted stage applies
            try:
                figures = _stats(url)
            except OSError:
                return
            live = figures["live"]
            if live["restarts"] and figures["version"] > live["version_at_restart"]:
                events["recovered"] = time.monotonic()
                return
            time.sleep(0.05)

    catcher.url = None
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    trainer = _trainer(args, spark)
    result = trainer.fit(data, validation_data=None)
    thread.join(timeout=5)
    stats = result.stats
    return {
        "center": stats[args.backend].get("center"),
        "completed": len(result.history["loss"]) == args.epochs,
        "restarts": stats["restarts"],
        "lost_steps": stats["lost_steps"],
        "redone_steps": stats["redone_steps"],
        "recovery_seconds": round(events["recovered"] - events["killed"], 2)
        if "recovered" in events
        else None,
        "test_accuracy": trainer.evaluate(test)["accuracy"],
        "killed_pid": events.get("victim"),
        "causes": [r["cause"][:160] for r in stats["restart_log"]],
    }


def _driver_command(args: argparse.Namespace, master: str, backup: Path) -> list[str]:
    command = [
        sys.executable,
        __file__,
        "--role",
        "driver",
        "--master",
        master,
        "--backup",
        str(backup),
        "--backend",
        args.backend,
        "--workers",
        str(args.workers),
        "--epochs",
        str(args.epochs),
        "--limit",
        str(args.limit),
        "--backup-every",
        str(args.backup_every),
        "--center",
        args.center,
        "--mirror-every",
        str(args.mirror_every),
    ]
    return command + (["--data", args.data] if args.data else [])


def _driver_process(args: argparse.Namespace, master: str, backup: Path) -> dict:
    """Run the driver as a process of its own to the end; its JSON line."""
    run = subprocess.run(_driver_command(args, master, backup), capture_output=True, text=True)
    lines = run.stdout.strip().splitlines()
    if run.returncode or not lines:
        raise RuntimeError(f"The driver process failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(lines[-1])


def kill_the_driver(args: argparse.Namespace, master: str, backup: Path) -> dict:
    """Run the driver as its own process, SIGKILL it mid-epoch once a backup exists, run it
    again."""
    first = subprocess.Popen(
        _driver_command(args, master, backup),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url, killed_at_steps = None, None
    assert first.stderr is not None
    for line in first.stderr:
        page = stats_page_url(line)
        if page is not None:
            url = page.replace("/dashboard?", "/stats?")
            break
    while url is not None and first.poll() is None:
        try:
            live = _stats(url)["live"]
        except OSError:
            break
        done = sum(w["samples"] for w in live["workers"].values() if w["epoch"] == 0)
        if list(backup.glob("backup-*[0-9]")) and done > 0.6 * args.limit:
            killed_at_steps = sum(w["steps"] for w in live["workers"].values() if w["epoch"] == 0)
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.1)
    first.wait()
    from kerasonspark._backup import BackupStore

    saved = BackupStore(backup).latest()
    report = _driver_process(args, master, backup)
    backed_up_steps = (
        sum(_steps_held(args, n) for n in saved.resume.values()) if saved is not None else 0
    )
    report.update(
        lost_steps=max((killed_at_steps or 0) - backed_up_steps, 0),
        killed=killed_at_steps is not None,
        resumed_from_epoch=report.get("resumed_from_epoch"),
    )
    return report


def _steps_held(args: argparse.Namespace, exchanges: int) -> int:
    """Steps of the first epoch a worker's ``exchanges`` cover (partitions taken as equal)."""
    from kerasonspark.engine import even_runs

    steps = -(-(args.limit // args.workers) // 32)
    if args.backend == "sync":
        return sum(even_runs(steps, -(-steps // 16))[:exchanges])
    return min(exchanges * 5, steps)


def driver_role(args: argparse.Namespace) -> None:
    """The driver process of ``--kill driver``: train with backups; print one JSON line at the
    end."""
    import keras

    from kerasonspark import start_session

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    data, test = _load(args)
    spark = start_session(args.master, "kerasonspark-fault-drill-driver")
    trainer = _trainer(args, spark)
    result = trainer.fit(
        data, callbacks=[keras.callbacks.BackupAndRestore(args.backup, save_freq=args.backup_every)]
    )
    print(
        json.dumps(
            {
                "completed": len(result.history["loss"]) == args.epochs,
                "restarts": result.stats["restarts"],
                "resumed_from_epoch": result.stats["epoch_events"]["resumed_from_epoch"],
                "test_accuracy": trainer.evaluate(test)["accuracy"],
            }
        ),
        flush=True,
    )
    spark.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None)
    parser.add_argument("--backend", default="async", choices=("async", "sync", "hogwild"))
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=12_000, help="MNIST training rows")
    parser.add_argument("--kill", default="worker", choices=("worker", "driver"))
    parser.add_argument(
        "--center",
        default="auto",
        choices=("auto", "driver", "sharded"),
        help="the center (auto: the engine's default, sharded for sync, the driver's for async)",
    )
    parser.add_argument(
        "--mirror-every", type=int, default=2, help="sync's rounds between mirrors (sharded)"
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--backup-every", type=int, default=20, help="exchanges between backups (--kill driver)"
    )
    parser.add_argument(
        "--role", default="drill", choices=("drill", "driver"), help=argparse.SUPPRESS
    )
    parser.add_argument("--master", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backup", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "driver":
        driver_role(args)
        return

    from kerasonspark import StandaloneCluster, start_session

    catcher = StatsPageWatcher()
    logging.getLogger("kerasonspark").addHandler(catcher)
    logging.getLogger("kerasonspark").setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="kerasonspark-drill-"))
    data, test = _load(args)
    runs, baselines = [], []
    cluster = StandaloneCluster(
        workers=args.workers, memory_per_worker="2g", work_dir=str(work / "cluster")
    )
    with cluster:
        if args.kill == "driver":  # every driver is a process of its own; this one holds no cores
            for run in range(args.repeat):
                baselines.append(
                    _driver_process(args, cluster.master_url, work / f"baseline-{run}")[
                        "test_accuracy"
                    ]
                )
                runs.append(kill_the_driver(args, cluster.master_url, work / f"backup-{run}"))
                print(
                    json.dumps(
                        {
                            "run": run + 1,
                            "backend": args.backend,
                            "kill": args.kill,
                            **runs[-1],
                            "baseline_accuracy": baselines[-1],
                        }
                    ),
                    flush=True,
                )
        else:
            spark = start_session(cluster.master_url, "kerasonspark-fault-drill")
            spark.sparkContext.setLogLevel("ERROR")
            try:
                for run in range(args.repeat):
                    baseline = _trainer(args, spark)
                    baseline.fit(data)
                    baselines.append(baseline.evaluate(test)["accuracy"])
                    runs.append(kill_a_worker(args, spark, data, test, catcher))
                    print(
                        json.dumps(
                            {
                                "run": run + 1,
                                "backend": args.backend,
                                "kill": args.kill,
                                **runs[-1],
                                "baseline_accuracy": baselines[-1],
                            }
                        ),
                        flush=True,
                    )
            finally:
                spark.stop()
    leftovers = _leftovers(work)
    summary = {
        "backend": args.backend,
        "kill": args.kill,
        "workers": args.workers,
        "runs": len(runs),
        "completed": all(r["completed"] for r in runs),
        "restarts": statistics.median(r.get("restarts", 0) for r in runs),
        "lost_steps": statistics.median(r.get("lost_steps", 0) for r in runs),
        "redone_steps": statistics.median(
            r.get("redone_steps", r.get("lost_steps", 0)) for r in runs
        ),
        "recovery_seconds": (
            statistics.median(seconds)
            if (seconds := [r["recovery_seconds"] for r in runs if r.get("recovery_seconds")])
            else None
        ),
        "test_accuracy": statistics.median(r["test_accuracy"] for r in runs),
        "baseline_accuracy": statistics.median(baselines),
        "leftover_processes": len(leftovers),
    }
    for pid in leftovers:
        try:
            print(
                f"left running: {pid} {Path(f'/proc/{pid}/cmdline').read_bytes()[:300]!r}",
                file=sys.stderr,
            )
        except OSError:
            pass
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
