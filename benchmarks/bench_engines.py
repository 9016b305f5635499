"""Samples/s and test accuracy of engines on full MNIST, in one run on the same cores.

    python benchmarks/bench_engines.py --data ../shared/data/mnist            # single and sync
    python benchmarks/bench_engines.py --data ../shared/data/mnist --backends single sync async async:downpour hogwild

A backend may carry an update rule after a colon (``async:downpour``). With ``--repeat N`` every
engine runs N times, interleaved, and the median of each figure is reported.

Each engine trains the reference CNN for one epoch (batch 32, seed 0) on a DataFrame in Spark,
then the test set is evaluated on the executors. samples/s counts the training stage only
(``stats["train_seconds"]``: for distributed engines the barrier stage, for ``single`` its
``model.fit``); the wall column is the whole ``fit`` including data preparation.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics

from kerasonspark import SparkTrainer
from kerasonspark.data import numpy_to_dataframe
from kerasonspark.datasets import load_mnist
from kerasonspark.models import mnist_cnn
from kerasonspark.session import start_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--backends", nargs="+", default=["single", "sync"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--master", default=None, help="Spark master URL (default: local[workers]), e.g. the URL "
                                                       "`kerasonspark cluster start` prints")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--options", default="{}", help='JSON: {"sync": {"sync_every": 32}}')
    parser.add_argument("--repeat", type=int, default=1, help="runs of each engine; medians are reported")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    options = json.loads(args.options)

    (x_train, y_train), (x_test, y_test) = load_mnist(args.data)
    spark = start_session(args.master or f"local[{args.workers}]", "kerasonspark-bench")
    try:
        train_df = numpy_to_dataframe(spark, x_train, y_train).cache()
        test_df = numpy_to_dataframe(spark, x_test, y_test).cache()
        train_df.count(), test_df.count()
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeat):
            for label in args.backends:
                backend, _, rule = label.partition(":")
                backend_options = dict(options.get(label, options.get(backend, {})))
                if rule:
                    backend_options["rule"] = rule
                trainer = SparkTrainer(mnist_cnn(seed=0), backend=backend, num_workers=args.workers,
                                       batch_size=args.batch_size, epochs=args.epochs, spark=spark, seed=0, verbose=0,
                                       backend_options=backend_options or None)
                result = trainer.fit(train_df)
                accuracy = trainer.evaluate(test_df)["accuracy"]
                s = result.stats
                runs.setdefault(label, []).append({
                    "samples_per_s": s["samples_per_second"], "train_s": s["train_seconds"], "wall_s": s["wall_seconds"],
                    "test_accuracy": accuracy, "exchanges": s.get("updates", s.get("rounds", 0)),
                    "overlapping_writes": s.get("overlapping_writes", 0),
                    "max_staleness": s.get("staleness", {}).get("max", 0)})
                extra = (f"  overlapping writes {s['overlapping_writes']}  staleness max {s['staleness']['max']}"
                         if "staleness" in s else "")
                print(f"{label:>15}: {s['samples_per_second']:8.0f} samples/s  train {s['train_seconds']:6.1f} s  "
                      f"wall {s['wall_seconds']:6.1f} s  test accuracy {accuracy:.4f}{extra}", flush=True)
    finally:
        spark.stop()
    rows = [{"backend": label, "runs": len(r), **{k: statistics.median(x[k] for x in r) for k in r[0]}}
            for label, r in runs.items()]
    base = next((r for r in rows if r["backend"] == "single"), None)
    if base:
        for r in rows:
            r["ratio_vs_single"] = r["samples_per_s"] / base["samples_per_s"]
            r["wall_ratio_vs_single"] = base["wall_s"] / r["wall_s"]
            print(f"{r['backend']:>15}: {r['ratio_vs_single']:.2f}x single samples/s "
                  f"({r['wall_ratio_vs_single']:.2f}x by wall time)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
