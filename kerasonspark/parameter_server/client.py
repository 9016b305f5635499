"""The workers' side of the parameter server: one persistent, authenticated HTTP connection."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .._errors import BarrierTimeoutError, ParameterServerError
from . import _auth as auth
from . import wire

__all__ = ["ParameterClient"]


class ParameterClient:
    """Talks to one parameter server over a single keep-alive connection.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:40123``.
        secret: the run's secret.
        worker: this worker's id (the driver uses -1).
        timeout: socket timeout in seconds; a round barrier may legitimately wait this long.
        sign_body: sign the body's SHA-256 too (the server must be configured the same way).
        timeout_name: the setting ``timeout`` comes from, named when a wait expires.
    """

    def __init__(
        self,
        url: str,
        secret: bytes,
        worker: int,
        timeout: float = 660.0,
        sign_body: bool = False,
        timeout_name: str = "timeout",
    ) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.secret = secret
        self.worker = worker
        self.timeout = timeout
        self.timeout_name = timeout_name
        self.sign_body = sign_body
        # Sequence numbers start at the clock so a retried task never reuses its predecessor's.
        self._seq = time.time_ns()
        self._conn: http.client.HTTPConnection | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.seconds = 0.0
        self.stop_requested = False  # a reply said the driver stops the run

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._conn.connect()
            self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._conn

    def request(
        self,
        method: str,
        path: str,
        body: list | bytes = b"",
        content_type: str = wire.CONTENT_TYPE,
    ) -> tuple[int, str, bytes]:
        """Send one signed request; returns ``(status, content type, body)``.

        Raises:
            ParameterServerError: the connection failed (status 0).
        """
        parts = [body] if isinstance(body, (bytes, bytearray)) else list(body)
        length = wire.encoded_size(parts)
        self._seq += 1
        digest = auth.body_digest(parts) if self.sign_body else None
        headers = {
            auth.HEADER: auth.sign(
                self.secret, method, path, self.worker, self._seq, length, body_digest=digest
            ),
            "Content-Length": str(length),
            "Content-Type": content_type,
        }
        started = time.perf_counter()
        for attempt in (0, 1):
            try:
                conn = self._connection()
            except OSError as exc:
                self.close()
                raise ParameterServerError(
                    f"Cannot reach the parameter server at {self.host}:{self.port}: {exc}"
                ) from exc
            try:
                conn.putrequest(method, path, skip_accept_encoding=True)
                for key, value in headers.items():
                    conn.putheader(key, value)
                conn.endheaders()
                for p in parts:
                    conn.send(p)
                response = conn.getresponse()
                data = response.read()
                break
            except (
                ConnectionError,
                http.client.RemoteDisconnected,
                http.client.BadStatusLine,
            ) as exc:
                self.close()
                # A keep-alive connection the server closed while idle: reconnect once. Never
                # retry after a timeout, which may mean the server applied the request.
                if attempt == 1:
                    raise ParameterServerError(
                        f"Lost the connection to the parameter server at {self.host}:{self.port}: "
                        f"{exc}"
                    ) from exc
            except http.client.IncompleteRead as exc:
                self.close()
                received = len(exc.partial)
                raise ParameterServerError(
                    f"The reply from the parameter server at {self.host}:{self.port} to {method} "
                    f"{path} stopped after {received} of its {received + (exc.expected or 0)} "
                    "bytes."
                ) from exc
            except TimeoutError as exc:
                self.close()
                raise ParameterServerError(
                    f"No reply from the parameter server at {self.host}:{self.port} to {method} "
                    f"{path} within {self.timeout:g} s: the wait `{self.timeout_name}` allows "
                    "expired."
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise ParameterServerError(
                    f"Cannot reach the parameter server at {self.host}:{self.port}: {exc}"
                ) from exc
        self.seconds += time.perf_counter() - started
        self.bytes_sent += length
        self.bytes_received += len(data)
        return response.status, response.getheader("Content-Type", ""), data

    def _weights(
        self, method: str, path: str, body: list | bytes = b"", sparse: bool = False
    ) -> tuple[dict[str, Any], np.ndarray]:
        status, content_type, data = self.request(method, path, body)
        if status != 200:
            _raise_for(status, content_type, data)
        header, flat = wire.decode(data, sparse=sparse)
        if header.get("stop"):
            self.stop_requested = True
        return header, flat

    def health(self) -> dict[str, Any]:
        """The server's health document."""
        return self._json("GET", "/v1/health")

    def stats(self) -> dict[str, Any]:
        """The server's statistics."""
        return self._json("GET", "/v1/stats")

    def pull(self) -> tuple[np.ndarray, int]:
        """The center weights (flat, read-only) and their version."""
        header, flat = self._weights("GET", "/v1/weights")
        return flat, header["version"]

    def push(
        self,
        update: np.ndarray,
        shapes: list,
        window: int,
        samples: int,
        indices: np.ndarray | None = None,
        since: int | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Push a delta (or weights, by the rule); returns the weights to continue from and the
        header.

        With ``indices`` the delta is sparse: ``update`` holds its values at those positions,
        the rest being zero. With ``since`` (the version of the caller's copy of the center) the
        reply may be sparse too: then ``header["indices"]`` holds the positions that changed
        after ``since`` and the returned array their values.
        """
        fields: dict[str, Any] = {"window": window, "samples": samples}
        if since is not None:
            fields["since"] = since
        message = (
            wire.encode(update, shapes, **fields)
            if indices is None
            else wire.encode_sparse(update, shapes, indices, **fields)
        )
        header, flat = self._weights("POST", "/v1/push", message, sparse=since is not None)
        return flat, header

    def barrier(self, round: int, weights: np.ndarray, shapes: list, samples: int) -> np.ndarray:
        """Join round ``round`` with these weights; returns the round's weighted average."""
        _, flat = self._weights(
            "POST", f"/v1/rounds/{round}", wire.encode(weights, shapes, samples=samples)
        )
        return flat

    def stop(self) -> None:
        """Ask every worker of this server to stop at its next exchange."""
        self._json("POST", "/v1/stop", b"{}")

    def publish_shard(self, url: str) -> list[str]:
        """Publish where this worker serves its shard of the center; waits for every worker's and
        returns their addresses in worker order."""
        return list(self.post_json("/v1/shards", {"url": url})["shards"])

    def mirror(
        self,
        key: int,
        values: np.ndarray,
        offset: int,
        rounds: int = 0,
        pushes: dict[int, int] | None = None,
    ) -> bool:
        """Send this worker's ``key``-th copy of its shard (elements ``offset`` on), holding
        ``rounds`` rounds and ``pushes`` per worker of this stage; returns whether it completed
        the center."""
        fields: dict[str, Any] = {"offset": offset, "rounds": rounds}
        if pushes:
            fields["pushes"] = {str(w): n for w, n in pushes.items()}
        status, content_type, data = self.request(
            "POST", f"/v1/center/{key}", wire.encode(values, [values.shape], **fields)
        )
        if status != 200:
            _raise_for(status, content_type, data)
        return bool(json.loads(data).get("committed"))

    def fence(self, key: int) -> None:
        """Tell the server this worker sent everything it sends before fence ``key``."""
        self._json("POST", f"/v1/fences/{key}", b"{}")

    def report_failure(self, message: str) -> None:
        """Tell the server this worker failed, so no barrier waits for it. Never raises."""
        try:
            self.request(
                "POST", "/v1/failure", json.dumps({"message": message}).encode(), "application/json"
            )
        except Exception:  # the worker is already failing; its own error is what matters
            pass

    def post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON object; returns the JSON reply."""
        return self._json("POST", path, json.dumps(payload).encode())

    def center(self) -> np.ndarray:
        """The center to start or resume from (on the control channel, unlike :meth:`pull`)."""
        return self._weights("GET", "/v1/epochs/center")[1]

    def end_epoch(
        self, epoch: int, samples: int, metrics: dict[str, float], center: bool, steps: int = 0
    ) -> np.ndarray | None:
        """Tell the driver this worker ended ``epoch`` after ``steps`` steps; waits for every
        worker. Returns the epoch's center when ``center`` asks for it."""
        payload = json.dumps(
            {"samples": samples, "steps": steps, "metrics": metrics, "center": center}
        ).encode()
        status, content_type, data = self.request(
            "POST", f"/v1/epochs/{epoch}/end", payload, "application/json"
        )
        if status != 200:
            _raise_for(status, content_type, data)
        return wire.decode(data)[1] if content_type.startswith(wire.CONTENT_TYPE) else None

    def _json(self, method: str, path: str, body: bytes = b"") -> dict[str, Any]:
        status, content_type, data = self.request(
            method, path, body, "application/json" if body else wire.CONTENT_TYPE
        )
        if status != 200:
            _raise_for(status, content_type, data)
        return json.loads(data)

    def close(self) -> None:
        """Close the connection (a later request reconnects)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ParameterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_for(status: int, content_type: str, data: bytes) -> None:
    try:
        payload = json.loads(data) if content_type.startswith("application/json") else {}
    except ValueError:
        payload = {}
    message = payload.get("error") or data[:200].decode("utf-8", "replace") or f"HTTP {status}"
    if status == 504:
        raise BarrierTimeoutError(
            message, payload.get("round", -1), tuple(payload.get("missing", ()))
        )
    raise ParameterServerError(f"Parameter server answered {status}: {message}", status)
