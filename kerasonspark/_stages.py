"""Spark stages over DataFrames of blocks: the one way every pass over the data runs, on a classic
session and over Spark Connect alike.

Prepared data is a DataFrame with one row per block (:data:`BLOCK_SCHEMA`: the arrays' raw bytes
and their layout). :func:`run_on_partitions` runs a Python function on each partition's blocks
through ``mapInArrow`` (as a barrier stage for training) and brings its results back to the
driver as one binary column, so no pass needs an RDD or the SparkContext.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

Block = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]
"""Features, labels and sample weights (or ``None``) of a run of rows."""

BLOCK_SCHEMA = "x binary, y binary, n long, ydtype string, ywidth int, w binary"
_RESULT_SCHEMA = "result binary"


def encode_block(x: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> Any:
    """A block as one Arrow row of :data:`BLOCK_SCHEMA` (features float32, labels as they are)."""
    import pyarrow as pa

    x = np.ascontiguousarray(x, np.float32)
    y = np.ascontiguousarray(y)
    return pa.RecordBatch.from_arrays(
        [
            pa.array([x.tobytes()], pa.binary()),
            pa.array([y.tobytes()], pa.binary()),
            pa.array([len(x)], pa.int64()),
            pa.array([str(y.dtype)]),
            pa.array([y.shape[1] if y.ndim == 2 else 0], pa.int32()),
            pa.array(
                [np.ascontiguousarray(w, np.float32).tobytes() if w is not None else None],
                pa.binary(),
            ),
        ],
        names=["x", "y", "n", "ydtype", "ywidth", "w"],
    )


def decode_block(row: Any, input_shape: tuple[int, ...]) -> Block:
    """A row of :data:`BLOCK_SCHEMA` (a Spark ``Row``, a dict, or a row of an Arrow batch) as its
    ``(x, y, w)`` arrays."""
    get: Callable[[str], Any] = row.get if isinstance(row, dict) else row.__getitem__
    n, width = get("n"), get("ywidth")
    x = np.frombuffer(get("x"), dtype=np.float32).reshape((n, *input_shape))
    y = np.frombuffer(get("y"), dtype=get("ydtype"))
    weights = get("w")
    w = np.frombuffer(weights, dtype=np.float32) if weights is not None else None
    return x, (y.reshape(n, width) if width else y), w


class _BatchRow:
    """Row ``i`` of an Arrow batch of blocks, read as :func:`decode_block` reads a row: the
    binary columns as Arrow buffers, not copies (the arrays are views of the batch's memory)."""

    def __init__(self, batch: Any, i: int) -> None:
        self.batch, self.i = batch, i

    def __getitem__(self, name: str) -> Any:
        value = self.batch.column(name)[self.i]
        if not value.is_valid:
            return None
        return value.as_buffer() if name in ("x", "y", "w") else value.as_py()


def decode_batches(batches: Iterable[Any], input_shape: tuple[int, ...]) -> Iterator[Block]:
    """The blocks of a partition's Arrow batches, one at a time."""
    for batch in batches:
        for i in range(batch.num_rows):
            yield decode_block(_BatchRow(batch, i), input_shape)


def decode_held_out(
    batches: Iterable[Any], input_shape: tuple[int, ...]
) -> Iterator[tuple[bool, Block]]:
    """The blocks of a partition of training and validation blocks (see
    :func:`kerasonspark._classic.to_partitions`), each as ``(held_out, block)``."""
    for batch in batches:
        for i in range(batch.num_rows):
            row = _BatchRow(batch, i)
            yield row["held_out"], decode_block(row, input_shape)


def _results_of(
    body: Callable[[Iterator[Any]], Iterable[Any]],
    input_shape: tuple[int, ...],
    held_out: bool,
    batches: Iterator[Any],
) -> Iterator[Any]:
    import pyarrow as pa
    from pyspark import cloudpickle

    decode = decode_held_out if held_out else decode_batches
    for result in body(decode(batches, input_shape)):
        yield pa.RecordBatch.from_arrays(
            [pa.array([cloudpickle.dumps(result)], pa.binary())], names=["result"]
        )


def partition_stage(
    blocks: DataFrame,
    body: Callable[[Iterator[Any]], Iterable[Any]],
    input_shape: tuple[int, ...],
    barrier: bool = False,
    held_out: bool = False,
) -> DataFrame:
    """The stage that runs ``body`` on every partition's blocks (a task each), lazily: its
    ``collect()`` rows go to :func:`stage_results`.

    ``body`` runs on the executors (``TaskContext`` gives its partition); it must read its
    iterator to the end, as a Spark task reads its input. ``barrier`` runs the tasks as one
    barrier stage (all at once, ``BarrierTaskContext`` inside). With ``held_out`` the frame
    carries a ``held_out`` column and ``body`` gets ``(held_out, block)`` pairs.
    """
    return blocks.mapInArrow(
        partial(_results_of, body, input_shape, held_out), _RESULT_SCHEMA, barrier=barrier
    )


def stage_results(rows: list[Any]) -> list[Any]:
    """What the bodies of a :func:`partition_stage` yielded, from its collected rows."""
    import pickle

    return [pickle.loads(row.result) for row in rows]


def run_on_partitions(
    blocks: DataFrame,
    body: Callable[[Iterator[Any]], Iterable[Any]],
    input_shape: tuple[int, ...],
) -> list[Any]:
    """Run ``body`` on every partition's blocks (see :func:`partition_stage`) and return what the
    bodies yielded, partition by partition."""
    return stage_results(partition_stage(blocks, body, input_shape).collect())


def block_frame(
    blocks_of: Callable[[Iterator[Any]], Iterator[Block]], frame: DataFrame
) -> DataFrame:
    """``frame`` turned into a DataFrame of blocks by ``blocks_of``, which reads each partition's
    Arrow batches and yields its ``(x, y, w)`` blocks on the executors."""
    return frame.mapInArrow(partial(_encoded, blocks_of), BLOCK_SCHEMA)


def _encoded(blocks_of: Callable[[Iterator[Any]], Iterator[Block]], batches: Iterator[Any]):
    for x, y, w in blocks_of(batches):
        yield encode_block(x, y, w)
