"""Nothing assumes loopback: Spark workers in two network namespaces (standing in for two hosts,
joined to this one by veth pairs on a bridge, addresses from 198.18.0.0/15, the range set aside
for benchmark networks) train `sync` and `async` with the master, the driver and the parameter
server in the root namespace on the host-side address. Needs root and iproute2; everything it
creates is removed afterwards, also when it fails."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from emulated_hosts import EmulatedNetwork, goodput

from kerasonspark import StandaloneCluster

from conftest import emulated_or_skip
from test_cli import run_processes, write_tiny_mnist

pytestmark = pytest.mark.spark
TESTS = Path(__file__).parent


@pytest.fixture
def network():
    """A bridge at 198.18.0.1 in this namespace and two emulated hosts at .2 and .3 on it."""
    network = emulated_or_skip(EmulatedNetwork(hosts=2))
    try:
        yield network
    finally:
        network.remove()


def test_separate_hosts_train_sync_and_async_with_nothing_on_loopback(network, tmp_path):
    write_tiny_mnist(tmp_path)
    before = run_processes()
    with StandaloneCluster(
        workers=2,
        memory_per_worker="1g",
        host=network.address,
        worker_hosts=network.hosts,
        work_dir=str(tmp_path),
    ) as cluster:
        assert sorted(w["host"] for w in cluster.status()["workers"]) == [
            h.address for h in network.hosts
        ]
        run = subprocess.run(
            [
                sys.executable,
                str(TESTS / "separate_hosts_driver.py"),
                cluster.master_url,
                network.address,
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=400,
            cwd=TESTS,
            env=dict(os.environ, PYTHONPATH=str(TESTS), SPARK_LOCAL_IP=network.address),
        )
        lines = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
        assert run.returncode == 0 and lines, run.stderr[-3000:]
        report = json.loads(lines[0][len("REPORT ") :])
    assert report["server_host"] == network.address
    # the tasks ran in the two namespaces
    assert report["executor_addresses"] == [h.address for h in network.hosts]
    for backend in ("sync", "async"):
        assert report[backend]["accuracy"] > 0.5 and report[backend]["samples"] == 400 * 3
    # Both engines' parameter servers bound and advertised the address the namespaces reach.
    assert len(report["servers"]) == 2 and all(
        f"http://{network.address}:" in s for s in report["servers"]
    )
    assert "sends weights in cleartext HTTP" in report["encrypted_refusal"]
    deadline = time.monotonic() + 30
    while run_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run_processes() - before == set()


def test_emulated_links_are_shaped_to_the_rate_asked_for(network):
    """What the scaling benchmark rests on: a shaped link carries about its rate, an unshaped one
    more."""
    rates = {}
    for rate in ("100mbit", None):
        network.shape(rate)
        rates[rate] = goodput(network.hosts[0], network.hosts[1])
    # 100 Mbit/s is 12.5 MB/s; TCP carries a little less
    assert 0.7 * 12.5e6 < rates["100mbit"] < 12.5e6
    assert rates[None] > 3 * rates["100mbit"]
