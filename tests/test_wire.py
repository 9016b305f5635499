import json
import struct

import numpy as np
import pytest

from kerasonspark import WireFormatError
from kerasonspark.parameter_server import wire


def message(flat, shapes, **fields):
    return b"".join(bytes(p) for p in wire.encode(flat, shapes, **fields))


def test_round_trip_is_exact_and_zero_copy():
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.5, -2.5], np.float32)]
    flat, shapes = wire.flatten(arrays)
    header, decoded = wire.decode(message(flat, shapes, worker=3, step=7))
    assert header["worker"] == 3 and header["step"] == 7 and header["shapes"] == [(2, 3), (2,)]
    np.testing.assert_array_equal(decoded, flat)
    restored = wire.unflatten(decoded, header["shapes"])
    np.testing.assert_array_equal(restored[0], arrays[0])
    assert not decoded.flags.writeable  # a view on the received bytes, not a copy


def test_layout_is_documented_prefix_then_aligned_little_endian_payload():
    flat = np.array([1.0, 2.0], np.float32)
    data = message(flat, [(2,)])
    magic, version, header_len = struct.unpack_from("<4sB3xI", data)
    assert (magic, version) == (b"KOSW", 1)
    header = json.loads(data[12 : 12 + header_len])
    assert header["dtype"] == "float32"
    start = 12 + header_len + (-(12 + header_len) % 8)
    assert start % 8 == 0
    assert data[start:] == np.array([1.0, 2.0], "<f4").tobytes()


def test_float16_payload_round_trips():
    flat = np.array([0.5, 1.0, -2.0], np.float16)
    header, decoded = wire.decode(message(flat, [(3,)]))
    assert header["dtype"] == "float16"
    np.testing.assert_array_equal(decoded, flat)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: b"XXXX" + d[4:], "magic"),
        (lambda d: d[:4] + b"\x09" + d[5:], "version"),
        (lambda d: d[:-4], "Payload length"),
        (lambda d: d + b"\0\0\0\0", "Payload length"),
        (lambda d: d[:8], "too short"),
        (lambda d: d[:8] + struct.pack("<I", 10**9) + d[12:], "Header length"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(mutate, fragment):
    data = message(np.ones(4, np.float32), [(2, 2)])
    with pytest.raises(WireFormatError, match=fragment):
        wire.decode(mutate(data))


def test_header_must_be_json_with_valid_dtype_and_shapes():
    def raw(header: bytes) -> bytes:
        pad = -(12 + len(header)) % 8
        return struct.pack("<4sB3xI", b"KOSW", 1, len(header)) + header + b"\0" * pad

    with pytest.raises(WireFormatError, match="JSON"):
        wire.decode(raw(b"{not json"))
    with pytest.raises(WireFormatError, match="dtype"):
        wire.decode(raw(b'{"dtype":"float64","shapes":[]}'))
    # not a name at all: still a WireFormatError
    with pytest.raises(WireFormatError, match="dtype"):
        wire.decode(raw(b'{"dtype":["float32"],"shapes":[]}'))
    with pytest.raises(WireFormatError, match="shapes"):
        wire.decode(raw(b'{"dtype":"float32","shapes":[[-1]]}'))
    with pytest.raises(WireFormatError, match="object"):
        wire.decode(raw(b"[1,2]"))


def test_encode_refuses_wrong_size_or_dtype():
    with pytest.raises(WireFormatError, match="elements"):
        wire.encode(np.ones(5, np.float32), [(2, 2)])
    with pytest.raises(WireFormatError, match="float32, float16 or bfloat16"):
        wire.encode(np.ones(4, np.float64), [(4,)])


def test_bfloat16_round_trip_keeps_three_significant_digits_and_non_finite_values():
    values = np.array([1.0, -3.14159, 1e-30, 6.5e4, 1e38, np.inf, np.nan], np.float32)
    bits = wire.to_bfloat16(values)
    header, decoded = wire.decode(message(bits, [(7,)]))
    assert header["dtype"] == "bfloat16"
    back = wire.as_float32(decoded, header["dtype"])
    np.testing.assert_allclose(back[:5], values[:5], rtol=4e-3)
    assert np.isinf(back[5]) and np.isnan(back[6])


def sparse_message(values, shapes, positions, **fields):
    return b"".join(bytes(p) for p in wire.encode_sparse(values, shapes, positions, **fields))


def test_a_sparse_message_is_version_2_positions_then_aligned_values():
    positions = np.array([1, 4, 9], np.uint32)
    data = sparse_message(np.array([0.5, -1.0, 2.0], np.float32), [(4, 3)], positions, window=2)
    magic, version, header_len = struct.unpack_from("<4sB3xI", data)
    assert (magic, version) == (b"KOSW", wire.SPARSE_VERSION)
    assert json.loads(data[12 : 12 + header_len])["nnz"] == 3
    start = 12 + header_len + (-(12 + header_len) % 8)
    assert data[start : start + 12] == positions.astype("<u4").tobytes()
    assert data[start + 16 :] == np.array([0.5, -1.0, 2.0], "<f4").tobytes()  # 12 + 4 padding
    header, values = wire.decode(data, sparse=True)
    assert header["window"] == 2 and not values.flags.writeable
    dense = wire.to_dense(header["indices"], values, 12)
    np.testing.assert_array_equal(np.flatnonzero(dense), positions)
    np.testing.assert_array_equal(dense[positions], [0.5, -1.0, 2.0])


def test_a_sparse_message_is_refused_where_whole_arrays_are_expected():
    data = sparse_message(np.ones(1, np.float32), [(4,)], np.array([2], np.uint32))
    with pytest.raises(WireFormatError, match="sparse message"):
        wire.decode(data)


def _with_positions(data: bytes, positions: list[int]) -> bytes:
    header_len = struct.unpack_from("<I", data, 8)[0]
    start = 12 + header_len + (-(12 + header_len) % 8)
    raw = np.array(positions, "<u4").tobytes()
    return data[:start] + raw + data[start + len(raw) :]


@pytest.mark.parametrize(
    "positions, fragment",
    [([3, 1], "strictly ascending"), ([1, 1], "strictly ascending"), ([1, 12], "below")],
)
def test_sparse_positions_out_of_order_or_range_are_refused(positions, fragment):
    data = sparse_message(np.ones(2, np.float32), [(12,)], np.array([0, 5], np.uint32))
    with pytest.raises(WireFormatError, match=fragment):
        wire.decode(_with_positions(data, positions), sparse=True)


def test_sparse_counts_and_lengths_that_disagree_are_refused():
    data = sparse_message(np.ones(2, np.float32), [(12,)], np.array([0, 5], np.uint32))
    with pytest.raises(WireFormatError, match="Payload length"):
        wire.decode(data[:-4], sparse=True)
    header_len = struct.unpack_from("<I", data, 8)[0]
    header = json.loads(data[12 : 12 + header_len])
    for nnz in (13, -1, "2", True):
        forged = json.dumps({**header, "nnz": nnz}).encode()
        pad = -(12 + len(forged)) % 8
        body = struct.pack("<4sB3xI", b"KOSW", 2, len(forged)) + forged + b"\0" * pad
        with pytest.raises(WireFormatError, match="nnz"):
            wire.decode(body + b"\0" * 16, sparse=True)
    with pytest.raises(WireFormatError, match="3 elements"):
        wire.encode_sparse(np.ones(2, np.float32), [(12,)], np.array([0, 5, 7], np.uint32))
