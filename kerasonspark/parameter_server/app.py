"""The parameter server's Flask application.

Routes (all under ``/v1``, all authenticated, see :mod:`.auth`)::

    GET  /v1/health           liveness: {"status": "ok", "version": n}
    GET  /v1/weights          pull: the center weights (wire format), header field "version"
    POST /v1/push             push an update (wire format; fields "window", "samples");
                              answers the weights the worker continues from
    POST /v1/rounds/<round>   round barrier (wire format; field "samples"); answers the
                              sample-weighted average once every worker has arrived
    POST /v1/failure          a worker reports its own failure: {"message": "..."}
    GET  /v1/stats            statistics (JSON)

Errors come back as JSON ``{"error": "...", "status": n}``: 400 (malformed, wrong shapes, bad
Content-Length), 401 (authentication; refused before the body is read), 408 (the body stopped
arriving), 409 (conflict: replay, duplicate arrival, no rule), 411 (chunked body), 413 (payload
too large), 422 (NaN/Inf update, refused and counted), 431 (headers too large), 503 (shutting
down) or 504 (round barrier timed out).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import BarrierTimeoutError, ParameterServerError
from . import auth, wire
from .store import ParameterStore

EXTENSION = "kerasonspark"


@dataclass
class ServerConfig:
    """Settings of one parameter server.

    Attributes:
        secret: the run's HMAC secret (see :func:`.auth.new_secret`).
        max_payload_bytes: requests with a larger body are refused with 413.
        sign_body: require the signature to cover the body's SHA-256 (slower, see :mod:`.auth`).
        idle_timeout: seconds a connection may send nothing before the server closes it (between
            requests: the client reconnects on its next one; within a body: 408). Bounds what a
            client that connects and goes quiet can hold. ``None`` waits forever.
    """

    secret: bytes
    max_payload_bytes: int = 64 << 20
    sign_body: bool = False
    idle_timeout: float | None = 120.0


class _ReplayGuard:
    """Remembers each worker's last sequence number; a request must carry a larger one."""

    def __init__(self) -> None:
        self._last: dict[int, int] = {}
        self._lock = threading.Lock()

    def check(self, worker: int, seq: int) -> None:
        with self._lock:
            if seq <= self._last.get(worker, -1):
                raise ParameterServerError(
                    f"Replayed or out-of-order request from worker {worker}: seq {seq} is not above {self._last[worker]}.", 409)
            self._last[worker] = seq


def _read_body(length: int | None) -> bytes | bytearray:
    """The request body, read straight from the socket into one buffer.

    Werkzeug's ``get_data`` reads a large body in small chunks and joins them (about 2 ms for
    4 MB); ``readinto`` one preallocated buffer costs a single copy from the kernel.
    """
    if not length:
        return request.get_data(cache=False)
    stream = request.environ["wsgi.input"]
    if not hasattr(stream, "readinto"):
        return request.get_data(cache=False)
    buffer = bytearray(length)
    view, received = memoryview(buffer), 0
    while received < length:
        n = stream.readinto(view[received:])
        if not n:
            raise ParameterServerError(f"The body ended after {received} of its {length} bytes (Content-Length).", 400)
        received += n
    return buffer


def _binary(parts: list, status: int = 200) -> Response:
    # WSGI servers take bytes, so the payload is copied once here, and not joined again.
    chunks = [bytes(p) if isinstance(p, memoryview) else p for p in parts]
    response = Response(chunks, status=status, mimetype=wire.CONTENT_TYPE, direct_passthrough=True)
    response.content_length = sum(len(c) for c in chunks)
    return response


def create_app(store: ParameterStore, config: ServerConfig) -> Flask:
    """Build the Flask app that serves ``store``.

    Args:
        store: the run's weights and barriers.
        config: the secret and limits.

    Returns:
        A Flask app; serve it with :class:`~kerasonspark.parameter_server.server.ParameterServer`
        or test it with ``app.test_client()``.
    """
    app = Flask("kerasonspark.parameter_server")
    app.config["MAX_CONTENT_LENGTH"] = config.max_payload_bytes
    app.extensions[EXTENSION] = {"store": store, "config": config, "replay": _ReplayGuard()}

    def state():
        return app.extensions[EXTENSION]

    @app.before_request
    def authenticate():
        if request.content_length is not None and request.content_length > config.max_payload_bytes:
            return _error(413, f"Payload of {request.content_length} bytes exceeds the cap of "
                               f"{config.max_payload_bytes} bytes; raise `max_payload_bytes` if the model is that large.")
        length = request.content_length or 0
        header = request.headers.get(auth.HEADER)
        try:
            if config.sign_body:
                body = _read_body(length)
                creds = auth.verify(config.secret, request.method, request.path, header, length, auth.body_digest(body))
            else:
                # Checked from the headers alone: an unsigned request is refused before its body is read.
                creds = auth.verify(config.secret, request.method, request.path, header, length)
                body = _read_body(length)
        except auth.AuthenticationError as exc:
            store.counters["refused_auth"] += 1
            return _error(401, str(exc))
        request.environ["kerasonspark.body"] = body
        state()["replay"].check(creds.worker, creds.seq)
        request.environ["kerasonspark.worker"] = creds.worker
        store.bytes_in += len(body)
        return None

    def worker_id() -> int:
        return request.environ["kerasonspark.worker"]

    def read_update() -> tuple[dict, np.ndarray]:
        if request.mimetype != wire.CONTENT_TYPE:
            raise ParameterServerError(f"Expected Content-Type {wire.CONTENT_TYPE}. Received: {request.mimetype!r}.", 400)
        header, flat = wire.decode(request.environ["kerasonspark.body"])
        return header, store.check_update(header["shapes"], wire.as_float32(flat, header["dtype"]))

    def int_field(header: dict, name: str, default: int | None = None) -> int:
        value = header.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ParameterServerError(f"Header field `{name}` must be a non-negative integer. Received: {value!r}.", 400)
        return value

    def reply(flat, **fields) -> Response:
        parts = wire.encode(flat, store.shapes, **fields)
        store.bytes_out += wire.encoded_size(parts)
        return _binary(parts)

    @app.get("/v1/health")
    def health():
        return jsonify(status="ok", version=store.version)

    @app.get("/v1/weights")
    def pull():
        center, version = store.pull(worker_id())
        return reply(center, version=version)

    @app.post("/v1/push")
    def push():
        header, update = read_update()
        window = int_field(header, "window", 1)
        samples = int_field(header, "samples", 0)
        new_weights, version, staleness = store.push(worker_id(), update, window, samples)
        return reply(new_weights, version=version, staleness=staleness)

    @app.post("/v1/rounds/<int:round>")
    def barrier(round: int):
        header, weights = read_update()
        samples = int_field(header, "samples")
        average = store.barrier(round, worker_id(), weights, samples)
        return reply(average, round=round, version=store.version)

    @app.post("/v1/failure")
    def failure():
        try:
            payload = json.loads(request.environ["kerasonspark.body"] or b"{}")
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise ParameterServerError('The failure report must be a JSON object: {"message": "..."}.', 400)
        store.report_failure(worker_id(), str(payload.get("message", "no message")))
        return jsonify(recorded=True)

    @app.get("/v1/stats")
    def stats():
        return jsonify(store.stats())

    @app.errorhandler(BarrierTimeoutError)
    def barrier_timeout(exc: BarrierTimeoutError):
        return _error(504, str(exc), round=exc.round, missing=list(exc.missing))

    @app.errorhandler(ParameterServerError)
    def refused(exc: ParameterServerError):
        return _error(exc.status or 500, str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 413:
            return _error(413, f"Payload exceeds the cap of {config.max_payload_bytes} bytes.")
        return _error(exc.code or 500, exc.description or exc.name)

    return app


def _error(status: int, message: str, **fields) -> Response:
    response = jsonify(error=message, status=status, **fields)
    response.status_code = status
    return response
