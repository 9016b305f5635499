"""A driver program for tests/test_gpus.py: trains on a local cluster whose one executor a
discovery script gave two (fake) GPUs, one per task, and prints as JSON what each worker chose (a
Spark driver needs a process of its own, since the test process already holds a local session)."""

import json
import logging
import sys

from kerasonspark import SparkTrainer, start_session

from conftest import make_blobs, small_model


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main(discovery_script: str) -> None:
    spark = start_session(
        "local-cluster[1,2,1024]",
        "kerasonspark-gpu-test",
        conf={
            "spark.worker.resource.gpu.amount": "2",
            "spark.worker.resource.gpu.discoveryScript": discovery_script,
            "spark.executor.resource.gpu.amount": "2",
            "spark.task.resource.gpu.amount": "1",
            # as YARN and Kubernetes set it: Spark's addresses index into it
            "spark.executorEnv.CUDA_VISIBLE_DEVICES": "5,7",
        },
    )
    lines = Lines()
    logging.getLogger("kerasonspark").addHandler(lines)
    x, y = make_blobs(1200)
    trainer = SparkTrainer(
        small_model(), backend="sync", num_workers=2, spark=spark, epochs=2, verbose=0
    )
    result = trainer.fit(x, y)
    report = {
        "devices": [w["device"] for w in result.stats["workers"]],
        "accuracy": trainer.evaluate(x, y)["accuracy"],
        "logs": lines.lines,
    }
    spark.stop()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
