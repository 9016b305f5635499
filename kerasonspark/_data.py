"""Training data to partitions of float32 NumPy blocks, validated before training starts.

Input may be a Spark DataFrame (a feature column of array<float|double> or ML Vector and a
numeric label column, or an array column of one-hot labels, and optionally a sample-weight column),
an RDD of ``(features, label)``, or NumPy ``(x, y)`` (with optional sample weights). DataFrames
travel through Arrow (``mapInArrow``), never row by row. Every kind ends as a DataFrame of blocks
(:data:`kerasonspark._stages.BLOCK_SCHEMA`, a row each) ``(x, y, w)``: ``x`` float32 of shape
``(rows, *input_shape)``, ``y`` the raw labels (1-D values or 2-D one-hot), ``w`` the float32
sample weights or ``None``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _classic as classic
from ._errors import ConfigurationError, DataError
from ._serialization import is_custom_loss, loss_name
from ._stages import BLOCK_SCHEMA, Block, decode_block, encode_block, run_on_partitions

if TYPE_CHECKING:
    import keras
    from pyspark.sql import Column, DataFrame, SparkSession

logger = logging.getLogger(__name__)

BLOCK_ROWS = 4096
_SPARSE_LOSSES = {
    "sparse_categorical_crossentropy",
    "sparsecategoricalcrossentropy",
    "sparse_categorical_focal_crossentropy",
}
_ONE_HOT_LOSSES = {
    "categorical_crossentropy",
    "categoricalcrossentropy",
    "categorical_focal_crossentropy",
    "kl_divergence",
    "kldivergence",
    "categorical_hinge",
    "categoricalhinge",
}


@dataclass(frozen=True)
class DataInfo:
    """What a model expects of its data.

    A model with several inputs takes one feature array per input; they travel packed side by
    side in one float32 row (``inputs`` says how to split it). A model with several outputs takes
    one label per output; they travel packed the same way, each already as its output's loss
    takes it (``outputs`` holds each output's own ``DataInfo``).

    Attributes:
        input_shape: one sample's shape, e.g. ``(28, 28, 1)`` (several inputs: the packed width).
        label_mode: ``"sparse"`` (class indices), ``"one_hot"``, ``"raw"`` (targets shaped like
            the output), ``"given"`` (a loss of the user's own: labels as given), or ``"packed"``
            (several outputs).
        num_classes: the output width for classification losses, else ``None``.
        target_shape: one label's shape: the model's output shape for ``"raw"``, the data's for
            ``"given"``, the packed width for ``"packed"``.
        label_dtype: the labels' dtype for ``"given"`` (``int32`` for integer labels).
        inputs: for several inputs, each input's name and shape in the order of ``model.inputs``;
            empty for one input.
        outputs: for several outputs, each output's name and ``DataInfo`` in the order of
            ``model.output_names``; empty for one output.
        named: whether the model takes its inputs as a dict by name (else a list).
    """

    input_shape: tuple[int, ...]
    label_mode: str
    num_classes: int | None
    target_shape: tuple[int, ...] = ()
    label_dtype: str = "float32"
    inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()
    outputs: tuple[tuple[str, DataInfo], ...] = ()
    named: bool = False

    @property
    def label_shape(self) -> tuple[int, ...]:
        """One label's shape as the model trains on it (several outputs: the packed width)."""
        if self.label_mode == "one_hot":
            return (self.classes,)
        return self.target_shape if self.label_mode in ("raw", "given", "packed") else ()

    @property
    def classes(self) -> int:
        """The number of classes (classification models only)."""
        if self.num_classes is None:
            raise ValueError(f"A model with label mode {self.label_mode!r} has no classes.")
        return self.num_classes

    @property
    def feature_size(self) -> int:
        return math.prod(self.input_shape)

    @property
    def label_size(self) -> int:
        """Values of one label as the model trains on it."""
        return math.prod(self.label_shape)

    @classmethod
    def for_model(cls, model: keras.Model, compile_config: dict[str, Any] | None) -> DataInfo:
        """Read the input shapes and label conventions off a built, compiled model.

        Keras's classification losses get class indices or one-hot labels converted to what they
        take; Keras's other losses get targets shaped like the model's output. A loss Keras does
        not ship (a user's own) gets the labels as the user gave them, as ``model.fit`` would (of a
        model with several outputs, targets shaped like that output).

        Raises:
            DataError: an input or output with unknown dimensions.
        """
        if getattr(model, "inputs", None) and getattr(model, "outputs", None):
            shapes = [tuple(t.shape) for t in model.inputs]
            outputs = [tuple(t.shape) for t in model.outputs]
        else:  # a subclassed model, built by calling it
            shapes, outputs = [tuple(model.input_shape)], [tuple(model.output_shape)]
        for what, shape in [*(("input", s) for s in shapes), *(("output", s) for s in outputs)]:
            if any(d is None for d in shape[1:]):
                raise DataError(
                    f"The model's {what} shapes must be fully known except the batch. "
                    f"Received: {what} shape {shape}."
                )
        loss = (compile_config or {}).get("loss")
        if len(outputs) == 1:
            info = cls._one_output(tuple(int(d) for d in shapes[0][1:]), outputs[0], compile_config)
        else:
            names = list(model.output_names)
            if isinstance(loss, (list, tuple)):
                losses = list(loss)
            # by output name, not one loss's config
            elif isinstance(loss, dict) and set(loss) <= set(names):
                losses = [loss.get(n) for n in names]
            else:
                losses = [loss] * len(names)  # one loss for every output, as Keras applies it
            per_output = []
            for name, shape, own in zip(names, outputs, losses, strict=True):
                one = cls._one_output((), shape, {"loss": own})
                if one.label_mode == "given":
                    one = cls((), "raw", None, tuple(int(d) for d in shape[1:]))
                per_output.append((name, one))
            width = sum(one.label_size for _, one in per_output)
            info = cls((), "packed", None, (width,), outputs=tuple(per_output))
        if len(shapes) > 1:
            try:
                named = isinstance(model.input, dict)
            except AttributeError:
                named = False
            inputs = tuple((t.name, tuple(int(d) for d in t.shape[1:])) for t in model.inputs)
            info = dataclasses.replace(
                info,
                input_shape=(sum(math.prod(s) for _, s in inputs),),
                inputs=inputs,
                named=named,
            )
        else:
            info = dataclasses.replace(info, input_shape=tuple(int(d) for d in shapes[0][1:]))
        return info

    @classmethod
    def _one_output(
        cls,
        input_shape: tuple[int, ...],
        out: tuple[Any, ...],
        compile_config: dict[str, Any] | None,
    ) -> DataInfo:
        if is_custom_loss(compile_config):
            return cls(input_shape, "given", None)
        name = loss_name(compile_config)
        width = out[-1] if len(out) > 1 else 1
        if name in _SPARSE_LOSSES:
            return cls(input_shape, "sparse", width)
        if name in _ONE_HOT_LOSSES:
            return cls(input_shape, "one_hot", width)
        return cls(input_shape, "raw", None, tuple(int(d) for d in out[1:]))

    def with_given_labels(self, width: int, integer: bool) -> DataInfo:
        """For a loss of the user's own: the labels' width (0 for one value) and kind, read off the
        data."""
        if self.label_mode != "given":
            return self
        return dataclasses.replace(
            self,
            target_shape=(width,) if width else (),
            label_dtype="int32" if integer else "float32",
        )

    def model_labels(self, y: np.ndarray) -> np.ndarray:
        """Labels as the model's loss wants them (indices for sparse, one-hot for categorical;
        several outputs: packed, as they travel)."""
        if self.label_mode == "sparse":
            return (y.argmax(axis=1) if y.ndim == 2 else y).astype(np.int32)
        if self.label_mode == "one_hot":
            if y.ndim == 1:
                return np.eye(self.classes, dtype=np.float32)[y.astype(np.int64)]
            return y.astype(np.float32, copy=False)
        if self.label_mode == "given":
            return y.astype(self.label_dtype, copy=False)
        return y.astype(np.float32, copy=False).reshape((len(y), *self.target_shape))

    def model_inputs(self, x: Any) -> Any:
        """Packed features (NumPy or a tensor) as the model takes them: itself for one input, one
        array per input (a list, or a dict by name) for several."""
        if not self.inputs:
            return x
        parts, start = [], 0
        for _, shape in self.inputs:
            size = math.prod(shape)
            parts.append(_reshaped(x[:, start : start + size], shape))
            start += size
        return (
            {name: part for (name, _), part in zip(self.inputs, parts, strict=True)}
            if self.named
            else parts
        )

    def model_targets(self, y: Any) -> Any:
        """Labels as :meth:`model_labels` made them (NumPy or a tensor), as the model's ``fit``
        takes them: itself for one output, one array per output (a list) for several."""
        if not self.outputs:
            return y
        parts, start = [], 0
        for _, one in self.outputs:
            size = one.label_size
            part = y[:, start : start + size]
            parts.append(
                _as_int32(part[:, 0])
                if one.label_mode == "sparse"
                else _reshaped(part, one.label_shape)
            )
            start += size
        return parts

    def pack_labels(self, ys: Any, where: str) -> np.ndarray:
        """One label array per output (raw, as a user gives them) as packed model labels.

        Raises:
            DataError: not one array per output, lengths differ, or an output's labels do not
                fit it (shape, NaN, a class out of range).
        """
        arrays = _per_name(ys, [name for name, _ in self.outputs], "labels", where)
        packed = []
        for (name, one), raw in zip(self.outputs, arrays, strict=True):
            labels = _as_labels(raw, f"{where} (output {name!r})")
            if len(labels) != len(arrays[0]):
                raise DataError(
                    f"The labels in {where} differ in length between outputs: "
                    f"{[len(a) for a in arrays]}."
                )
            check_label_shape(labels.shape, one, f"{where} (output {name!r})")
            raise_problems(
                [block_problems(np.zeros((len(labels), 0), np.float32), labels, one)],
                f"output {name!r}",
            )
            packed.append(one.model_labels(labels).astype(np.float32).reshape(len(labels), -1))
        return np.concatenate(packed, axis=1)

    def pack_features(self, xs: Any, where: str) -> np.ndarray:
        """One feature array per input as packed float32 rows.

        Raises:
            DataError: not one array per input, lengths differ, or an input's samples are the
                wrong size.
        """
        arrays = _per_name(xs, [name for name, _ in self.inputs], "feature arrays", where)
        parts = [
            as_features(raw, DataInfo(shape, "raw", None), f"{where} (input {name!r})").reshape(
                len(raw), -1
            )
            for (name, shape), raw in zip(self.inputs, arrays, strict=True)
        ]
        if len({len(p) for p in parts}) > 1:
            raise DataError(f"The inputs in {where} differ in length: {[len(p) for p in parts]}.")
        return np.concatenate(parts, axis=1)


def _per_name(values: Any, names: list[str], what: str, where: str) -> list[Any]:
    """A list or a dict by name of one array per name, as a list in ``names``' order."""
    if isinstance(values, Mapping):
        missing = [n for n in names if n not in values]
        if missing:
            raise DataError(f"The {what} in {where} lack {missing}; the model's are {names}.")
        return [values[n] for n in names]
    if not isinstance(values, (list, tuple)) or len(values) != len(names):
        count = len(values) if isinstance(values, (list, tuple)) else 1
        raise DataError(
            f"The model has {len(names)} {'inputs' if what.startswith('feature') else 'outputs'} "
            f"{names}; pass {what} in {where} as a list of {len(names)} in that order (or a dict "
            f"by name). Received: {count}."
        )
    return list(values)


def _reshaped(part: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(part, np.ndarray):
        return part.reshape((len(part), *shape))
    import tensorflow as tf

    return tf.reshape(part, (-1, *shape))


def _as_int32(part: Any) -> Any:
    if isinstance(part, np.ndarray):
        return part.astype(np.int32)
    import tensorflow as tf

    return tf.cast(part, tf.int32)


@dataclass
class PreparedData:
    """Validated training data: one partition of blocks per worker, persisted.

    Attributes:
        blocks: a DataFrame of ``(x, y, w)`` blocks (:data:`kerasonspark._stages.BLOCK_SCHEMA`).
        counts: rows per partition.
        label_width: the labels' width (0 for one value per row).
        integer_labels: whether every label column came as integers.
        partition_bytes: each partition's size as NumPy arrays.
        memory_budget: the least memory a worker may hold its partition in, as the executors
            measured it (see :func:`worker_memory_budget`).
    """

    blocks: DataFrame
    counts: list[int]
    label_width: int = 0
    integer_labels: bool = False
    partition_bytes: list[int] = dataclasses.field(default_factory=list)
    memory_budget: int | None = None

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def streams(self, partition_storage: str) -> bool:
        """Whether workers should stream their partitions (``"stream"``, or ``"auto"`` and the
        largest partition is bigger than the smallest worker's memory budget)."""
        if partition_storage != "auto":
            return partition_storage == "stream"
        return (
            self.memory_budget is not None
            and max(self.partition_bytes, default=0) > self.memory_budget
        )

    def release(self) -> None:
        """Drop the cached partitions (and the broadcasts of NumPy input)."""
        release_blocks(self.blocks)


# -- per-block checks, shared by the driver (NumPy input) and the executors ---------------------
def block_problems(
    x: np.ndarray, y: np.ndarray, info: DataInfo, w: np.ndarray | None = None
) -> dict[str, int]:
    """Count the rows of one block that cannot be trained on, by reason."""
    problems = {
        "nonfinite_rows": 0,
        "label_out_of_range": 0,
        "label_not_integer": 0,
        "bad_weights": 0,
    }
    if len(x) == 0:
        return problems
    if w is not None:
        problems["bad_weights"] = int((~np.isfinite(w) | (w < 0)).sum())
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if np.issubdtype(y.dtype, np.floating):
        bad |= ~np.isfinite(y.reshape(len(y), -1)).all(axis=1)
    problems["nonfinite_rows"] = int(bad.sum())
    if info.label_mode in ("sparse", "one_hot") and y.ndim == 1:
        finite = y[np.isfinite(y)] if np.issubdtype(y.dtype, np.floating) else y
        problems["label_not_integer"] = int((finite != np.floor(finite)).sum())
        problems["label_out_of_range"] = int(((finite < 0) | (finite >= info.num_classes)).sum())
    return problems


def check_label_shape(y_shape: tuple[int, ...], info: DataInfo, where: str) -> None:
    """Raise when labels do not match the model's output (width for classes, size for targets)."""
    if info.label_mode == "given":
        return
    if info.label_mode in ("raw", "packed"):
        size = math.prod(y_shape[1:])
        if size != math.prod(info.target_shape):
            raise DataError(
                f"Targets in {where} should have {math.prod(info.target_shape)} value(s) each to "
                f"match the model's output shape {info.target_shape}. Received: targets of shape "
                f"{y_shape}."
            )
        return
    if len(y_shape) == 1:
        return
    if len(y_shape) != 2 or y_shape[1] != info.num_classes:
        raise DataError(
            f"Labels in {where} should be class indices or one-hot vectors of width "
            f"{info.num_classes} (the model's output). Received: labels of shape {y_shape}."
        )


def as_features(x: Any, info: DataInfo, where: str) -> np.ndarray:
    """``x`` as float32 samples of the model's input shape (any numeric array of the right size).

    Raises:
        DataError: ``x`` is not numeric, holds no samples, or its samples are the wrong size.
    """
    x = np.asarray(x)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(
            f"{where[0].upper() + where[1:]} must be numeric. Received: dtype={x.dtype}."
        )
    rows = x.shape[0] if x.ndim else 0
    if x.ndim and rows == 0:
        raise DataError(f"{where[0].upper() + where[1:]} hold no samples.")
    if x.ndim < 1 or (x.size // max(rows, 1)) != info.feature_size:
        raise DataError(
            f"Each sample in {where} must have {info.feature_size} values to fit the model's "
            f"input shape {info.input_shape}. Received: features of shape {x.shape}. Reshape or "
            "select the right column."
        )
    return x.reshape((rows, *info.input_shape)).astype(np.float32, copy=False)


def _as_labels(y: Any, where: str) -> np.ndarray:
    y = np.asarray(y)
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise DataError(f"Labels in {where} must be numeric. Received: dtype={y.dtype}.")
    return y.reshape(len(y), -1)[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y


def raise_problems(per_partition: list[dict[str, int]], what: str) -> None:
    """Raise one DataError that counts every problem of :func:`block_problems`, per partition."""
    messages = []
    for key, text, fix in (
        (
            "nonfinite_rows",
            "row(s) with NaN, Inf or null features or labels",
            "drop or impute them",
        ),
        (
            "label_out_of_range",
            "label(s) outside the model's classes",
            "map labels to 0..num_classes-1 or widen the output layer",
        ),
        ("label_not_integer", "non-integer class label(s)", "labels must be whole class indices"),
        (
            "bad_weights",
            "sample weight(s) that are negative, NaN, Inf or null",
            "weights must be finite and >= 0",
        ),
    ):
        where = {i: p[key] for i, p in enumerate(per_partition) if p.get(key)}
        if where:
            detail = ", ".join(f"{n} in partition {i}" for i, n in list(where.items())[:8])
            messages.append(f"{sum(where.values())} {text} ({detail}); {fix}")
    if messages:
        raise DataError(
            f"The {what} data cannot be trained on as given: " + "; ".join(messages) + "."
        )


# -- conversion to blocks ------------------------------------------------------------------------
def _split_blocks(x: np.ndarray, y: np.ndarray, w: np.ndarray | None, parts: int) -> list[Block]:
    """Split into ``parts`` equal partitions of equally many blocks, in partition order."""
    part_x, part_y = np.array_split(x, parts), np.array_split(y, parts)
    part_w = np.array_split(w, parts) if w is not None else [None] * parts
    per_part = max(1, math.ceil(max(len(p) for p in part_x) / BLOCK_ROWS))
    blocks: list[Block] = []
    for px, py, pw in zip(part_x, part_y, part_w, strict=True):
        ws = np.array_split(pw, per_part) if pw is not None else [None] * per_part
        blocks += list(
            zip(np.array_split(px, per_part), np.array_split(py, per_part), ws, strict=True)
        )
    return blocks


def validate_arrays(data: tuple, info: DataInfo, what: str) -> Block:
    """NumPy ``(x, y)`` or ``(x, y, sample_weight)`` checked against the model: features as float32
    samples, labels as given, weights as float32 (``None`` without them).

    Raises:
        DataError: not a pair or a triple, lengths differ, wrong feature size or label shape,
            NaN/Inf rows, labels outside the classes, negative or non-finite weights.
    """
    if len(data) not in (2, 3):
        raise DataError(
            f"NumPy {what} data must be a pair `(x, y)` or a triple `(x, y, sample_weight)`. "
            f"Received: a tuple of {len(data)}."
        )
    x = (
        info.pack_features(data[0], f"the {what} features")
        if info.inputs
        else as_features(data[0], info, f"the {what} features")
    )
    y = (
        info.pack_labels(data[1], f"the {what} labels")
        if info.outputs
        else _as_labels(data[1], f"the {what} labels")
    )
    if len(x) != len(y):
        raise DataError(
            f"{what.capitalize()} features and labels differ in length: {len(x)} vs {len(y)}."
        )
    w = _as_weights(data[2], len(x), what) if len(data) == 3 and data[2] is not None else None
    check_label_shape(y.shape, info, f"the {what} data")
    raise_problems([block_problems(x, y, info, w)], what)
    return x, y, w


def dense_class_weight(class_weight: Any, info: DataInfo) -> tuple[float, ...]:
    """``fit(class_weight=)`` as one weight per class (classes it leaves out weigh 1).

    Raises:
        ConfigurationError: the model's loss is not a classification loss, or a class or a weight
            is not one the model can use.
    """
    if info.outputs:
        raise ConfigurationError(
            "`class_weight` is for models with one output (as in Keras); weigh rows with "
            "`sample_weight` instead."
        )
    if info.label_mode not in ("sparse", "one_hot"):
        raise ConfigurationError(
            "`class_weight` needs a classification loss (sparse or categorical cross-entropy, "
            "...); weigh rows with `sample_weight` instead."
        )
    if not isinstance(class_weight, Mapping):
        raise ConfigurationError(
            f"Expected `class_weight` as a dict of class index -> weight. Received: "
            f"{type(class_weight).__name__}."
        )
    dense = [1.0] * info.classes
    for key, value in class_weight.items():
        if (
            isinstance(key, bool)
            or not isinstance(key, (int, np.integer))
            or not 0 <= key < info.classes
        ):
            raise ConfigurationError(
                f"`class_weight` has class {key!r}; the model's classes are 0..{info.classes - 1}."
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.number))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ConfigurationError(
                f"`class_weight[{key}]` must be a finite number >= 0. Received: {value!r}."
            )
        dense[int(key)] = float(value)
    return tuple(dense)


def class_weighted(
    y: np.ndarray, weights: np.ndarray | None, class_weight: tuple[float, ...] | None
) -> np.ndarray | None:
    """Sample weights times each row's class weight (labels as the model's loss takes them:
    indices, or one-hot rows whose largest entry is the class), as Keras combines them."""
    if class_weight is None:
        return weights
    classes = y.argmax(axis=1) if y.ndim == 2 else y
    per_row = np.asarray(class_weight, np.float32)[classes.astype(np.int64)]
    return per_row if weights is None else weights * per_row


def _as_weights(w: Any, rows: int, what: str) -> np.ndarray:
    w = np.asarray(w)
    if not (np.issubdtype(w.dtype, np.number) or w.dtype == bool):
        raise DataError(
            f"Sample weights of the {what} data must be numeric. Received: dtype={w.dtype}."
        )
    if w.shape != (rows,):
        raise DataError(
            f"Sample weights of the {what} data must hold one number per row, shape ({rows},). "
            f"Received: shape {w.shape}."
        )
    return w.astype(np.float32)


def _too_few_rows(rows: int, workers: int, what: str) -> DataError:
    return DataError(
        f"The {what} data has {rows} row(s) for {workers} workers; each worker needs at least one. "
        "Use fewer workers or more data."
    )


def _numpy_blocks(
    spark: SparkSession, data: tuple, info: DataInfo, partitions: int, what: str
) -> DataFrame:
    """NumPy data as a DataFrame of blocks, ``partitions`` of them, balanced (see
    :func:`kerasonspark._classic.numpy_block_frame` for how the rows reach the executors)."""
    x, y, w = validate_arrays(data, info, what)
    if partitions and len(x) < partitions:  # known before any Spark job
        raise _too_few_rows(len(x), partitions, what)
    blocks = _split_blocks(x, y, w, partitions)
    per_part = len(blocks) // partitions
    return classic.numpy_block_frame(
        spark, [blocks[i * per_part : (i + 1) * per_part] for i in range(partitions)]
    )


def release_blocks(blocks: DataFrame) -> None:
    """Drop a DataFrame of blocks' cached partitions and the broadcasts that carry NumPy input."""
    blocks.unpersist()
    classic.release(blocks)


def _row_blocks(rows: Iterable[Any], info: DataInfo) -> Iterator[Block]:
    xs, ys = [], []
    for row in rows:
        features, label = row[0], row[1]
        xs.append(features.toArray() if hasattr(features, "toArray") else features)
        ys.append(label.toArray() if hasattr(label, "toArray") else label)
        if len(xs) == BLOCK_ROWS:
            yield (
                as_features(xs, info, "an RDD partition"),
                _as_labels(ys, "an RDD partition"),
                None,
            )
            xs, ys = [], []
    if xs:
        yield as_features(xs, info, "an RDD partition"), _as_labels(ys, "an RDD partition"), None


def _arrow_block_function(
    info: DataInfo, label_widths: list[int]
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """Arrow batches of ``features``, ``label`` (and ``weight``) as one encoded block each;
    ``label_widths``: each output's width in the packed labels of a model with several outputs."""

    def to_blocks(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        for batch in batches:
            n = batch.num_rows
            if n == 0:
                continue
            features, labels = batch.column(0), batch.column(1)
            weights = (
                batch.column(2).to_numpy(zero_copy_only=False).astype(np.float32)
                if batch.num_columns > 2
                else None
            )
            lengths = features.value_lengths().to_numpy(zero_copy_only=False)
            if features.null_count or (lengths != info.feature_size).any():
                wrong = int(features.null_count + (lengths != info.feature_size).sum())
                raise DataError(
                    f"{wrong} row(s) have a feature array that is null or not {info.feature_size} "
                    f"long (the model's input {info.input_shape}); filter or fix them."
                )
            x = features.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            if info.outputs:
                raw = labels.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                if labels.null_count or raw.size != n * sum(label_widths):
                    raise DataError(
                        f"Some rows' labels are null or not {label_widths} wide (one per output, "
                        f"{[name for name, _ in info.outputs]}); filter or fix them."
                    )
                y = packed_labels(
                    raw.reshape(n, -1), label_widths, info, "the labels of a partition"
                )
            elif pa.types.is_list(labels.type) or pa.types.is_fixed_size_list(labels.type):
                y = (
                    labels.flatten()
                    .to_numpy(zero_copy_only=False)
                    .astype(np.float32)
                    .reshape(n, -1)
                )
            else:
                kind = np.float64 if labels.null_count else labels.type.to_pandas_dtype()
                y = labels.to_numpy(zero_copy_only=False).astype(kind)
            yield encode_block(x.reshape(n, -1), y, weights)

    return to_blocks


def feature_column(df: DataFrame, features: str, what: str) -> Column:
    """The features column of ``df`` as ``array<float>`` (from an array or an ML Vector column).

    Raises:
        DataError: the column is missing or holds neither numbers nor vectors.
    """
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    fields = {f.name: f.dataType for f in df.schema.fields}
    if not isinstance(features, str):
        raise DataError(
            f"The model has one input; pass `features=` as one column name. Received: {features!r}."
        )
    if features not in fields:
        raise DataError(
            f"The {what} DataFrame has no features column {features!r}. Its columns: "
            f"{sorted(fields)}. Pass `features=` with the right name."
        )
    ftype = fields[features]
    if isinstance(ftype, VectorUDT):
        return vector_to_array(F.col(features), "float32")
    if isinstance(ftype, T.ArrayType) and isinstance(ftype.elementType, T.NumericType):
        return F.col(features).cast("array<float>")
    raise DataError(
        f"Feature column {features!r} must be array<float|double> or an ML Vector. Received: "
        f"{ftype.simpleString()}."
    )


def check_first_row(
    df: DataFrame, column: str, features: str, info: DataInfo, what: str, keep: tuple[str, ...] = ()
) -> Any:
    """Check the first row's feature size with one small job, before any full pass.

    Returns:
        The first row's ``keep`` columns (and its feature size as ``__size``).

    Raises:
        DataError: ``df`` is empty, or its first feature array does not fit the model's input.
    """
    from pyspark.sql import functions as F

    first = df.select(F.size(column).alias("__size"), *keep).first()
    if first is None:
        raise DataError(f"The {what} DataFrame is empty.")
    if first["__size"] != info.feature_size:
        raise DataError(
            f"Each sample must have {info.feature_size} values to fit the model's input shape "
            f"{info.input_shape}. Received: feature arrays of length {first['__size']} in column "
            f"{features!r}."
        )
    return first


def _label_column(df: DataFrame, label: str, what: str) -> tuple[Column, bool]:
    """A label column as it travels, and whether it holds arrays (one-hot rows or targets)."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    fields = {f.name: f.dataType for f in df.schema.fields}
    if not isinstance(label, str):
        raise DataError(
            f"The model has one output; pass `label=` as one column name. Received: {label!r}."
        )
    if label not in fields:
        raise DataError(
            f"The {what} DataFrame has no label column {label!r}. Its columns: {sorted(fields)}. "
            f"Pass `label=` with the right name."
        )
    ltype = fields[label]
    if isinstance(ltype, VectorUDT):
        return vector_to_array(F.col(label), "float32"), True
    if isinstance(ltype, T.NumericType):
        return F.col(label), False
    if isinstance(ltype, T.ArrayType) and isinstance(ltype.elementType, T.NumericType):
        return F.col(label), True
    raise DataError(
        f"Label column {label!r} must be numeric (or an array for one-hot). Received: "
        f"{ltype.simpleString()}."
    )


def _column_names(names: Any, model_names: list[str], argument: str, what: str) -> list[str]:
    """``features=`` or ``label=`` of a model with several inputs or outputs: one column each, in
    order."""
    if (
        isinstance(names, str)
        or not isinstance(names, (list, tuple))
        or len(names) != len(model_names)
    ):
        raise DataError(
            f"The model has {len(model_names)} "
            f"{'inputs' if argument == 'features' else 'outputs'} {model_names}; pass "
            f"`{argument}=` as a list of {len(model_names)} {what} column names, one for each, in "
            f"that order. Received: {argument}={names!r}."
        )
    return list(names)


def features_column(df: DataFrame, features: Any, info: DataInfo, what: str) -> Column:
    """The features of ``df`` as one ``array<float>``: the column ``features``, or, for a model
    with several inputs, the columns listed in ``features`` (one per input, in the model's
    order) side by side, each checked against its input's size on the first row.

    Raises:
        DataError: a column is missing, of the wrong type, or the wrong size for its input.
    """
    from pyspark.sql import functions as F

    if not info.inputs:
        return feature_column(df, features, what)
    columns = _column_names(features, [name for name, _ in info.inputs], "features", what)
    arrays = [feature_column(df, c, what) for c in columns]
    first = df.select(*(F.size(a).alias(f"_{i}") for i, a in enumerate(arrays))).first()
    for i, (column, (name, shape)) in enumerate(zip(columns, info.inputs, strict=True)):
        if first is not None and first[f"_{i}"] != math.prod(shape):
            raise DataError(
                f"Each sample of input {name!r} must have {math.prod(shape)} values (shape "
                f"{shape}). Received: arrays of length {first[f'_{i}']} in column {column!r}."
            )
    return F.concat(*arrays)


def _dataframe_columns(
    df: DataFrame,
    features: Any,
    label: Any,
    info: DataInfo,
    what: str,
    sample_weight: str | None = None,
) -> tuple[DataFrame, list[int]]:
    """``df`` as the columns ``features``, ``label`` (and ``weight``), several inputs' features and
    several outputs' labels each packed side by side in one array; with each output's label width
    in the packed labels (1 for a plain number)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    widths: list[int] = []
    fcol = features_column(df, features, info, what)
    if info.outputs:
        labels = [
            _label_column(df, c, what)
            for c in _column_names(label, [name for name, _ in info.outputs], "label", what)
        ]
        arrays = [
            col.cast("array<float>") if is_array else F.array(col.cast("float"))
            for col, is_array in labels
        ]
        first = df.select(*(F.size(a).alias(f"_{i}") for i, a in enumerate(arrays))).first()
        widths = [first[f"_{i}"] if first is not None else 1 for i in range(len(arrays))]
        lcol = F.concat(*arrays)
    else:
        lcol, _ = _label_column(df, label, what)
    fields = {f.name: f.dataType for f in df.schema.fields}
    if sample_weight is None:
        return df.select(fcol.alias("features"), lcol.alias("label")), widths
    if sample_weight not in fields:
        raise DataError(
            f"The {what} DataFrame has no sample-weight column {sample_weight!r}. Its columns: "
            f"{sorted(fields)}."
        )
    if not isinstance(fields[sample_weight], T.NumericType):
        raise DataError(
            f"Sample-weight column {sample_weight!r} must be numeric. Received: "
            f"{fields[sample_weight].simpleString()}."
        )
    return df.select(
        fcol.alias("features"),
        lcol.alias("label"),
        F.col(sample_weight).cast("float").alias("weight"),
    ), widths


def _dataframe_blocks(
    df: DataFrame,
    features: Any,
    label: Any,
    info: DataInfo,
    partitions: int | None,
    what: str,
    sample_weight: str | None = None,
) -> DataFrame:
    selected, widths = _dataframe_columns(df, features, label, info, what, sample_weight)
    first = check_first_row(selected, "features", str(features), info, what, keep=("label",))
    if isinstance(first["label"], (list, tuple)) and not info.outputs:
        check_label_shape((1, len(first["label"])), info, f"column {label!r}")
    if partitions is not None and classic.partition_count(selected) != partitions:
        selected = selected.repartition(partitions)
    return selected.mapInArrow(_arrow_block_function(info, widths), BLOCK_SCHEMA)


def packed_labels(raw: np.ndarray, widths: list[int], info: DataInfo, what: str) -> np.ndarray:
    """Several outputs' labels, side by side as they came (``widths`` each), as packed model labels.

    Raises:
        DataError: an output's labels do not fit it (width, NaN, a class out of range).
    """
    bounds = np.cumsum([0, *widths])
    return info.pack_labels(
        {
            name: raw[:, a] if b - a == 1 else raw[:, a:b]
            for (name, _), a, b in zip(info.outputs, bounds[:-1], bounds[1:], strict=True)
        },
        what,
    )


def to_blocks(
    spark: SparkSession,
    data: Any,
    features: Any,
    label: Any,
    info: DataInfo,
    partitions: int | None,
    what: str = "training",
    sample_weight: str | None = None,
) -> DataFrame:
    """Turn any supported input into a DataFrame of blocks (lazily, after the checks that need no
    job).

    Args:
        partitions: the number of partitions wanted, or ``None`` to keep the input's.
        sample_weight: a DataFrame's sample-weight column (NumPy input carries its weights as the
            third item of the tuple).

    Raises:
        DataError: wrong columns, types or feature size (checked before any full pass).
        TypeError: ``data`` is not a DataFrame, an RDD or a NumPy pair.
    """
    from pyspark.sql import DataFrame

    if isinstance(data, (str, os.PathLike)):
        data = read_parquet(spark, data, what)
    if isinstance(data, DataFrame):
        return _dataframe_blocks(data, features, label, info, partitions, what, sample_weight)
    if sample_weight is not None:
        raise DataError(
            f"`sample_weight={sample_weight!r}` names a DataFrame column; pass NumPy weights as "
            "`fit(x, y, sample_weight=w)`. An RDD cannot carry sample weights."
        )
    if classic.is_rdd(data) and (info.inputs or info.outputs):
        raise DataError(
            f"A model with several inputs or outputs takes its {what} data as a DataFrame (a "
            "column for each) or NumPy arrays (a list for each), not an RDD of (features, "
            "label)."
        )
    if classic.is_rdd(data):
        rows = (
            data
            if partitions is None or data.getNumPartitions() == partitions
            else data.repartition(partitions)
        )
        return classic.rdd_block_frame(spark, rows, partial(_row_blocks, info=info))
    if isinstance(data, (tuple, list)):
        return _numpy_blocks(
            spark, tuple(data), info, partitions or classic.default_parallelism(spark), what
        )
    raise TypeError(
        f"Expected {what} data as a Spark DataFrame, a Parquet path, an RDD of (features, label) "
        f"or a NumPy pair (x, y). Received: {type(data).__name__}."
    )


def read_parquet(spark: SparkSession, path: str | os.PathLike, what: str) -> DataFrame:
    """The Parquet file or folder at ``path`` (any file system Spark reads) as a DataFrame.

    Raises:
        DataError: nothing readable as Parquet is there.
    """
    from pyspark.errors import AnalysisException

    try:
        return spark.read.parquet(os.fspath(path))
    except AnalysisException as exc:
        raise DataError(
            f"The {what} data path {os.fspath(path)!r} holds no Parquet data Spark can read "
            f"({str(exc).splitlines()[0][:200]}). Pass a Parquet file or folder, or a DataFrame."
        ) from None


def _partition_stats(info: DataInfo, warm_up: Callable[[], None] | None):
    def stats(blocks: Iterator[Block]) -> Iterator[dict[str, Any]]:
        from pyspark import TaskContext

        index = TaskContext.get().partitionId()  # type: ignore[union-attr]  # inside a task
        if warm_up is not None:
            warm_up()
        rows, size, ywidths, integer = 0, 0, set(), True
        problems: dict[str, int] = {}
        for x, y, w in blocks:
            rows += len(x)
            size += x.nbytes + y.nbytes + (w.nbytes if w is not None else 0)
            ywidths.add(y.shape[1] if y.ndim == 2 else 0)
            integer &= bool(np.issubdtype(y.dtype, np.integer))
            for key, value in block_problems(x, y, info, w).items():
                problems[key] = problems.get(key, 0) + value
        yield {
            "partition": index,
            "rows": rows,
            "bytes": size,
            "budget": worker_memory_budget(),
            "ywidths": sorted(ywidths),
            "integer": integer,
            **problems,
        }

    return stats


def worker_memory_budget() -> int:
    """The bytes a Python worker on this machine may hold its partition in: half of
    ``spark.executor.pyspark.memory`` where it is set, else half of the machine's available
    memory shared among its cores (half: concatenating a partition briefly holds it twice)."""
    limit_mb = int(os.environ.get("PYSPARK_EXECUTOR_MEMORY_MB", "-1"))
    if limit_mb > 0:
        return limit_mb * 2**20 // 2
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: free pages stand in for available memory
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return available // (os.cpu_count() or 1) // 2


# Where prepare() caches the blocks: a partition that is to stream stays off the JVM's heap too.
_STORAGE_LEVELS = {"memory": "MEMORY_ONLY", "auto": "MEMORY_AND_DISK", "stream": "DISK_ONLY"}


def materialize(blocks: DataFrame, level: Any) -> DataFrame:
    """``blocks`` persisted at ``level`` and computed by a job of their own; returns them.

    Spark runs each ``mapInArrow`` of a stage in a Python worker of its own, so a pass that
    converted the input and read the blocks at once would hold two workers per task; the pool's
    extra workers would then take later stages' tasks, away from the workers the data pass warmed
    up. Computed first, every later stage reads the cache with one worker per task.
    """
    blocks.persist(level)
    blocks.count()
    return blocks


def prepare(
    spark: SparkSession,
    data: Any,
    features: Any,
    label: Any,
    info: DataInfo,
    partitions: int,
    what: str = "training",
    warm_up: Callable[[], None] | None = None,
    sample_weight: str | None = None,
    require_rows: bool = True,
    partition_storage: str = "memory",
) -> PreparedData:
    """Convert, partition, cache and validate data in one pass.

    Args:
        partitions: one per worker.
        partition_storage: ``"memory"`` caches the blocks in the executors' memory, ``"stream"``
            on their disks, ``"auto"`` in memory where it fits and on disk beyond.
        warm_up: run once in each task of the validation pass (the workers use it to import
            TensorFlow and rebuild the model while the data is scanned).
        require_rows: refuse fewer rows than partitions (training data: every worker trains);
            ``False`` for validation data, where a partition may be empty.

    Raises:
        DataError: any row that cannot be trained on (the message counts them per partition), or
            fewer rows than workers.
    """
    from pyspark import StorageLevel

    level = getattr(StorageLevel, _STORAGE_LEVELS[partition_storage])
    blocks = to_blocks(spark, data, features, label, info, partitions, what, sample_weight)
    try:
        materialize(blocks, level)
        stats = sorted(
            run_on_partitions(blocks, _partition_stats(info, warm_up), info.input_shape),
            key=lambda s: s["partition"],
        )
        raise_problems(stats, what)
        for s in stats:
            for width in s["ywidths"]:
                check_label_shape(
                    (1, width) if width else (1,), info, f"partition {s['partition']}"
                )
        counts = [s["rows"] for s in stats]
        widths = sorted({w for s in stats for w in s["ywidths"]})
        if len(widths) > 1:
            raise DataError(
                f"The {what} labels differ in width between rows: {widths} (0 is one value per "
                "row). Give every row labels of the same shape."
            )
        if require_rows and sum(counts) < len(counts):
            raise _too_few_rows(sum(counts), len(counts), what)
        empty = [i for i, c in enumerate(counts) if c == 0]
        if empty and require_rows:
            logger.warning(
                "Partition(s) %s of the %s data are empty; those workers only synchronise.",
                empty,
                what,
            )
    except BaseException:
        release_blocks(blocks)
        raise
    return PreparedData(
        blocks,
        counts,
        widths[0] if widths else 0,
        all(s["integer"] for s in stats if s["rows"]),
        [s["bytes"] for s in stats],
        min(s["budget"] for s in stats),
    )


def numpy_to_dataframe(
    spark: SparkSession,
    x: np.ndarray,
    y: np.ndarray | None = None,
    features: str = "features",
    label: str = "label",
    partitions: int | None = None,
) -> DataFrame:
    """A DataFrame with an array<float> feature column (and a label column) from NumPy, through
    Arrow.

    On a classic session the rows reach the executors as one broadcast (Arrow IPC bytes) per
    partition, not inside the tasks (``createDataFrame`` would put 30 MB of MNIST in each task);
    the broadcasts live as long as the SparkContext, as the data of a ``createDataFrame`` would
    live with its plan. Over Spark Connect the client uploads the table.

    Args:
        partitions: the DataFrame's partitions (default: the context's default parallelism).

    Example:
        >>> df = numpy_to_dataframe(spark, x_train, y_train)   # columns: features, label
    """
    import pyarrow as pa

    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(len(x), -1))
    offsets = np.arange(0, x.size + 1, max(x.shape[1], 1), dtype=np.int64)[: len(x) + 1]
    columns = {features: pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(x.ravel()))}
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 2:
            y_offsets = np.arange(0, y.size + 1, y.shape[1], dtype=np.int64)
            columns[label] = pa.LargeListArray.from_arrays(
                pa.array(y_offsets), pa.array(y.astype(np.float32).ravel())
            )
        else:
            columns[label] = pa.array(y)
    table = pa.table(columns)
    # Spark reads lists with 32-bit offsets, so a batch holds at most 2**31 - 1 values of a column.
    # Otherwise a partition is one batch: a `first()` that stops reading after one batch would
    # leave its Python worker writing the next into a closed pipe (a BrokenPipeError traceback).
    rows_per_batch = max(1, (2**31 - 1) // max(x.shape[1], 1))
    schema = pa.schema(
        [
            f.with_type(pa.list_(f.type.value_type)) if pa.types.is_large_list(f.type) else f
            for f in table.schema
        ]
    )
    parts = max(1, min(partitions or classic.default_parallelism(spark), len(x)))
    bounds = np.linspace(0, len(x), parts + 1).astype(int)
    return classic.arrow_frame(
        spark,
        [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
        schema,
        rows_per_batch,
    )


def collect_arrays(blocks: DataFrame, input_shape: tuple[int, ...]) -> Block:
    """Bring a DataFrame of blocks to the driver as one ``(x, y, w)`` triple (for validation sets
    and the single engine)."""
    parts = [decode_block(row, input_shape) for row in blocks.collect()]
    if not parts:
        raise DataError("No rows to collect.")
    return concatenate(parts)


def concatenate(blocks: list[Block]) -> Block:
    """Blocks as one ``(x, y, w)`` triple (``w`` is ``None`` when no block has weights)."""
    weighted = any(b[2] is not None for b in blocks)
    w = (
        np.concatenate(
            [b[2] if b[2] is not None else np.ones(len(b[0]), np.float32) for b in blocks]
        )
        if weighted
        else None
    )
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks]), w
