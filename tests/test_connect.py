"""Spark Connect: a client with no SparkContext trains, evaluates and predicts through a real
Connect server (the installed pyspark's ``SparkConnectServer`` on ``local[2]``, on loopback,
stopped by its process id)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_driver_program


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory):
    import pyspark

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    home = Path(pyspark.__file__).parent
    log = tmp_path_factory.mktemp("connect") / "server.log"
    settings = {
        "spark.connect.grpc.binding.address": "127.0.0.1",
        "spark.connect.grpc.binding.port": str(port),
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": "false",
        "spark.pyspark.python": sys.executable,
    }
    command = [
        str(home / "bin" / "spark-submit"),
        "--master",
        "local[2]",
        "--class",
        "org.apache.spark.sql.connect.service.SparkConnectServer",
        *(arg for key, value in settings.items() for arg in ("--conf", f"{key}={value}")),
        "spark-internal",
    ]
    env = dict(os.environ, SPARK_HOME=str(home), SPARK_LOCAL_IP="127.0.0.1")
    with open(log, "w") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            with socket.socket() as attempt:
                if attempt.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield f"sc://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.spark
def test_every_served_engine_trains_evaluates_and_predicts_over_connect(connect_server):
    report = run_driver_program("connect_driver.py", connect_server, "sync", "async", "single")
    assert report["session"].startswith("pyspark.sql.connect")
    # the client had no SparkContext: the library cannot have used one
    assert report["spark_context"] not in (True, None)
    for backend, run in report["runs"].items():
        assert run["numpy_samples"] == 900 * 3, backend
        assert run["changed"], backend
        assert run["val_accuracy"] > 0.9, backend
        assert run["evaluate"] > 0.9 and run["evaluate_numpy"] > 0.9, backend
        assert run["predicted_rows"] == 300 and run["predict_accuracy"] > 0.9, backend
