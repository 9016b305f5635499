"""Spark Connect: a client with no SparkContext trains, evaluates and predicts through a real
Connect server (the installed pyspark's ``SparkConnectServer`` on ``local[2]``, on loopback,
stopped by its process group id: benchmarks/connect_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture
def client_apart():
    """A cluster host and a client host on two separate emulated networks (namespaces at
    198.18.7.2 and 198.19.7.2, each joined to this namespace by a bridge of its own): neither
    namespace has a route to the other's network, so only a relay here carries the client's
    connection to the Connect server, as a NAT gateway carries a laptop's."""
    from emulated_hosts import EmulatedNetwork

    from conftest import emulated_or_skip

    tag = f"{os.getpid() % 100000}"
    networks = []
    try:
        for kind, subnet in (("s", "198.18.7"), ("c", "198.19.7")):
            networks.append(EmulatedNetwork(hosts=1, subnet=subnet, tag=f"k{kind}{tag}"))
            emulated_or_skip(networks[-1])
    except BaseException:
        for network in networks:
            network.remove()
        raise
    try:
        yield networks
    finally:
        for network in networks:
            network.remove()


@pytest.mark.spark
def test_a_client_the_executors_cannot_reach_trains_with_the_server_in_the_stage(client_apart):
    from connect_server import ConnectServer
    from emulated_hosts import Relay
    from stage_placement_driver import check

    cluster, client = (network.hosts[0] for network in client_apart)
    # the executors have no way back to the client: there is no route to its network
    probe = subprocess.run(
        cluster.command(
            [
                sys.executable,
                "-c",
                f"import socket; socket.create_connection(('{client.address}', 9))",
            ]
        ),
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "unreachable" in probe.stderr, probe.stderr[-500:]
    with (
        ConnectServer("local[2]", host=cluster.address, run_in=cluster.command) as server,
        Relay(client_apart[1].address, cluster.address, server.port) as relay,
    ):
        tests = Path(__file__).parent
        run = subprocess.run(
            client.command(
                [
                    sys.executable,
                    str(tests / "stage_placement_driver.py"),
                    f"sc://{client_apart[1].address}:{relay.port}",
                ]
            ),
            capture_output=True,
            text=True,
            timeout=400,
            cwd=tests,
            env=dict(os.environ, PYTHONPATH=str(tests)),
        )
    lines = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    report = json.loads(lines[0][len("REPORT ") :])
    assert report["spark_context"] not in (True, None)
    check(report["runs"])
    # task 0 served on the cluster's side (its loopback: local mode), never on the client's
    assert all(run["server_url"].startswith("http://127.0.0.1:") for run in report["runs"].values())
