"""A driver program for tests/test_connect.py: a Spark Connect client (no SparkContext, no JVM in
this process) that trains, evaluates and predicts through a real Connect server, and prints as
JSON what it saw (a process of its own: a Connect client and the test process's classic session
must not share one Python)."""

import sys
import tempfile
from pathlib import Path

import numpy as np
from test_several_inputs import dataframe_of, noisy_two_headed_rows, two_headed

from conftest import FailsOnce, crashing, make_blobs, report_connect_client, small_model


def data_kinds(spark, train_df, report: dict) -> None:
    """Two inputs, two outputs and sample weights from DataFrame columns; a Parquet path with
    class weights, streamed from the executors' disks."""
    from kerasonspark import DataConfig, SparkTrainer

    image, meta, digit, parity, weight, (clean_x, clean_y) = noisy_two_headed_rows()
    result = SparkTrainer(
        two_headed(), backend="async", num_workers=2, epochs=3, seed=0, spark=spark, verbose=0
    ).fit(
        dataframe_of(spark, image, meta, digit, parity, weight),
        features=["image", "meta"],
        label=["digit", "parity"],
        sample_weight="weight",
        validation_data=dataframe_of(spark, *clean_x, *clean_y),
    )
    # unweighted, two thirds of the digits are wrong: only the weights reach this
    report["weighted_val_digit_accuracy"] = result.history["val_digit_accuracy"][-1]
    path = tempfile.mkdtemp(prefix="kerasonspark-connect-parquet-") + "/train"
    train_df.write.parquet(path)
    streamed = SparkTrainer(
        small_model(),
        backend="sync",
        num_workers=2,
        epochs=3,
        seed=0,
        spark=spark,
        verbose=0,
        data=DataConfig(partition_storage="stream"),
    ).fit(path, class_weight={0: 1.0, 1: 2.0, 2: 1.0, 3: 1.0})
    report["parquet_streamed"] = {
        "path": streamed.stats["partition_storage"]["path"],
        "samples": streamed.stats["samples"],
        "accuracy": streamed.history["accuracy"][-1],
    }


def extras(spark, train_df, validation_df, report: dict) -> None:
    """A killed Python worker, a stopping callback, and a Spark ML pipeline saved and loaded."""
    import keras

    from kerasonspark import SparkTrainer
    from kerasonspark.ml import KerasEstimator, KerasModel

    folder = Path(tempfile.mkdtemp(prefix="kerasonspark-connect-"))
    engine = crashing(
        "async", lambda inner: FailsOnce(inner, 0, 3, str(folder / "died"), kill=True), window=4
    )
    result = SparkTrainer(
        small_model(), backend=engine, num_workers=2, epochs=2, seed=0, spark=spark, verbose=0
    ).fit(train_df)
    report["restarts"] = result.stats["restarts"]
    report["restart_cause"] = result.stats["restart_log"][0]["cause"][:300]
    report["restart_accuracy"] = result.history["accuracy"][-1]
    # no later epoch improves the loss by 100: stops after the second of six
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=100)
    stopped = SparkTrainer(
        small_model(), backend="sync", num_workers=2, epochs=6, seed=0, spark=spark, verbose=0
    ).fit(train_df, validation_data=validation_df, callbacks=[stop])
    report["early_stopping_epochs"] = len(stopped.history["loss"])
    fitted = KerasEstimator(model=small_model(), backend="sync", epochs=2, seed=0).fit(train_df)
    fitted.write().overwrite().save(str(folder / "model"))
    loaded = KerasModel.load(str(folder / "model"))
    before = [r.prediction for r in fitted.transform(validation_df).orderBy("features").collect()]
    after = [r.prediction for r in loaded.transform(validation_df).orderBy("features").collect()]
    report["ml_rows"], report["ml_identical"] = len(before), before == after


def main(url: str, backends: list[str]) -> None:
    from pyspark.sql import SparkSession

    from kerasonspark import SparkTrainer, numpy_to_dataframe

    spark = SparkSession.builder.remote(url).getOrCreate()
    x, y = make_blobs(1200)
    (tx, ty), (vx, vy) = (x[:900], y[:900]), (x[900:], y[900:])
    train_df = numpy_to_dataframe(spark, tx, ty, partitions=2)
    validation_df = numpy_to_dataframe(spark, vx, vy)
    from kerasonspark._session import server_host

    report: dict = {"session": type(spark).__module__, "runs": {}}
    report["server_host"] = server_host(spark)  # the server runs on this machine: loopback
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
    extras(spark, train_df, validation_df, report)
    data_kinds(spark, train_df, report)
    try:  # Elephas takes an RDD, which a Connect client has none of
        SparkTrainer(
            small_model(), backend="elephas", num_workers=2, epochs=1, spark=spark, verbose=0
        ).fit(train_df)
        report["elephas"] = "trained"
    except Exception as exc:
        report["elephas"] = f"{type(exc).__name__}: {exc}"
    report_connect_client(spark, report)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
