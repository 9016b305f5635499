"""The twelve weaknesses of issue 10, each tried as an attacker (or a broken worker) would.

Every test here failed against the server before its fix; the numbers follow the issue's list.
All of them run a real :class:`ParameterServer` on loopback.
"""

import json
import logging
import socket
import threading
import time

import numpy as np
import pytest

from kerasonspark import ParameterServerError, WireFormatError
from kerasonspark.parameter_server import (
    ParameterClient,
    ParameterServer,
    ParameterStore,
    ServerConfig,
    make_rule,
    new_secret,
    wire,
)
from kerasonspark.parameter_server import (
    _auth as auth,
)

SHAPES = [(3, 2), (2,)]
F32_MAX = float(np.finfo(np.float32).max)


def serve(num_workers: int = 2, rule: str | None = "downpour", lock: bool = True, **config):
    secret = new_secret()
    store = ParameterStore(
        np.arange(8, dtype=np.float32),
        SHAPES,
        num_workers=num_workers,
        rule=make_rule(rule) if rule else None,
        lock=lock,
        barrier_timeout=5,
    )
    server = ParameterServer(store, ServerConfig(secret, **config))
    server.secret = secret
    return server


def connect(server, timeout: float = 10) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def error_of(response: bytes) -> str:
    return json.loads(response.partition(b"\r\n\r\n")[2])["error"]


def signed_head(
    server,
    method: str,
    path: str,
    length: int,
    worker: int = 0,
    seq: int = 1,
    content_type: str = wire.CONTENT_TYPE,
) -> bytes:
    value = auth.sign(server.secret, method, path, worker, seq, length)
    return (
        f"{method} {path} HTTP/1.1\r\nHost: ps\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n{auth.HEADER}: {value}\r\n\r\n"
    ).encode()


def message(flat: np.ndarray, **fields) -> bytes:
    return b"".join(bytes(p) for p in wire.encode(flat, SHAPES, **fields))


# 1. A cap on connections waiting for their request, and a deadline for the request line and
# headers.
def test_1_a_slow_sender_is_closed_at_the_header_deadline(no_leaked_threads):
    with serve(header_timeout=1.0) as server:
        started = time.monotonic()
        with connect(server) as sock:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\n")
            try:
                for _ in range(40):  # one header byte every 0.1 s: never idle, never done
                    sock.sendall(b"X")
                    time.sleep(0.1)
            except OSError:
                pass
            response = read_until_closed(sock)
        assert time.monotonic() - started < 3.5
        assert status_of(response) == 408 and "1 s" in error_of(response)
        assert server.store.counters["closed_at_deadline"] == 1


def test_1_connections_without_credentials_are_capped_and_honest_workers_still_get_in(
    no_leaked_threads,
):
    with serve(max_pending_connections=8, header_timeout=30) as server:
        idle = [connect(server) for _ in range(40)]
        try:
            time.sleep(0.5)
            # The oldest waiting connections were closed to keep 8; their threads ended.
            assert server.open_connections <= 9
            closed = sum(1 for s in idle[:32] if _closed_by_peer(s))
            assert closed >= 30
            with ParameterClient(server.url, server.secret, 0, timeout=10) as client:
                assert client.health()["status"] == "ok"
            assert server.store.counters["connections_evicted"] >= 30
        finally:
            for sock in idle:
                sock.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(2)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return True


# 2. The listen backlog: a burst of connects must not stall an honest request.
def test_2_a_flood_of_connects_does_not_stall_an_honest_request(no_leaked_threads):
    with serve() as server:
        stop = threading.Event()

        def flood():  # bursts of 300 connects, 20 a second
            while not stop.is_set():
                socks = []
                for _ in range(300):
                    sock = socket.socket()
                    sock.setblocking(False)
                    sock.connect_ex((server.host, server.port))
                    socks.append(sock)
                time.sleep(0.05)
                for s in socks:
                    s.close()

        flooders = [threading.Thread(target=flood)]
        [t.start() for t in flooders]
        latencies = []
        try:
            for _ in range(15):  # an honest worker that reconnects each time, during the flood
                started = time.monotonic()
                with ParameterClient(server.url, server.secret, 0, timeout=10) as client:
                    client.health()
                latencies.append(time.monotonic() - started)
        finally:
            stop.set()
            [t.join() for t in flooders]
        # With a listen backlog of 5, dropped SYNs cost 1 s (and 3 s, ...) each.
        assert max(latencies) < 0.9, latencies


# 3. Header bytes held before authentication are bounded.
def test_3_oversized_headers_are_refused_with_431_before_authentication(no_leaked_threads):
    with serve() as server, connect(server) as sock:
        padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 8000) for i in range(8))
        sock.sendall(b"GET /v1/health HTTP/1.1\r\n" + padding + b"\r\n")
        response = read_until_closed(sock)
        assert status_of(response) == 431 and "16384" in error_of(response)


# 4. With sign_body, an unauthenticated request's declared body is never allocated or awaited.
def test_4_sign_body_refuses_an_unsigned_request_before_reading_its_body(no_leaked_threads):
    with serve(sign_body=True, idle_timeout=10) as server, connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/push HTTP/1.1\r\nContent-Length: 60000000\r\n\r\n")
        response = read_until_closed(sock)
        assert status_of(response) == 401 and time.monotonic() - started < 3


def test_4_sign_body_still_binds_the_body(no_leaked_threads):
    with serve(sign_body=True) as server:
        with ParameterClient(server.url, server.secret, 0, sign_body=True) as client:
            client.pull()
            reply, _ = client.push(np.ones(8, np.float32), SHAPES, window=1, samples=1)
        np.testing.assert_array_equal(reply, np.arange(8) + 1)
        body = message(np.full(8, 100, np.float32), window=1, samples=1)
        value = auth.sign(
            server.secret,
            "POST",
            "/v1/push",
            1,
            1,
            len(body),
            body_digest=auth.body_digest(message(np.zeros(8, np.float32), window=1, samples=1)),
        )
        with connect(server) as sock:
            sock.sendall(
                "POST /v1/push HTTP/1.1\r\nContent-Type: "
                f"{wire.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n{auth.HEADER}: "
                f"{value}\r\n\r\n".encode()
                + body
            )
            response = read_until_closed(sock)  # a refused request's connection is closed
        assert status_of(response) == 401 and "body" in error_of(response)
        np.testing.assert_array_equal(server.store.center, np.arange(8) + 1)


# 5. A malformed auth header is a 401, never a 500 with a traceback in the driver's log.
@pytest.mark.parametrize(
    "value",
    [
        "v1 worker=0 seq=1 ts={now} sig=" + "é" * 64,
        "v1 worker=0 seq=1 ts=" + "9" * 400 + " sig=" + "0" * 64,
        "v1 worker=0 seq=1 ts=-" + "9" * 400 + " sig=" + "0" * 64,
        "v1 worker=" + "1" * 5000 + " seq=1 ts={now} sig=" + "0" * 64,
    ],
    ids=["non-ascii-sig", "ts-400-digits", "ts-negative-400-digits", "worker-5000-digits"],
)
def test_5_a_malformed_auth_header_gets_401_and_no_traceback(value, caplog, no_leaked_threads):
    value = value.replace("{now}", str(int(time.time())))
    with serve() as server, connect(server) as sock, caplog.at_level(logging.DEBUG):
        sock.sendall(f"GET /v1/health HTTP/1.1\r\n{auth.HEADER}: {value}\r\n\r\n".encode("latin-1"))
        response = sock.recv(65536)
        assert status_of(response) == 401
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# 6. stop() survives a connection thread that could not start, and frees the port.
def test_6_stop_survives_a_connection_thread_that_failed_to_start(monkeypatch, no_leaked_threads):
    real_start = threading.Thread.start

    def start(self):
        if self.name.startswith("kerasonspark-ps-conn"):
            raise RuntimeError("can't start new thread")
        return real_start(self)

    server = serve().start()
    monkeypatch.setattr(threading.Thread, "start", start)
    with connect(server) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\n\r\n")
        assert sock.recv(100) == b""  # closed, not left hanging
    monkeypatch.setattr(threading.Thread, "start", real_start)
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection((server.host, server.port), timeout=2)


# 7. A finite update whose result overflows is refused; the center stays finite.
@pytest.mark.parametrize("lock", [True, False])
def test_7_a_push_that_would_overflow_the_center_is_refused(lock, no_leaked_threads):
    with serve(lock=lock) as server, ParameterClient(server.url, server.secret, 0) as client:
        client.pull()
        client.push(np.full(8, F32_MAX / 16, np.float32), SHAPES, window=1, samples=1)
        with pytest.raises(ParameterServerError, match="overflow") as refused:
            client.push(np.full(8, F32_MAX, np.float32), SHAPES, window=1, samples=1)
        assert refused.value.status == 422
        assert np.isfinite(server.store.center).all()
        np.testing.assert_array_equal(
            server.store.center, np.arange(8, dtype=np.float32) + np.float32(F32_MAX / 16)
        )


def test_7_a_round_whose_average_would_overflow_is_refused_and_the_round_still_completes(
    no_leaked_threads,
):
    with serve(rule=None) as server:
        with ParameterClient(server.url, server.secret, 0) as a:
            with pytest.raises(ParameterServerError, match="overflow") as refused:
                a.barrier(0, np.full(8, F32_MAX, np.float32), SHAPES, samples=10)
            assert refused.value.status == 422
        results = {}

        def arrive(worker):
            with ParameterClient(server.url, server.secret, worker) as c:
                results[worker] = c.barrier(
                    0, np.full(8, float(worker), np.float32), SHAPES, samples=1
                )

        threads = [threading.Thread(target=arrive, args=(w,)) for w in (0, 1)]
        [t.start() for t in threads]
        [t.join(10) for t in threads]
        np.testing.assert_array_equal(results[0], np.full(8, 0.5, np.float32))


# 8. An absurd sample count is refused before it joins the round, so the round is not jammed.
@pytest.mark.parametrize(
    "samples", [10**400, 2**64, -1, 1.5, "7"], ids=["10**400", "2**64", "-1", "1.5", "str"]
)
def test_8_an_absurd_sample_count_does_not_jam_the_round(samples, no_leaked_threads):
    with serve(rule=None) as server:
        body = message(np.ones(8, np.float32), samples=samples)
        with connect(server) as sock:
            sock.sendall(signed_head(server, "POST", "/v1/rounds/0", len(body)) + body)
            response = sock.recv(65536)
        assert status_of(response) == 400 and "samples" in error_of(response)
        results = {}

        def arrive(worker):
            with ParameterClient(server.url, server.secret, worker) as c:
                results[worker] = c.barrier(0, np.full(8, 2.0, np.float32), SHAPES, samples=1)

        threads = [threading.Thread(target=arrive, args=(w,)) for w in (0, 1)]
        [t.start() for t in threads]
        [t.join(10) for t in threads]
        assert set(results) == {0, 1}


# 9. Malformed wire headers are a 400 (WireFormatError), never a 500.
@pytest.mark.parametrize(
    "header",
    [
        b'{"dtype": "float32", "shapes": [[8]], "samples": ' + b"7" * 5000 + b"}",
        b'{"dtype": "float32", "shapes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"dtype": "float32", "shapes": [[' + b",".join([b"4611686018427387904"] * 300) + b"]]}",
    ],
    ids=["number-of-5000-digits", "nesting-100000-deep", "shape-product-too-large-to-print"],
)
def test_9_malformed_wire_headers_are_refused_with_400(header, no_leaked_threads):
    prefix = b"KOSW\x01\x00\x00\x00" + len(header).to_bytes(4, "little") + header
    body = prefix + b"\0" * (-len(prefix) % 8) + bytes(32)
    with pytest.raises(WireFormatError):
        wire.decode(body)
    with serve() as server, connect(server) as sock:
        sock.sendall(signed_head(server, "POST", "/v1/push", len(body)) + body)
        assert status_of(sock.recv(65536)) == 400


@pytest.mark.parametrize(
    "path",
    ["/v1/rounds/" + "9" * 5000, "/v1/epochs/" + "9" * 5000 + "/end"],
    ids=["round-of-5000-digits", "epoch-of-5000-digits"],
)
def test_9_absurd_numbers_in_the_path_are_refused_with_400_or_404(path, no_leaked_threads):
    with serve() as server, connect(server) as sock:
        sock.sendall(signed_head(server, "POST", path, 0))
        assert status_of(sock.recv(65536)) in (400, 404)


# 10. idle_timeout bounds idle time, not a whole reply; a cut reply is our error, not
# IncompleteRead.
def test_10_a_slow_but_steady_reader_gets_the_whole_reply(no_leaked_threads):
    secret = new_secret()
    size = 8 << 20  # 32 MB of float32: more than the kernel's send buffer takes at once
    store = ParameterStore(
        np.ones(size, np.float32), [(size,)], num_workers=1, rule=make_rule("downpour")
    )
    with ParameterServer(store, ServerConfig(secret, idle_timeout=1.0)) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.connect((server.host, server.port))
        value = auth.sign(secret, "GET", "/v1/weights", 0, 1, 0)
        sock.sendall(f"GET /v1/weights HTTP/1.1\r\n{auth.HEADER}: {value}\r\n\r\n".encode())
        received, started = 0, time.monotonic()
        while chunk := sock.recv(65536):
            received += len(chunk)
            # about 16 MB/s: the reply takes longer than idle_timeout, but never idles
            time.sleep(0.004)
            if received >= 4 * size:
                break
        sock.close()
        assert time.monotonic() - started > 1.0
        assert received >= 4 * size


def test_10_a_reply_cut_short_raises_our_error():
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_half():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                b'1000\r\n\r\n{"a"'
            )

    thread = threading.Thread(target=answer_half)
    thread.start()
    with ParameterClient(
        f"http://127.0.0.1:{listener.getsockname()[1]}", new_secret(), 0, timeout=5
    ) as client:
        with pytest.raises(ParameterServerError, match="4 of its 1000 bytes"):
            client.health()
    thread.join(5)
    listener.close()


# 11. Content-Length is digits only.
@pytest.mark.parametrize(
    "length",
    [b"+5", b"0_5", b"5 5", b"0x5", b"\xd9\xa5", b"1" * 30],
    ids=["sign", "underscore", "inner-space", "hex", "arabic-digit", "30-digits"],
)
def test_11_content_length_must_be_digits(length, no_leaked_threads):
    with serve() as server, connect(server) as sock:
        sock.sendall(b"POST /v1/failure HTTP/1.1\r\nContent-Length: " + length + b"\r\n\r\n12345")
        response = read_until_closed(sock)
        assert status_of(response) == 400 and "Content-Length" in error_of(response)


# 12. The payload cap (the model's size) is told only to an authenticated client.
def test_12_an_oversized_unauthenticated_request_learns_nothing_of_the_cap(no_leaked_threads):
    with serve(max_payload_bytes=4096) as server:
        with connect(server) as sock:
            sock.sendall(b"POST /v1/push HTTP/1.1\r\nContent-Length: 999999\r\n\r\n")
            response = read_until_closed(sock)
        assert status_of(response) == 401 and "4096" not in response.decode()
        with connect(server) as sock:
            sock.sendall(signed_head(server, "POST", "/v1/push", 999999))
            response = read_until_closed(sock)
        assert status_of(response) == 413 and "4096" in error_of(response)


def test_a_signed_request_from_an_unknown_worker_id_is_refused_before_the_replay_guard_remembers_it(
    no_leaked_threads,
):
    with serve() as server:
        for worker in (2, 7, 10**8):
            with connect(server) as sock:
                sock.sendall(signed_head(server, "GET", "/v1/stats", 0, worker=worker))
                response = sock.recv(65536)
            assert status_of(response) == 400 and "Unknown worker id" in error_of(response)
        assert server.app.extensions["kerasonspark"].replay._last == {}
        with (
            ParameterClient(server.url, server.secret, -1) as driver,
            ParameterClient(server.url, server.secret, 1) as w,
        ):
            assert driver.health()["status"] == "ok" and w.health()["status"] == "ok"
