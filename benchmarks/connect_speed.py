"""Spark Connect against a classic session: the reference CNN on MNIST, the same engine, data and
epochs, whole-``fit`` seconds and test accuracy, medians of ``--repeat`` runs taken in turn.

    python benchmarks/connect_speed.py --data ../shared/data/mnist
    python benchmarks/connect_speed.py --data ../shared/data/mnist --backends sync async --repeat 3

    python benchmarks/connect_speed.py --data ../shared/data/mnist --modes classic connect-stage
    python benchmarks/connect_speed.py --data ../shared/data/mnist --input parquet

Each run is a process of its own: a classic driver on ``local[2]``, or a Connect client of a
fresh Connect server on ``local[2]`` (benchmarks/connect_server.py), each driver with 4 GiB, all
fed the same NumPy arrays (over Connect the client uploads one Arrow file per partition), or with
``--input parquet`` the path of the same rows as Parquet (written once under ``--workdir``), data
that already lives where the cluster reads it.
``connect-stage`` puts the parameter server in the training stage
(``spark.kerasonspark.serverPlacement=stage``). ``fit`` seconds exclude the session's start;
``prepare`` is the data pass inside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def one_run(
    mode: str, backend: str, data: str | None, rows: int, epochs: int, url: str, parquet: str
) -> dict:
    """Train once in this process and return the figures."""
    from kerasonspark import SparkTrainer, load_mnist, mnist_cnn, start_session

    (x, y), (tx, ty) = load_mnist(data)
    x, y = x[:rows], y[:rows]
    if mode == "classic":
        spark = start_session("local[2]", "kerasonspark-connect-speed")
    else:
        from pyspark.sql import SparkSession

        spark = SparkSession.builder.remote(url).getOrCreate()
        if mode == "connect-stage":
            spark.conf.set("spark.kerasonspark.serverPlacement", "stage")
    trainer = SparkTrainer(
        mnist_cnn(), backend=backend, num_workers=2, epochs=epochs, seed=0, spark=spark, verbose=0
    )
    result = trainer.fit(parquet) if parquet else trainer.fit(x, y)
    figures = {
        "mode": mode,
        "backend": backend,
        "fit_seconds": result.stats["wall_seconds"],
        "prepare_seconds": result.stats["prepare_seconds"],
        "accuracy": trainer.evaluate(tx, ty)["accuracy"],
    }
    spark.stop()
    return figures


def in_a_process(args: argparse.Namespace, mode: str, backend: str, url: str) -> dict:
    """:func:`one_run` in a new Python process (a classic driver and a Connect client each need
    one of their own)."""
    command = [sys.executable, __file__, "--rows", str(args.rows), "--epochs", str(args.epochs)]
    command += ["--data", args.data] if args.data else []
    command += ["--parquet", args.parquet] if args.parquet else []
    done = subprocess.run(
        [*command, "--one", mode, backend, url], capture_output=True, text=True, timeout=1200
    )
    if done.returncode != 0:
        raise RuntimeError(f"The {mode} run of {backend} failed:\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("FIGURES "))
    return json.loads(line[len("FIGURES ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder with the MNIST files")
    parser.add_argument("--backends", nargs="+", default=["sync", "async"])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["classic", "connect"],
        choices=["classic", "connect", "connect-stage"],
        help="connect-stage: over Connect with the parameter server in the training stage",
    )
    parser.add_argument("--input", default="numpy", choices=["numpy", "parquet"])
    parser.add_argument("--workdir", default="/tmp/kerasonspark-bench", help="where Parquet goes")
    parser.add_argument("--parquet", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--one", nargs=3, metavar=("MODE", "BACKEND", "URL"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--connect-driver-memory",
        default="4g",
        help="the Connect server's driver memory (Spark's own default is 1g)",
    )
    args = parser.parse_args()
    if args.one:
        mode, backend, url = args.one
        print(
            "FIGURES "
            + json.dumps(
                one_run(mode, backend, args.data, args.rows, args.epochs, url, args.parquet)
            )
        )
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from connect_server import ConnectServer

    if args.input == "parquet":
        from bench_memory import write_parquet

        if args.rows != 60_000:
            parser.error("--input parquet trains on MNIST's 60,000 training rows")
        args.parquet = str(write_parquet(args.data, Path(args.workdir), [1])[1].resolve())

    runs: list[dict] = []
    for _ in range(args.repeat):
        for backend in args.backends:
            for mode in args.modes:
                if mode != "classic":
                    # by default the classic run's 4 GiB driver: only the session differs
                    memory = {"spark.driver.memory": args.connect_driver_memory}
                    with ConnectServer("local[2]", memory) as server:
                        figures = in_a_process(args, mode, backend, server.url)
                else:
                    figures = in_a_process(args, mode, backend, "-")
                runs.append(figures)
                print(json.dumps(figures), flush=True)
    print("| backend | session | runs | fit s (median) | prepare s | test accuracy | vs classic |")
    print("|---|---|---|---|---|---|---|")
    for backend in args.backends:
        medians = {}
        for mode in args.modes:
            mine = [r for r in runs if r["backend"] == backend and r["mode"] == mode]
            medians[mode] = statistics.median(r["fit_seconds"] for r in mine)
            print(
                f"| `{backend}` | {mode} | {len(mine)} | {medians[mode]:.1f} | "
                f"{statistics.median(r['prepare_seconds'] for r in mine):.1f} | "
                f"{statistics.median(r['accuracy'] for r in mine):.4f} | "
                f"{medians[mode] / medians['classic']:.2f}x |"
            )


if __name__ == "__main__":
    main()
