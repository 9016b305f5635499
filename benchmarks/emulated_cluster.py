"""What the multi-host benchmarks share: a Spark standalone cluster on emulated hosts, and drivers
run in the driver's host that print one ``RUN {json}`` line per training run.

Three hosts (``emulated_hosts.py``) on 198.19.0.0/24 (the test suite's use
198.18.0.0/24): the driver with the Spark master and the parameter server in the first, a Spark
worker with one core in each of the others. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from emulated_hosts import EmulatedHost, EmulatedNetwork

from kerasonspark import StandaloneCluster

SUBNET = "198.19.0"
BATCH = 32


@contextlib.contextmanager
def emulated_cluster(
    workers: int = 2, memory: str = "3g"
) -> Iterator[tuple[EmulatedNetwork, StandaloneCluster]]:
    """The network and the running cluster; everything is stopped and removed on exit."""
    with EmulatedNetwork(hosts=workers + 1, subnet=SUBNET) as network:
        driver_host, *worker_hosts = network.hosts
        with StandaloneCluster(
            workers=workers,
            memory_per_worker=memory,
            master_host=driver_host,
            worker_hosts=worker_hosts,
            work_dir=tempfile.mkdtemp(prefix="kos-bench-"),
        ) as cluster:
            yield network, cluster


def run_driver(
    host: EmulatedHost, script: str, *args: str, timeout: float = 3600
) -> list[dict[str, Any]]:
    """Run ``script`` (with ``--drive`` and ``args``) in ``host``; its ``RUN`` lines, parsed."""
    run = subprocess.run(
        host.command([sys.executable, script, "--drive", *args]),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "SPARK_LOCAL_IP": host.address},
    )
    lines = [json.loads(line[4:]) for line in run.stdout.splitlines() if line.startswith("RUN ")]
    if run.returncode or not lines:
        raise RuntimeError(f"the driver in {host.namespace} failed:\n{run.stderr[-3000:]}")
    return lines


def driver_session(master: str, address: str, name: str):  # -> SparkSession
    """The driver's session, bound to its host's address."""
    from kerasonspark import start_session

    return start_session(
        master,
        name,
        conf={
            "spark.driver.host": address,
            "spark.driver.bindAddress": address,
            "spark.driver.memory": "4g",
            "spark.ui.showConsoleProgress": "false",
        },
    )
