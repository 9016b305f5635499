"""Start and stop a real Spark standalone cluster (one master, N workers) on this machine.

The same topology as the 2017 three-container setup, from the Spark that the ``pyspark`` package
ships (``bin/spark-class``), with every daemon bound to one address (loopback by default)::

    with StandaloneCluster(workers=2) as cluster:
        spark = start_session(cluster.master_url)
        SparkTrainer(model, backend="async", num_workers=2, spark=spark).fit(train_df)

Each daemon is a child process in a process group of its own, so :meth:`StandaloneCluster.stop`
ends it, and the executors and Python workers it started, by process id. ``kerasonspark cluster
start`` keeps a cluster running between commands; its process ids and addresses are written to a
state file that ``kerasonspark cluster stop`` reads.

On hosts of its own (any object with an ``address`` and a ``command`` that runs a command there:
the test suite and the benchmarks use network namespaces, ``benchmarks/emulated_hosts.py``), the
master and each worker run each bound to its host's address, so that nothing travels over loopback::

    with EmulatedNetwork(hosts=2) as network, StandaloneCluster(
            workers=2, host=network.address, worker_hosts=network.hosts) as cluster:
        ...
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ._errors import ConfigurationError, SparkEnvironmentError
from ._session import require_java
from .engine import check_positive_int


class Host(Protocol):
    """Where a daemon runs: its address and how to run a command there (``ip netns exec`` ...)."""

    @property
    def address(self) -> str: ...

    def command(self, command: Sequence[str]) -> list[str]: ...


logger = logging.getLogger(__name__)

DEFAULT_STATE_FILE = Path("~/.kerasonspark/cluster.json")


def spark_home() -> Path:
    """The Spark distribution inside the installed ``pyspark`` package (or ``$SPARK_HOME``)."""
    if os.environ.get("SPARK_HOME"):
        return Path(os.environ["SPARK_HOME"])
    import pyspark

    return Path(pyspark.__file__).parent


def free_port(host: str) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ClusterState:
    """What identifies a running cluster: its addresses and the process ids to stop."""

    master_url: str
    web_ui: str
    pids: list[int]
    log_dir: str


@dataclass
class StandaloneCluster:
    """A Spark standalone master and ``workers`` workers, started on this machine.

    Args:
        workers: worker daemons (Spark's executors run inside them).
        cores_per_worker: cores each worker offers; a barrier stage of ``n`` workers needs
            ``n`` cores in all.
        memory_per_worker: memory each worker offers its executors (Spark's format, ``"2g"``).
        host: the address every daemon binds (``127.0.0.1`` keeps the cluster on this machine).
        port: the master's port; 0 picks a free one.
        work_dir: where daemons keep logs and executor files; a fresh temporary folder by default.
        start_timeout: seconds to wait for every worker to register with the master.
        master_host: an emulated host to run the master in, at its address (``host`` is then
            ignored); ``None`` runs it here, at ``host``.
        worker_hosts: one emulated host per worker, each worker bound to its host's address;
            ``None`` runs them here, at ``host``.

    Example:
        >>> with StandaloneCluster(workers=2) as cluster:
        ...     spark = start_session(cluster.master_url)
    """

    workers: int = 2
    cores_per_worker: int = 1
    memory_per_worker: str = "2g"
    host: str = "127.0.0.1"
    port: int = 0
    work_dir: str | None = None
    start_timeout: float = 120.0
    master_host: Host | None = None
    worker_hosts: Sequence[Host] | None = None
    state: ClusterState | None = field(default=None, init=False)
    _processes: list[subprocess.Popen] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("workers", "cores_per_worker"):
            check_positive_int(name, getattr(self, name))
        if self.worker_hosts is not None and len(self.worker_hosts) != self.workers:
            raise ConfigurationError(
                f"Expected one worker host per worker ({self.workers}). "
                f"Received: {len(self.worker_hosts)} worker_hosts."
            )

    @property
    def master_url(self) -> str:
        """``spark://host:port`` of the running master."""
        return self._running().master_url

    def _running(self) -> ClusterState:
        if self.state is None:
            raise SparkEnvironmentError("The cluster is not running; call start() first.")
        return self.state

    def start(self) -> StandaloneCluster:
        """Start the master and the workers; returns once every worker has registered.

        Raises:
            SparkEnvironmentError: Java is missing, a daemon exited, or the workers did not
                register within ``start_timeout`` (the message carries the end of its log).
        """
        require_java()
        work = Path(self.work_dir or tempfile.mkdtemp(prefix="kerasonspark-cluster-"))
        logs = work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        master_address = self.master_host.address if self.master_host else self.host
        # A fresh namespace has every port free; this namespace's are probed.
        port = self.port or (7077 if self.master_host else free_port(self.host))
        ui_port = 8080 if self.master_host else free_port(self.host)
        master_url = f"spark://{master_address}:{port}"
        self.state = ClusterState(master_url, f"http://{master_address}:{ui_port}", [], str(logs))
        try:
            self._spawn(
                "master",
                [
                    "org.apache.spark.deploy.master.Master",
                    "--host",
                    master_address,
                    "--port",
                    str(port),
                    "--webui-port",
                    str(ui_port),
                ],
                logs,
                self.master_host,
            )
            for i in range(self.workers):
                worker_host = self.worker_hosts[i] if self.worker_hosts else None
                address = worker_host.address if worker_host else self.host
                worker_dir = work / f"worker-{i}"
                worker_dir.mkdir(exist_ok=True)
                self._spawn(
                    f"worker-{i}",
                    [
                        "org.apache.spark.deploy.worker.Worker",
                        master_url,
                        "--host",
                        address,
                        "--cores",
                        str(self.cores_per_worker),
                        "--memory",
                        self.memory_per_worker,
                        "--webui-port",
                        str(8081 if worker_host else free_port(self.host)),
                        "--work-dir",
                        str(worker_dir),
                    ],
                    logs,
                    worker_host,
                )
            self._wait_for_workers()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "Spark standalone cluster up at %s (%d workers, web UI %s)",
            master_url,
            self.workers,
            self.state.web_ui,
        )
        return self

    def _spawn(self, name: str, args: list[str], logs: Path, emulated: Host | None = None) -> None:
        # No port retries: a master that silently moved to the next port would leave the workers
        # (and the recorded URL) pointing at whatever holds the one asked for.
        no_retries = "-Dspark.port.maxRetries=0"
        env = dict(
            os.environ,
            SPARK_HOME=str(spark_home()),
            SPARK_LOCAL_IP=emulated.address if emulated else self.host,
            SPARK_MASTER_OPTS=f"{os.environ.get('SPARK_MASTER_OPTS', '')} {no_retries}".strip(),
            SPARK_WORKER_OPTS=f"{os.environ.get('SPARK_WORKER_OPTS', '')} {no_retries}".strip(),
        )
        with open(logs / f"{name}.log", "wb") as log:
            command = [str(spark_home() / "bin" / "spark-class"), *args]
            process = subprocess.Popen(
                emulated.command(command) if emulated else command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self._processes.append(process)
        self._running().pids.append(process.pid)

    def status(self) -> dict[str, Any]:
        """The master's own status document (its web UI's ``/json/``)."""
        return master_status(self._running())

    def _wait_for_workers(self) -> None:
        state = self._running()
        deadline = time.monotonic() + self.start_timeout
        alive = 0
        while time.monotonic() < deadline:
            for process, name in zip(
                self._processes,
                ["master"] + [f"worker-{i}" for i in range(self.workers)],
                strict=True,
            ):
                if process.poll() is not None:
                    log = _log_tail(Path(state.log_dir) / f"{name}.log")
                    hint = (
                        " Its port is taken (another cluster? `kerasonspark cluster stop` stops "
                        "the one the CLI started); pass another port, or 0 for a free one."
                        if "Address already in use" in log
                        else ""
                    )
                    raise SparkEnvironmentError(
                        f"The Spark {name} exited with code {process.returncode}.{hint}\n{log}"
                    )
            try:
                alive = sum(
                    w.get("state") == "ALIVE" for w in master_status(state).get("workers", [])
                )
            # not listening yet, or its web UI is up before its JSON page
            except (
                OSError,
                ValueError,
            ):
                alive = 0
            if alive == self.workers:
                return
            time.sleep(0.5)
        raise SparkEnvironmentError(
            f"Only {alive} of {self.workers} Spark workers registered with {state.master_url} "
            f"within {self.start_timeout:.0f} s (`start_timeout`). Master "
            f"log:\n{_log_tail(Path(state.log_dir) / 'master.log')}"
        )

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every daemon (and the executors they started); waits until they are gone."""
        if self.state is not None:
            stop_processes(self.state.pids, timeout)
        for process in self._processes:
            process.poll()  # reap, so no zombie is left behind
        self._processes.clear()

    def save(self, path: str | os.PathLike = DEFAULT_STATE_FILE) -> Path:
        """Write the cluster's addresses and process ids, for ``kerasonspark cluster stop``."""
        state = self._running()
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(asdict(state), indent=2))
        return target

    def __enter__(self) -> StandaloneCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def master_status(state: ClusterState, timeout: float = 5.0) -> dict[str, Any]:
    """The master's status document: workers, cores, running applications."""
    with urllib.request.urlopen(f"{state.web_ui}/json/", timeout=timeout) as response:
        return json.loads(response.read())


def load_state(path: str | os.PathLike = DEFAULT_STATE_FILE) -> ClusterState:
    """Read a state file written by :meth:`StandaloneCluster.save`.

    Raises:
        SparkEnvironmentError: no state file (no cluster was started with it).
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise SparkEnvironmentError(
            f"No cluster state at {source}: start one with `kerasonspark cluster start`."
        )
    return ClusterState(**json.loads(source.read_text()))


def stop_processes(pids: list[int], timeout: float = 20.0) -> None:
    """End each process group (a daemon and what it started): SIGTERM, then SIGKILL after
    ``timeout``.

    Only groups that still hold a Spark process are signalled: process ids from an old state
    file may belong to something else by now.
    """
    pids = [pid for pid in pids if any(_is_spark(member) for member in _group_members(pid))]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_group_alive(pid) for pid in pids):
            time.sleep(0.2)
        if not any(_group_alive(pid) for pid in pids):
            return
        logger.warning("Spark daemons did not stop on SIGTERM within %.0f s; killing them", timeout)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group whose members are all zombies still answers; a zombie has finished its work.
    return any(_state_of(pid) not in ("Z", None) for pid in _group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def _is_spark(pid: int) -> bool:
    try:
        return b"org.apache.spark." in (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False


def _state_of(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
