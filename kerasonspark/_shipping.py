"""Driver side: make sure the executors can run kerasonspark, shipping the package when they cannot.

A cluster's executors often run a Python that has TensorFlow and Keras but not this package (a
shared image, a notebook's driver with a fresh ``pip install``). Before the first job of an
application, one tiny job asks an executor which of the modules a worker needs it can find. When
only ``kerasonspark`` is missing, the driver zips the package it runs (``kerasonspark`` and the
engines of ``kerasonspark.backends``), names the zip after a hash of its contents (so an editable
install never ships stale code), and adds it to the session's Python path
(:func:`kerasonspark._classic.add_py_file`). What the package
itself needs (TensorFlow, Keras, NumPy, PyArrow) cannot be shipped this way: a missing one is an
error that names it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import tempfile
import zipfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._classic import add_py_file
from ._errors import SparkEnvironmentError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

logger = logging.getLogger(__name__)

# What a worker imports: this package, and what it needs already installed on the executors.
PACKAGE = "kerasonspark"
REQUIRED = ("tensorflow", "keras", "numpy", "pyarrow")
# applications whose executors were checked (and given the package if needed)
_READY: set[str] = set()


# The check must run where kerasonspark is absent: its function is made from this source in a
# namespace of no importable module, so Spark's cloudpickle sends it by value, with nothing of
# kerasonspark's.
_PROBE_SOURCE = """
def probe(modules, batches):
    import importlib.util

    import pyarrow as pa

    for _ in batches:
        pass
    found = [importlib.util.find_spec(name) is not None for name in modules]
    yield pa.RecordBatch.from_arrays(
        [pa.array(list(modules)), pa.array(found)], names=["module", "found"]
    )
"""


def executors_lack(spark: SparkSession, modules: tuple[str, ...]) -> list[str]:
    """The ``modules`` an executor's Python cannot find (one task, which imports nothing)."""
    namespace: dict[str, Any] = {"__name__": "kerasonspark_executor_probe"}
    exec(compile(_PROBE_SOURCE, "<kerasonspark executor probe>", "exec"), namespace)
    found = (
        spark.range(1, numPartitions=1)
        .mapInArrow(partial(namespace["probe"], modules), "module string, found boolean")
        .collect()
    )
    return [row.module for row in found if not row.found]


def package_zip(folder: str | Path | None = None) -> Path:
    """The running kerasonspark (with its engines) as a zip named after a hash of its contents."""
    # The engines may live apart from the core (an editable install maps backends/ there).
    roots = {
        PACKAGE: Path(importlib.import_module(PACKAGE).__file__ or "").parent,
        f"{PACKAGE}/backends": Path(importlib.import_module(f"{PACKAGE}.backends").__path__[0]),
    }
    files = {}
    for prefix, root in roots.items():
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            # taken from their own root
            nested_engines = prefix == PACKAGE and relative.parts[0] == "backends"
            if path.is_file() and "__pycache__" not in relative.parts and not nested_engines:
                files[f"{prefix}/{relative.as_posix()}"] = path.read_bytes()
    digest = hashlib.sha256()
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    target = (
        Path(folder or Path(tempfile.gettempdir()) / "kerasonspark-ship")
        / f"kerasonspark-{digest.hexdigest()[:16]}.zip"
    )
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".zip.part")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in sorted(files.items()):
                archive.writestr(name, data)
        partial.replace(target)
    return target


def ensure_executors_ready(spark: SparkSession) -> None:
    """Check once per application that executors can run kerasonspark; ship it if only it is
    missing.

    Raises:
        SparkEnvironmentError: the executors' Python lacks a module kerasonspark needs.
    """
    application = spark.conf.get("spark.app.id", "") or ""
    if application in _READY:
        return
    missing = executors_lack(spark, (PACKAGE, *REQUIRED))
    required = [name for name in missing if name != PACKAGE]
    if required:
        raise SparkEnvironmentError(
            f"The executors' Python cannot import {', '.join(required)}, which kerasonspark needs "
            "there. Install them in the executors' environment (the same versions as the "
            "driver's), or point `spark.pyspark.python` at a Python that has them."
        )
    if missing:
        archive = package_zip()
        add_py_file(spark, archive)
        logger.info("The executors cannot import kerasonspark: shipped %s to them", archive.name)
    _READY.add(application)
