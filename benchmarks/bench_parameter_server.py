"""Parameter-server round trips for the reference CNN's 4.2 MB of weights, against a raw socket.

    python benchmarks/bench_parameter_server.py [--trips 200] \\
        [--servers kerasonspark cheroot waitress]

Each client is a separate process on loopback with one keep-alive connection. A round trip is
one push of a 4.2 MB delta answered by the 4.2 MB center (the whole pull+push exchange of the
asynchronous engines). The raw-socket line sends the same bytes to a bare TCP echo of the same
size and reads them back: the ceiling for any protocol on this machine.

``--servers`` serves the same Flask app with other WSGI servers (``pip install cheroot waitress``)
for the float32 round trip: the measurement behind keeping our own keep-alive server.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import socket
import statistics
import threading
import time

import numpy as np

from kerasonspark import MNIST_CNN_PARAMETERS

SHAPES = [(3, 3, 1, 32), (32,), (3, 3, 32, 32), (32,), (4608, 225), (225,), (225, 10), (10,)]
assert sum(int(np.prod(s)) for s in SHAPES) == MNIST_CNN_PARAMETERS


def ps_client(url: str, secret: bytes, worker: int, trips: int, dtype: str, out: mp.Queue) -> None:
    from kerasonspark.parameter_server import ParameterClient, wire

    # Realistic deltas: an Adam step or five moves weights by about 1e-5 to 1e-3.
    delta = (np.random.default_rng(worker).normal(size=MNIST_CNN_PARAMETERS) * 1e-4).astype(
        np.float32
    )
    if dtype == "bfloat16":
        delta = wire.to_bfloat16(delta)
    times = []
    with ParameterClient(url, secret, worker) as client:
        client.pull()
        for _ in range(trips + 5):
            started = time.perf_counter()
            client.push(delta, SHAPES, window=5, samples=80)
            times.append(time.perf_counter() - started)
        out.put((times[5:], client.bytes_sent, client.bytes_received))


def raw_client(port: int, size: int, trips: int, out: mp.Queue) -> None:
    payload = bytes(size)
    buffer = bytearray(size)
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(trips + 5):
            started = time.perf_counter()
            sock.sendall(payload)
            view, got = memoryview(buffer), 0
            while got < size:
                got += sock.recv_into(view[got:])
            times.append(time.perf_counter() - started)
    out.put((times[5:], size * trips, size * trips))


def raw_echo_server(size: int) -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one(conn: socket.socket) -> None:
        buffer = bytearray(size)
        with conn:
            while True:
                view, got = memoryview(buffer), 0
                while got < size:
                    n = conn.recv_into(view[got:])
                    if not n:
                        return
                    got += n
                conn.sendall(buffer)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener, thread


def run_clients(target, args_for, n: int) -> tuple[list[float], float, int]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(i), out)) for i in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    times = [t for r in results for t in r[0]]
    return times, sum(times) / n, sum(r[1] + r[2] for r in results)


def report(label: str, times: list[float], busy: float, nbytes: int, clients: int) -> None:
    trips = len(times)
    print(
        f"{label:<34} {clients} client(s): median {statistics.median(times) * 1e3:6.2f} ms  "
        f"p90 {np.percentile(times, 90) * 1e3:6.2f} ms  {trips / busy:7.1f} trips/s  "
        f"{nbytes / 1e6 / busy:7.0f} MB/s",
        flush=True,
    )


@contextlib.contextmanager
def other_server(name: str, app):
    """Serve ``app`` with a maintained WSGI server on loopback; yields its URL."""
    if name == "cheroot":
        from cheroot.wsgi import Server

        server = Server(("127.0.0.1", 0), app, numthreads=4, request_queue_size=128)
        server.prepare()
        serve, stop, port = server.serve, server.stop, server.bind_addr[1]
    else:
        from waitress.server import create_server

        server = create_server(
            app, host="127.0.0.1", port=0, threads=4, max_request_body_size=1 << 30
        )
        serve, stop, port = server.run, server.close, server.effective_port
    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trips", type=int, default=200)
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["kerasonspark"],
        choices=["kerasonspark", "cheroot", "waitress"],
    )
    args = parser.parse_args()

    from kerasonspark.parameter_server import (
        ParameterServer,
        ParameterStore,
        ServerConfig,
        make_rule,
        new_secret,
    )
    from kerasonspark.parameter_server._app import create_app

    size = MNIST_CNN_PARAMETERS * 4
    print(f"payload: {size / 1e6:.2f} MB each way per round trip", flush=True)
    listener, _ = raw_echo_server(size)
    for clients in (1, 2):
        times, busy, nbytes = run_clients(
            raw_client, lambda i: (listener.getsockname()[1], size, args.trips), clients
        )
        report("raw socket echo (ceiling)", times, busy, nbytes, clients)
    listener.close()

    for dtype in ("float32", "bfloat16"):
        for clients in (1, 2):
            secret = new_secret()
            store = ParameterStore(
                np.zeros(MNIST_CNN_PARAMETERS, np.float32), SHAPES, clients, rule=make_rule("adag")
            )
            with ParameterServer(
                store, ServerConfig(secret, max_payload_bytes=size + (1 << 20))
            ) as server:
                times, busy, nbytes = run_clients(
                    ps_client,
                    lambda i, url=server.url, key=secret, up=dtype: (url, key, i, args.trips, up),
                    clients,
                )
            report(f"parameter server push ({dtype} up)", times, busy, nbytes, clients)

    for name in (n for n in args.servers if n != "kerasonspark"):
        for clients in (1, 2):
            secret = new_secret()
            store = ParameterStore(
                np.zeros(MNIST_CNN_PARAMETERS, np.float32), SHAPES, clients, rule=make_rule("adag")
            )
            with other_server(
                name, create_app(store, ServerConfig(secret, max_payload_bytes=size + (1 << 20)))
            ) as url:
                times, busy, nbytes = run_clients(
                    ps_client,
                    lambda i, url=url, key=secret: (url, key, i, args.trips, "float32"),
                    clients,
                )
            report(f"same app on {name} (float32 up)", times, busy, nbytes, clients)


if __name__ == "__main__":
    main()
