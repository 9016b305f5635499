"""The one seam between a classic Spark session and Spark Connect.

Everything else in kerasonspark speaks DataFrames (:mod:`kerasonspark._stages`), which both kinds
of session serve. What only a classic session has (its SparkContext: broadcasts, RDDs) is used
here and only here, where it is measurably better, with the Connect way beside it:

- a value every task reads (the model, validation arrays): a broadcast on a classic session,
  inside the task's closure over Connect (:func:`share`);
- NumPy training data: one broadcast per partition on a classic session (the rows never sit in a
  task or in the plan), one Arrow file per partition uploaded by the client as a session artifact
  over Connect (:func:`numpy_block_frame`, :func:`uploaded_frame`);
- an RDD given as input, and an RDD of blocks handed to another Spark library (Elephas; refused
  over Connect, :func:`require_rdds`);
- the session's services: task slots (Spark's own count, or the configuration's cores), job
  groups and tags that stop a block's jobs from any thread (a Connect server names a client's
  jobs itself), shipping a zip of Python code
  (``addPyFile`` or ``addArtifacts``), and the address a Connect client is reached at.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import ConfigurationError
from ._stages import BLOCK_SCHEMA, Block, decode_block, encode_block

if TYPE_CHECKING:
    from pyspark import RDD
    from pyspark.sql import DataFrame, SparkSession


def is_connect(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect session (a client, with no SparkContext)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def connect_client_address(spark: SparkSession) -> str:
    """This client's address on the interface it reaches its Spark Connect server through (the
    route the kernel picks; no packet is sent): where executors beside the server can reach it."""
    import socket

    host = spark.client.host  # a Connect session
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return str(probe.getsockname()[0])


@dataclass
class Inline:
    """A value that travels inside each task's closure: what :func:`share` gives over Connect,
    where there are no broadcasts. Read and released like a broadcast."""

    value: Any

    def destroy(self) -> None:
        """Nothing to release: the value lives in the stage's closure."""


def share(spark: SparkSession, value: Any) -> Any:
    """``value`` for every task of the stages to come, read as ``.value`` there and released by
    ``.destroy()``: a broadcast on a classic session (it travels once per executor, by Spark's
    block manager), the value itself over Connect (once per task, in its closure)."""
    if is_connect(spark):
        return Inline(value)
    return spark.sparkContext.broadcast(value)


def numpy_block_frame(spark: SparkSession, parts: list[list[Block]]) -> DataFrame:
    """A DataFrame of blocks with partition ``i`` holding ``parts[i]``, in order.

    On a classic session each partition's blocks travel as one broadcast, which its task reads
    (``createDataFrame`` would put 30 MB of MNIST in each task); :func:`release` destroys them.
    Over Connect each partition's blocks travel as one file (:func:`uploaded_frame`).
    """
    import pyarrow as pa

    if is_connect(spark):
        schema = encode_block(np.zeros((0, 1), np.float32), np.zeros(0), None).schema
        tables = [
            pa.Table.from_batches([encode_block(*block) for block in blocks], schema)
            for blocks in parts
        ]
        return uploaded_frame(spark, tables, BLOCK_SCHEMA)
    sc = spark.sparkContext
    shares = [sc.broadcast(blocks) for blocks in parts]
    frame = spark.range(len(parts), numPartitions=len(parts)).mapInArrow(
        partial(_shared_blocks, shares), BLOCK_SCHEMA
    )
    frame._kerasonspark_shares = shares  # type: ignore[attr-defined]
    return frame


def _shared_blocks(shares: list[Any], batches: Iterator[Any]) -> Iterator[Any]:
    for batch in batches:
        for part in batch.column(0).to_pylist():
            for block in shares[part].value:
                yield encode_block(*block)


def release(frame: DataFrame) -> None:
    """Destroy the broadcasts behind a frame of :func:`numpy_block_frame`, if any."""
    # vars(): a Connect frame answers any attribute it lacks with a column
    for shared in vars(frame).get("_kerasonspark_shares", []):
        shared.destroy()


def to_partitions(frame: DataFrame, column: str, partitions: int) -> DataFrame:
    """``frame``'s rows moved so that those whose ``column`` is ``i`` make partition ``i`` (for
    ``i < partitions``), kept in the order of its ``order`` column (dropped).

    ``repartition(n, key)`` places a row at ``pmod(hash(key), n)``; each ``i`` gets a key that
    Spark's own hash sends to ``i``, found by a small query.
    """
    from pyspark.sql import functions as F

    spark = frame.sparkSession
    keys: dict[int, int] = {}
    candidates = 0
    while len(keys) < partitions:
        candidates += 64 * partitions
        found = (
            spark.range(candidates)
            .select("id", F.expr(f"pmod(hash(id), {partitions})").alias("bucket"))
            .groupBy("bucket")
            .agg(F.min("id").alias("id"))
            .collect()
        )
        keys = {int(row.bucket): int(row.id) for row in found}
    key = F.element_at(F.array(*(F.lit(keys[i]) for i in range(partitions))), F.col(column) + 1)
    return frame.repartition(partitions, key).sortWithinPartitions("order").drop("order")


def arrow_frame(
    spark: SparkSession, parts: list[Any], schema: Any, rows_per_batch: int
) -> DataFrame:
    """A DataFrame of Arrow tables ``parts``, one partition each, rows in order, as ``schema``.

    On a classic session each part travels as one broadcast of Arrow IPC bytes, kept for the
    SparkContext's life (a DataFrame derived from it may outlive the Python object). Over Connect
    the client uploads the rows as one table and a shuffle places them (not
    :func:`uploaded_frame`: a DataFrame the caller builds on would start in a Python stage of its
    own, a second Python worker per task beside the caller's; a test's fits and evaluations from
    such frames took twice as long).
    """
    from pyspark.sql.pandas.types import from_arrow_schema

    if is_connect(spark):
        import pyarrow as pa

        tagged = [
            part.cast(schema).append_column("worker", pa.array([i] * len(part), pa.int32()))
            for i, part in enumerate(parts)
        ]
        table = pa.concat_tables(tagged)
        frame = spark.createDataFrame(
            table.append_column("order", pa.array(range(len(table)), pa.int64()))
        )
        return to_partitions(frame, "worker", len(parts)).drop("worker")
    sc = spark.sparkContext
    shares = [sc.broadcast(_arrow_ipc(part, schema, rows_per_batch)) for part in parts]
    if id(sc) not in _KEPT_BROADCASTS:
        _KEPT_BROADCASTS.clear()  # one SparkContext per process: the old one's are gone with it
    _KEPT_BROADCASTS.setdefault(id(sc), []).extend(shares)
    return spark.range(len(parts), numPartitions=len(parts)).mapInArrow(
        partial(_shared_rows, shares), from_arrow_schema(schema)
    )


def uploaded_frame(spark: SparkSession, tables: list[Any], schema: Any) -> DataFrame:
    """A DataFrame of Arrow tables ``tables``, one partition each, rows in order, over Spark
    Connect: each table travels as one compressed Arrow file, a session artifact
    (``addArtifacts(..., file=True)``), which the partition's task reads.

    Why files, not ``createDataFrame``: an uploaded table is a local relation on the server's
    driver, converted to rows again by every request whose plan holds it, and sent to the tasks
    inside their closures; placing its rows by partition takes a shuffle. A file reaches each
    executor once, through Spark's file server (again to a new executor, so a lost one recomputes
    its part), and LZ4 shrinks what crosses the client's link. The files stay with the session.
    """
    import shutil
    import tempfile
    import uuid

    import pyarrow as pa

    run = uuid.uuid4().hex[:12]
    folder = tempfile.mkdtemp(prefix="kerasonspark-upload-")
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    names = [f"kerasonspark-{run}-{i}.arrow" for i in range(len(tables))]
    try:
        paths = [os.path.join(folder, name) for name in names]
        for table, path in zip(tables, paths, strict=True):
            with (
                pa.OSFile(path, "wb") as sink,
                pa.ipc.new_file(sink, table.schema, options=options) as out,
            ):
                out.write_table(table)
        spark.addArtifacts(*paths, file=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return spark.range(len(names), numPartitions=len(names)).mapInArrow(
        partial(_uploaded_rows, names), schema
    )


def _uploaded_rows(names: list[str], batches: Iterator[Any]) -> Iterator[Any]:
    import pyarrow as pa
    from pyspark import SparkFiles

    for batch in batches:
        for part in batch.column(0).to_pylist():
            with pa.memory_map(SparkFiles.get(names[part])) as source:
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)


# The broadcasts behind arrow_frame's DataFrames, by SparkContext.
_KEPT_BROADCASTS: dict[int, list[Any]] = {}


def _arrow_ipc(table: Any, schema: Any, rows_per_batch: int) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in table.combine_chunks().to_batches(max_chunksize=rows_per_batch):
            writer.write_batch(batch.cast(schema))
    return sink.getvalue().to_pybytes()


def _shared_rows(shares: list[Any], batches: Iterator[Any]) -> Iterator[Any]:
    import pyarrow as pa

    for batch in batches:
        for part in batch.column(0).to_pylist():
            yield from pa.ipc.open_stream(shares[part].value)


def default_parallelism(spark: SparkSession) -> int:
    """The partitions Spark gives data without a count of its own: the SparkContext's
    ``defaultParallelism``, or over Connect ``spark.default.parallelism`` where it is set, else
    the partitions of ``spark.range`` (which Spark sizes by that same default)."""
    if not is_connect(spark):
        return spark.sparkContext.defaultParallelism
    setting = spark.conf.get("spark.default.parallelism", None)
    if setting:
        return int(setting)
    from pyspark.sql import functions as F

    return spark.range(1 << 16).select(F.spark_partition_id()).distinct().count()


@contextlib.contextmanager
def job_description(
    spark: SparkSession, group: str, description: str, tag: str | None = None
) -> Iterator[None]:
    """On a classic session, the thread's Spark jobs inside the block in job group ``group``,
    described by ``description`` (the thread's previous group and description come back
    afterwards). A Connect server names a client's jobs itself: nothing to do there.

    ``tag`` marks the block's jobs for :func:`interrupt_jobs`: a SparkContext job tag on a classic
    session, a session tag over Connect."""
    if is_connect(spark):
        if tag is not None:
            spark.addTag(tag)
        try:
            yield
        finally:
            if tag is not None:
                spark.removeTag(tag)
        return
    sc = spark.sparkContext
    keys = ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel")
    saved = {key: sc.getLocalProperty(key) for key in keys}
    sc.setJobGroup(group, description, interruptOnCancel=True)
    if tag is not None:
        sc.addJobTag(tag)
    try:
        yield
    finally:
        if tag is not None:
            sc.removeJobTag(tag)
        for key, value in saved.items():
            sc.setLocalProperty(key, value)  # type: ignore[arg-type]  # None removes the property


def interrupt_jobs(spark: SparkSession, tag: str) -> None:
    """Stop the running jobs of a :func:`job_description` block tagged ``tag``, from any thread.

    A classic session keeps its session tags per JVM thread: ``spark.interruptTag`` from another
    thread (or from this one after Ctrl-C, which makes Py4J open a new connection, so a new JVM
    thread) finds nothing. The SparkContext's job tags are global; over Connect the server
    interrupts the client session's operations with the tag."""
    if is_connect(spark):
        spark.interruptTag(tag)
    else:
        spark.sparkContext.cancelJobsWithTag(tag)


def task_slots(spark: SparkSession) -> int:
    """Tasks the cluster's registered executors can run at once, as Spark counts them for a barrier
    stage.

    On a classic session, Spark's own count (``maxNumConcurrentTasks``) follows executors as
    they come and go; ``defaultParallelism`` does not (it never drops below 2). A Connect client
    cannot ask: it counts the cores the configuration gives (``local[N]``, or executor instances
    times their cores), divided by ``spark.task.cpus``; Spark's own barrier check still refuses
    a stage the cluster cannot hold.
    """
    per_task = max(int(spark.conf.get("spark.task.cpus", "1") or "1"), 1)
    if not is_connect(spark):
        sc = spark.sparkContext
        try:
            jsc = sc._jsc.sc()
            profile = jsc.resourceProfileManager().defaultResourceProfile()
            return int(jsc.maxNumConcurrentTasks(profile))
        except Exception:  # a Spark without the method: the documented, coarser count
            return sc.defaultParallelism // per_task
    url = spark.conf.get("spark.master", "") or ""
    if url.startswith("local"):
        inside = url.partition("[")[2].partition("]")[0].split(",")[0] or "1"
        cores = (os.cpu_count() or 1) if inside == "*" else int(inside)
    else:
        instances = int(spark.conf.get("spark.executor.instances", "0") or "0")
        cores = instances * int(spark.conf.get("spark.executor.cores", "1") or "1")
        if not cores:  # a standalone cluster gives what it has: let Spark's check decide
            return 1 << 30
    return cores // per_task


def add_py_file(spark: SparkSession, archive: str | os.PathLike) -> None:
    """Put a zip of Python modules on the executors' path for this session: ``addPyFile`` on a
    classic session, ``addArtifacts(..., pyfile=True)`` over Connect."""
    if is_connect(spark):
        spark.addArtifacts(os.fspath(archive), pyfile=True)
    else:
        spark.sparkContext.addPyFile(os.fspath(archive))


def partition_count(frame: DataFrame) -> int | None:
    """``frame``'s number of partitions, where the session can tell without a job (classic)."""
    if is_connect(frame.sparkSession):
        return None
    return frame.rdd.getNumPartitions()


def is_rdd(data: Any) -> bool:
    """Whether ``data`` is an RDD (classic input only: a Connect client has none)."""
    from pyspark import RDD

    return isinstance(data, RDD)


def rdd_session(rdd: RDD) -> SparkSession:
    """The session of an RDD's SparkContext (the active one, or a new one on that context)."""
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession() or SparkSession(rdd.context)


def rdd_feature_frame(rdd: RDD, column: str) -> DataFrame:
    """An RDD of feature vectors (or ``(features, label)`` pairs) as a DataFrame of one
    ``array<double>`` column ``column``."""
    import numpy as np

    return rdd.map(
        lambda r: ([float(v) for v in np.asarray(r[0] if isinstance(r, tuple) else r).ravel()],)
    ).toDF([column])


def rdd_block_frame(spark: SparkSession, rdd: RDD, blocks_of: Any) -> DataFrame:
    """An RDD of ``(features, label)`` rows as a DataFrame of blocks (``blocks_of`` reads a
    partition's rows), partitions kept."""

    def rows(items: Iterable[Any]) -> Iterator[tuple]:
        for x, y, w in blocks_of(items):
            yield tuple(encode_block(x, y, w).to_pylist()[0].values())

    return spark.createDataFrame(rdd.mapPartitions(rows), BLOCK_SCHEMA)


def require_rdds(spark: SparkSession, engine: str = "This engine") -> None:
    """Refuse an engine that hands the data to a Spark library as an RDD on a Spark Connect
    session, which has none.

    Raises:
        ConfigurationError: ``spark`` is a Connect client.
    """
    if is_connect(spark):
        raise ConfigurationError(
            f"{engine} hands the data to a Spark library as an RDD, and a Spark Connect "
            "session has no RDDs (no SparkContext). Use a classic session "
            "(SparkSession.builder.master(...)), or an engine that runs over Connect: sync, "
            "async, hogwild or single."
        )


def training_rdd(blocks: DataFrame, input_shape: tuple[int, ...]) -> RDD:
    """A DataFrame of blocks as an RDD of ``(x, y, w)`` blocks, partitions kept, for a Spark
    library that takes RDDs.

    Raises:
        ConfigurationError: the session is a Spark Connect client, which has no RDDs.
    """
    require_rdds(blocks.sparkSession)
    return blocks.rdd.map(partial(decode_block, input_shape=input_shape))
