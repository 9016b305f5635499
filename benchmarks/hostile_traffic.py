"""Hostile traffic at volume against a live parameter server while two honest workers keep pushing.

    python benchmarks/hostile_traffic.py --requests 10000 [--attackers 4] [--threads 16]

The server holds the reference CNN's 1,048,853 weights (ADAG rule). Two honest workers (processes 0
and 1) push 4.2 MB deltas: first alone (the latency without the attack), then while the attacker
processes fire ``--requests`` requests of the mix below on loopback. Every attack has a documented
answer; ``unexpected`` counts the answers that differ (it must be 0). Worker ids 0 and 1 are the
honest workers; every attacker thread is an insider with a worker id of its own (2 and up: it holds
the secret and sends signed garbage, so the checks behind authentication are tried too); ids beyond
those are unknown to the server.

Prints one JSON line: ``status_counts`` (status -> count; ``closed`` when the server closed the
connection without an answer, as it does to a flood connection it evicts),
``closed_at_deadline`` (the server's count of connections closed at ``header_timeout``),
``server_alive``, ``center_changed_by_refused`` (false when replaying the accepted honest pushes,
in the server's order, on the initial center reproduces the final center bit for bit, and the
accepted pushes are exactly the honest ones), and the honest pushes' p50/p99 latency without and
with the attack.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import random
import socket
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from kerasonspark import MNIST_CNN_PARAMETERS
from kerasonspark.parameter_server import _auth as auth
from kerasonspark.parameter_server import wire
from kerasonspark.parameter_server._rules import Adag

SHAPES = [(3, 3, 1, 32), (32,), (3, 3, 32, 32), (32,), (4608, 225), (225,), (225, 10), (10,)]
SIZE = MNIST_CNN_PARAMETERS
WINDOW = 5
HEADER_TIMEOUT = 2.0
IDLE_TIMEOUT = 2.0
FLOOD = 100  # silent connections opened at once by one `connection_flood` request


def honest_delta(worker: int, index: int, base: np.ndarray) -> np.ndarray:
    """Push ``index`` of an honest worker: marked with (worker, index) in its first two values."""
    delta = base * np.float32(1 + index % 7)
    delta[0], delta[1] = worker, index
    return delta


def honest_base(worker: int) -> np.ndarray:
    return (np.random.default_rng(worker).normal(size=SIZE) * 1e-4).astype(np.float32)


def honest_worker(url: str, secret: bytes, worker: int, attack: Any, stop: Any, out: Any) -> None:
    from kerasonspark.parameter_server import ParameterClient

    base = honest_base(worker)
    latencies: list[tuple[float, bool]] = []
    accepted: list[int] = []
    index = 0
    with ParameterClient(url, secret, worker, timeout=60) as client:
        client.pull()
        while not stop.is_set():
            delta = honest_delta(worker, index, base)
            under_attack = attack.is_set()
            started = time.perf_counter()
            client.push(delta, SHAPES, window=WINDOW, samples=WINDOW * 32)
            latencies.append((time.perf_counter() - started, under_attack))
            accepted.append(index)
            index += 1
    out.put((worker, latencies, accepted))


# -- the attacks ---------------------------------------------------------------------------------
class Attack:
    """What every attacker thread shares: where the server is, the secret, prepared bodies."""

    def __init__(
        self, host: str, port: int, secret: bytes, first_insider: int = 2, unknown_from: int = 2
    ) -> None:
        self.host, self.port, self.secret = host, port, secret
        self.unknown_from = unknown_from
        self.local = threading.local()  # each thread: its own insider id and sequence
        self.insiders = iter(range(first_insider, 1 << 30))
        self.lock = threading.Lock()
        flat = np.zeros(SIZE, np.float32)
        flat[0] = -1  # never an honest marker
        self.valid = self.body(flat, window=WINDOW, samples=160)
        nan = flat.copy()
        nan[1000] = np.nan
        self.nan = self.body(nan, window=WINDOW, samples=160)
        # Finite weights whose sample-weighted sum overflows: refused before they join a round.
        self.overflow = self.body(np.full(SIZE, np.finfo(np.float32).max, np.float32), samples=2)
        self.absurd_samples = self.body(np.zeros(SIZE, np.float32), samples=10**400)
        self.wrong_shapes = b"".join(
            bytes(p) for p in wire.encode(np.zeros(10, np.float32), [(10,)], samples=1)
        )
        small = b"".join(bytes(p) for p in wire.encode(np.zeros(10, np.float32), [(10,)]))
        self.wrong_dtype = small.replace(b'"float32"', b'"int32"  ')

    @staticmethod
    def body(flat: np.ndarray, **fields: Any) -> bytes:
        return b"".join(bytes(p) for p in wire.encode(flat, SHAPES, **fields))

    @staticmethod
    def header_message(header: bytes) -> bytes:
        prefix = (
            wire.MAGIC + bytes([wire.VERSION, 0, 0, 0]) + len(header).to_bytes(4, "little") + header
        )
        return prefix + b"\0" * (-len(prefix) % 8) + bytes(40)

    def sign(
        self, method: str, path: str, length: int, worker: int | None = None, seq: int | None = None
    ) -> str:
        """Signed with the secret: by this thread's insider id unless ``worker`` is given."""
        local = self.local
        if not hasattr(local, "worker"):
            with self.lock:
                local.worker, local.seq = next(self.insiders), time.time_ns()
        if seq is None:
            local.seq += 1
            seq = local.seq
        return auth.sign(
            self.secret, method, path, local.worker if worker is None else worker, seq, length
        )

    def head(
        self,
        method: str,
        path: str,
        length: int,
        auth_value: str | None = None,
        extra: str = "",
        content_type: str = "application/x-kerasonspark-weights",
    ) -> bytes:
        lines = [
            f"{method} {path} HTTP/1.1",
            "Host: ps",
            f"Content-Type: {content_type}",
            f"Content-Length: {length}",
        ]
        if auth_value is not None:
            lines.append(f"{auth.HEADER}: {auth_value}")
        return ("\r\n".join(lines) + extra + "\r\n\r\n").encode("latin-1")

    def exchange(
        self, data: bytes, then_close: bool = False, timeout: float = 30.0, drip: float = 0.0
    ) -> str:
        """Send ``data`` and return the answer's status (or ``closed``)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
                try:
                    if drip:
                        for byte in data:
                            sock.sendall(bytes([byte]))
                            time.sleep(drip)
                    else:
                        sock.sendall(data)
                    if then_close:
                        sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                received = b""
                while b"\r\n" not in received:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
        except OSError:
            return "closed"
        if not received.startswith(b"HTTP/1.1 "):
            return "closed"
        return received.split(b" ", 2)[1].decode()

    def flood(self, connections: int = FLOOD) -> str:
        """Open ``connections`` at once and say nothing; ``closed`` once the server closed them
        all."""
        socks = []
        for _ in range(connections):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((self.host, self.port))
            socks.append(sock)
        deadline, open_ = time.monotonic() + HEADER_TIMEOUT * 3, set(socks)
        while open_ and time.monotonic() < deadline:
            time.sleep(0.05)
            for sock in list(open_):
                try:
                    if sock.recv(1) == b"":
                        open_.discard(sock)
                except BlockingIOError:
                    pass
                except OSError:  # reset, or the connect itself was refused
                    open_.discard(sock)
        for sock in socks:
            sock.close()
        return "closed" if not open_ else "not closed"

    def silent_connection(self) -> str:
        """Connect and say nothing: evicted by newer connections or closed at header_timeout."""
        try:
            with socket.create_connection(
                (self.host, self.port), timeout=HEADER_TIMEOUT * 3
            ) as sock:
                return "closed" if sock.recv(1) == b"" else "answered"
        except TimeoutError:
            return "not closed"
        except OSError:  # reset, or refused
            return "closed"


def attack_kinds(a: Attack) -> dict[str, tuple[Any, set[str]]]:
    """name -> (send one, the documented answers)."""
    now = int(time.time())
    sig0 = "0" * 64
    return {
        "random_bytes": (
            lambda: a.exchange(
                b"X"
                + os.urandom(random.randint(1, 400)).replace(b"\r", b"").replace(b"\n", b"")
                + b"\r\n\r\n"
            ),
            {"400", "505"},
        ),
        "unsigned_push": (
            lambda: a.exchange(a.head("POST", "/v1/push", len(a.valid)) + a.valid[:65536]),
            {"401"},
        ),
        "forged_signature": (
            lambda: a.exchange(
                a.head(
                    "POST",
                    "/v1/push",
                    len(a.valid),
                    f"v1 worker=0 seq={now} ts={now} sig={os.urandom(32).hex()}",
                )
                + a.valid[:65536]
            ),
            {"401"},
        ),
        "replayed_sequence": (
            lambda: a.exchange(
                a.head(
                    "POST",
                    "/v1/push",
                    len(a.valid),
                    a.sign(
                        "POST", "/v1/push", len(a.valid), worker=0, seq=random.randint(1, 10**6)
                    ),
                )
                + a.valid
            ),
            {"409"},
        ),
        "unknown_worker": (
            lambda: a.exchange(
                a.head(
                    "POST",
                    "/v1/push",
                    len(a.valid),
                    a.sign(
                        "POST",
                        "/v1/push",
                        len(a.valid),
                        worker=random.randint(a.unknown_from, 10**6),
                    ),
                )
                + a.valid
            ),
            {"400"},
        ),
        "nan_update": (
            lambda: a.exchange(
                a.head("POST", "/v1/push", len(a.nan), a.sign("POST", "/v1/push", len(a.nan)))
                + a.nan
            ),
            {"422"},
        ),
        "overflowing_round": (
            lambda: a.exchange(
                a.head(
                    "POST",
                    "/v1/rounds/0",
                    len(a.overflow),
                    a.sign("POST", "/v1/rounds/0", len(a.overflow)),
                )
                + a.overflow
            ),
            {"422"},
        ),
        "wrong_shapes": (
            lambda: a.exchange(
                a.head(
                    "POST",
                    "/v1/push",
                    len(a.wrong_shapes),
                    a.sign("POST", "/v1/push", len(a.wrong_shapes)),
                )
                + a.wrong_shapes
            ),
            {"400"},
        ),
        "wrong_dtype": (
            lambda: a.exchange(
                a.head(
                    "POST",
                    "/v1/push",
                    len(a.wrong_dtype),
                    a.sign("POST", "/v1/push", len(a.wrong_dtype)),
                )
                + a.wrong_dtype
            ),
            {"400"},
        ),
        "truncated_body": (
            lambda: a.exchange(
                a.head("POST", "/v1/push", len(a.valid), a.sign("POST", "/v1/push", len(a.valid)))
                + a.valid[:100_000],
                then_close=True,
            ),
            {"400"},
        ),
        "oversized_signed": (
            lambda: a.exchange(
                a.head("POST", "/v1/push", 1 << 30, a.sign("POST", "/v1/push", 1 << 30))
            ),
            {"413"},
        ),
        "oversized_unsigned": (lambda: a.exchange(a.head("POST", "/v1/push", 1 << 30)), {"401"}),
        "lying_length_signed": (
            lambda: a.exchange(
                a.head("POST", "/v1/push", 5000, a.sign("POST", "/v1/push", 5000)) + b"KOSW"
            ),
            {"408"},
        ),
        "bad_content_length": (
            lambda: a.exchange(b"POST /v1/push HTTP/1.1\r\nContent-Length: +5\r\n\r\n12345"),
            {"400"},
        ),
        "chunked_body": (
            lambda: a.exchange(
                b"POST /v1/push HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            {"411"},
        ),
        "oversized_headers": (
            lambda: a.exchange(b"GET /v1/health HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"),
            {"431"},
        ),
        "non_ascii_signature": (
            lambda: a.exchange(
                a.head("GET", "/v1/stats", 0, f"v1 worker=0 seq=1 ts={now} sig=" + "é" * 64)
            ),
            {"401"},
        ),
        "absurd_timestamp": (
            lambda: a.exchange(
                a.head("GET", "/v1/stats", 0, "v1 worker=0 seq=1 ts=" + "9" * 400 + " sig=" + sig0)
            ),
            {"401"},
        ),
        "huge_json_number": (
            lambda: (
                lambda m: a.exchange(
                    a.head("POST", "/v1/push", len(m), a.sign("POST", "/v1/push", len(m))) + m
                )
            )(
                a.header_message(
                    b'{"dtype":"float32","shapes":[[10]],"samples":' + b"7" * 5000 + b"}"
                )
            ),
            {"400"},
        ),
        "deep_nesting": (
            lambda: (
                lambda m: a.exchange(
                    a.head("POST", "/v1/push", len(m), a.sign("POST", "/v1/push", len(m))) + m
                )
            )(a.header_message(b'{"shapes":' + b"[" * 50000 + b"]" * 50000 + b"}")),
            {"400"},
        ),
        "absurd_round_samples": (
            lambda: a.exchange(
                a.head(
                    "POST",
                    "/v1/rounds/0",
                    len(a.absurd_samples),
                    a.sign("POST", "/v1/rounds/0", len(a.absurd_samples)),
                )
                + a.absurd_samples
            ),
            {"400"},
        ),
        "absurd_round_number": (
            lambda: a.exchange(
                a.head(
                    "POST",
                    "/v1/rounds/" + "9" * 5000,
                    0,
                    a.sign("POST", "/v1/rounds/" + "9" * 5000, 0),
                )
            ),
            {"404"},
        ),
        "wrong_method": (lambda: a.exchange(a.head("GET", "/v1/push", 0)), {"405"}),
        "unknown_route": (
            lambda: a.exchange(a.head("GET", "/v1/" + os.urandom(4).hex(), 0)),
            {"404"},
        ),
        "view_token_guess": (
            lambda: a.exchange(a.head("GET", f"/v1/stats?token={os.urandom(8).hex()}", 0)),
            {"401"},
        ),
        "slow_sender": (
            lambda: a.exchange(b"GET /v1/health HTTP/1.1\r\nX-Slow: " + b"a" * 40, drip=0.1),
            {"408", "closed"},
        ),
        "silent_connection": (a.silent_connection, {"closed"}),
        "connection_flood": (a.flood, {"closed"}),
    }


# the rest split evenly
RARE = {
    "slow_sender": 0.01,
    "silent_connection": 0.04,
    "connection_flood": 0.002,
}


def attacker(
    host: str,
    port: int,
    secret: bytes,
    requests: int,
    threads: int,
    seed: int,
    workers: int,
    out: Any,
) -> None:
    random.seed(seed)
    a = Attack(host, port, secret, first_insider=2 + seed * threads, unknown_from=workers)
    kinds = attack_kinds(a)
    plan: list[str] = []
    for name, share in RARE.items():
        plan += [name] * max(1, int(requests * share))
    common = [k for k in kinds if k not in RARE]
    plan += [common[i % len(common)] for i in range(max(requests - len(plan), 0))]
    random.shuffle(plan)
    work: queue.Queue[str] = queue.Queue()
    for name in plan[:requests]:
        work.put(name)
    results: list[tuple[str, str]] = []

    def run() -> None:
        while True:
            try:
                name = work.get_nowait()
            except queue.Empty:
                return
            results.append((name, kinds[name][0]()))

    pool = [threading.Thread(target=run) for _ in range(threads)]
    [t.start() for t in pool]
    [t.join() for t in pool]
    out.put(results)


class RecordingAdag(Adag):
    """ADAG that writes down, in the server's order, which push it applied (from its marker)."""

    def __init__(self) -> None:
        self.applied: list[tuple[int, int, int, int]] = []

    def apply(
        self, center: np.ndarray, update: np.ndarray, staleness: int, window: int
    ) -> tuple[np.ndarray, np.ndarray]:
        self.applied.append((int(update[0]), int(update[1]), staleness, window))
        return super().apply(center, update, staleness, window)


def percentile_ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1e3, 2) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--attackers", type=int, default=4, help="attacker processes")
    parser.add_argument("--threads", type=int, default=16, help="threads per attacker process")
    parser.add_argument(
        "--baseline-seconds", type=float, default=8.0, help="honest pushes alone, before the attack"
    )
    args = parser.parse_args()

    from kerasonspark.parameter_server import (
        ParameterClient,
        ParameterServer,
        ParameterStore,
        ServerConfig,
        new_secret,
    )

    secret = new_secret()
    # the honest two, then one insider id per attacker thread
    workers = 2 + args.attackers * args.threads
    initial = (np.random.default_rng(42).normal(size=SIZE) * 0.05).astype(np.float32)
    rule = RecordingAdag()
    store = ParameterStore(initial, SHAPES, num_workers=workers, rule=rule, barrier_timeout=5)
    config = ServerConfig(
        secret,
        max_payload_bytes=SIZE * 4 + (1 << 20),
        header_timeout=HEADER_TIMEOUT,
        idle_timeout=IDLE_TIMEOUT,
    )
    ctx = mp.get_context("spawn")
    started = time.time()
    with ParameterServer(store, config) as server:
        attack, stop, honest_out, attack_out = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
        honest = [
            ctx.Process(
                target=honest_worker, args=(server.url, secret, w, attack, stop, honest_out)
            )
            for w in (0, 1)
        ]
        [p.start() for p in honest]
        time.sleep(args.baseline_seconds)
        attack.set()
        attack_started = time.time()
        share = args.requests // args.attackers
        attackers = [
            ctx.Process(
                target=attacker,
                args=(
                    server.host,
                    server.port,
                    secret,
                    share + (args.requests % args.attackers if i == 0 else 0),
                    args.threads,
                    i,
                    workers,
                    attack_out,
                ),
            )
            for i in range(args.attackers)
        ]
        [p.start() for p in attackers]
        results = [r for _ in attackers for r in attack_out.get(timeout=1800)]
        [p.join() for p in attackers]
        attack_seconds = time.time() - attack_started
        stop.set()
        reports = [honest_out.get(timeout=120) for _ in honest]
        [p.join() for p in honest]
        try:
            with ParameterClient(server.url, secret, 0, timeout=10) as client:
                server_alive = client.health()["status"] == "ok"
        except Exception:
            server_alive = False
        final = store.center.copy()
        counters = dict(store.counters)

    # Replay the accepted honest pushes, in the server's order, on the initial center.
    bases = {w: honest_base(w) for w in (0, 1)}
    replayed, plain = initial.copy(), Adag()
    for worker, index, staleness, window in rule.applied:
        if worker not in bases:
            break
        replayed, _ = plain.apply(
            replayed, honest_delta(worker, index, bases[worker]), staleness, window
        )
    honest_accepted = sorted((w, i) for w, _, accepted in reports for i in accepted)
    applied = sorted((w, i) for w, i, _, _ in rule.applied)
    center_changed_by_refused = not (
        applied == honest_accepted and replayed.tobytes() == final.tobytes()
    )

    kinds = attack_kinds(Attack("127.0.0.1", 1, secret, unknown_from=workers))
    status_counts = Counter(status for _, status in results)
    unexpected = Counter(
        f"{name}:{status}" for name, status in results if status not in kinds[name][1]
    )
    without = [t for _, lat, _ in reports for t, under in lat if not under]
    with_attack = [t for _, lat, _ in reports for t, under in lat if under]
    print(
        json.dumps(
            {
                "requests": len(results),
                "flood_connections": FLOOD
                * sum(1 for name, _ in results if name == "connection_flood"),
                "status_counts": dict(sorted(status_counts.items())),
                "unexpected": sum(unexpected.values()),
                "unexpected_examples": dict(unexpected.most_common(5)),
                "closed_at_deadline": counters.get("closed_at_deadline", 0),
                "connections_evicted": counters.get("connections_evicted", 0),
                "internal_errors": counters.get("internal_errors", 0),
                "server_alive": server_alive,
                "center_changed_by_refused": center_changed_by_refused,
                "honest_pushes_accepted": len(honest_accepted),
                "honest_p50_ms_without_attack": percentile_ms(without, 50),
                "honest_p99_ms_without_attack": percentile_ms(without, 99),
                "honest_p50_ms_with_attack": percentile_ms(with_attack, 50),
                "honest_p99_ms_with_attack": percentile_ms(with_attack, 99),
                "attack_seconds": round(attack_seconds, 1),
                "attack_requests_per_second": round(len(results) / attack_seconds, 1),
                "refused": {k: v for k, v in sorted(counters.items()) if k.startswith("refused_")},
                "wall_seconds": round(time.time() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
