"""The ``kerasonspark`` command: train the reference MNIST model, list engines.

    kerasonspark train --backend sync --workers 2 --data ../shared/data/mnist
    kerasonspark backends
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"Expected KEY=VALUE. Received: {text!r}.")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def _train_parser(sub: Any) -> None:
    train = sub.add_parser("train", help="train the 2017 MNIST CNN and print time, accuracy and updates")
    train.add_argument("--backend", default="sync", help="engine name (default: sync)")
    train.add_argument("--workers", type=int, default=2)
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--master", default=None, help="Spark master URL (default: local[workers])")
    train.add_argument("--data", default=None, help="folder with the MNIST files (default: standard locations)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--rule", default=None, help="update rule of an asynchronous engine")
    train.add_argument("--window", type=int, default=None, help="local steps between exchanges (asynchronous)")
    train.add_argument("-o", "--option", action="append", default=[], type=_option,
                       help="backend option KEY=VALUE, repeatable (e.g. -o sync_every=32)")
    train.add_argument("--limit", type=int, default=None, help="train on the first N images only")


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train the reference CNN on MNIST as the 2017 Dist-Keras run did; prints its three lines."""
    from .data import numpy_to_dataframe
    from .datasets import load_mnist
    from .models import mnist_cnn
    from .session import start_session
    from .trainer import SparkTrainer

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
    finally:
        spark.stop()
    stats = result.stats
    updates = stats.get("updates", stats.get("rounds", 0))
    print(f"Training time: {stats['wall_seconds']:.1f} s")
    print(f"Test accuracy: {accuracy:.4f}")
    print(f"Parameter-server updates: {updates}")
    return {"stats": stats, "accuracy": accuracy}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kerasonspark`` command."""
    parser = argparse.ArgumentParser(prog="kerasonspark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    sub.add_parser("backends", help="list the installed engines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    if args.command == "backends":
        from .engine import available_backends

        for name, engine in sorted(available_backends().items()):
            print(f"{name:10} {engine.__module__}.{engine.__qualname__}")
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
