"""Where the seconds of a small run go: the reference CNN, 8,000 MNIST rows, 2 epochs, 2 workers on
``local[2]``, seconds by phase, from a fresh Python process to the trained model, against plain
Keras on the same rows and epochs.

    python benchmarks/small_run_budget.py --data ../shared/data/mnist
    python benchmarks/small_run_budget.py --data ../shared/data/mnist --backend async --fits 3

The phases, in the order a user's script meets them: importing kerasonspark (and with it Keras
and TensorFlow) in the driver; starting the Spark session (the JVM); then each ``fit`` split into
the data pass (``prepare_seconds``: the rows scanned and checked, while every Python worker
imports TensorFlow, builds the model and traces its step), the training stage (``train_seconds``:
the barrier stage, of which the workers' own training loops are ``loop``), and the rest (the
executor probe, the model's spec, assembling the result); ``evaluate`` on the 10,000 test rows.
The second and later fits reuse the session and its Python workers (TensorFlow stays imported
there), which is what a notebook or a hyperparameter search sees. ``cold TensorFlow import`` is
one fresh interpreter's ``import tensorflow``, what each new Python worker pays once.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def cold_import_seconds() -> float:
    """Seconds a fresh interpreter takes to ``import tensorflow``."""
    code = "import time; t = time.perf_counter(); import tensorflow; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder with the MNIST files")
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backend", default="sync")
    parser.add_argument("--fits", type=int, default=2, help="fits on the same session")
    args = parser.parse_args()

    started = time.perf_counter()
    from kerasonspark import SparkTrainer, load_mnist, mnist_cnn, start_session

    imported = time.perf_counter()
    (x, y), (tx, ty) = load_mnist(args.data)
    x, y = x[: args.rows], y[: args.rows]
    loaded = time.perf_counter()
    spark = start_session("local[2]", "kerasonspark-small-run")
    session = time.perf_counter()
    rows = [
        ("import kerasonspark (driver)", imported - started),
        ("load MNIST (driver)", loaded - imported),
        ("start the Spark session", session - loaded),
    ]
    accuracy = 0.0
    for fit in range(1, args.fits + 1):
        trainer = SparkTrainer(
            mnist_cnn(),
            backend=args.backend,
            num_workers=2,
            epochs=args.epochs,
            spark=spark,
            seed=0,
            verbose=0,
        )
        result = trainer.fit(x, y)
        stats = result.stats
        loop = statistics.median(w["seconds"] for w in stats["workers"])
        rest = stats["wall_seconds"] - stats["prepare_seconds"] - stats["train_seconds"]
        scored = time.perf_counter()
        accuracy = trainer.evaluate(tx, ty)["accuracy"]
        evaluated = time.perf_counter() - scored
        which = "first fit (new Python workers)" if fit == 1 else f"fit {fit} (same session)"
        rows += [
            (f"{which}: whole fit", stats["wall_seconds"]),
            (
                "    data pass (with the workers' TensorFlow import, model, tracing)",
                stats["prepare_seconds"],
            ),
            ("    training stage", stats["train_seconds"]),
            ("        of which the workers' training loops", loop),
            ("    the rest (executor probe, model spec, result)", rest),
            (f"{which}: evaluate (10,000 rows)", evaluated),
        ]
    spark.stop()
    total = time.perf_counter() - started

    model = mnist_cnn()
    plain_started = time.perf_counter()
    model.fit(x, y, epochs=args.epochs, batch_size=32, verbose=0)
    plain = time.perf_counter() - plain_started
    plain_accuracy = model.evaluate(tx, ty, verbose=0)[1]

    rows += [
        ("whole script to here (driver process)", total),
        ("plain Keras model.fit, same rows and epochs (this process)", plain),
        ("cold TensorFlow import (one fresh interpreter)", cold_import_seconds()),
    ]
    print(f"{args.backend}, {args.rows:,} rows, {args.epochs} epochs, 2 workers on local[2]")
    print("| phase | seconds |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")
    print(f"test accuracy: {args.backend} {accuracy:.4f}, plain Keras {plain_accuracy:.4f}")


if __name__ == "__main__":
    main()
