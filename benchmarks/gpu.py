"""Each engine with 2 workers sharing one GPU, against plain Keras on it: samples/s and test
accuracy of the reference CNN, one epoch on MNIST, in one run (under five minutes on one GPU).

    python benchmarks/gpu.py --data ../shared/data/mnist
    python benchmarks/gpu.py --data ../shared/data/mnist --limit 12000 --repeat 3

Spark schedules the GPU: a local cluster of one executor that a discovery script (``nvidia-smi``)
gives the machine's GPUs, each task half of one (``spark.task.resource.gpu.amount=0.5``), so both
workers pin GPU 0 before TensorFlow starts; ``single`` trains in this process on the same GPU.
Prints the comparison table, then the device each worker of a ``sync`` fit used. Where there is
no GPU the script still runs (the discovery script reports address 0, TensorFlow finds no
device, and every worker says it trains on the CPU).
"""

import argparse
import json
import os
import tempfile

from kerasonspark import (
    SparkTrainer,
    compare_strategies,
    format_table,
    load_mnist,
    mnist_cnn,
    numpy_to_dataframe,
    start_session,
)

DISCOVERY = """#!/bin/sh
ids=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, -)
[ -n "$ids" ] || ids=0
echo "{\\"name\\": \\"gpu\\", \\"addresses\\": [\\"$(echo "$ids" | sed 's/,/","/g')\\"]}"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder with the MNIST files")
    parser.add_argument("--limit", type=int, default=0, help="train on the first N rows only")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=["single", "sync", "async", "hogwild"])
    args = parser.parse_args()
    script = os.path.join(tempfile.mkdtemp(), "discover_gpus.sh")
    with open(script, "w") as f:
        f.write(DISCOVERY)
    os.chmod(script, 0o755)
    spark = start_session(
        "local-cluster[1,2,8192]",
        "kerasonspark-gpu-benchmark",
        conf={
            "spark.worker.resource.gpu.amount": "1",
            "spark.worker.resource.gpu.discoveryScript": script,
            "spark.executor.resource.gpu.amount": "1",
            "spark.task.resource.gpu.amount": "0.5",
        },
    )
    (x, y), (tx, ty) = load_mnist(args.data)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    train_df = numpy_to_dataframe(spark, x, y, partitions=2).cache()
    test_df = numpy_to_dataframe(spark, tx, ty, partitions=2).cache()
    rows = compare_strategies(
        mnist_cnn, spark, train_df, test_df, args.backends, num_workers=2, repeat=args.repeat
    )
    print(format_table(rows))
    trainer = SparkTrainer(mnist_cnn(), backend="sync", num_workers=2, spark=spark, verbose=0)
    stats = trainer.fit(x[:4000], y[:4000]).stats
    for worker in stats["workers"]:
        print(f"worker {worker['worker']}: " + json.dumps(worker.get("device", {})))
    spark.stop()


if __name__ == "__main__":
    main()
