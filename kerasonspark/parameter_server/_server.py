"""Serve the parameter server's Flask app on a real socket with keep-alive, and stop it completely.

Werkzeug's development server closes every connection after one response, and the maintained
WSGI servers cost 4x (cheroot) to 7x (waitress) our round trip of 4.2 MB of weights each way
(``python benchmarks/bench_parameter_server.py --servers kerasonspark cheroot waitress``), so
this module carries a small HTTP/1.1 server of its own, built to face a hostile network:

- **No thread before a complete request head.** One acceptor thread holds every new connection
  in a selector until its request line and headers have arrived, within ``header_timeout`` seconds
  and ``max_header_bytes`` bytes (408 or 431 otherwise). At most ``max_pending_connections``
  wait; a newer connection closes the oldest waiting one, so a flood of silent connections
  cannot lock out a worker that connects and speaks at once. The listen backlog is 1,024.
- **One thread per connection after that**, and keep-alive only for a connection whose request
  was authenticated: a refused request's connection is closed after its answer. At most
  ``max_pending_connections`` threads serve requests that have not authenticated yet; beyond
  that a new request gets 503 at once.
- **Deadlines measure silence, not size.** ``idle_timeout`` is how long a body or a reply may
  make no progress; a slow but steady 4 MB transfer is never cut.
- Strict framing: ``Content-Length`` is ASCII digits only, chunked bodies are refused (411),
  header names with ``_`` or bytes outside the token set are refused (400).

:meth:`ParameterServer.stop` closes every open connection and joins every thread it started, so
nothing outlives a ``fit``.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import selectors
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from .._errors import ParameterServerError
from ._app import EXTENSION, ServerConfig, create_app
from ._board import EpochBoard
from ._store import ParameterStore

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024
MAX_HEADERS = 100
_HEAD_END = b"\r\n\r\n"
_TOKEN = re.compile(rb"[!#$%&'*+.^`|~0-9A-Za-z-]+")  # RFC 9110 token, less "_" (nginx's default)
_DIGITS = re.compile(rb"[0-9]{1,18}")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Refusal(Exception):
    """A request the HTTP layer answers itself (malformed, too large, too slow)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Head:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    length: int
    keep_alive: bool
    expect_continue: bool


def _split_head(buffer: bytearray) -> bytes | None:
    """Take one complete request head off the front of ``buffer``; ``None`` while incomplete."""
    while buffer[:2] == b"\r\n":  # RFC 9112: ignore empty lines before a request line
        del buffer[:2]
    end = buffer.find(_HEAD_END)
    if end < 0:
        return None
    head = bytes(buffer[:end])
    del buffer[: end + len(_HEAD_END)]
    return head


def _parse_head(head: bytes) -> _Head:
    """The request line and headers of one request, strictly.

    Raises:
        _Refusal: 400 (malformed), 411 (chunked), 431 (too many headers), 505 (HTTP version).
    """
    request_line, *lines = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if (
        len(parts) != 3
        or not parts[0].isalpha()
        or not parts[0].isupper()
        or not _TARGET.fullmatch(parts[1])
    ):
        raise _Refusal(400, "Malformed request line; expected 'METHOD /path HTTP/1.1'.")
    method, target, version = (p.decode("ascii") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _Refusal(505, f"Unsupported HTTP version {version!r}; speak HTTP/1.1.")
    if len(lines) > MAX_HEADERS:
        raise _Refusal(431, f"Too many header lines: at most {MAX_HEADERS}.")
    headers: list[tuple[str, str]] = []
    fields: dict[str, list[str]] = {}
    for line in lines:
        raw_name, colon, raw_value = line.partition(b":")
        raw_value = raw_value.strip(b" \t")
        if not colon or not _TOKEN.fullmatch(raw_name) or any(c in raw_value for c in b"\r\n\0"):
            raise _Refusal(
                400, "Malformed header line; expected 'Name: value' with a token name (no '_')."
            )
        name, value = raw_name.decode("ascii"), raw_value.decode("latin-1")
        headers.append((name, value))
        fields.setdefault(name.lower(), []).append(value)
    if "transfer-encoding" in fields:
        raise _Refusal(
            411, "Send a Content-Length; chunked or otherwise encoded bodies are not accepted."
        )
    lengths = set(fields.get("content-length", []))
    if len(lengths) > 1:
        raise _Refusal(400, f"Conflicting Content-Length headers: {sorted(lengths)}.")
    raw_length = lengths.pop() if lengths else "0"
    if not _DIGITS.fullmatch(raw_length.encode("latin-1")):
        raise _Refusal(
            400, "Content-Length must be a non-negative integer of at most 18 ASCII digits."
        )
    connection = ",".join(fields.get("connection", [])).lower()
    keep_alive = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    expect_continue = any(v.lower() == "100-continue" for v in fields.get("expect", []))
    return _Head(method, target, version, headers, int(raw_length), keep_alive, expect_continue)


def _refusal_bytes(status: int, message: str) -> bytes:
    body = json.dumps({"error": message, "status": status}).encode()
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Best effort, never blocking: for refusals to clients that may not be reading."""
    try:
        sock.setblocking(False)
        sock.send(data)
    except OSError:
        pass


class _Body:
    """``wsgi.input`` for one request: at most Content-Length bytes, from the connection.

    Each read waits at most ``idle_timeout`` for progress; a body that stops arriving ends the
    request with 408. ``100 Continue`` goes out on the first read, so a client that asked for it
    sends nothing the server did not want.
    """

    def __init__(self, connection: _Connection, length: int, expect_continue: bool) -> None:
        self.connection, self.remaining, self.expect_continue = connection, length, expect_continue

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: self.remaining]
        if not len(view):
            return 0
        pending = self.connection.buffer
        if pending:
            n = min(len(pending), len(view))
            view[:n] = pending[:n]
            del pending[:n]
        else:
            if self.expect_continue:
                self.expect_continue = False
                self.connection.send([_CONTINUE])
            # One call takes the whole body: the kernel waits for all of it (MSG_WAITALL) and
            # returns early only after idle_timeout (SO_RCVTIMEO), with what it has, or nothing.
            n, sock = 0, self.connection.sock
            while n < len(view):
                try:
                    received = sock.recv_into(view[n:], 0, socket.MSG_WAITALL)
                except BlockingIOError:
                    raise ParameterServerError(
                        f"The request body stopped arriving with {self.remaining - n} bytes still "
                        "to come.",
                        408,
                    ) from None
                if not received:
                    break
                n += received
        self.remaining -= n
        return n

    def read(self, size: int | None = -1) -> bytes:
        size = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = bytearray(size)
        view, received = memoryview(data), 0
        while received < size and (n := self.readinto(view[received:])):
            received += n
        return bytes(data[:received])

    def readline(self, size: int | None = -1) -> bytes:
        line = bytearray()
        while (size is None or size < 0 or len(line) < size) and (byte := self.read(1)):
            line += byte
            if byte == b"\n":
                break
        return bytes(line)

    def __iter__(self):
        while line := self.readline():
            yield line


class _Connection:
    """One client connection, served by one thread: its requests one after another."""

    def __init__(
        self, server: _Server, sock: socket.socket, address: tuple, buffer: bytearray
    ) -> None:
        self.server, self.sock, self.address, self.buffer = server, sock, address, buffer
        self.authenticated = False
        # Bodies and replies move in single blocking calls that the kernel ends after
        # idle_timeout without progress: a 4 MB transfer costs one system call, not dozens.
        sock.settimeout(None)
        idle = server.config.idle_timeout
        if idle:
            timeval = struct.pack("ll", int(idle), int(idle % 1 * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    def run(self) -> None:
        try:
            head: bytes | None = _split_head(self.buffer)
            while head is not None and self._serve(head):
                head = self._next_head()
        except (OSError, _Closed):
            pass
        except Exception:  # a bug, not a client's doing: keep it to one line per connection
            logger.warning(
                "Parameter-server connection from %s ended by an internal error",
                self.address[0],
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
        finally:
            self.server.forget(self)

    def send(self, buffers: Iterable[bytes | memoryview]) -> None:
        """Send every buffer; each wait for the client to take more is bounded by
        ``idle_timeout``."""
        pending = [memoryview(b).cast("B") for b in buffers if len(b)]
        while pending:
            try:
                sent = self.sock.sendmsg(pending)
            except BlockingIOError:
                raise _Closed from None  # the client took nothing for idle_timeout
            while sent and pending:
                if sent >= len(pending[0]):
                    sent -= len(pending.pop(0))
                else:
                    pending[0], sent = pending[0][sent:], 0

    def _next_head(self) -> bytes | None:
        """The next request head on a kept-alive connection, or ``None`` when it ends."""
        config = self.server.config
        self.sock.settimeout(config.idle_timeout)
        deadline = None
        while (head := _split_head(self.buffer)) is None:
            if len(self.buffer) > config.max_header_bytes:
                self._refuse(431, f"The request head exceeds {config.max_header_bytes} bytes.")
                return None
            if deadline is None and self.buffer:
                deadline = time.monotonic() + config.header_timeout
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.server.count("closed_at_deadline")
                    self._refuse(408, _deadline_message(config))
                    return None
                self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                # idle between requests: the client reconnects when it needs to
                if deadline is None:
                    return None
                continue
            if not data:
                return None
            self.buffer += data
        self.sock.settimeout(None)  # back to blocking calls bounded by the kernel's idle timeouts
        return head

    def _refuse(self, status: int, message: str) -> None:
        _send_quietly(self.sock, _refusal_bytes(status, message))

    def _serve(self, raw_head: bytes) -> bool:
        """Answer one request; returns whether the connection stays open for another."""
        if len(raw_head) > self.server.config.max_header_bytes:
            self._refuse(
                431, f"The request head exceeds {self.server.config.max_header_bytes} bytes."
            )
            return False
        try:
            head = _parse_head(raw_head)
        except _Refusal as refusal:
            self._refuse(refusal.status, str(refusal))
            return False
        body = _Body(self, head.length, head.expect_continue)
        environ = self._environ(head, body)
        response: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None):
            response["status"], response["headers"] = status, headers
            return lambda data: self.send([data])

        chunks = self.server.app(environ, start_response)
        try:
            parts = [c for c in chunks if c]
            self.authenticated = self.authenticated or bool(
                environ.get("kerasonspark.authenticated")
            )
            # An unread body would be taken for the next request; a connection that never
            # authenticated gets one answer only.
            keep_alive = head.keep_alive and not body.remaining and self.authenticated
            headers = [
                (k, v)
                for k, v in response["headers"]
                if k.lower() not in ("content-length", "connection")
            ]
            headers.append(("Content-Length", str(sum(len(p) for p in parts))))
            if not keep_alive:
                headers.append(("Connection", "close"))
            lines = [
                f"HTTP/1.1 {response['status']}\r\n",
                *(f"{k}: {v}\r\n" for k, v in headers),
                "\r\n",
            ]
            self.send(
                [("".join(lines)).encode("latin-1"), *(parts if head.method != "HEAD" else [])]
            )
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        return keep_alive

    def _environ(self, head: _Head, body: _Body) -> dict[str, Any]:
        path, _, query = head.target.partition("?")
        host, port = self.server.address
        environ: dict[str, Any] = {
            "REQUEST_METHOD": head.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "CONTENT_TYPE": "",
            "CONTENT_LENGTH": str(head.length),
            "SERVER_NAME": host,
            "SERVER_PORT": str(port),
            "SERVER_PROTOCOL": head.version,
            "REMOTE_ADDR": self.address[0],
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": body,
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in head.headers:
            key = "HTTP_" + name.upper().replace("-", "_")
            if key == "HTTP_CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
            elif key != "HTTP_CONTENT_LENGTH":
                environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ


class _Closed(Exception):
    """The client went away or stopped reading; the connection ends."""


def _deadline_message(config: ServerConfig) -> str:
    return (
        f"The request line and headers did not arrive within {config.header_timeout:g} s "
        "(`header_timeout`); the connection is closed."
    )


@dataclass
class _Waiting:
    """A connection the acceptor holds until its request head is complete (no thread yet)."""

    sock: socket.socket
    address: tuple
    deadline: float
    buffer: bytearray


class _Server:
    """The listening socket, the acceptor thread and the connection threads of one server."""

    def __init__(
        self, address: tuple[str, int], app: Any, config: ServerConfig, store: ParameterStore
    ) -> None:
        self.app, self.config, self.store = app, config, store
        self.listener = socket.create_server(address, backlog=LISTEN_BACKLOG)
        self.listener.setblocking(False)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.lock = threading.Lock()
        self.connections: dict[_Connection, threading.Thread] = {}
        self.threads: list[threading.Thread] = []  # every connection thread not yet seen finished
        self.waiting: OrderedDict[socket.socket, _Waiting] = OrderedDict()  # oldest first
        self.selector = selectors.DefaultSelector()
        self.stopping = threading.Event()
        self._ids = itertools.count()
        # A new connection that stays silent is idle as well as late: the shorter bound closes it.
        self._first_head_timeout = min(
            config.header_timeout, config.idle_timeout or config.header_timeout
        )
        self._failed_starts = 0

    def count(self, name: str) -> None:
        self.store.count(name)

    # -- the acceptor thread ------------------------------------------------------------------
    def serve(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ)
        try:
            while not self.stopping.is_set():
                timeout = 0.1
                if self.waiting:
                    timeout = min(
                        timeout,
                        max(next(iter(self.waiting.values())).deadline - time.monotonic(), 0),
                    )
                for key, _ in self.selector.select(timeout):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        self._read_waiting(self.waiting[key.fileobj])  # type: ignore[index]
                self._expire()
        finally:
            for waiting in list(self.waiting.values()):
                self._drop(waiting)
            self.selector.close()

    def _accept(self) -> None:
        for _ in range(LISTEN_BACKLOG):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors, or the peer already gave up
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self.waiting) >= self.config.max_pending_connections:
                self._evict_one()
            waiting = _Waiting(
                sock, address, time.monotonic() + self._first_head_timeout, bytearray()
            )
            self.waiting[sock] = waiting
            self.selector.register(sock, selectors.EVENT_READ)
            # By the time a connection is accepted its client has often sent the whole head: no
            # wait.
            self._read_waiting(waiting)

    def _evict_one(self) -> None:
        """Close the oldest connection that has sent nothing (read first what it may have sent)."""
        for waiting in list(self.waiting.values()):
            if not waiting.buffer:
                self._read_waiting(waiting)  # its head may be in the socket, not yet read
                if waiting.sock in self.waiting and not waiting.buffer:
                    self._drop(waiting)
                    self.count("connections_evicted")
                    return
                if len(self.waiting) < self.config.max_pending_connections:
                    return
        # every one is talking, slowly: the oldest goes
        self._drop(next(iter(self.waiting.values())))
        self.count("connections_evicted")

    def _read_waiting(self, waiting: _Waiting) -> None:
        try:
            data = waiting.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(waiting)
            return
        waiting.buffer += data
        if _HEAD_END in waiting.buffer:
            self._unwait(waiting)
            self._start(waiting)
        elif len(waiting.buffer) > self.config.max_header_bytes:
            _send_quietly(
                waiting.sock,
                _refusal_bytes(
                    431, f"The request head exceeds {self.config.max_header_bytes} bytes."
                ),
            )
            self._drop(waiting)

    def _expire(self) -> None:
        now = time.monotonic()
        while self.waiting and (waiting := next(iter(self.waiting.values()))).deadline <= now:
            if waiting.buffer.strip():
                _send_quietly(waiting.sock, _refusal_bytes(408, _deadline_message(self.config)))
            self.count("closed_at_deadline")
            self._drop(waiting)

    def _unwait(self, waiting: _Waiting) -> None:
        self.selector.unregister(waiting.sock)
        del self.waiting[waiting.sock]

    def _drop(self, waiting: _Waiting) -> None:
        self._unwait(waiting)
        waiting.sock.close()

    def _start(self, waiting: _Waiting) -> None:
        sock = waiting.sock
        with self.lock:
            unauthenticated = sum(1 for c in self.connections if not c.authenticated)
        if unauthenticated >= self.config.max_pending_connections:
            self.count("refused_busy")
            _send_quietly(
                sock,
                _refusal_bytes(
                    503, "Too many requests are waiting for authentication; retry shortly."
                ),
            )
            sock.close()
            return
        sock.setblocking(True)
        connection = _Connection(self, sock, waiting.address, waiting.buffer)
        thread = threading.Thread(
            target=connection.run, name=f"kerasonspark-ps-conn-{next(self._ids)}", daemon=True
        )
        with self.lock:
            self.connections[connection] = thread
            if len(self.threads) > 256:
                self.threads = [t for t in self.threads if t.is_alive()]
        try:
            thread.start()
        # the process is out of threads: refuse this one, keep serving the others
        except RuntimeError:
            with self.lock:
                self.connections.pop(connection, None)
            sock.close()
            self._failed_starts += 1
            if self._failed_starts == 1 or self._failed_starts % 1000 == 0:
                logger.warning(
                    "Could not start a parameter-server connection thread (%d so far); "
                    "the connection was closed.",
                    self._failed_starts,
                )
            return
        with self.lock:
            self.threads.append(thread)

    # -- connection threads and shutdown -------------------------------------------------------
    def forget(self, connection: _Connection) -> None:
        with self.lock:
            self.connections.pop(connection, None)
        try:
            connection.sock.close()
        except OSError:
            pass

    def open_connections(self) -> int:
        with self.lock:
            return len(self.connections) + len(self.waiting)

    def close_connections(self, timeout: float) -> list[threading.Thread]:
        """Shut every open connection down and join its thread; returns threads still alive."""
        with self.lock:
            connections, threads = list(self.connections), list(self.threads)
        for connection in connections:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:  # also those that just left `connections` and are ending
            thread.join(timeout)
        return [t for t in threads if t.is_alive()]


class ParameterServer:
    """A parameter server for one run, bound to ``host`` on a free port.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        store: the run's weights and barriers.
        config: secret and limits.
        host: address to bind (the driver's address; ``127.0.0.1`` for local runs).
        port: port to bind; 0 picks a free one.
        board: the run's progress reports and epoch gate (see :mod:`.board`).

    Example:
        >>> with ParameterServer(store, ServerConfig(secret)) as server:
        ...     server.url
    """

    def __init__(
        self,
        store: ParameterStore,
        config: ServerConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        board: EpochBoard | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.board = board
        self.app = create_app(store, config, board)
        self._server = _Server((host, port), self.app, config, store)
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self._server.address[0]

    @property
    def port(self) -> int:
        return self._server.address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def dashboard_url(self) -> str | None:
        """The live stats page with its read-only token, or ``None`` without a view token."""
        token = self.config.view_token
        return f"{self.url}/v1/dashboard?token={token}" if token else None

    @property
    def open_connections(self) -> int:
        """Client connections open now (waiting for a request head, or served by a thread)."""
        return self._server.open_connections()

    def rotate_secret(self, secret: bytes, timeout: float = 10.0) -> bool:
        """Refuse every request signed with the old secret from now on, and wait until the pushes it
        already let in have landed. Returns whether they did within ``timeout``."""
        self.config.secret = secret
        return self.app.extensions[EXTENSION].in_flight.wait_idle(timeout)

    def start(self) -> ParameterServer:
        """Start serving in a background thread; returns self."""
        self._thread = threading.Thread(
            target=self._server.serve, name="kerasonspark-ps", daemon=True
        )
        self._thread.start()
        logger.info("Parameter server listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, wake blocked barriers, close connections, and join every thread."""
        self.store.close()
        if self.board is not None:
            self.board.close()
        self._server.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._server.listener.close()
        stuck = self._server.close_connections(timeout)
        if stuck:
            logger.warning(
                "%d parameter-server connection thread(s) did not stop within %.0f s",
                len(stuck),
                timeout,
            )

    def __enter__(self) -> ParameterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
