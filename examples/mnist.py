"""Reproduce the 2017 Dist-Keras MNIST run with kerasonspark.

    python examples/mnist.py                                   # sync, 2 workers, local Spark
    python examples/mnist.py --backend sync --workers 2 --data ../shared/data/mnist

Prints the three lines the 2017 run printed: training time, test accuracy, and the number of
parameter-server updates (rounds, for the synchronous engine).
"""

from __future__ import annotations

import argparse
import logging

from kerasonspark import SparkTrainer
from kerasonspark.data import numpy_to_dataframe
from kerasonspark.datasets import load_mnist
from kerasonspark.models import mnist_cnn
from kerasonspark.session import start_session


def parse_option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="sync", help="engine name (default: sync)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--master", default=None, help="Spark master URL (default: local[workers])")
    parser.add_argument("--data", default=None, help="folder with the MNIST files (default: standard locations)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rule", default=None, help="update rule, for asynchronous engines")
    parser.add_argument("--window", type=int, default=None, help="local steps between exchanges, for asynchronous engines")
    parser.add_argument("-o", "--option", action="append", default=[], type=parse_option,
                        help="backend option KEY=VALUE, repeatable (e.g. -o sync_every=32)")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only (quick runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)

    (x_train, y_train), (x_test, y_test) = load_mnist(args.data)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    options = dict(args.option)
    if args.rule is not None:
        options["rule"] = args.rule
    if args.window is not None:
        options["window"] = args.window

    spark = start_session(args.master or f"local[{args.workers}]", "kerasonspark-mnist")
    try:
        train_df = numpy_to_dataframe(spark, x_train, y_train)
        test_df = numpy_to_dataframe(spark, x_test, y_test)
        trainer = SparkTrainer(mnist_cnn(seed=args.seed), backend=args.backend, num_workers=args.workers,
                               batch_size=args.batch_size, epochs=args.epochs, backend_options=options or None,
                               spark=spark, seed=args.seed)
        result = trainer.fit(train_df)
        accuracy = trainer.evaluate(test_df)["accuracy"]
        stats = result.stats
        updates = stats.get("updates", stats.get("rounds", 0))
        print(f"Training time: {stats['wall_seconds']:.1f} s")
        print(f"Test accuracy: {accuracy:.4f}")
        print(f"Parameter-server updates: {updates}")
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
