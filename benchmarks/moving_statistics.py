"""Batch norm with Keras's default momentum: test accuracy and seconds of plain Keras and of the
engines at equal epochs, on the reference CNN with three ``BatchNormalization`` layers.

    python benchmarks/moving_statistics.py --data ../shared/data/mnist
    python benchmarks/moving_statistics.py --data ../shared/data/mnist --rows 60000 --epochs 1 \\
        --backends plain sync async

The workload of the issue "Models beyond the reference CNN": 8,000 MNIST rows, 2 epochs, batch
32, 2 workers on ``local[2]``. ``plain`` is ``model.fit`` in this process.
"""

import argparse
import time

import keras

from kerasonspark import SparkTrainer, load_mnist, start_session


def batch_norm_cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.BatchNormalization(),
            layers.Conv2D(32, 3, activation="relu"),
            layers.BatchNormalization(),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(225, activation="relu"),
            layers.BatchNormalization(),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder with the MNIST files")
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["plain", "sync"])
    args = parser.parse_args()
    (x, y), (tx, ty) = load_mnist(args.data)
    x, y = x[: args.rows], y[: args.rows]
    spark = start_session("local[2]")
    for backend in args.backends:
        model = batch_norm_cnn()
        started = time.perf_counter()
        if backend == "plain":
            model.fit(x, y, epochs=args.epochs, batch_size=32, verbose=0)
        else:
            trainer = SparkTrainer(
                model, backend=backend, epochs=args.epochs, spark=spark, verbose=0, seed=0
            )
            trainer.fit(x, y)
        seconds = time.perf_counter() - started
        accuracy = model.evaluate(tx, ty, verbose=0)[1]
        print(f"{backend}: test accuracy {accuracy:.4f}, {seconds:.1f} s", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
