"""Nothing assumes loopback: Spark workers in two network namespaces (standing in for two hosts,
joined to this one by veth pairs on a bridge, addresses from 198.18.0.0/15, the range set aside
for benchmark networks) train `sync` and `async` with the master, the driver and the parameter
server in the root namespace on the host-side address. Needs root and iproute2; everything it
creates is removed afterwards, also when it fails."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kerasonspark.cluster import spark_home

from test_cli import run_processes, write_tiny_mnist

pytestmark = pytest.mark.spark
TESTS = Path(__file__).parent
TAG = f"kos{os.getpid() % 100000}"
BRIDGE, HOST_ADDRESS = f"{TAG}br", "198.18.0.1"
HOSTS = {f"{TAG}h{i}": f"198.18.0.{i + 1}" for i in (1, 2)}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def remove_network() -> None:
    for namespace in HOSTS:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    for i in (1, 2):
        subprocess.run(["ip", "link", "del", f"{TAG}v{i}"], capture_output=True)


@pytest.fixture
def two_hosts():
    """A bridge at 198.18.0.1 in this namespace and two namespaces at .2 and .3 on it."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    try:
        ip("link", "add", BRIDGE, "type", "bridge")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"this machine does not allow new network devices: {exc.stderr.strip()}")
    try:
        ip("addr", "add", f"{HOST_ADDRESS}/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        for i, (namespace, address) in enumerate(HOSTS.items(), start=1):
            ip("netns", "add", namespace)
            ip("link", "add", f"{TAG}v{i}", "type", "veth", "peer", "name", "eth0", "netns", namespace)
            ip("link", "set", f"{TAG}v{i}", "master", BRIDGE, "up")
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")
            ip("-n", namespace, "link", "set", "lo", "up")
        yield
    finally:
        remove_network()


def start(command: list[str], log: Path, namespace: str | None = None, **env: str) -> subprocess.Popen:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    return subprocess.Popen([*prefix, *command], env=dict(os.environ, **env), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_separate_hosts_train_sync_and_async_with_nothing_on_loopback(two_hosts, tmp_path):
    spark_class = str(spark_home() / "bin" / "spark-class")
    write_tiny_mnist(tmp_path)
    before = run_processes()
    daemons = []
    try:
        daemons.append(start([spark_class, "org.apache.spark.deploy.master.Master", "--host", HOST_ADDRESS,
                              "--port", "7077", "--webui-port", "8080"], tmp_path / "master.log",
                             SPARK_LOCAL_IP=HOST_ADDRESS))
        for namespace, address in HOSTS.items():
            daemons.append(start([spark_class, "org.apache.spark.deploy.worker.Worker", "--host", address,
                                  "--cores", "1", "--memory", "1g", "--work-dir", str(tmp_path / namespace),
                                  f"spark://{HOST_ADDRESS}:7077"], tmp_path / f"{namespace}.log", namespace,
                                 SPARK_LOCAL_IP=address, PYSPARK_PYTHON=sys.executable))
        deadline, workers = time.monotonic() + 120, []
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(1)
            try:
                with urllib.request.urlopen(f"http://{HOST_ADDRESS}:8080/json", timeout=2) as reply:
                    workers = [w["host"] for w in json.load(reply)["workers"] if w["state"] == "ALIVE"]
            except OSError:
                continue
        assert sorted(workers) == sorted(HOSTS.values()), (tmp_path / "master.log").read_text()[-2000:]
        run = subprocess.run([sys.executable, str(TESTS / "separate_hosts_driver.py"), f"spark://{HOST_ADDRESS}:7077",
                              HOST_ADDRESS, str(tmp_path)], capture_output=True, text=True, timeout=400, cwd=TESTS,
                             env=dict(os.environ, PYTHONPATH=str(TESTS), SPARK_LOCAL_IP=HOST_ADDRESS,
                                      PYSPARK_PYTHON=sys.executable))
        lines = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
        assert run.returncode == 0 and lines, run.stderr[-3000:]
        report = json.loads(lines[0][len("REPORT "):])
    finally:
        for daemon in daemons:
            os.killpg(daemon.pid, signal.SIGTERM)
        for daemon in daemons:
            daemon.wait(timeout=30)
    assert report["server_host"] == HOST_ADDRESS
    assert report["executor_addresses"] == sorted(HOSTS.values())  # the tasks ran in the two namespaces
    for backend in ("sync", "async"):
        assert report[backend]["accuracy"] > 0.5 and report[backend]["samples"] == 400 * 3
    # Both engines' parameter servers bound and advertised the address the namespaces reach.
    assert len(report["servers"]) == 2 and all(f"http://{HOST_ADDRESS}:" in s for s in report["servers"])
    assert "sends weights in cleartext HTTP" in report["encrypted_refusal"]
    deadline = time.monotonic() + 30
    while run_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run_processes() - before == set()
