"""Spark Connect: a client with no SparkContext trains, evaluates and predicts through a real
Connect server (the installed pyspark's ``SparkConnectServer`` on ``local[2]``, on loopback,
stopped by its process group id: benchmarks/connect_server.py)."""

from __future__ import annotations

import pytest

from conftest import run_driver_program


@pytest.fixture(scope="module")
def connect_server():
    from connect_server import ConnectServer

    with ConnectServer("local[2]") as server:
        yield server.url


@pytest.mark.spark
def test_every_engine_but_elephas_trains_evaluates_and_predicts_over_connect(connect_server):
    report = run_driver_program(
        "connect_driver.py", connect_server, "sync", "async", "hogwild", "single"
    )
    assert report["session"].startswith("pyspark.sql.connect")
    assert report["server_host"] == "127.0.0.1"
    # the client had no SparkContext: the library cannot have used one
    assert report["spark_context"] not in (True, None)
    assert report["restarts"] == 1 and "exited unexpectedly" in report["restart_cause"]
    assert report["restart_accuracy"] > 0.9
    assert report["early_stopping_epochs"] == 2
    assert report["ml_rows"] == 300 and report["ml_identical"]
    assert report["weighted_val_digit_accuracy"] > 0.9
    assert report["parquet_streamed"]["path"] == "stream"
    assert report["parquet_streamed"]["samples"] == 900 * 3
    assert report["parquet_streamed"]["accuracy"] > 0.9
    assert report["elephas"].startswith("ConfigurationError"), report["elephas"]
    assert "Backend 'elephas' hands the data to a Spark library as an RDD" in report["elephas"]
    assert "Spark Connect session has no RDDs" in report["elephas"]
    for backend, run in report["runs"].items():
        assert run["numpy_samples"] == 900 * 3, backend
        assert run["changed"], backend
        assert run["val_accuracy"] > 0.9, backend
        assert run["evaluate"] > 0.9 and run["evaluate_numpy"] > 0.9, backend
        assert run["predicted_rows"] == 300 and run["predict_accuracy"] > 0.9, backend
