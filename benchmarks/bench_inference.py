"""Rows/s of prediction on Spark (``KerasModel.transform``) against single-process
``model.predict``.

    python benchmarks/bench_inference.py --data ../shared/data/mnist
    python benchmarks/bench_inference.py --data ../shared/data/mnist --rows 100000 --repeat 3 \\
        --workers 2

The 10,000 MNIST test images are repeated to ``--rows`` rows and written to Parquet (the data
lives in Spark, as a user's would). Each timed Spark run is ``KerasModel.transform`` on that
table written to Spark's ``noop`` sink (every row predicted, typed ``prediction`` and
``probability`` columns built, nothing collected to the driver); each single-process run is
``model.predict`` on the same rows as one NumPy array, in this process, with TensorFlow's default
thread pools (every core). One untimed run of each comes first (Python workers start, the model
is built and traced), then ``--repeat`` runs of each, interleaved. Prints one JSON line per run
and a summary line with the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default=None, help="an MNIST folder (default: the standard locations)"
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    from kerasonspark import load_mnist, mnist_cnn, start_session
    from kerasonspark.ml import KerasModel

    _, (x_test, _) = load_mnist(args.data)
    x = np.resize(x_test.reshape(len(x_test), -1), (args.rows, x_test[0].size)).astype(np.float32)
    model = mnist_cnn()
    spark = start_session(f"local[{args.workers}]", "kerasonspark-bench-inference")
    spark.sparkContext.setLogLevel("ERROR")
    with tempfile.TemporaryDirectory(prefix="kerasonspark-inference-") as folder:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = os.path.join(folder, "rows.parquet")
        features = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]).cast(
            pa.list_(pa.float32())
        )
        pq.write_table(
            pa.table({"id": np.arange(args.rows), "features": features}),
            path,
            row_group_size=10_000,
        )
        table = spark.read.parquet(path).repartition(args.workers * 2).cache()
        table.count()
        transformer = KerasModel(model).setPredictionBatchSize(args.batch_size)

        def spark_run() -> float:
            started = time.perf_counter()
            transformer.transform(table).write.format("noop").mode("overwrite").save()
            return time.perf_counter() - started

        def single_run() -> float:
            started = time.perf_counter()
            model.predict(x.reshape((-1, 28, 28, 1)), batch_size=args.batch_size, verbose=0)
            return time.perf_counter() - started

        warm = {"spark": spark_run(), "single": single_run()}
        print(
            json.dumps({"run": "warm-up", **{k: round(args.rows / v, 1) for k, v in warm.items()}}),
            flush=True,
        )
        rates: dict[str, list[float]] = {"spark": [], "single": []}
        for i in range(args.repeat):
            for name, run in (("single", single_run), ("spark", spark_run)):
                rates[name].append(args.rows / run())
                print(
                    json.dumps(
                        {"run": i + 1, "engine": name, "rows_per_second": round(rates[name][-1], 1)}
                    ),
                    flush=True,
                )
    spark.stop()
    medians = {k: statistics.median(v) for k, v in rates.items()}
    print(
        json.dumps(
            {
                "rows": args.rows,
                "workers": args.workers,
                "cores": os.cpu_count(),
                "repeat": args.repeat,
                "spark_rows_per_second": round(medians["spark"], 1),
                "single_rows_per_second": round(medians["single"], 1),
                "spark_vs_single": round(medians["spark"] / medians["single"], 3),
                "warm_up_seconds": {k: round(v, 2) for k, v in warm.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
