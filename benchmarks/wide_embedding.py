"""A model that is mostly an embedding table: bytes a push moves each way, peak memory, test
accuracy and seconds of the asynchronous engines against plain Keras at equal epochs.

    python benchmarks/wide_embedding.py
    python benchmarks/wide_embedding.py --backends plain async hogwild --optimizer adam
    python benchmarks/wide_embedding.py --emulated 1gbit --backends async hogwild

The wide model of the issue "Models beyond the reference CNN": ``Embedding(500_000, 64)``
(32 M parameters, 128 MB) averaged over each sequence of 20 tokens, ``Dense(64)``, ``Dense(4)``;
8,000 training sequences, 2,000 test sequences, 1 epoch, batch 32, 2 workers on ``local[2]``.
The data is synthetic (nothing is downloaded): a sequence's label is the class that most of its
tokens stand for, tokens of each class drawn with word-like frequencies (a few thousand common,
most of the 500,000 rare or unseen), a quarter of them noise, and a fifth of the labels drawn at
random. With ``adagrad`` (the default)
a window's update touches only the rows its sequences hold; Keras's ``adam`` keeps moving every
row it ever touched (its moments decay), so more rows travel. Down a push leaves out each
worker's first pull of the whole model. ``peak RSS`` is the driver's (it hosts the parameter
server) and, for the engines, the largest Python worker's. The session starts before the clock.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

VOCAB, LENGTH, CLASSES = 500_000, 20, 4


def sequences(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` token sequences and their labels (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    rank = np.minimum(rng.zipf(1.3, (n, LENGTH)), VOCAB // CLASSES - 1)
    tokens = rank * CLASSES + labels[:, None]
    noise = rng.random((n, LENGTH)) < 0.25
    tokens[noise] = rng.integers(0, VOCAB, int(noise.sum()))
    flipped = rng.random(n) < 0.2  # a fifth of the labels wrong: no model scores above ~0.85
    labels[flipped] = rng.integers(0, CLASSES, int(flipped.sum()))
    return tokens.astype(np.int32), labels.astype(np.int32)


def wide_model(optimizer: str):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((LENGTH,)),  # token ids as floats (exact below 2**24); Embedding casts
            keras.layers.Embedding(VOCAB, 64),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    chosen = keras.optimizers.Adagrad(0.5) if optimizer == "adagrad" else keras.optimizers.Adam()
    model.compile(chosen, "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def run_backends(spark, backends: list[str], optimizer: str, epochs: int, window: int) -> None:
    """Train each of ``backends`` in turn (``plain`` is ``model.fit`` here), print one
    ``RUN {json}`` line each."""
    x, y = sequences(8000, seed=0)
    tx, ty = sequences(2000, seed=1)
    for backend in backends:
        model = wide_model(optimizer)
        started = time.perf_counter()
        figures: dict = {"backend": backend, "optimizer": optimizer}
        if backend == "plain":
            model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
        else:
            from kerasonspark import SparkTrainer

            result = SparkTrainer(
                model,
                backend=backend,
                epochs=epochs,
                spark=spark,
                verbose=0,
                seed=0,
                backend_options={"window": window},
            ).fit(x, y)
            reports = result.stats["workers"]
            pushes = sum(w["pushes"] for w in reports)
            first_pulls = len(reports) * model.count_params() * 4 / 1e6  # not exchanges
            figures.update(
                pushes=pushes,
                mb_up_per_push=round(sum(w["mb_sent"] for w in reports) / pushes, 2),
                mb_down_per_push=round(
                    (sum(w["mb_received"] for w in reports) - first_pulls) / pushes, 2
                ),
                exchange_seconds_per_push=round(
                    sum(w["exchange_seconds"] for w in reports) / pushes, 3
                ),
                # absent from versions before workers reported it
                worker_peak_rss_mb=max(w.get("peak_rss_mb", 0) for w in reports),
            )
        figures.update(
            fit_seconds=round(time.perf_counter() - started, 1),
            test_accuracy=round(float(model.evaluate(tx, ty, verbose=0, batch_size=256)[1]), 4),
            model_mb=round(model.count_params() * 4 / 1e6, 1),
            driver_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3),
        )
        print("RUN " + json.dumps(figures), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["plain", "async"])
    parser.add_argument("--optimizer", choices=["adagrad", "adam"], default="adagrad")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument(
        "--emulated",
        metavar="RATE",
        help="train on a standalone cluster of 3 emulated hosts (driver and server in one, a "
        "one-core worker in each other) whose links are shaped to RATE, e.g. 1gbit (needs root)",
    )
    parser.add_argument("--drive", nargs=2, help=argparse.SUPPRESS)  # master, address
    args = parser.parse_args()
    options = (args.optimizer, args.epochs, args.window)
    if args.drive:
        from emulated_cluster import driver_session

        spark = driver_session(*args.drive, "kerasonspark-wide-embedding")
        run_backends(spark, args.backends, *options)
        spark.stop()
    elif args.emulated:
        from emulated_cluster import emulated_cluster, run_driver

        with emulated_cluster(workers=2) as (network, cluster):
            network.shape(args.emulated)
            host = network.hosts[0]
            extra = ["--optimizer", args.optimizer, "--epochs", str(args.epochs)]
            extra += ["--window", str(args.window), "--backends", *args.backends]
            for line in run_driver(host, __file__, cluster.master_url, host.address, *extra):
                print(json.dumps({"link": args.emulated, **line}), flush=True)
    else:
        spark = None
        if set(args.backends) - {"plain"}:
            from kerasonspark import start_session

            spark = start_session("local[2]")  # before the clock: a session outlives its fits
        run_backends(spark, args.backends, *options)
        if spark is not None:
            spark.stop()


if __name__ == "__main__":
    main()
