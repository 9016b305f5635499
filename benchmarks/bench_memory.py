"""Peak memory and speed of in-memory and streamed partitions, at 1x and 8x MNIST, from Parquet.

    python benchmarks/bench_memory.py --data ../shared/data/mnist
    python benchmarks/bench_memory.py --data ../shared/data/mnist \\
        --runs memory:1 stream:1 stream:8 --backend sync

Writes MNIST's training set as Parquet once at 1x and at 8x its rows (the set repeated), under
``--workdir``. Each run (``path:scale``) is a fresh driver process on ``local[2]`` that trains
the reference CNN for one epoch on 2 workers from the Parquet folder with
``partition_storage=path``, then scores the test set. While it trains, a thread samples, every
50 ms, the anonymous resident memory (``RssAnon``: the heap, not the page cache or mapped
files) of the Python driver and of every Python worker under it. Prints one JSON line per run:
``driver_peak_rss_anon_mb``, ``worker_peak_rss_anon_mb`` (the largest Python worker),
``samples_per_second`` (the training stage), ``path`` (what ran), ``auto_path`` (what
``partition_storage="auto"`` chooses for that data), and the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from kerasonspark import DataConfig

HERE = Path(__file__).resolve()


def rss_anon_mb(pid: int) -> float:
    """A process's anonymous resident memory in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def python_workers(root: int) -> list[int]:
    """Spark's Python worker processes under ``root`` (its daemon and the daemon's forks).

    A JVM starts them from any of its threads, so every thread's children are followed.
    """
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                queue.append(child)
                try:
                    argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if Path(argv[0].decode(errors="replace")).name.startswith(
                    "python"
                ) and b"pyspark" in b" ".join(argv[1:3]):
                    found.append(child)
    return found


class PeakSampler(threading.Thread):
    """Samples the driver's and the largest Python worker's ``RssAnon`` until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.driver_peak = self.worker_peak = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.done.wait(0.05):
            self.driver_peak = max(self.driver_peak, rss_anon_mb(me))
            self.worker_peak = max(
                [self.worker_peak, *(rss_anon_mb(pid) for pid in python_workers(me))]
            )

    def stop(self) -> None:
        self.done.set()
        self.join()


def write_parquet(data: str | None, workdir: Path, scales: list[int]) -> dict[int, Path]:
    """MNIST's training set as Parquet at each scale (the rows repeated), written once."""
    folders = {scale: workdir / f"mnist-x{scale}.parquet" for scale in scales}
    missing = [scale for scale, folder in folders.items() if not (folder / "_SUCCESS").exists()]
    if not missing:
        return folders
    from functools import reduce

    from kerasonspark import load_mnist, numpy_to_dataframe, start_session

    spark = start_session("local[2]", "kerasonspark-bench-memory-write")
    (x, y), _ = load_mnist(data)
    once = numpy_to_dataframe(spark, x.reshape(len(x), -1), y, partitions=4)
    for scale in missing:
        reduce(lambda a, b: a.union(b), [once] * scale).write.mode("overwrite").parquet(
            str(folders[scale])
        )
    spark.stop()
    return folders


def measure(folder: str, path: str, scale: int, backend: str, data: str | None) -> None:
    """In a fresh process: train one epoch from ``folder`` and print the run's JSON line."""
    from kerasonspark import SparkTrainer, load_mnist, mnist_cnn, start_session

    spark = start_session("local[2]", "kerasonspark-bench-memory")
    _, (x_test, y_test) = load_mnist(data)
    trainer = SparkTrainer(
        mnist_cnn(seed=0),
        backend=backend,
        num_workers=2,
        epochs=1,
        batch_size=32,
        spark=spark,
        seed=0,
        verbose=0,
        data=DataConfig(partition_storage=path),
    )
    sampler = PeakSampler()
    sampler.start()
    try:
        stats = trainer.fit(folder).stats
    finally:
        sampler.stop()
    storage = stats["partition_storage"]
    accuracy = trainer.evaluate(x_test, y_test)["accuracy"]
    spark.stop()
    sys.stdout.write(
        json.dumps(
            {
                "scale": scale,
                "rows": stats["samples"],
                "backend": backend,
                "path": storage["path"],
                "auto_path": "stream"
                if storage["largest_partition_mb"] > storage["worker_budget_mb"]
                else "memory",
                "largest_partition_mb": round(storage["largest_partition_mb"], 1),
                "worker_budget_mb": round(storage["worker_budget_mb"], 1),
                "driver_peak_rss_anon_mb": round(sampler.driver_peak, 1),
                "worker_peak_rss_anon_mb": round(sampler.worker_peak, 1),
                "samples_per_second": round(stats["samples_per_second"], 1),
                "train_seconds": round(stats["train_seconds"], 1),
                "prepare_seconds": round(stats["prepare_seconds"], 1),
                "accuracy": round(accuracy, 4),
            }
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=None, help="MNIST folder (default: the standard locations)"
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["memory:1", "stream:1", "stream:8"],
        help="path:scale pairs, run in this order (path: memory, stream or auto)",
    )
    parser.add_argument("--backend", default="sync")
    parser.add_argument("--workdir", default="/tmp/kerasonspark-bench-memory")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        folder, path, scale = args.measure
        measure(folder, path, int(scale), args.backend, args.data)
        return
    runs = [(path, int(scale)) for path, scale in (run.split(":") for run in args.runs)]
    folders = write_parquet(args.data, Path(args.workdir), sorted({scale for _, scale in runs}))
    for path, scale in runs:
        started = time.perf_counter()
        command = [
            sys.executable,
            str(HERE),
            "--backend",
            args.backend,
            "--measure",
            str(folders[scale]),
            path,
            str(scale),
        ]
        if args.data:
            command += ["--data", args.data]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
        if finished.returncode or not lines:
            sys.stderr.write(finished.stderr[-3000:])
            raise SystemExit(f"run {path}:{scale} failed (exit {finished.returncode})")
        record = json.loads(lines[-1])
        record["run_seconds"] = round(time.perf_counter() - started, 1)
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
