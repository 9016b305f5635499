"""What steering costs: MNIST with validation data, with and without callbacks and the progress bar.

    python benchmarks/bench_callbacks.py --data ../shared/data/mnist
    python benchmarks/bench_callbacks.py --data ../shared/data/mnist --backend async --repeat 3 \\
        --epochs 3

Both runs score the center on the 10,000 test images at every epoch boundary (``validation_data``);
one also runs ``ModelCheckpoint`` (every epoch, ``.keras``), an ``EarlyStopping`` that does not
trigger, and the live progress bar (``verbose=1``), the other runs no callbacks and is silent.
The two alternate (``--repeat`` pairs, in one Spark session) and the medians of samples/s
(``stats["samples_per_second"]``: the training stage, epoch boundaries and validation included)
are printed side by side with their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None, help="folder with the MNIST files")
    parser.add_argument("--backend", default="sync")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    args = parser.parse_args()

    import keras

    from kerasonspark import SparkTrainer, load_mnist, mnist_cnn, start_session
    from kerasonspark._executor import configure_tensorflow

    configure_tensorflow(0)
    (x, y), (test_x, test_y) = load_mnist(args.data)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    spark = start_session(f"local[{args.workers}]", "kerasonspark-bench-callbacks")
    spark.sparkContext.setLogLevel("ERROR")
    figures: dict[str, list[float]] = {"callbacks": [], "none": []}
    try:
        with tempfile.TemporaryDirectory() as folder:
            for run in range(args.repeat):
                for variant in ("callbacks", "none"):
                    callbacks = []
                    if variant == "callbacks":
                        callbacks = [
                            keras.callbacks.ModelCheckpoint(
                                str(Path(folder) / "epoch-{epoch:02d}.keras")
                            ),
                            keras.callbacks.EarlyStopping(monitor="val_loss", patience=args.epochs),
                        ]
                    trainer = SparkTrainer(
                        mnist_cnn(),
                        backend=args.backend,
                        num_workers=args.workers,
                        epochs=args.epochs,
                        seed=run,
                        spark=spark,
                        verbose=1 if variant == "callbacks" else 0,
                    )
                    shown = io.StringIO()
                    with contextlib.redirect_stdout(shown):
                        started = time.perf_counter()
                        result = trainer.fit(
                            (x, y), validation_data=(test_x, test_y), callbacks=callbacks
                        )
                    rate = result.stats["samples_per_second"]
                    figures[variant].append(rate)
                    events = result.stats["epoch_events"]
                    print(
                        f"run {run + 1} {variant:9s} {rate:8.0f} samples/s  val_accuracy "
                        f"{result.history['val_accuracy'][-1]:.4f}  callbacks "
                        f"{events['callback_seconds']:.2f} s  epoch barriers "
                        f"{events['epoch_barrier_seconds']:.2f} s  wall "
                        f"{time.perf_counter() - started:.0f} s",
                        flush=True,
                    )
                    if variant == "callbacks" and run == 0:
                        print(
                            "  progress bar, last lines:",
                            *shown.getvalue().splitlines()[-2:],
                            sep="\n  ",
                        )
    finally:
        spark.stop()
    with_cb, without = statistics.median(figures["callbacks"]), statistics.median(figures["none"])
    print(
        f"\n{args.backend}, {args.workers} workers, {args.epochs} epochs, medians of {args.repeat}:"
    )
    print(f"  with validation + callbacks + progress bar: {with_cb:8.0f} samples/s")
    print(f"  with validation, no callbacks, silent:      {without:8.0f} samples/s")
    print(f"  ratio: {with_cb / without:.3f}")


if __name__ == "__main__":
    main()
