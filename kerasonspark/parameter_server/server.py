"""Serve the parameter server's Flask app on a real socket with keep-alive, and stop it completely.

Werkzeug's development server closes every connection after one response (its docs: keep-alive
"isn't handled well by Python's http.server"), which costs a TCP handshake per exchange, so this
module carries a small threaded WSGI server of its own: HTTP/1.1 with persistent connections,
one thread per connection, no request logging, and request bodies bounded by Content-Length.
:meth:`ParameterServer.stop` closes every open connection and joins every thread it started, so
nothing outlives a ``fit``.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote

from ..errors import ParameterServerError
from .app import ServerConfig, create_app
from .board import EpochBoard
from .store import ParameterStore

logger = logging.getLogger(__name__)


class _BodyReader:
    """``wsgi.input`` for one request: at most Content-Length bytes, counting what was read.

    A body that stops arriving for the connection's timeout ends the request with 408.
    """

    def __init__(self, stream: Any, length: int) -> None:
        self.stream, self.remaining = stream, length

    def _stalled(self) -> ParameterServerError:
        return ParameterServerError(f"The request body stopped arriving with {self.remaining} bytes still to come.", 408)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)[: self.remaining]
        try:
            n = self.stream.readinto(view) if len(view) else 0
        except TimeoutError:
            raise self._stalled() from None
        self.remaining -= n or 0
        return n or 0

    def read(self, size: int = -1) -> bytes:
        return self._bounded(self.stream.read, size)

    def readline(self, size: int = -1) -> bytes:
        return self._bounded(self.stream.readline, size)

    def _bounded(self, read: Any, size: int | None) -> bytes:
        size = self.remaining if size is None or size < 0 else min(size, self.remaining)
        try:
            data = read(size) if size else b""
        except TimeoutError:
            raise self._stalled() from None
        self.remaining -= len(data)
        return data

    def __iter__(self):
        while line := self.readline():
            yield line


class _WSGIHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kerasonspark-ps"
    sys_version = ""
    server: _ThreadedServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout)

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except TimeoutError:  # idle keep-alive connection: the client reconnects when it needs to
            self.close_connection = True
            return
        if not self.raw_requestline or len(self.raw_requestline) > 65536:
            self.close_connection = True
            return
        if not self.parse_request():  # sends its own 400 / 431 / 505 and sets close_connection
            return
        lengths = {value.strip() for value in self.headers.get_all("Content-Length", [])}
        if len(lengths) > 1:
            self.send_error(400, f"Conflicting Content-Length headers: {sorted(lengths)}")
            return
        try:
            length = int(lengths.pop()) if lengths else 0
            if length < 0:
                raise ValueError
        except ValueError:
            self.send_error(400, "Content-Length must be a non-negative integer")
            return
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.send_error(411, "Send a Content-Length; chunked bodies are not accepted")
            return
        body = _BodyReader(self.rfile, length)
        self._run_app(self._environ(body, length))
        if body.remaining:
            # The app answered without reading the whole body (a refusal such as 401 or 413): the
            # unread bytes would be taken for the next request, so end the connection.
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Refuse a request the HTTP layer cannot parse, in the app's JSON error shape."""
        body = json.dumps({"error": message or HTTPStatus(code).phrase, "status": code}).encode()
        self.close_connection = True
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _environ(self, body: _BodyReader, length: int) -> dict[str, Any]:
        path, _, query = self.path.partition("?")
        environ = {
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(length),
            "SERVER_NAME": self.server.server_address[0],
            "SERVER_PORT": str(self.server.server_address[1]),
            "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0],
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": body,
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for key, value in self.headers.items():
            name = "HTTP_" + key.upper().replace("-", "_")
            if name not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                environ[name] = f"{environ[name]},{value}" if name in environ else value
        return environ

    def _run_app(self, environ: dict[str, Any]) -> None:
        response: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None):
            response["status"], response["headers"] = status, headers
            return self.wfile.write

        chunks = self.server.app(environ, start_response)
        try:
            if not any(k.lower() == "content-length" for k, _ in response["headers"]):
                chunks = [b"".join(chunks)]
                response["headers"].append(("Content-Length", str(len(chunks[0]))))
            head = [f"HTTP/1.1 {response['status']}\r\n"]
            head += [f"{k}: {v}\r\n" for k, v in response["headers"]]
            self.wfile.write(("".join(head) + "\r\n").encode("latin-1"))
            for chunk in chunks:
                if chunk:
                    self.wfile.write(chunk)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()

    def log_message(self, format: str, *args: Any) -> None:  # the hot path; errors reach the client
        logger.debug("%s - %s", self.address_string(), format % args)


class _ThreadedServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """One thread per connection; knows its connections, so it can end them all."""

    daemon_threads = True
    allow_reuse_address = True
    server_address: tuple[str, int]

    def __init__(self, address: tuple[str, int], app: Any, idle_timeout: float | None) -> None:
        super().__init__(address, _WSGIHandler)
        self.app = app
        self.idle_timeout = idle_timeout
        self.connections: dict[threading.Thread, socket.socket] = {}
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        thread = threading.Thread(target=self._serve_connection, args=(request, client_address),
                                  name=f"kerasonspark-ps-conn-{client_address[1]}", daemon=True)
        with self.connections_lock:
            self.connections[thread] = request
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("Connection from %s ended with an error", client_address, exc_info=True)

    def close_connections(self, timeout: float) -> list[threading.Thread]:
        """Shut every open connection down and join its thread; returns threads still alive."""
        with self.connections_lock:
            items = list(self.connections.items())
        for _, sock in items:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread, _ in items:
            thread.join(timeout)
        return [t for t, _ in items if t.is_alive()]


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

    def __init__(self, store: ParameterStore, config: ServerConfig, host: str = "127.0.0.1", port: int = 0,
                 board: EpochBoard | None = None) -> None:
        self.store = store
        self.config = config
        self.board = board
        self.app = create_app(store, config, board)
        self._server = _ThreadedServer((host, port), self.app, config.idle_timeout)
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self._server.server_address[0]

    @property
    def port(self) -> int:
        return self._server.server_address[1]

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
        """Client connections open now (each served by one thread)."""
        with self._server.connections_lock:
            return len(self._server.connections)

    def start(self) -> ParameterServer:
        """Start serving in a background thread; returns self."""
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="kerasonspark-ps", daemon=True)
        self._thread.start()
        logger.info("Parameter server listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, wake blocked barriers, close connections, and join every thread."""
        self.store.close()
        if self.board is not None:
            self.board.close()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout)
            self._thread = None
        stuck = self._server.close_connections(timeout)
        self._server.server_close()
        if stuck:
            logger.warning("%d parameter-server connection thread(s) did not stop within %.0f s", len(stuck), timeout)

    def __enter__(self) -> ParameterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
