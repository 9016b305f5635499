"""Why a worker sizes TensorFlow's thread pools to its task's cores, measured on the engine itself.

    python benchmarks/bench_threads.py --data ../shared/data/mnist [--repeat 2]

Trains the reference CNN one epoch (batch 32) with the ``sync`` engine on ``local[2]``, once with
each worker's pools sized to its task (one thread: the default, ``worker_threads=None``) and once
with TensorFlow's own defaults (``worker_threads=0``: every worker uses every core), interleaved
``--repeat`` times. A fresh Spark session per run, since a Python worker keeps its pools for life.
"""

from __future__ import annotations

import argparse
import logging
import statistics

from kerasonspark import ResourceConfig


def one_run(data: str | None, threads: int | None) -> float:
    from kerasonspark import SparkTrainer, load_mnist, mnist_cnn, numpy_to_dataframe, start_session

    (x, y), _ = load_mnist(data)
    spark = start_session("local[2]", "kerasonspark-bench-threads")
    try:
        df = numpy_to_dataframe(spark, x, y).cache()
        df.count()
        trainer = SparkTrainer(
            mnist_cnn(seed=0),
            backend="sync",
            num_workers=2,
            spark=spark,
            seed=0,
            verbose=0,
            resources=ResourceConfig(worker_threads=threads),
        )
        return trainer.fit(df).stats["samples_per_second"]
    finally:
        spark.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runs: dict[str, list[float]] = {"sized (1 thread per worker)": [], "TensorFlow defaults": []}
    for _ in range(args.repeat):
        for label, threads in (("sized (1 thread per worker)", None), ("TensorFlow defaults", 0)):
            runs[label].append(one_run(args.data, threads))
            print(f"{label:<30} {runs[label][-1]:7.0f} samples/s", flush=True)
    sized, default = (statistics.median(v) for v in runs.values())
    print(
        f"median: sized {sized:.0f}, defaults {default:.0f} samples/s: sizing gives "
        f"{sized / default:.2f}x"
    )


if __name__ == "__main__":
    main()
