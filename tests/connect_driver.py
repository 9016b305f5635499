"""A driver program for tests/test_connect.py: a Spark Connect client (no SparkContext, no JVM in
this process) that trains, evaluates and predicts through a real Connect server, and prints as
JSON what it saw (a process of its own: a Connect client and the test process's classic session
must not share one Python)."""

import json
import sys

import numpy as np

from conftest import make_blobs, small_model


def main(url: str, backends: list[str]) -> None:
    from pyspark.sql import SparkSession

    from kerasonspark import SparkTrainer, numpy_to_dataframe

    spark = SparkSession.builder.remote(url).getOrCreate()
    x, y = make_blobs(1200)
    (tx, ty), (vx, vy) = (x[:900], y[:900]), (x[900:], y[900:])
    train_df = numpy_to_dataframe(spark, tx, ty, partitions=2)
    validation_df = numpy_to_dataframe(spark, vx, vy)
    report: dict = {"session": type(spark).__module__, "runs": {}}
    for backend in backends:
        trainer = SparkTrainer(
            small_model(), backend=backend, num_workers=2, epochs=3, seed=0, spark=spark, verbose=0
        )
        before = [w.copy() for w in trainer.model.get_weights()]
        numpy_result = trainer.fit(tx, ty)
        result = trainer.fit(train_df, validation_data=validation_df)
        predicted = trainer.predict(validation_df).select("label", "prediction").collect()
        classes = np.array([np.argmax(row.prediction) for row in predicted])
        labels = np.array([row.label for row in predicted])
        report["runs"][backend] = {
            "numpy_samples": numpy_result.stats.get("samples"),
            "changed": any(
                not np.array_equal(a, b)
                for a, b in zip(before, trainer.model.get_weights(), strict=True)
            ),
            "val_accuracy": result.history["val_accuracy"][-1],
            "evaluate": trainer.evaluate(validation_df)["accuracy"],
            "evaluate_numpy": trainer.evaluate(vx, vy)["accuracy"],
            "predicted_rows": len(predicted),
            "predict_accuracy": float((classes == labels).mean()),
        }
    try:
        spark.sparkContext  # noqa: B018  # a Connect client has none: this must raise
        report["spark_context"] = True
    except Exception as exc:  # the error Connect gives
        report["spark_context"] = type(exc).__name__
    spark.stop()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
