"""The parameter server over a real socket: routes, auth, limits, barriers, shutdown."""

import http.client
import json
import threading
import time

import numpy as np
import pytest

from kerasonspark import BarrierTimeoutError, ParameterServerError
from kerasonspark.parameter_server import (
    ParameterClient,
    ParameterServer,
    ParameterStore,
    ServerConfig,
    UpdateRule,
    new_secret,
    wire,
)

SHAPES = [(3, 2), (2,)]


class AddRule(UpdateRule):
    name = "add"

    def apply(self, center, update, staleness, window):
        new = center + update
        return new, new


@pytest.fixture
def server(no_leaked_threads):
    secret = new_secret()
    store = ParameterStore(
        np.arange(8, dtype=np.float32), SHAPES, num_workers=2, rule=AddRule(), barrier_timeout=5
    )
    with ParameterServer(store, ServerConfig(secret, max_payload_bytes=4096)) as srv:
        srv.secret = secret
        yield srv


def client(server, worker=0, secret=None):
    return ParameterClient(server.url, secret or server.secret, worker, timeout=30)


def test_health_pull_and_stats(server):
    with client(server) as c:
        assert c.health()["status"] == "ok"
        flat, version = c.pull()
        np.testing.assert_array_equal(flat, np.arange(8))
        assert version == 0
        assert c.stats()["pulls"] == 1


def test_push_applies_the_rule_and_reports_staleness(server):
    with client(server, 0) as a, client(server, 1) as b:
        a.pull(), b.pull()
        a.push(np.ones(8, np.float32), SHAPES, window=1, samples=4)
        reply, header = b.push(np.ones(8, np.float32), SHAPES, window=1, samples=4)
        np.testing.assert_array_equal(reply, np.arange(8) + 2)
        assert header["staleness"] == 1 and header["version"] == 2
        stats = b.stats()
    assert stats["updates"] == 2 and stats["staleness"]["max"] == 1


@pytest.mark.parametrize("secret", [None, b"wrong" * 8])
def test_unauthenticated_requests_get_401_and_change_nothing(server, secret):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    body = b"".join(bytes(p) for p in wire.encode(np.full(8, 100, np.float32), SHAPES))
    headers = {"Content-Type": wire.CONTENT_TYPE}
    if secret:
        from kerasonspark.parameter_server import _auth as auth

        headers[auth.HEADER] = auth.sign(secret, "POST", "/v1/push", 0, 1, len(body))
    conn.request("POST", "/v1/push", body, headers)
    response = conn.getresponse()
    assert response.status == 401
    assert "secret" in json.loads(response.read())["error"] or not secret
    conn.close()
    np.testing.assert_array_equal(server.store.center, np.arange(8))


def test_wrong_shapes_get_400_and_nan_gets_422_and_weights_stay(server):
    with client(server) as c:
        with pytest.raises(ParameterServerError) as bad_shape:
            c.push(np.ones(8, np.float32), [(2, 4)], window=1, samples=1)
        assert bad_shape.value.status == 400 and "shapes" in str(bad_shape.value)
        poisoned = np.ones(8, np.float32)
        poisoned[3] = np.nan
        with pytest.raises(ParameterServerError) as nan:
            c.push(poisoned, SHAPES, window=1, samples=1)
        assert nan.value.status == 422
        stats = c.stats()
    assert stats["refused"] == {"shape": 1, "nonfinite": 1}
    np.testing.assert_array_equal(server.store.center, np.arange(8))


def test_malformed_body_gets_400(server):
    with client(server) as c:
        status, _, data = c.request("POST", "/v1/push", b"KOSW garbage")
    assert status == 400 and "error" in json.loads(data)
    np.testing.assert_array_equal(server.store.center, np.arange(8))


def test_oversized_payload_gets_413(server):
    with client(server) as c:
        status, _, data = c.request("POST", "/v1/push", b"\0" * 10_000)
    assert status == 413 and "cap" in json.loads(data)["error"]


def test_replayed_sequence_number_gets_409(server):
    # Two clients of one worker: the older one's sequence numbers are below the newer one's, as
    # a recorded request replayed later would be.
    with client(server) as older, client(server) as newer:
        newer.pull()
        with pytest.raises(ParameterServerError) as replay:
            older.pull()
    assert replay.value.status == 409 and "Replayed or out-of-order" in str(replay.value)


def test_barrier_returns_the_sample_weighted_average_to_everyone(server):
    results = {}

    def join(worker, value, samples):
        with client(server, worker) as c:
            results[worker] = c.barrier(0, np.full(8, value, np.float32), SHAPES, samples)

    threads = [threading.Thread(target=join, args=a) for a in ((0, 1.0, 10), (1, 4.0, 20))]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    expected = (1.0 * 10 + 4.0 * 20) / 30
    np.testing.assert_allclose(results[0], expected, rtol=1e-6)
    np.testing.assert_allclose(results[1], expected, rtol=1e-6)
    np.testing.assert_allclose(server.store.center, expected, rtol=1e-6)


def test_barrier_timeout_names_the_missing_worker(server):
    server.store.barrier_timeout = 0.5
    with client(server, 1) as c:
        started = time.monotonic()
        with pytest.raises(BarrierTimeoutError) as timeout:
            c.barrier(0, np.ones(8, np.float32), SHAPES, 5)
    assert timeout.value.missing == (0,) and "worker(s) [0]" in str(timeout.value)
    assert time.monotonic() - started < 5


def test_stop_ends_every_thread_and_closes_the_port(no_leaked_threads):
    secret = new_secret()
    store = ParameterStore(np.zeros(8, np.float32), SHAPES, num_workers=2)
    srv = ParameterServer(store, ServerConfig(secret)).start()
    waiter = ParameterClient(srv.url, secret, 0, timeout=30)
    errors = []

    def wait_in_barrier():
        try:
            waiter.barrier(0, np.ones(8, np.float32), SHAPES, 1)
        except Exception as exc:
            errors.append(exc)

    blocked = threading.Thread(target=wait_in_barrier)
    blocked.start()
    assert store.wait_for_arrivals(0, 1, timeout=10) == [0]
    srv.stop()
    blocked.join(10)
    assert not blocked.is_alive() and errors
    with pytest.raises(OSError):
        http.client.HTTPConnection(srv.host, srv.port, timeout=2).connect()


def test_one_keep_alive_connection_serves_many_requests(server):
    with client(server) as c:
        for _ in range(5):
            c.pull()
        c.stats()
        assert server.open_connections == 1
    # and a refused request does not poison the next one on the same connection
    with client(server) as c:
        status, _, _ = c.request("POST", "/v1/push", b"\0" * 10_000)
        assert status == 413
        assert c.health()["status"] == "ok"


def test_failure_report_must_be_a_json_object(server):
    with client(server) as c:
        status, _, data = c.request("POST", "/v1/failure", b"[1, 2]", "application/json")
    assert status == 400 and "JSON object" in json.loads(data)["error"]
    assert server.store.failures == {}


def raw_exchange(server, data: bytes, timeout: float = 10) -> tuple[bytes, bool]:
    """Send raw bytes, read until the server closes; returns (what came back, whether it closed)."""
    import socket

    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
    return received, True


def status_and_error(response: bytes) -> tuple[int, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


@pytest.mark.parametrize(
    "head, status, fragment",
    [
        (b"Content-Length: -5", 400, "non-negative"),
        (b"Content-Length: 3\r\nContent-Length: 5", 400, "Conflicting"),
        (b"Transfer-Encoding: chunked", 411, "Content-Length"),
    ],
)
def test_http_framing_errors_get_a_json_refusal_and_change_nothing(server, head, status, fragment):
    response, closed = raw_exchange(server, b"POST /v1/push HTTP/1.1\r\n" + head + b"\r\n\r\nabcde")
    code, error = status_and_error(response)
    assert code == status and fragment in error and closed
    np.testing.assert_array_equal(server.store.center, np.arange(8))


def test_an_unsigned_request_is_refused_before_its_body_is_read(server):
    # Only the headers are sent; the 401 must not wait for the 4,000 announced bytes.
    response, closed = raw_exchange(
        server, b"POST /v1/push HTTP/1.1\r\nContent-Length: 4000\r\n\r\n", timeout=5
    )
    assert status_and_error(response)[0] == 401
    assert server.store.counters["refused_auth"] == 1


def test_idle_and_stalled_connections_are_closed_and_clients_reconnect(no_leaked_threads):
    from kerasonspark.parameter_server import _auth as auth

    secret = new_secret()
    store = ParameterStore(np.arange(8, dtype=np.float32), SHAPES, num_workers=1, rule=AddRule())
    with ParameterServer(store, ServerConfig(secret, idle_timeout=0.5)) as srv:
        started = time.monotonic()
        response, closed = raw_exchange(srv, b"", timeout=10)
        assert closed and response == b"" and time.monotonic() - started < 5
        signature = auth.sign(secret, "POST", "/v1/push", 0, 1, 100).encode()
        response, _ = raw_exchange(
            srv,
            b"POST /v1/push HTTP/1.1\r\nContent-Length: 100\r\nX-KOS-Auth: "
            + signature
            + b"\r\n\r\nKOSW",
            timeout=10,
        )
        status, error = status_and_error(response)
        assert status == 408 and "stopped arriving" in error
        with ParameterClient(srv.url, secret, 0, timeout=10) as c:
            c.pull()
            time.sleep(1.0)  # the server closes the idle connection meanwhile
            reply, _ = c.push(np.ones(8, np.float32), SHAPES, window=1, samples=1)
        np.testing.assert_array_equal(reply, np.arange(8) + 1)
        assert store.version == 1


def test_rotating_the_secret_refuses_the_old_one_and_waits_for_a_push_it_let_in(no_leaked_threads):
    import socket

    from kerasonspark.parameter_server import _auth as auth

    secret = new_secret()
    store = ParameterStore(np.arange(8, dtype=np.float32), SHAPES, num_workers=1, rule=AddRule())
    with ParameterServer(store, ServerConfig(secret)) as server:
        body = b"".join(
            bytes(p) for p in wire.encode(np.ones(8, np.float32), SHAPES, window=1, samples=1)
        )
        head = (
            f"POST /v1/push HTTP/1.1\r\nContent-Type: {wire.CONTENT_TYPE}\r\nContent-Length: "
            f"{len(body)}\r\n{auth.HEADER}: "
            f"{auth.sign(secret, 'POST', '/v1/push', 0, 1, len(body))}\r\n\r\n"
        ).encode()
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            # authenticated; the rest of the body is still on its way
            sock.sendall(head + body[:10])
            time.sleep(0.3)
            outcome = {}
            rotation = threading.Thread(
                target=lambda: outcome.setdefault("drained", server.rotate_secret(new_secret()))
            )
            rotation.start()
            time.sleep(0.3)
            assert rotation.is_alive() and store.version == 0  # waiting for the push it let in
            sock.sendall(body[10:])
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            rotation.join(5)
        assert outcome == {"drained": True} and store.version == 1
        with ParameterClient(server.url, secret, 0, timeout=10) as old:
            with pytest.raises(ParameterServerError, match="401"):
                old.pull()
