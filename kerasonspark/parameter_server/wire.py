"""The parameter server's binary wire format, version 1.

Every weight-carrying message (request or response) is::

    offset  size  field
    0       4     magic  b"KOSW"
    4       1     format version (1)
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
    "VERSION",
    "decode",
    "dtype_name",
    "encode",
    "encoded_size",
    "flatten",
    "unflatten",
]


MAGIC = b"KOSW"
"""The four bytes every message starts with."""
VERSION = 1
"""The format's version, the byte after :data:`MAGIC`."""
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
    name = dtype_name(flat)
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if flat.ndim != 1 or flat.size != shapes_size(shapes):
        raise WireFormatError(
            f"Expected a flat array of {shapes_size(shapes)} elements for shapes {shapes}. "
            f"Received: shape={flat.shape}."
        )
    header = json.dumps({"dtype": name, "shapes": shapes, **fields}, separators=(",", ":")).encode()
    padding = -(_PREFIX.size + len(header)) % 8
    prefix = _PREFIX.pack(MAGIC, VERSION, len(header)) + header + b"\0" * padding
    payload = np.ascontiguousarray(flat)
    if payload.dtype.byteorder == ">":
        payload = payload.astype(payload.dtype.newbyteorder("<"))
    return [prefix, memoryview(payload).cast("B")]  # type: ignore[arg-type]  # ndarray is a buffer


def encoded_size(parts: Sequence[bytes | memoryview]) -> int:
    """Total bytes of a message returned by :func:`encode`."""
    return sum(memoryview(p).nbytes for p in parts)


def decode(message: bytes | bytearray | memoryview) -> tuple[dict[str, Any], np.ndarray]:
    """Decode a message into ``(header, flat)``; ``flat`` is a read-only view of ``message``.

    Raises:
        WireFormatError: bad magic or version, a header that is not a JSON object with valid
            ``dtype`` and ``shapes``, or a payload of the wrong length.
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
    if version != VERSION:
        raise WireFormatError(
            f"Unsupported wire format version {version}; this side speaks version {VERSION}."
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
    start = _PREFIX.size + header_len
    start += -start % 8
    expected = shapes_size(header["shapes"]) * dtype.itemsize
    if view.nbytes - start != expected:
        called_for = f"{expected} bytes" if expected < 1 << 62 else "more than 2**62 bytes"
        raise WireFormatError(
            f"Payload length mismatch: shapes and dtype call for {called_for}. "
            f"Received: {max(view.nbytes - start, 0)} bytes."
        )
    flat = np.frombuffer(view, dtype=dtype, offset=start)
    return header, flat


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
