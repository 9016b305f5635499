"""A real Spark Connect server on this machine, for tests and benchmarks: the installed pyspark's
``SparkConnectServer`` (through its own ``spark-submit``) on a local master, bound to loopback,
stopped by its process group id::

    with ConnectServer("local[2]") as server:
        spark = SparkSession.builder.remote(server.url).getOrCreate()

Its Python workers run this Python (``spark.pyspark.python``), so they import what it imports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType


class ConnectServer:
    """A Spark Connect server process; ``url`` is its ``sc://`` address once entered.

    Args:
        master: the server's Spark master.
        conf: more Spark settings for the server.
        start_timeout: seconds to wait for its port to open.
        host: the address its gRPC port binds (its driver stays on loopback).
        run_in: turns the server's command into one run elsewhere, such as an emulated host's
            ``EmulatedHost.command`` (benchmarks/emulated_hosts.py) with ``host`` its address.
    """

    def __init__(
        self,
        master: str = "local[2]",
        conf: dict[str, str] | None = None,
        start_timeout: float = 120.0,
        host: str = "127.0.0.1",
        run_in: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        self.master, self.conf, self.start_timeout = master, dict(conf or {}), start_timeout
        self.host, self.run_in = host, run_in
        self.process: subprocess.Popen | None = None
        self.log = Path(tempfile.mkdtemp(prefix="kerasonspark-connect-")) / "server.log"
        self.url, self.port = "", 0

    def __enter__(self) -> ConnectServer:
        import pyspark

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        home = Path(pyspark.__file__).parent
        settings = {
            "spark.connect.grpc.binding.address": self.host,
            "spark.connect.grpc.binding.port": str(port),
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.ui.enabled": "false",
            "spark.pyspark.python": sys.executable,
            **self.conf,
        }
        command = [
            str(home / "bin" / "spark-submit"),
            "--master",
            self.master,
            "--class",
            "org.apache.spark.sql.connect.service.SparkConnectServer",
            *(arg for key, value in settings.items() for arg in ("--conf", f"{key}={value}")),
            "spark-internal",
        ]
        if self.run_in is not None:
            command = self.run_in(command)
        # the Python workers' interpreter: a server started from a venv's Python without the venv
        # on PATH would otherwise run `python3` from PATH
        env = dict(
            os.environ,
            SPARK_HOME=str(home),
            SPARK_LOCAL_IP="127.0.0.1",
            PYSPARK_PYTHON=sys.executable,
        )
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            deadline = time.monotonic() + self.start_timeout
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"The Connect server exited: {self.tail()}")
                with socket.socket() as attempt:
                    if attempt.connect_ex((self.host, port)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"The Connect server did not open its port: {self.tail()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.port = port
        self.url = f"sc://{self.host}:{port}"
        return self

    def tail(self, chars: int = 3000) -> str:
        """The end of the server's log."""
        return self.log.read_text()[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        """Stop the server and everything it started (its process group)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
