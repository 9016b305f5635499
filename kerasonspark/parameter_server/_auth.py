"""Request authentication for the parameter server.

Every request carries ``X-KOS-Auth: v1 worker=<id> seq=<n> ts=<unix seconds> sig=<hex>`` where
``sig = HMAC-SHA256(secret, "METHOD\\nPATH\\nworker\\nseq\\nts\\nbody length")``, and with
``sign_body`` also `` bsig=<hex>``, ``bsig = HMAC-SHA256(secret, sig + "\\n" + SHA-256 of the
body)``.
The fields are strict: ``worker`` up to 9 digits (``-`` allowed), ``seq`` up to 20, ``ts`` up to 12,
``sig`` and ``bsig`` 64 lowercase hex digits; anything else is malformed. The secret is
random per run (:func:`new_secret`) and reaches the executors with the task, never over the
parameter server's own socket.

The signature proves the request comes from a holder of the run's secret. ``seq`` must grow
with every request of one worker and ``ts`` must be within :data:`MAX_CLOCK_SKEW_S` of the
server's clock, so a captured request cannot be replayed. The body is bound by its length, not
by a digest: hashing 4 MB of weights twice per exchange would cost more than the exchange itself,
and an attacker able to rewrite traffic could read the weights anyway. On an untrusted network
turn on Spark's network encryption, or pass ``sign_body=True`` to bind the body's SHA-256 too.
``sig`` never depends on the body, so the server authenticates every request from its headers
before it allocates or reads a byte of the body; ``bsig`` is checked once the body is in.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

HEADER = "X-KOS-Auth"
MAX_CLOCK_SKEW_S = 300.0
_VALUE = re.compile(
    r"worker=(-?[0-9]{1,9}) seq=([0-9]{1,20}) ts=([0-9]{1,12}) sig=([0-9a-f]{64})(?: "
    r"bsig=([0-9a-f]{64}))?"
)


class AuthenticationError(Exception):
    """The request's credentials are missing, malformed, wrong, or replayed."""


def new_secret() -> bytes:
    """A fresh 256-bit secret for one run."""
    return secrets.token_bytes(32)


def sign(
    secret: bytes,
    method: str,
    path: str,
    worker: int,
    seq: int,
    body_length: int,
    ts: int | None = None,
    body_digest: str | None = None,
) -> str:
    """The value of the ``X-KOS-Auth`` header for one request.

    Args:
        body_digest: the body's SHA-256 hex digest when the server signs bodies; otherwise the
            body is bound by ``body_length``.
    """
    ts = int(time.time()) if ts is None else ts
    sig = _mac(secret, f"{method.upper()}\n{path}\n{worker}\n{seq}\n{ts}\n{body_length}")
    value = f"v1 worker={worker} seq={seq} ts={ts} sig={sig}"
    if body_digest is None:
        return value
    bsig = _mac(secret, sig + "\n" + body_digest)
    return f"{value} bsig={bsig}"


def _mac(secret: bytes, message: str) -> str:
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def body_digest(parts: list | bytes | bytearray | memoryview) -> str:
    """The SHA-256 hex digest that ``sign_body`` mode binds: of one body, or of its parts in
    order."""
    h = hashlib.sha256()
    for part in [parts] if isinstance(parts, (bytes, bytearray, memoryview)) else parts:
        h.update(part)
    return h.hexdigest()


@dataclass
class Credentials:
    """The fields of a parsed ``X-KOS-Auth`` header."""

    worker: int
    seq: int
    ts: int
    sig: str
    bsig: str | None = None


def parse(value: str | None) -> Credentials:
    """Parse an ``X-KOS-Auth`` header value.

    Raises:
        AuthenticationError: the header is missing or malformed.
    """
    if not value:
        raise AuthenticationError(
            f"Missing `{HEADER}` header: every request must be signed with the run's secret."
        )
    scheme, _, rest = value.partition(" ")
    if scheme != "v1":
        raise AuthenticationError(f"Unsupported auth scheme {scheme[:16]!r}; expected 'v1'.")
    match = _VALUE.fullmatch(rest)
    if match is None:
        raise AuthenticationError(
            f"Malformed `{HEADER}` header; expected 'v1 worker=.. seq=.. ts=.. sig=..'."
        )
    worker, seq, ts, sig, bsig = match.groups()
    return Credentials(int(worker), int(seq), int(ts), sig, bsig)


def verify(
    secret: bytes,
    method: str,
    path: str,
    value: str | None,
    body_length: int,
    body_digest: str | None = None,
    now: float | None = None,
) -> Credentials:
    """Check a request's signature and freshness; returns its credentials.

    Without ``body_digest`` the request is checked from its headers alone, so a server can refuse
    it before reading the body (and check the body later with :func:`verify_body`). Replay
    protection by ``seq`` is the caller's (it needs per-worker state).

    Args:
        body_length: the body's length (Content-Length).
        body_digest: the body's SHA-256 hex digest, where the server signs bodies.

    Raises:
        AuthenticationError: missing, malformed, wrong signature, or clock skew too large.
    """
    creds = parse(value)
    now = time.time() if now is None else now
    if abs(now - creds.ts) > MAX_CLOCK_SKEW_S:
        raise AuthenticationError(
            f"Request timestamp is {abs(now - creds.ts):.0f} s away from the server's clock "
            f"(at most {MAX_CLOCK_SKEW_S:.0f} s allowed); synchronise the clocks."
        )
    expected = _mac(
        secret, f"{method.upper()}\n{path}\n{creds.worker}\n{creds.seq}\n{creds.ts}\n{body_length}"
    )
    if not hmac.compare_digest(expected, creds.sig):
        raise AuthenticationError(
            "Bad signature: the request was not signed with this run's secret."
        )
    if body_digest is not None:
        verify_body(secret, creds, body_digest)
    return creds


def verify_body(secret: bytes, creds: Credentials, body_digest: str) -> None:
    """Check ``bsig``, the signature of the body, for a request whose headers verified.

    Raises:
        AuthenticationError: no ``bsig`` (the client does not sign bodies) or the body is not
            the one that was signed.
    """
    if creds.bsig is None:
        raise AuthenticationError(
            "This server signs bodies: the request carries no `bsig`; sign with sign_body=True."
        )
    if not hmac.compare_digest(_mac(secret, creds.sig + "\n" + body_digest), creds.bsig):
        raise AuthenticationError("Bad body signature: the body is not the one that was signed.")
