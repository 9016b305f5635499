"""Finding or starting the Spark session a trainer runs on."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._errors import ConfigurationError, SparkEnvironmentError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

logger = logging.getLogger(__name__)

LOOPBACK_DRIVER = {
    # Servers we start bind to loopback unless the user runs on a cluster beyond this machine.
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
}

LOCAL_CONF = {
    **LOOPBACK_DRIVER,
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",  # training prints its own progress
    "spark.driver.memory": "4g",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.python.worker.reuse": "true",
    "spark.sql.shuffle.partitions": "8",
}


def require_java() -> str:
    """The ``java`` executable Spark will use.

    Raises:
        SparkEnvironmentError: no Java is installed (PySpark 4 needs Java 17 or newer).
    """
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not java or not os.path.exists(java):
        raise SparkEnvironmentError(
            "Java was not found (JAVA_HOME is unset and `java` is not on PATH). PySpark 4 needs "
            "Java 17 or newer: install it (e.g. `apt-get install openjdk-17-jre-headless`) or "
            "set JAVA_HOME."
        )
    return java


def start_session(
    master: str, app_name: str = "kerasonspark", conf: dict[str, Any] | None = None
) -> SparkSession:
    """Start (or join) a Spark session on ``master``.

    ``local[...]`` masters get loopback-only, quiet settings; a cluster master on this machine's
    loopback address (``spark://127.0.0.1:...``, as :mod:`kerasonspark._cluster` starts) gets a
    loopback driver, so the driver and the parameter server stay off the network too. On this
    machine the Python workers run the driver's own interpreter (Spark's default is whatever
    ``python3`` is on PATH, which in an unactivated virtual environment cannot import
    kerasonspark); ``PYSPARK_PYTHON`` still chooses another.
    """
    require_java()
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(master).appName(app_name)
    on_this_machine = master.startswith("local") or is_loopback(urlsplit(master).hostname or "")
    if master.startswith("local"):
        settings = dict(LOCAL_CONF)
    else:
        settings = {"spark.python.worker.reuse": "true"}
        if on_this_machine:
            settings.update(LOOPBACK_DRIVER, **{"spark.ui.showConsoleProgress": "false"})
    settings.update(conf or {})
    for key, value in settings.items():
        builder = builder.config(key, value)
    # PySpark reads PYSPARK_PYTHON once, when the context starts; put the variable back after.
    worker_python = (
        {"PYSPARK_PYTHON": sys.executable}
        if on_this_machine and not os.environ.get("PYSPARK_PYTHON")
        else {}
    )
    try:
        with _environment(worker_python):
            return builder.getOrCreate()
    except Exception as exc:
        raise SparkEnvironmentError(f"Spark could not start on master {master!r}: {exc}") from exc


@contextlib.contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (traffic to it never leaves)."""
    return host in ("localhost", "::1") or host.startswith("127.")


def is_local(spark: SparkSession) -> bool:
    """Whether ``spark`` runs in local mode (``local[...]``)."""
    return master(spark).startswith("local")


def master(spark: SparkSession) -> str:
    """The master URL of ``spark``'s cluster (for a Spark Connect client, the server's)."""
    return spark.conf.get("spark.master", "") or ""


SERVER_HOST = "spark.kerasonspark.serverHost"


def server_host(spark: SparkSession) -> str:
    """Where a driver-side server binds, and the address the executors are given for it:
    ``spark.kerasonspark.serverHost`` where set; else loopback in local mode, the driver's address
    (``spark.driver.host``) on a cluster, and for a Spark Connect client the address of its own
    interface toward the Connect server (loopback when the server runs on this machine)."""
    from ._classic import connect_client_address, is_connect

    setting = spark.conf.get(SERVER_HOST, "") or ""
    if setting:
        return setting
    if is_connect(spark):
        return connect_client_address(spark)
    if is_local(spark):
        return "127.0.0.1"
    return spark.conf.get("spark.driver.host", "127.0.0.1") or "127.0.0.1"


SERVER_PLACEMENT = "spark.kerasonspark.serverPlacement"
_PLACEMENTS = ("client", "stage")


def server_placement(spark: SparkSession) -> str:
    """Where the parameter server of a served engine lives: ``"client"`` (the default: the
    driver, or the Spark Connect client, serves at :func:`server_host`) or ``"stage"`` (task 0 of
    the training stage serves and steers, for a client the executors cannot reach), from
    ``spark.kerasonspark.serverPlacement``.

    Raises:
        ConfigurationError: the setting names neither.
    """
    value = (spark.conf.get(SERVER_PLACEMENT, "client") or "client").strip().lower()
    if value not in _PLACEMENTS:
        raise ConfigurationError(
            f"`{SERVER_PLACEMENT}` must be one of {', '.join(map(repr, _PLACEMENTS))}. "
            f"Received: {value!r}."
        )
    return value


SERVER_PORT = "spark.kerasonspark.serverPort"


def server_port(spark: SparkSession) -> int:
    """The port the driver's parameter server listens on: ``spark.kerasonspark.serverPort`` (a
    fixed one a firewall or a container can open), or 0 for any free port (the default).

    Raises:
        ConfigurationError: the setting is not a port number.
    """
    value = spark.conf.get(SERVER_PORT, "0") or "0"
    if not value.isdigit() or int(value) > 65535:
        raise ConfigurationError(
            f"`{SERVER_PORT}` must be a port number (0 for any free one). Received: {value!r}."
        )
    return int(value)


ALLOW_CLEARTEXT_WEIGHTS = "spark.kerasonspark.allowCleartextWeights"
_ENCRYPTION_SETTINGS = ("spark.ssl.enabled", "spark.network.crypto.enabled")


def check_weights_privacy(conf: Mapping[str, str], server_host: str) -> None:
    """Refuse to send weights over plain HTTP beside a cluster that encrypts its own traffic.

    The parameter server authenticates every request but does not encrypt it. On loopback that
    is private; across a network whose Spark traffic is encrypted (``spark.ssl.enabled`` or
    ``spark.network.crypto.enabled``), cleartext weights would be the one thing left readable.

    Args:
        conf: the session's Spark configuration (``spark.conf.getAll``).
        server_host: the address the parameter server will bind.

    Raises:
        ConfigurationError: encryption is on, the server is not on loopback, and
            ``spark.kerasonspark.allowCleartextWeights`` is not ``true``.
    """
    encrypted = [key for key in _ENCRYPTION_SETTINGS if conf.get(key, "false").lower() == "true"]
    if (
        encrypted
        and not is_loopback(server_host)
        and conf.get(ALLOW_CLEARTEXT_WEIGHTS, "false").lower() != "true"
    ):
        raise ConfigurationError(
            f"This cluster encrypts Spark's traffic ({', '.join(encrypted)}), but the parameter "
            f"server at {server_host} sends weights in cleartext HTTP. Set "
            f"`{ALLOW_CLEARTEXT_WEIGHTS}=true` to accept that, or run the driver and workers on a "
            "private network."
        )


def task_slots(spark: SparkSession) -> int:
    """Tasks the cluster's registered executors can run at once, as Spark counts them for a barrier
    stage (see :func:`kerasonspark._classic.task_slots`)."""
    from ._classic import task_slots as slots

    return slots(spark)


def check_slots(spark: SparkSession, num_workers: int, registration_timeout: float = 30.0) -> None:
    """Refuse to submit a barrier stage that could never be scheduled.

    On a cluster, executors register a few seconds after the session starts, so this waits up
    to ``registration_timeout`` seconds for enough of them before refusing.

    Raises:
        ConfigurationError: fewer task slots than workers (a barrier stage would wait forever).
    """
    slots = task_slots(spark)
    deadline = time.monotonic() + (0 if is_local(spark) else registration_timeout)
    while num_workers > slots and time.monotonic() < deadline:
        time.sleep(0.5)
        slots = task_slots(spark)
    if num_workers > slots:
        waited = (
            ""
            if is_local(spark)
            else f" after waiting {registration_timeout:.0f} s (`registration_timeout`)"
        )
        raise ConfigurationError(
            f"`num_workers={num_workers}` needs {num_workers} task slots at once (training runs "
            f"as one barrier stage), but master {master(spark)!r} offers {slots}{waited}. Use "
            f"num_workers <= {slots} or add executor cores."
        )
