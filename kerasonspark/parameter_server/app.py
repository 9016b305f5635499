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
from flask import Blueprint, Flask, Response, current_app, jsonify, request
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


api = Blueprint("parameter_server", __name__, url_prefix="/v1")


@dataclass
class _State:
    """What the views share, kept in ``app.extensions["kerasonspark"]``."""

    store: ParameterStore
    config: ServerConfig
    replay: _ReplayGuard


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
    app.extensions[EXTENSION] = _State(store, config, _ReplayGuard())
    app.register_blueprint(api)
    app.register_error_handler(BarrierTimeoutError, _barrier_timeout)
    app.register_error_handler(ParameterServerError, _refused)
    app.register_error_handler(HTTPException, _http_error)
    return app


def _state() -> _State:
    return current_app.extensions[EXTENSION]


@api.before_request
def _authenticate() -> Response | None:
    store, config = _state().store, _state().config
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
        store.count("refused_auth")
        return _error(401, str(exc))
    request.environ["kerasonspark.body"] = body
    _state().replay.check(creds.worker, creds.seq)
    request.environ["kerasonspark.worker"] = creds.worker
    store.count_bytes(received=len(body))
    return None


def _worker_id() -> int:
    return request.environ["kerasonspark.worker"]


def _read_update() -> tuple[dict, np.ndarray]:
    if request.mimetype != wire.CONTENT_TYPE:
        raise ParameterServerError(f"Expected Content-Type {wire.CONTENT_TYPE}. Received: {request.mimetype!r}.", 400)
    header, flat = wire.decode(request.environ["kerasonspark.body"])
    return header, _state().store.check_update(header["shapes"], wire.as_float32(flat, header["dtype"]))


def _int_field(header: dict, name: str, default: int | None = None) -> int:
    value = header.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ParameterServerError(f"Header field `{name}` must be a non-negative integer. Received: {value!r}.", 400)
    return value


def _reply(flat: np.ndarray, **fields: object) -> Response:
    store = _state().store
    parts = wire.encode(flat, store.shapes, **fields)
    store.count_bytes(sent=wire.encoded_size(parts))
    return _binary(parts)


@api.get("/health")
def health() -> Response:
    return jsonify(status="ok", version=_state().store.version)


@api.get("/weights")
def pull() -> Response:
    center, version = _state().store.pull(_worker_id())
    return _reply(center, version=version)


@api.post("/push")
def push() -> Response:
    header, update = _read_update()
    window = _int_field(header, "window", 1)
    samples = _int_field(header, "samples", 0)
    new_weights, version, staleness = _state().store.push(_worker_id(), update, window, samples)
    return _reply(new_weights, version=version, staleness=staleness)


@api.post("/rounds/<int:round>")
def barrier(round: int) -> Response:
    header, weights = _read_update()
    samples = _int_field(header, "samples")
    store = _state().store
    average = store.barrier(round, _worker_id(), weights, samples)
    return _reply(average, round=round, version=store.version)


@api.post("/failure")
def failure() -> Response:
    try:
        payload = json.loads(request.environ["kerasonspark.body"] or b"{}")
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise ParameterServerError('The failure report must be a JSON object: {"message": "..."}.', 400)
    _state().store.report_failure(_worker_id(), str(payload.get("message", "no message")))
    return jsonify(recorded=True)


@api.get("/stats")
def stats() -> Response:
    return jsonify(_state().store.stats())


def _barrier_timeout(exc: BarrierTimeoutError) -> Response:
    return _error(504, str(exc), round=exc.round, missing=list(exc.missing))


def _refused(exc: ParameterServerError) -> Response:
    return _error(exc.status or 500, str(exc))


def _http_error(exc: HTTPException) -> Response:
    if exc.code == 413:
        return _error(413, f"Payload exceeds the cap of {_state().config.max_payload_bytes} bytes.")
    return _error(exc.code or 500, exc.description or exc.name)


def _error(status: int, message: str, **fields) -> Response:
    response = jsonify(error=message, status=status, **fields)
    response.status_code = status
    return response
