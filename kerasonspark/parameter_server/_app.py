"""The parameter server's Flask application.

Routes (all under ``/v1``, all authenticated, see :mod:`.auth`)::

    GET  /v1/health           liveness: {"status": "ok", "version": n}
    GET  /v1/weights          pull: the center weights (wire format), header field "version"
    POST /v1/push             push an update (wire format; fields "window", "samples");
                              answers the weights the worker continues from
    POST /v1/rounds/<round>   round barrier (wire format; field "samples"); answers the
                              sample-weighted average once every worker has arrived
    POST /v1/failure          a worker reports its own failure: {"message": "..."}
    POST /v1/stop             a worker asks every worker to stop at its next exchange (its loss
                              is not finite, or the driver's stop reached it first)
    POST /v1/shards           a sharded center: a worker publishes where it serves its shard
                              (JSON: url); waits for every worker's, answers {"shards": [url]}
    POST /v1/center/<key>     a sharded center: a worker's <key>-th copy of its shard this
                              stage (wire format; fields "offset", and what it holds of the
                              stage: "rounds", "pushes" {worker: n}); answers
                              {"committed": true} when the last shard of <key> made the center
    POST /v1/fences/<key>     a sharded center: the worker sent everything before fence <key>
                              (the shard's owner waits for every worker's, then mirrors)
    POST /v1/progress         a worker's progress (JSON: epoch, samples, steps, metrics, logs);
                              the reply carries "stop": true once the driver stops the run
    POST /v1/epochs/<e>/end   a worker ended epoch e (JSON: samples, steps, metrics, center);
                              waits for the others, answers the epoch's center (wire format) if
                              asked
    POST /v1/epochs/<e>/ready a worker scored the epoch's center (JSON: rows, scores, learning_rate,
                              rows_per_second); waits for the driver's decision {"stop",
                              "learning_rate", and with balance_workers "steps": {worker: steps}}
    POST /v1/epochs/join      a worker starts in a training stage (JSON: stage); once per worker
                              and stage
    GET  /v1/epochs/center    the center a worker starts or resumes from (wire format)
    GET  /v1/stats            statistics (JSON)
    GET  /v1/dashboard        the live stats page (HTML)

``/v1/stats`` and ``/v1/dashboard`` also open to ``?token=<view token>``: a read-only token,
never the training secret, that the driver logs with the page's URL at the start of ``fit``.

Errors come back as JSON ``{"error": "...", "status": n}``: 400 (malformed, wrong shapes, bad
Content-Length, unknown worker id, a count out of range), 401 (authentication; refused from the
headers, before the body is read or allocated), 404 (unknown route), 405 (wrong method), 408
(the request head did not arrive within ``header_timeout``, or the body stopped arriving), 409
(conflict: replay, duplicate arrival, no rule), 411 (chunked body), 413 (payload too large; told
only to an authenticated client), 422 (NaN/Inf update, or one whose result would overflow float32:
refused and counted), 431 (request head too large), 503 (shutting down, or too many requests
waiting for authentication) or 504 (round barrier timed out). Every refusal leaves the weights as
they were. An unexpected error is logged in one line and answered 500 without a traceback.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter

from .._errors import BarrierTimeoutError, ParameterServerError
from . import _auth as auth
from . import wire
from ._board import EpochBoard
from ._dashboard import DASHBOARD_HTML
from ._store import ParameterStore

EXTENSION = "kerasonspark"
# counts (samples, steps, epochs) stay exact as floats and cannot overflow a float32 sum
MAX_COUNT = 2**53 - 1
MAX_WORKERS = 100_000
logger = logging.getLogger(__name__)


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
        view_token: opens the read-only routes (stats, dashboard) to ``?token=...``; ``None``
            keeps them behind the secret.
        header_timeout: seconds for a request line and headers to arrive, counted from the
            connection (or, between requests, from the first byte); the connection is then closed
            with 408. No thread serves a connection before its request head is complete.
        max_header_bytes: the largest request head (431 beyond).
        max_pending_connections: connections waiting for their request head (a newer one closes
            the oldest), and requests served before authentication (503 beyond).
    """

    secret: bytes
    max_payload_bytes: int = 64 << 20
    sign_body: bool = False
    idle_timeout: float | None = 120.0
    view_token: str | None = None
    header_timeout: float = 10.0
    max_header_bytes: int = 16384
    max_pending_connections: int = 128


class _ReplayGuard:
    """Remembers each worker's last sequence number per channel; a request must carry a larger one.

    A worker talks on two channels, each over its own connection with its own sequence: weights
    (pull, push, rounds) and control (progress, epochs). The path is signed, so a request cannot
    change channel.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()

    def check(self, worker: int, channel: str, seq: int) -> None:
        with self._lock:
            last = self._last.get((worker, channel), -1)
            if seq <= last:
                raise ParameterServerError(
                    f"Replayed or out-of-order request from worker {worker}: seq {seq} is not "
                    f"above {last}.",
                    409,
                )
            self._last[worker, channel] = seq


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
            raise ParameterServerError(
                f"The body ended after {received} of its {length} bytes (Content-Length).", 400
            )
        received += n
    return buffer


class _CountConverter(BaseConverter):
    """``<count:name>``: 1 to 15 ASCII digits, so an absurd number in a path is a 404, not a 500."""

    regex = r"[0-9]{1,15}"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: int) -> str:
        return str(value)


def _binary(parts: list, status: int = 200) -> Response:
    # WSGI servers take bytes, so the payload is copied once here, and not joined again.
    chunks = [bytes(p) if isinstance(p, memoryview) else p for p in parts]
    response = Response(chunks, status=status, mimetype=wire.CONTENT_TYPE, direct_passthrough=True)
    response.content_length = sum(len(c) for c in chunks)
    return response


api = Blueprint("parameter_server", __name__, url_prefix="/v1")


class InFlight:
    """Pushes that passed authentication and have not finished.

    A restart replaces the run's secret, then waits here, so that a push authenticated with the
    old secret lands before the driver counts what the center holds, never after.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def enter(self) -> None:
        with self._cond:
            self._count += 1

    def leave(self) -> None:
        with self._cond:
            self._count -= 1
            if not self._count:
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until none is in flight; returns whether that happened within ``timeout``
        seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout)


@dataclass
class _State:
    """What the views share, kept in ``app.extensions["kerasonspark"]``."""

    store: ParameterStore
    config: ServerConfig
    replay: _ReplayGuard
    board: EpochBoard | None
    in_flight: InFlight
    last_internal_error: float = 0.0  # when one was last logged (monotonic seconds)


def create_app(
    store: ParameterStore, config: ServerConfig, board: EpochBoard | None = None
) -> Flask:
    """Build the Flask app that serves ``store``.

    Args:
        store: the run's weights and barriers.
        config: the secret and limits.
        board: the run's progress and epoch gate; without it the progress and epoch routes
            answer 409.

    Returns:
        A Flask app; serve it with :class:`~kerasonspark.parameter_server._server.ParameterServer`
        or test it with ``app.test_client()``.
    """
    app = Flask("kerasonspark.parameter_server")
    app.config["MAX_CONTENT_LENGTH"] = config.max_payload_bytes
    app.url_map.converters["count"] = _CountConverter
    app.extensions[EXTENSION] = _State(store, config, _ReplayGuard(), board, InFlight())
    app.register_blueprint(api)
    app.register_error_handler(BarrierTimeoutError, _barrier_timeout)
    app.register_error_handler(ParameterServerError, _refused)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal_error)
    return app


def _state() -> _State:
    return current_app.extensions[EXTENSION]


_VIEW_ROUTES = ("/v1/stats", "/v1/dashboard")
_CONTROL_PREFIXES = ("/v1/progress", "/v1/epochs/")


def _view_token_valid(config: ServerConfig) -> bool:
    token = request.args.get("token", "")
    return (
        config.view_token is not None
        and request.method == "GET"
        and request.path in _VIEW_ROUTES
        and hmac.compare_digest(token.encode("utf-8", "replace"), config.view_token.encode())
    )


@api.before_request
def _authenticate() -> Response | None:
    store, config = _state().store, _state().config
    if _view_token_valid(config):
        request.environ["kerasonspark.worker"] = -1
        request.environ["kerasonspark.authenticated"] = True
        return None
    length = request.content_length or 0
    try:
        # From the headers alone: an unsigned request is refused before its body is read or
        # allocated.
        creds = auth.verify(
            config.secret, request.method, request.path, request.headers.get(auth.HEADER), length
        )
    except auth.AuthenticationError as exc:
        store.count("refused_auth")
        return _error(401, str(exc))
    request.environ["kerasonspark.authenticated"] = True
    # -1 is the driver; refused before the replay guard keeps it
    if not -1 <= creds.worker < store.num_workers:
        return _error(
            400,
            f"Unknown worker id {creds.worker}: this run has workers 0 to {store.num_workers - 1}.",
        )
    # a round cannot complete without the failed worker; a push can land
    if request.path == "/v1/push":
        _state().in_flight.enter()
        request.environ["kerasonspark.in_flight"] = True
    # the cap is the model's size: told to secret holders only
    if length > config.max_payload_bytes:
        return _error(
            413,
            f"Payload of {length} bytes exceeds the cap of {config.max_payload_bytes} bytes; "
            "raise `max_payload_bytes` if the model is that large.",
        )
    body = _read_body(length)
    if config.sign_body:
        try:
            auth.verify_body(config.secret, creds, auth.body_digest(body))
        except auth.AuthenticationError as exc:
            request.environ["kerasonspark.authenticated"] = False
            store.count("refused_auth")
            return _error(401, str(exc))
    request.environ["kerasonspark.body"] = body
    _state().replay.check(
        creds.worker,
        "control" if request.path.startswith(_CONTROL_PREFIXES) else "weights",
        creds.seq,
    )
    request.environ["kerasonspark.worker"] = creds.worker
    store.count_bytes(received=len(body))
    return None


@api.teardown_request
def _finished(exc: BaseException | None) -> None:
    if request.environ.pop("kerasonspark.in_flight", False):
        _state().in_flight.leave()


def _worker_id() -> int:
    return request.environ["kerasonspark.worker"]


def _read_message(sparse: bool = False) -> tuple[dict, np.ndarray]:
    if request.mimetype != wire.CONTENT_TYPE:
        raise ParameterServerError(
            f"Expected Content-Type {wire.CONTENT_TYPE}. Received: {request.mimetype!r}.", 400
        )
    header, flat = wire.decode(request.environ["kerasonspark.body"], sparse=sparse)
    return header, wire.as_float32(flat, header["dtype"])


def _read_update(sparse: bool = False) -> tuple[dict, np.ndarray]:
    """The request's update, validated, as float32 values (of a sparse push: its values, the
    positions being ``header["indices"]``)."""
    header, values = _read_message(sparse)
    return header, _state().store.check_update(header["shapes"], values, header.get("indices"))


def _int_field(header: dict, name: str, default: int | None = None) -> int:
    value = header.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ParameterServerError(
            f"Field `{name}` must be an integer from 0 to 2**53 - 1. Received: {shown}.", 400
        )
    return value


def _reply(flat: np.ndarray, **fields: object) -> Response:
    return _send_parts(wire.encode(flat, _state().store.shapes, **fields))


def _send_parts(parts: list[bytes | memoryview]) -> Response:
    _state().store.count_bytes(sent=wire.encoded_size(parts))
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
    header, update = _read_update(sparse=True)
    window = _int_field(header, "window", 1)
    samples = _int_field(header, "samples", 0)
    # `since`: the version of the pusher's copy of the center, which the reply may bring up to
    # date with only what changed after it
    since = _int_field(header, "since") if "since" in header else None
    store = _state().store
    new_weights, version, staleness = store.push(
        _worker_id(), update, window, samples, header.get("indices")
    )
    positions = None
    if since is not None and store.rule is not None and store.rule.payload == "delta":
        positions = store.changed_since(since, most=int(store.size * wire.SPARSE_BELOW))
    fields = {"version": version, "staleness": staleness, **_stop_field()}
    if positions is None:
        return _reply(new_weights, **fields)
    values = new_weights[positions]
    return _send_parts(wire.encode_sparse(values, store.shapes, positions, **fields))


@api.post("/rounds/<count:round>")
def barrier(round: int) -> Response:
    header, weights = _read_update()
    samples = _int_field(header, "samples")
    store = _state().store
    average = store.barrier(round, _worker_id(), weights, samples)
    return _reply(average, round=round, version=store.version, **_stop_field())


def _stop_field() -> dict[str, bool]:
    # Present only when the driver asked for a stop: the hot path's header stays as it was.
    return {"stop": True} if _state().store.stop_requested else {}


@api.post("/failure")
def failure() -> Response:
    message = str(_json_body().get("message", "no message"))
    state = _state()
    state.store.report_failure(_worker_id(), message)
    if state.board is not None:
        state.board.fail(
            f"Worker {_worker_id()} failed: {message.splitlines()[0] if message else 'no message'}"
        )
    return jsonify(recorded=True)


@api.post("/stop")
def stop() -> Response:
    _state().store.request_stop()
    return jsonify(stop=True)


_MAX_URL_LENGTH = 256


@api.post("/shards")
def publish_shard() -> Response:
    url = _json_body().get("url")
    parts = urlsplit(url) if isinstance(url, str) and len(url) <= _MAX_URL_LENGTH else None
    try:
        valid = parts is not None and parts.scheme == "http" and parts.hostname and parts.port
    except ValueError:  # a port out of range
        valid = False
    if not valid or not isinstance(url, str):
        raise ParameterServerError(
            f"Field `url` must be http://host:port, at most {_MAX_URL_LENGTH} characters. "
            f"Received: {str(url)[:60]!r}.",
            400,
        )
    store = _state().store
    return jsonify(shards=store.publish_shard(_worker_id(), url, store.barrier_timeout))


@api.post("/center/<count:key>")
def mirror(key: int) -> Response:
    header, values = _read_message()
    pushes = header.get("pushes", {})
    if not isinstance(pushes, dict) or len(pushes) > MAX_WORKERS:
        raise ParameterServerError("Field `pushes` must be an object of worker ids to counts.", 400)
    held = {}
    for worker in pushes:
        if not (isinstance(worker, str) and worker.isdigit() and len(worker) <= 6):
            raise ParameterServerError(
                f"Field `pushes` must name workers by their ids. Received: {worker[:20]!r}.", 400
            )
        held[int(worker)] = _int_field(pushes, worker)
    store = _state().store
    committed = store.mirror(
        _worker_id(),
        key,
        _int_field(header, "offset"),
        values,
        _int_field(header, "rounds", 0),
        held,
    )
    return jsonify(committed=committed)


@api.post("/fences/<count:key>")
def fence(key: int) -> Response:
    _state().store.fence(key, _worker_id(), wait=False)
    return jsonify(fenced=True)


@api.get("/stats")
def stats() -> Response:
    state = _state()
    figures = state.store.stats()
    if state.board is not None:
        figures["live"] = state.board.stats()
    return jsonify(figures)


@api.get("/dashboard")
def dashboard() -> Response:
    return Response(DASHBOARD_HTML, mimetype="text/html")


def _board() -> EpochBoard:
    board = _state().board
    if board is None:
        raise ParameterServerError(
            "This server has no epoch gate (it serves no training run).", 409
        )
    return board


def _json_body() -> dict:
    payload = wire.loads_json(request.environ["kerasonspark.body"] or b"{}", "The request body")
    if not isinstance(payload, dict):
        raise ParameterServerError("Expected a JSON object as the request body.", 400)
    return payload


def _metrics_field(payload: dict, name: str) -> dict[str, float]:
    value = payload.get(name, {})
    if (
        not isinstance(value, dict)
        or len(value) > 256
        or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in value.items()
        )
    ):
        raise ParameterServerError(
            f"Field `{name}` must be an object of at most 256 names to numbers.", 400
        )
    return {k: float(v) for k, v in value.items()}


def _optional_number_field(payload: dict, name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ParameterServerError(
            f"Field `{name}` must be a finite number >= 0 or null. Received: {value!r}.", 400
        )
    return float(value)


@api.post("/progress")
def progress() -> Response:
    payload = _json_body()
    logs = payload.get("logs", [])
    if not isinstance(logs, list) or not all(isinstance(line, str) for line in logs):
        raise ParameterServerError("Field `logs` must be a list of strings.", 400)
    _board().report_progress(
        _worker_id(),
        _int_field(payload, "epoch"),
        _int_field(payload, "samples"),
        _int_field(payload, "steps", 0),
        _metrics_field(payload, "metrics"),
        logs,
        pid=_int_field(payload, "pid", 0),
    )
    # A sharded center's workers meet no round on the driver: the stop reaches them here.
    return jsonify(recorded=True, **_stop_field())


@api.post("/epochs/join")
def epoch_join() -> Response:
    stage = _json_body().get("stage")
    if not isinstance(stage, str) or not 0 < len(stage) <= 64:
        raise ParameterServerError("Field `stage` must be a string of 1 to 64 characters.", 400)
    _board().join(_worker_id(), stage)
    return jsonify(joined=True)


@api.get("/epochs/center")
def epoch_center() -> Response:
    # On the control channel: a worker fetches the center it starts or resumes from.
    return _reply(_state().store.center.copy())


@api.post("/epochs/<count:epoch>/end")
def epoch_end(epoch: int) -> Response:
    payload = _json_body()
    center = _board().arrive(
        _worker_id(),
        epoch,
        _int_field(payload, "samples"),
        _metrics_field(payload, "metrics"),
        want_center=payload.get("center") is True,
        steps=_int_field(payload, "steps", 0),
    )
    if center is None:
        return jsonify(epoch=epoch)
    return _reply(center, epoch=epoch)


@api.post("/epochs/<count:epoch>/ready")
def epoch_ready(epoch: int) -> Response:
    payload = _json_body()
    decision = _board().ready(
        _worker_id(),
        epoch,
        _int_field(payload, "rows", 0),
        _metrics_field(payload, "scores"),
        _optional_number_field(payload, "learning_rate"),
        _optional_number_field(payload, "rows_per_second"),
    )
    return jsonify(decision)


def _barrier_timeout(exc: BarrierTimeoutError) -> Response:
    return _error(504, str(exc), round=exc.round, missing=list(exc.missing))


def _refused(exc: ParameterServerError) -> Response:
    return _error(exc.status or 500, str(exc))


def _http_error(exc: HTTPException) -> Response:
    if exc.code == 413:
        return _error(413, f"Payload exceeds the cap of {_state().config.max_payload_bytes} bytes.")
    return _error(exc.code or 500, exc.description or exc.name)


def _internal_error(exc: Exception) -> Response:
    # A bug, not the client's doing; one line at most every 10 s, so no client can flood the log.
    state = _state()
    state.store.count("internal_errors")
    now = time.monotonic()
    if now - state.last_internal_error > 10:
        state.last_internal_error = now
        logger.error(
            "Parameter server: %s on %s %s: %s",
            type(exc).__name__,
            request.method,
            request.path[:100],
            str(exc)[:200],
        )
    return _error(500, "Internal error in the parameter server; the driver's log names it.")


def _error(status: int, message: str, **fields) -> Response:
    response = jsonify(error=message, status=status, **fields)
    response.status_code = status
    return response
