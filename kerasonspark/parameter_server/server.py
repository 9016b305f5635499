"""Serve the parameter server's Flask app on a real socket, and stop it completely.

Werkzeug's threaded WSGI server (not Flask's debug server), speaking HTTP/1.1 so each worker
keeps one connection open, with request logging off (it costs about 1.7 ms per 4 MB exchange).
:meth:`ParameterServer.stop` closes every open connection and joins every thread it started, so
nothing outlives a ``fit``.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from .app import ServerConfig, create_app
from .store import ParameterStore

logger = logging.getLogger(__name__)


class _QuietHandler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_request(self, *args: Any, **kwargs: Any) -> None:  # the hot path; failures go through log_error
        pass


class _TrackingServer(ThreadedWSGIServer):
    """A threaded WSGI server that knows its connection threads, so it can end them all."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: dict[threading.Thread, socket.socket] = {}
        self.connections_lock = threading.Lock()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
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

    Example:
        >>> with ParameterServer(store, ServerConfig(secret)) as server:
        ...     server.url
    """

    def __init__(self, store: ParameterStore, config: ServerConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = store
        self.config = config
        self.app = create_app(store, config)
        self._server = _TrackingServer(host, port, self.app, handler=_QuietHandler)
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

    def start(self) -> "ParameterServer":
        """Start serving in a background thread; returns self."""
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="kerasonspark-ps", daemon=True)
        self._thread.start()
        logger.info("Parameter server listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, wake blocked barriers, close connections, and join every thread."""
        self.store.close()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout)
            self._thread = None
        stuck = self._server.close_connections(timeout)
        self._server.server_close()
        if stuck:
            logger.warning("%d parameter-server connection thread(s) did not stop within %.0f s", len(stuck), timeout)

    def __enter__(self) -> "ParameterServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
