"""The parameter server's binary wire format, versions 1 (whole arrays) and 2 (sparse).

Every weight-carrying message (request or response) is::

    offset  size  field
    0       4     magic  b"KOSW"
    4       1     format version (1: whole arrays; 2: sparse, below)
    5       3     reserved, zero
    8       4     header length H, uint32 little-endian
    12      H     header: UTF-8 JSON object
    12+H    P     zero padding so the payload starts on an 8-byte boundary
    12+H+P  N     payload: the arrays' raw little-endian bytes, C order, back to back

The header always holds ``"dtype"`` (``"float32"``, ``"float16"``, or ``"bfloat16"``: the upper 16
bits of each float32, rounded to nearest even, stored as little-endian uint16) and ``"shapes"`` (a
list of shapes, one per array, in order); the payload length must equal the sum of the shapes'
sizes times the item size. Any other header keys are message fields (``worker``, ``step``,
``version``, ``samples``, ...). Nothing is pickled: a decoder needs only JSON and NumPy, and a
malformed message raises :class:`~kerasonspark.WireFormatError` before any payload is used. Limits:
a header of at most 1 MiB, at most 65,536 arrays of at most 32 dimensions, and every JSON number
within what Python parses (:func:`loads_json`).

**Sparse messages (version 2)** carry some elements of the arrays (:func:`encode_sparse`): a push
whose delta is mostly zeros or compressed (the asynchronous engines' ``delta_fraction``), the
others being zero, or a push's reply of only the elements that changed since the pusher's copy
(its ``since`` field), the others being as in that copy. The header holds ``"nnz"`` (how many
elements travel) besides ``dtype`` and ``shapes``, and the payload is ``nnz`` uint32 little-endian
positions into the flat arrays (strictly ascending, each below the shapes' total size), zero
padding to an 8-byte boundary, then the ``nnz`` values of ``dtype``. Dense messages stay version
1, byte for byte, and every other route and reply takes whole arrays and refuses a sparse one.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import WireFormatError

__all__ = [
    "CONTENT_TYPE",
    "MAGIC",
    "MAX_ARRAYS",
    "MAX_DIMENSIONS",
    "MAX_HEADER_BYTES",
    "SPARSE_BELOW",
    "SPARSE_VERSION",
    "VERSION",
    "decode",
    "dtype_name",
    "encode",
    "encode_sparse",
    "encoded_size",
    "flatten",
    "nonzero_part",
    "to_dense",
    "unflatten",
]


MAGIC = b"KOSW"
"""The four bytes every message starts with."""
VERSION = 1
"""The format's version of a message of whole arrays, the byte after :data:`MAGIC`."""
SPARSE_VERSION = 2
"""The format's version of a sparse message (positions and values)."""
CONTENT_TYPE = "application/x-kerasonspark-weights"
"""The HTTP ``Content-Type`` of a message."""
MAX_HEADER_BYTES = 1 << 20
"""The largest JSON header a message may carry."""
MAX_ARRAYS = 1 << 16
"""The most arrays one message may describe."""
MAX_DIMENSIONS = 32
"""The most dimensions one array may have."""
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
SPARSE_BELOW = 0.4
"""The share of a flat array's elements below which a sparse message of float32 values is the
smaller: 8 bytes for each position and value against 4 for each element, less a margin for the
work of gathering them."""
_PREFIX = struct.Struct("<4sB3xI")

Shapes = list[tuple[int, ...]]


def loads_json(data: bytes | bytearray | memoryview, what: str) -> Any:
    """Parse JSON from a peer: any malformed input is a :class:`WireFormatError` (400), including
    numbers too long for Python's int parser and nesting too deep for its recursion limit."""
    try:
        return json.loads(bytes(data))
    # UnicodeDecodeError and JSONDecodeError are ValueErrors
    except (
        ValueError,
        RecursionError,
    ) as exc:
        raise WireFormatError(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def shapes_size(shapes: Sequence[Sequence[int]]) -> int:
    """Number of elements in arrays of the given shapes together."""
    return sum(math.prod(s) for s in shapes)


def to_bfloat16(flat: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bits (uint16), rounding to nearest even; NaN and Inf stay non-finite."""
    bits = np.ascontiguousarray(flat, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def dtype_name(flat: np.ndarray) -> str:
    """The wire's name of ``flat``'s dtype: ``float32``, ``float16`` or ``bfloat16`` (uint16 bits).

    Raises:
        WireFormatError: another dtype.
    """
    name = next(
        (n for n, d in DTYPES.items() if flat.dtype == d or flat.dtype == d.newbyteorder("=")), None
    )
    if name is None:
        raise WireFormatError(
            f"Expected a float32, float16 or bfloat16 (uint16) array. Received: dtype={flat.dtype}."
        )
    return name


def as_float32(flat: np.ndarray, dtype: str) -> np.ndarray:
    """A decoded payload as float32 (no copy when it already is)."""
    if dtype == "bfloat16":
        return (flat.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return flat.astype(np.float32, copy=False)


def encode(
    flat: np.ndarray, shapes: Sequence[Sequence[int]], **fields: Any
) -> list[bytes | memoryview]:
    """Encode a flat array (the arrays of ``shapes`` back to back) and header fields.

    ``flat`` is float32, float16, or uint16 holding bfloat16 bits (see :func:`to_bfloat16`).
    Returns the message as a list of buffers (prefix and header, then the payload as a view of
    ``flat``), so a caller can send it without joining: the weights are never copied here.

    Raises:
        WireFormatError: ``flat`` has the wrong dtype or size for ``shapes``.
    """
    return _message(flat, shapes, None, fields)


def encode_sparse(
    values: np.ndarray, shapes: Sequence[Sequence[int]], positions: np.ndarray, **fields: Any
) -> list[bytes | memoryview]:
    """Encode a sparse message (version 2): ``values`` at ``positions`` (strictly ascending, into
    the arrays of ``shapes`` back to back), the other elements zero. As :func:`encode`, the
    arrays are sent as views, not copied.

    Raises:
        WireFormatError: ``values`` has the wrong dtype, or not one value per position.
    """
    return _message(values, shapes, positions, fields)


def _message(
    flat: np.ndarray,
    shapes: Sequence[Sequence[int]],
    positions: np.ndarray | None,
    fields: dict[str, Any],
) -> list[bytes | memoryview]:
    name = dtype_name(flat)
    shapes = [tuple(int(d) for d in s) for s in shapes]
    expected = shapes_size(shapes) if positions is None else len(positions)
    if flat.ndim != 1 or flat.size != expected:
        raise WireFormatError(
            f"Expected a flat array of {expected} elements for shapes {shapes}"
            f"{'' if positions is None else ' and its positions'}. Received: shape={flat.shape}."
        )
    version = VERSION
    parts: list[bytes | memoryview] = []  # the positions of a sparse message
    if positions is not None:
        if shapes_size(shapes) > 1 << 32:
            raise WireFormatError("A sparse message addresses at most 2**32 elements.")
        version = SPARSE_VERSION
        fields = {"nnz": int(len(positions)), **fields}
        raw = np.ascontiguousarray(positions, dtype="<u4")
        parts = [_bytes_of(raw), b"\0" * (-raw.nbytes % 8)]
    header = json.dumps({"dtype": name, "shapes": shapes, **fields}, separators=(",", ":")).encode()
    padding = -(_PREFIX.size + len(header)) % 8
    prefix = _PREFIX.pack(MAGIC, version, len(header)) + header + b"\0" * padding
    payload = np.ascontiguousarray(flat)
    if payload.dtype.byteorder == ">":
        payload = payload.astype(payload.dtype.newbyteorder("<"))
    return [prefix, *parts, _bytes_of(payload)]


def _bytes_of(array: np.ndarray) -> memoryview:
    return memoryview(array).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer


def encoded_size(parts: Sequence[bytes | memoryview]) -> int:
    """Total bytes of a message returned by :func:`encode`."""
    return sum(memoryview(p).nbytes for p in parts)


def decode(
    message: bytes | bytearray | memoryview, sparse: bool = False
) -> tuple[dict[str, Any], np.ndarray]:
    """Decode a message into ``(header, flat)``; ``flat`` is a read-only view of ``message``.

    With ``sparse`` a sparse message (version 2) is accepted too: ``flat`` then holds its values
    and ``header["indices"]`` their positions (a read-only uint32 view; :func:`to_dense`).

    Raises:
        WireFormatError: bad magic or version, a sparse message where ``sparse`` is false, a
            header that is not a JSON object with valid ``dtype`` and ``shapes`` (and ``nnz``),
            positions out of order or out of range, or a payload of the wrong length.
    """
    view = memoryview(message).cast("B")
    if view.nbytes < _PREFIX.size:
        raise WireFormatError(
            f"Message too short: expected at least {_PREFIX.size} bytes. Received: {view.nbytes}."
        )
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise WireFormatError(
            f"Not a kerasonspark message: expected magic {MAGIC!r}. Received: {magic!r}."
        )
    if version not in (VERSION, SPARSE_VERSION):
        raise WireFormatError(
            f"Unsupported wire format version {version}; this side speaks versions {VERSION} and "
            f"{SPARSE_VERSION}."
        )
    if version == SPARSE_VERSION and not sparse:
        raise WireFormatError(
            "A sparse message (wire format version 2) where whole arrays are expected: only a "
            "push and its reply may be sparse."
        )
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > view.nbytes:
        raise WireFormatError(
            f"Header length {header_len} does not fit the {view.nbytes}-byte message."
        )
    header = loads_json(view[_PREFIX.size : _PREFIX.size + header_len], "The header")
    if not isinstance(header, dict):
        raise WireFormatError(
            f"The header must be a JSON object. Received: {type(header).__name__}."
        )
    named = header.get("dtype")
    dtype = DTYPES.get(named) if isinstance(named, str) else None
    if dtype is None:
        raise WireFormatError(
            f"Expected header dtype in {sorted(DTYPES)}. Received: dtype={header.get('dtype')!r}."
        )
    shapes = header.get("shapes")
    if (
        not isinstance(shapes, list)
        or len(shapes) > MAX_ARRAYS
        or not all(
            isinstance(s, list)
            and len(s) <= MAX_DIMENSIONS
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
            for s in shapes
        )
    ):
        raise WireFormatError(
            f"Header `shapes` must be a list of at most {MAX_ARRAYS} lists of at most "
            f"{MAX_DIMENSIONS} non-negative integers."
        )
    header["shapes"] = [tuple(s) for s in shapes]
    size = shapes_size(header["shapes"])
    start = _PREFIX.size + header_len
    start += -start % 8
    if version == SPARSE_VERSION:
        return _decode_sparse(view, start, header, dtype, size)
    expected = size * dtype.itemsize
    if view.nbytes - start != expected:
        called_for = f"{expected} bytes" if expected < 1 << 62 else "more than 2**62 bytes"
        raise WireFormatError(
            f"Payload length mismatch: shapes and dtype call for {called_for}. "
            f"Received: {max(view.nbytes - start, 0)} bytes."
        )
    flat = np.frombuffer(view, dtype=dtype, offset=start)
    return header, flat


def _decode_sparse(
    view: memoryview, start: int, header: dict[str, Any], dtype: np.dtype, size: int
) -> tuple[dict[str, Any], np.ndarray]:
    nnz = header.get("nnz")
    if not isinstance(nnz, int) or isinstance(nnz, bool) or not 0 <= nnz <= min(size, 1 << 32):
        raise WireFormatError(
            f"Header `nnz` of a sparse message must be an integer from 0 to the arrays' {size} "
            f"elements. Received: {str(nnz)[:40]}."
        )
    positions_bytes = nnz * 4 + (-(nnz * 4) % 8)
    expected = positions_bytes + nnz * dtype.itemsize
    if view.nbytes - start != expected:
        raise WireFormatError(
            f"Payload length mismatch: {nnz} positions and values of {dtype.name} call for "
            f"{expected} bytes. Received: {max(view.nbytes - start, 0)} bytes."
        )
    indices = np.frombuffer(view, dtype="<u4", count=nnz, offset=start)
    if nnz and (int(indices[-1]) >= size or not bool((indices[1:] > indices[:-1]).all())):
        raise WireFormatError(
            f"The positions of a sparse message must be strictly ascending and below the arrays' "
            f"{size} elements. Received: the last is {int(indices[-1])}."
        )
    header["indices"] = indices
    return header, np.frombuffer(view, dtype=dtype, offset=start + positions_bytes)


def nonzero_part(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(positions, values)`` of ``flat``'s nonzero elements when fewer than
    :data:`SPARSE_BELOW` of them are nonzero (a sparse message then is the smaller), else
    ``None``. Exact: the zeros are all that is left out."""
    if np.count_nonzero(flat) >= SPARSE_BELOW * flat.size:
        return None
    positions = np.flatnonzero(flat).astype(np.uint32)
    return positions, flat[positions]


def to_dense(indices: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """The flat float32 array of ``size`` elements that is ``values`` at ``indices``, zero
    elsewhere (a decoded sparse message)."""
    dense = np.zeros(size, np.float32)
    dense[indices] = values
    return dense


def unflatten(flat: np.ndarray, shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Split a flat array into views of the given shapes (no copy)."""
    arrays, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        arrays.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return arrays


def flatten(
    arrays: Sequence[np.ndarray], dtype: np.dtype | str = "float32"
) -> tuple[np.ndarray, Shapes]:
    """Concatenate arrays into one flat array of ``dtype``; returns it with their shapes."""
    shapes = [tuple(int(d) for d in np.shape(a)) for a in arrays]
    if not arrays:
        return np.zeros(0, dtype=dtype), shapes
    flat = np.concatenate([np.asarray(a, dtype=dtype).ravel() for a in arrays])
    return flat, shapes
