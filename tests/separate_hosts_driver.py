"""A driver program for tests/test_separate_hosts.py: runs in the root network namespace on the
host-side address, trains `sync` and `async` on a tiny MNIST with workers in two other namespaces,
and prints what happened as JSON."""

import json
import logging
import sys

import keras
import numpy as np

from kerasonspark import ConfigurationError, SparkTrainer, load_mnist, start_session
from kerasonspark._session import check_weights_privacy, server_host


def small_mnist_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def source_address(peer: str) -> str:
    """The address this process's traffic to ``peer`` leaves from (a UDP connect sends nothing)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((peer, 9))
        return sock.getsockname()[0]


def main(master_url: str, address: str, data: str) -> None:
    servers = []
    handler = logging.Handler()
    handler.emit = lambda record: servers.append(record.getMessage())
    logger = logging.getLogger("kerasonspark.parameter_server._server")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    spark = start_session(
        master_url,
        "kerasonspark-separate-hosts",
        conf={"spark.driver.host": address, "spark.driver.bindAddress": address},
    )
    (x, y), (x_test, y_test) = load_mnist(data)
    report = {"server_host": server_host(spark)}
    for backend in ("sync", "async"):
        trainer = SparkTrainer(
            small_mnist_model(),
            backend=backend,
            num_workers=2,
            spark=spark,
            epochs=3,
            batch_size=16,
            verbose=0,
        )
        result = trainer.fit(x, y)
        report[backend] = {
            "accuracy": trainer.evaluate(x_test, y_test)["accuracy"],
            "samples": result.stats["samples"],
        }
    report["executor_addresses"] = sorted(
        set(
            spark.sparkContext.parallelize(range(8), 8)
            .map(lambda _: source_address(address))
            .collect()
        )
    )
    report["servers"] = servers
    conf = dict(spark.sparkContext.getConf().getAll())
    try:
        check_weights_privacy({**conf, "spark.network.crypto.enabled": "true"}, server_host(spark))
        report["encrypted_refusal"] = None
    except ConfigurationError as exc:
        report["encrypted_refusal"] = str(exc)
    spark.stop()
    print(
        "REPORT "
        + json.dumps(report, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
