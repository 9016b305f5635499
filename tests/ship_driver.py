"""Part of tests/cluster_driver.py: trains on the standalone cluster with executors that cannot
import kerasonspark (tests/executor_without_package on their PYTHONPATH), then with executors that
also lack Keras, and reports what happened."""

import logging
from pathlib import Path

from kerasonspark import SparkEnvironmentError, SparkTrainer, start_session
from kerasonspark._shipping import executors_lack

from conftest import make_blobs, small_model

BLOCKER = str(Path(__file__).parent / "executor_without_package")


def session(master_url: str, hide: str = ""):
    return start_session(
        master_url,
        "kerasonspark-ship-test",
        conf={"spark.executorEnv.PYTHONPATH": BLOCKER, "spark.executorEnv.KOS_TEST_HIDE": hide},
    )


def ship_report(master_url: str) -> dict:
    """What happened, as a dict: each application is a session of its own, stopped after."""
    shipped = []
    handler = logging.Handler()
    handler.emit = lambda record: shipped.append(record.getMessage())
    logging.getLogger("kerasonspark._shipping").addHandler(handler)
    logging.getLogger("kerasonspark._shipping").setLevel(logging.INFO)
    report = {}
    spark = session(master_url)
    report["lacking_before"] = executors_lack(spark, ("kerasonspark", "tensorflow"))
    x, y = make_blobs(1200)
    trainer = SparkTrainer(
        small_model(), backend="async", num_workers=1, spark=spark, epochs=2, verbose=0
    )
    trainer.fit(x, y)
    report["async"] = trainer.evaluate(x, y)["accuracy"]
    report["executor_package"] = (
        spark.sparkContext.parallelize([0], 1)
        .map(lambda _: __import__("kerasonspark").__file__)
        .collect()[0]
    )
    report["shipped_logs"] = shipped
    spark.stop()

    spark = session(master_url, hide="keras")
    try:
        SparkTrainer(small_model(), num_workers=1, spark=spark, verbose=0).fit(x, y)
        report["without_keras"] = None
    except SparkEnvironmentError as exc:
        report["without_keras"] = str(exc)
    spark.stop()
    return report
