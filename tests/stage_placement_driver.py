"""The parameter server inside the training stage (``spark.kerasonspark.serverPlacement=stage``):
``sync`` (its center on the stage's server, and sharded) and ``async`` train with callbacks,
evaluate and predict. tests/test_connect.py runs this file as a Spark Connect client in a network
namespace the executors cannot reach, and it prints as JSON what it saw;
tests/test_server_placement.py calls :func:`placed_in_stage` on a classic session."""

import sys

import keras
import numpy as np

from conftest import make_blobs, report_connect_client, small_model

PLACEMENT = "spark.kerasonspark.serverPlacement"
RUNS = {
    "sync": ("sync", {"center": "driver"}),
    "sync_sharded": ("sync", {"center": "sharded"}),
    "async": ("async", {}),
}


class EpochsSeen(keras.callbacks.Callback):
    """Records the epochs whose end it saw (where the callbacks ran: task 0 of the stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch)


def placed_in_stage(spark) -> dict:
    """Train every run of :data:`RUNS` with the server in the stage; what each saw."""
    from kerasonspark import SparkTrainer, numpy_to_dataframe

    spark.conf.set(PLACEMENT, "stage")
    x, y = make_blobs(1200)
    train_df = numpy_to_dataframe(spark, x[:900], y[:900], partitions=2)
    validation_df = numpy_to_dataframe(spark, x[900:], y[900:])
    report = {}
    try:
        for name, (backend, options) in RUNS.items():
            # no epoch improves the loss by 100: it stops after the second of six
            stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=100)
            seen = EpochsSeen()
            trainer = SparkTrainer(
                small_model(),
                backend=backend,
                num_workers=2,
                epochs=6,
                seed=0,
                spark=spark,
                verbose=0,
                backend_options=options,
            )
            before = [w.copy() for w in trainer.model.get_weights()]
            result = trainer.fit(train_df, validation_data=validation_df, callbacks=[stop, seen])
            predicted = trainer.predict(validation_df).select("label", "prediction").collect()
            classes = np.array([np.argmax(row.prediction) for row in predicted])
            events = result.stats["epoch_events"]
            report[name] = {
                "epochs": len(result.history["loss"]),
                "stopped_epoch": stop.stopped_epoch,
                "seen": seen.epochs,
                "placement": events["server_placement"],
                "server_url": events["server_url"],
                "exchanges": result.stats["exchanges"],
                "center": result.stats[backend].get("center"),
                "val_accuracy": result.history["val_accuracy"][-1],
                "evaluate": trainer.evaluate(validation_df)["accuracy"],
                "predict_accuracy": float(
                    (classes == np.array([row.label for row in predicted])).mean()
                ),
                "changed": any(
                    not np.array_equal(a, b)
                    for a, b in zip(before, trainer.model.get_weights(), strict=True)
                ),
            }
    finally:
        spark.conf.unset(PLACEMENT)
    return report


def check(report: dict) -> None:
    """What every run of :func:`placed_in_stage` must show."""
    assert set(report) == set(RUNS)
    for name, run in report.items():
        assert run["placement"] == "stage", name
        # EarlyStopping ran beside the server and stopped it; the client's callbacks came back
        # with the state their copies ended with
        assert run["epochs"] == 2 and run["stopped_epoch"] == 1, (name, run)
        assert run["seen"] == [0, 1], name
        assert run["exchanges"] > 0 and run["changed"], name
        assert run["val_accuracy"] > 0.9 and run["evaluate"] > 0.9, (name, run)
        assert run["predict_accuracy"] > 0.9, name
    assert report["sync_sharded"]["center"] == "sharded"


def main(url: str) -> None:
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.remote(url).getOrCreate()
    report: dict = {"runs": placed_in_stage(spark)}
    report_connect_client(spark, report)


if __name__ == "__main__":
    main(sys.argv[1])
