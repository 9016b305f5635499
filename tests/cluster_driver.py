"""A driver program for tests/test_cluster.py: trains on the standalone cluster named on the
command line and prints what happened as JSON (a Spark driver needs a process of its own, since
the test process already holds a local session)."""

import json
import sys

from conftest import make_blobs, small_model
from kerasonspark import SparkTrainer
from kerasonspark.cluster import ClusterState, master_status
from kerasonspark.session import server_host, start_session


def main(master_url: str, web_ui: str) -> None:
    spark = start_session(master_url, "kerasonspark-cluster-test")
    x, y = make_blobs(1200)
    report = {"master": spark.sparkContext.master, "server_host": server_host(spark)}
    for backend in ("sync", "async"):
        trainer = SparkTrainer(small_model(), backend=backend, num_workers=2, spark=spark, epochs=2, verbose=0)
        result = trainer.fit(x, y)
        report[backend] = {"accuracy": trainer.evaluate(x, y)["accuracy"],
                           "worker_samples": [w["samples"] for w in result.stats["workers"]]}
    status = master_status(ClusterState(master_url, web_ui, [], ""))
    report["apps"] = [{"name": a["name"], "cores": a["cores"]} for a in status["activeapps"]]
    report["workers_busy"] = [w["coresused"] for w in status["workers"]]
    spark.stop()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
