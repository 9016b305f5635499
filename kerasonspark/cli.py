"""The ``kerasonspark`` command: train the reference MNIST model, run a local cluster, list engines.

kerasonspark train --backend sync --workers 2 --data ../shared/data/mnist
kerasonspark compare --backends single sync async hogwild --repeat 3
kerasonspark cluster start --workers 2        # prints the master URL to train on
kerasonspark train --master spark://127.0.0.1:PORT --backend async
kerasonspark cluster stop
kerasonspark backends
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

__all__ = ["main"]


if TYPE_CHECKING:
    from pyspark.sql import SparkSession


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


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _train_parser(sub: Any) -> None:
    train = sub.add_parser(
        "train", help="train the 2017 MNIST CNN and print time, accuracy and updates"
    )
    train.add_argument("--backend", default="sync", help="engine name (default: sync)")
    train.add_argument(
        "--workers",
        type=int,
        default=None,
        help="training workers (default: --cluster's N, else 2)",
    )
    train.add_argument(
        "--cluster",
        type=int,
        default=None,
        metavar="N",
        help="start a standalone cluster of N one-core workers on this machine for the run, stop "
        "it after",
    )
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--master", default=None, help="Spark master URL (default: local[workers])")
    train.add_argument(
        "--conf",
        action="append",
        default=[],
        type=_setting,
        metavar="KEY=VALUE",
        help="a Spark setting for the session (repeatable), e.g. spark.driver.host=10.0.0.5",
    )
    train.add_argument(
        "--data", default=None, help="folder with the MNIST files (default: standard locations)"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--rule", default=None, help="update rule of an asynchronous engine")
    train.add_argument(
        "--window", type=int, default=None, help="local steps between exchanges (asynchronous)"
    )
    train.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        type=_option,
        help="backend option KEY=VALUE, repeatable (e.g. -o sync_every=32)",
    )
    train.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    train.add_argument(
        "--verbose",
        type=int,
        default=1,
        choices=(0, 1, 2),
        help="1 a live progress bar per epoch (default), 2 a line per epoch, 0 silent",
    )
    train.add_argument(
        "--validate",
        action="store_true",
        help="score the center on the test images at every epoch boundary (val_* in the bar)",
    )


def _cluster_parser(sub: Any) -> None:
    cluster = sub.add_parser(
        "cluster", help="start, inspect or stop a Spark standalone cluster on this machine"
    )
    actions = cluster.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="start a master and workers; prints the master URL")
    start.add_argument("--workers", type=int, default=2)
    start.add_argument("--cores", type=int, default=1, help="cores per worker (default: 1)")
    start.add_argument("--memory", default="2g", help="memory per worker (default: 2g)")
    start.add_argument(
        "--host", default="127.0.0.1", help="address every daemon binds (default: 127.0.0.1)"
    )
    start.add_argument(
        "--port", type=int, default=7077, help="master port (default: 7077; 0 picks a free one)"
    )
    for action in (
        start,
        actions.add_parser("status", help="workers and applications of the running cluster"),
        actions.add_parser("stop", help="stop the cluster that `start` started"),
    ):
        action.add_argument(
            "--state", default=None, help="state file (default: ~/.kerasonspark/cluster.json)"
        )


def cluster(args: argparse.Namespace) -> int:
    """``kerasonspark cluster start|status|stop``."""
    from ._cluster import (
        DEFAULT_STATE_FILE,
        StandaloneCluster,
        load_state,
        master_status,
        stop_processes,
    )

    state_file = Path(args.state or DEFAULT_STATE_FILE).expanduser()
    if args.action == "start":
        if state_file.is_file():
            print(
                f"A cluster is already recorded in {state_file}; run `kerasonspark cluster stop` "
                "first.",
                file=sys.stderr,
            )
            return 1
        running = StandaloneCluster(
            workers=args.workers,
            cores_per_worker=args.cores,
            memory_per_worker=args.memory,
            host=args.host,
            port=args.port,
        ).start()
        running.save(state_file)
        print(running.master_url)
        return 0
    state = load_state(state_file)
    if args.action == "status":
        status = master_status(state)
        print(f"{state.master_url}  status {status.get('status')}  web UI {state.web_ui}")
        for worker in status.get("workers", []):
            print(
                f"  worker {worker['host']}:{worker['port']}  {worker['state']}  "
                f"cores {worker['coresused']}/{worker['cores']}"
            )
        for app in status.get("activeapps", []):
            print(f"  application {app['name']}  cores {app.get('cores')}")
        return 0
    stop_processes(state.pids)
    state_file.unlink()
    print(f"Stopped {state.master_url}")
    return 0


def _compare_parser(sub: Any) -> None:
    compare = sub.add_parser(
        "compare", help="train the 2017 MNIST CNN with several strategies side by side"
    )
    compare.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="strategies: engine names, optionally engine:rule (default: every installed engine)",
    )
    compare.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[2],
        help="worker counts: every strategy runs at each (single once)",
    )
    compare.add_argument(
        "--target",
        type=float,
        default=None,
        help="also report the seconds each strategy took to reach this test accuracy, e.g. 0.987",
    )
    compare.add_argument(
        "--master",
        default=None,
        help="Spark master URL (default: local[workers]), e.g. the URL "
        "`kerasonspark cluster start` prints",
    )
    compare.add_argument("--epochs", type=int, default=1)
    compare.add_argument("--batch-size", type=int, default=32)
    compare.add_argument(
        "--options",
        default="{}",
        help="options by strategy or backend name, as JSON: "
        '{"sync": {"sync_every": 32}, "elephas:asynchronous": {"frequency": "epoch"}}',
    )
    compare.add_argument(
        "--repeat", type=int, default=1, help="runs of each strategy; medians are reported"
    )
    compare.add_argument(
        "--data", default=None, help="folder with the MNIST files (default: standard locations)"
    )
    compare.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    compare.add_argument(
        "--json",
        default=None,
        help="also write the figures, every run and every curve point, to this file",
    )
    compare.add_argument(
        "--plot",
        default=None,
        help="also draw accuracy against time and samples/s to this PNG (needs matplotlib)",
    )


def _mnist(args: argparse.Namespace) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    from ._config import ResourceConfig
    from ._datasets import load_mnist
    from ._executor import configure_tensorflow

    # TensorFlow's default pools for the driver, its start-up lines held back
    configure_tensorflow(ResourceConfig(worker_threads=0), "driver")
    (x_train, y_train), test = load_mnist(args.data)
    if args.limit:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    return (x_train, y_train), test


@contextlib.contextmanager
def _session(args: argparse.Namespace, app_name: str) -> Iterator[SparkSession]:
    """The Spark session for a command: the running one (left running), or one started and stopped
    here."""
    from pyspark.sql import SparkSession

    from ._session import start_session

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    spark = start_session(
        args.master or f"local[{args.workers}]", app_name, conf=dict(getattr(args, "conf", []))
    )
    try:
        yield spark
    finally:
        spark.stop()


def compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train the reference CNN with each strategy on the same data and cores; prints a table."""
    import json

    from ._compare import compare_strategies, format_table, plot_comparison
    from ._data import numpy_to_dataframe
    from ._models import mnist_cnn
    from .engine import available_backends

    strategies = args.backends or sorted(
        available_backends(), key=lambda name: (name != "single", name)
    )
    (x_train, y_train), (x_test, y_test) = _mnist(args)
    if max(args.workers) > (os.cpu_count() or 1):
        print(
            f"Note: {max(args.workers)} workers on {os.cpu_count()} cores share them: compare "
            "accuracy at that count, not speed.",
            flush=True,
        )
    args.master = args.master or f"local[{max(args.workers)}]"
    with _session(args, "kerasonspark-compare") as spark:
        train_df = numpy_to_dataframe(spark, x_train, y_train).cache()
        test_df = numpy_to_dataframe(spark, x_test, y_test).cache()
        train_df.count(), test_df.count()

        def report(strategy: str, run: dict[str, float]) -> None:
            extra = (
                f"  overlapping writes {run['overlapping_writes']:.0f}  staleness max "
                f"{run['max_staleness']:.0f}"
                if run["max_staleness"] or run["overlapping_writes"]
                else ""
            )
            print(
                f"{strategy:>15}: {run['samples_per_s']:8.0f} samples/s  train "
                f"{run['train_s']:6.1f} s  wall {run['wall_s']:6.1f} s  test accuracy "
                f"{run['test_accuracy']:.4f}{extra}",
                flush=True,
            )

        try:
            rows = compare_strategies(
                lambda: mnist_cnn(seed=0),
                spark,
                train_df,
                test_df,
                strategies,
                num_workers=args.workers,
                batch_size=args.batch_size,
                epochs=args.epochs,
                repeat=args.repeat,
                options=json.loads(args.options),
                on_run=report,
            )
        finally:
            train_df.unpersist(), test_df.unpersist()
    print(format_table(rows, args.target))
    figures = [row.as_dict(args.target) for row in rows]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if args.plot:
        workers = "/".join(map(str, args.workers))
        plot_comparison(
            rows,
            args.plot,
            f"MNIST {len(x_train):,} images, {workers} workers, {args.epochs} epoch(s), batch "
            f"{args.batch_size}",
        )
        print(f"Plot written to {args.plot}")
    return figures


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train the reference CNN on MNIST as the 2017 Dist-Keras run did; prints its three lines.

    With ``--cluster N`` the run gets a standalone cluster of its own (master and N workers on
    this machine), stopped with every executor when the run ends, also when it fails.
    """
    if args.workers is None:
        args.workers = args.cluster or 2
    if args.cluster is None:
        return _train(args)
    from ._cluster import StandaloneCluster

    if args.master is not None:
        raise SystemExit("kerasonspark train: pass either --master or --cluster, not both.")
    with StandaloneCluster(workers=args.cluster, port=0) as running:
        workers = f"{args.cluster} worker" + ("s" if args.cluster != 1 else "")
        print(f"Started a standalone cluster of {workers} at {running.master_url}", flush=True)
        args.master = running.master_url
        return _train(args)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from ._data import numpy_to_dataframe
    from ._models import mnist_cnn
    from ._trainer import SparkTrainer

    (x_train, y_train), (x_test, y_test) = _mnist(args)
    options = dict(args.option)
    if args.rule is not None:
        options["rule"] = args.rule
    if args.window is not None:
        options["window"] = args.window
    with _session(args, "kerasonspark-mnist") as spark:
        train_df = numpy_to_dataframe(spark, x_train, y_train)
        test_df = numpy_to_dataframe(spark, x_test, y_test)
        trainer = SparkTrainer(
            mnist_cnn(seed=args.seed),
            backend=args.backend,
            num_workers=args.workers,
            batch_size=args.batch_size,
            epochs=args.epochs,
            backend_options=options or None,
            spark=spark,
            seed=args.seed,
            verbose=args.verbose,
        )
        result = trainer.fit(train_df, validation_data=test_df if args.validate else None)
        accuracy = trainer.evaluate(test_df)["accuracy"]
    stats = result.stats
    updates = stats["exchanges"]
    print(f"Training time: {stats['wall_seconds']:.1f} s")
    print(f"Test accuracy: {accuracy:.4f}")
    print(f"Parameter-server updates: {updates}")
    return {"stats": stats, "accuracy": accuracy}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kerasonspark`` command."""
    parser = argparse.ArgumentParser(
        prog="kerasonspark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _compare_parser(sub)
    _cluster_parser(sub)
    sub.add_parser("backends", help="list the installed engines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    # Elephas's Flask server logs every request
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    if args.command == "backends":
        from .engine import available_backends

        for name, engine in sorted(available_backends().items()):
            print(f"{name:10} {engine.__module__}.{engine.__qualname__}")
        return 0
    if args.command == "cluster":
        return cluster(args)
    if args.command == "compare":
        compare(args)
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
