"""Compressed deltas with error feedback against whole deltas: bytes per push and test accuracy
of ``async`` on the reference CNN, at 2 and 4 workers, medians of interleaved runs.

    python benchmarks/compressed_deltas.py --data ../shared/data/mnist
    python benchmarks/compressed_deltas.py --data ../shared/data/mnist --fractions 1 0.1 0.01 \\
        --workers 2 4 --repeat 3

One session (``local[4]``, so 4 workers fit), 60,000 MNIST rows, 1 epoch, batch 32, DynSGD at
window 20. ``fraction`` is ``delta_fraction`` (1 pushes whole deltas). Up is what a worker sends
a push (request bodies, the epoch's one whole push of what compression held back included), down
what it receives (each worker's first pull of the whole model included): the whole center, or only
what changed since the worker's copy when that is under 40 % of it.
"""

import argparse
import itertools
import json
import statistics

from kerasonspark import SparkTrainer, load_mnist, mnist_cnn, start_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder with the MNIST files")
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.01])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    (x, y), (tx, ty) = load_mnist(args.data)
    x, y = x[: args.rows], y[: args.rows]
    spark = start_session(f"local[{max(args.workers)}]")
    runs: dict[tuple[int, float], list[dict]] = {}
    for _, workers, fraction in itertools.product(range(args.repeat), args.workers, args.fractions):
        model = mnist_cnn(seed=0)
        result = SparkTrainer(
            model,
            backend="async",
            num_workers=workers,
            epochs=args.epochs,
            spark=spark,
            verbose=0,
            seed=0,
            backend_options={"delta_fraction": fraction},
        ).fit(x, y)
        reports = result.stats["workers"]
        pushes = sum(w["pushes"] for w in reports)
        run = {
            "workers": workers,
            "fraction": fraction,
            "fit_seconds": result.stats["wall_seconds"],
            "accuracy": float(model.evaluate(tx, ty, verbose=0)[1]),
            "pushes": pushes,
            "mb_up_per_push": sum(w["mb_sent"] for w in reports) / pushes,
            "mb_down_per_push": sum(w["mb_received"] for w in reports) / pushes,
        }
        print(json.dumps(run), flush=True)
        runs.setdefault((workers, fraction), []).append(run)
    spark.stop()
    print(
        "\n| workers | delta_fraction | MB up a push | MB down a push | test accuracy | fit s |"
        "\n|---|---|---|---|---|---|"
    )
    for (workers, fraction), group in sorted(runs.items(), key=lambda kv: (kv[0][0], -kv[0][1])):

        def median(key: str, group: list[dict] = group) -> float:
            return statistics.median(r[key] for r in group)

        print(
            f"| {workers} | {fraction:g} | {median('mb_up_per_push'):.3f} | "
            f"{median('mb_down_per_push'):.3f} | {median('accuracy'):.4f} | "
            f"{median('fit_seconds'):.1f} |"
        )


if __name__ == "__main__":
    main()
