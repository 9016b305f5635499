"""Compare training strategies on MNIST from Python: the library call behind ``kerasonspark
compare``.

    python examples/compare_strategies.py                              # every installed engine
    python examples/compare_strategies.py single sync async:downpour   # the ones named

Each strategy trains the reference CNN from the same initial weights on the same cached
DataFrame and cores; the table at the end holds the medians.
"""

import sys

from kerasonspark import (
    compare_strategies,
    format_table,
    load_mnist,
    mnist_cnn,
    numpy_to_dataframe,
    start_session,
)
from kerasonspark.engine import available_backends


def main(strategies: list[str]) -> None:
    (x_train, y_train), (x_test, y_test) = load_mnist()
    spark = start_session("local[2]", "compare-strategies")
    try:
        train_df = numpy_to_dataframe(spark, x_train, y_train).cache()
        test_df = numpy_to_dataframe(spark, x_test, y_test).cache()
        rows = compare_strategies(
            lambda: mnist_cnn(seed=0),
            spark,
            train_df,
            test_df,
            strategies or sorted(available_backends()),
            num_workers=2,
            batch_size=32,
            epochs=1,
            on_run=lambda strategy, run: print(
                f"{strategy}: {run['test_accuracy']:.4f}", flush=True
            ),
        )
    finally:
        spark.stop()
    print(format_table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
