"""A driver program for tests/test_server_placement.py: a ``fit`` interrupted by Ctrl-C
(``KeyboardInterrupt``, from a timer here) while its training stage runs, with the parameter
server in the stage (the client's thread waits in the stage's ``collect``). Prints as JSON what
it saw: the interrupt, whether Spark still ran a job afterwards, and a fit after it."""

import json
import signal
import sys
import time

from conftest import make_blobs, small_model


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(placement: str) -> None:
    from kerasonspark import SparkTrainer, start_session

    spark = start_session("local[2]", "kerasonspark-interrupt")
    spark.conf.set("spark.kerasonspark.serverPlacement", placement)
    x, y = make_blobs(2000)
    report = {}
    trainer = SparkTrainer(
        small_model(), backend="sync", num_workers=2, epochs=500, batch_size=8, spark=spark
    )
    signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(20)  # well inside the 500 epochs' stage
    started = time.monotonic()
    try:
        trainer.fit(x, y)
        report["interrupted"] = False
    except KeyboardInterrupt:
        report["interrupted"] = True
    report["fit_seconds"] = time.monotonic() - started
    tracker = spark.sparkContext.statusTracker()
    deadline = time.monotonic() + 30
    while tracker.getActiveJobsIds() and time.monotonic() < deadline:
        time.sleep(0.2)
    report["jobs_left"] = len(tracker.getActiveJobsIds())
    report["seconds_to_stop"] = time.monotonic() - started - report["fit_seconds"]
    after = SparkTrainer(small_model(), backend="sync", num_workers=2, epochs=2, spark=spark)
    report["accuracy_after"] = after.fit(x, y).history["accuracy"][-1]
    spark.stop()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
