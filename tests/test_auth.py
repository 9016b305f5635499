import time

import pytest

from kerasonspark.parameter_server import _auth as auth


def test_signed_request_verifies_and_returns_credentials():
    secret = auth.new_secret()
    value = auth.sign(secret, "POST", "/v1/push", worker=2, seq=11, body_length=5)
    creds = auth.verify(secret, "POST", "/v1/push", value, 5)
    assert (creds.worker, creds.seq) == (2, 11)


@pytest.mark.parametrize("change", ["secret", "path", "method", "length", "worker"])
def test_any_change_breaks_the_signature(change):
    secret = auth.new_secret()
    value = auth.sign(secret, "POST", "/v1/push", worker=2, seq=11, body_length=5)
    kwargs = dict(secret=secret, method="POST", path="/v1/push", value=value, body_length=5)
    if change == "secret":
        kwargs["secret"] = auth.new_secret()
    elif change == "path":
        kwargs["path"] = "/v1/rounds/0"
    elif change == "method":
        kwargs["method"] = "GET"
    elif change == "length":
        kwargs["body_length"] = 6
    else:
        kwargs["value"] = value.replace("worker=2", "worker=3")
    with pytest.raises(auth.AuthenticationError, match="signature"):
        auth.verify(**kwargs)


def test_missing_malformed_and_stale_headers_are_refused():
    secret = auth.new_secret()
    with pytest.raises(auth.AuthenticationError, match="Missing"):
        auth.verify(secret, "GET", "/v1/stats", None, 0)
    with pytest.raises(auth.AuthenticationError, match="Malformed"):
        auth.verify(secret, "GET", "/v1/stats", "v1 worker=x", 0)
    old = auth.sign(secret, "GET", "/v1/stats", 0, 1, 0, ts=int(time.time()) - 3600)
    with pytest.raises(auth.AuthenticationError, match="clock"):
        auth.verify(secret, "GET", "/v1/stats", old, 0)


def test_body_signing_binds_the_content():
    secret = auth.new_secret()
    value = auth.sign(secret, "POST", "/v1/push", 0, 1, 5, body_digest=auth.body_digest(b"hello"))
    auth.verify(secret, "POST", "/v1/push", value, 5, body_digest=auth.body_digest([b"he", b"llo"]))
    with pytest.raises(auth.AuthenticationError):
        auth.verify(secret, "POST", "/v1/push", value, 5, body_digest=auth.body_digest(b"jello"))


def test_secrets_are_256_bits_and_fresh():
    first, second = auth.new_secret(), auth.new_secret()
    assert len(first) == 32 and first != second


def test_freshness_is_judged_by_the_server_clock_given():
    secret = auth.new_secret()
    value = auth.sign(secret, "GET", "/v1/stats", 0, 1, 0, ts=1_000_000)
    assert auth.verify(secret, "GET", "/v1/stats", value, 0, now=1_000_000).ts == 1_000_000
    assert (
        auth.verify(secret, "GET", "/v1/stats", value, 0, now=1_000_000 + auth.MAX_CLOCK_SKEW_S).seq
        == 1
    )
    with pytest.raises(
        auth.AuthenticationError, match="^Request timestamp is 301 s away from the server's clock"
    ):
        auth.verify(secret, "GET", "/v1/stats", value, 0, now=1_000_000 + auth.MAX_CLOCK_SKEW_S + 1)


def test_an_older_timestamp_within_the_window_still_verifies_against_its_own_signature():
    secret = auth.new_secret()
    ts = int(time.time()) - 100
    value = auth.sign(secret, "POST", "/v1/push", 1, 5, 10, ts=ts)
    assert auth.verify(secret, "POST", "/v1/push", value, 10).ts == ts
    with pytest.raises(
        auth.AuthenticationError,
        match="^Bad signature: the request was not signed with this run's secret.$",
    ):
        auth.verify(auth.new_secret(), "POST", "/v1/push", value, 10)


def test_header_parsing_names_what_is_wrong():
    sig = "0123456789abcdef" * 4
    assert auth.parse(f"v1 worker=3 seq=4 ts=5 sig={sig}") == auth.Credentials(3, 4, 5, sig)
    for malformed in (
        f"v1 worker=3 seq=4 ts=5 sig={sig.upper()}",
        f"v1 worker=3 seq=+4 ts=5 sig={sig}",
        f"v1 worker=3 seq=4 ts={'9' * 13} sig={sig}",
        f"v1 worker=3 seq=4 ts=5 sig={sig} extra=1",
        f"v1 seq=4 worker=3 ts=5 sig={sig}",
        "v1 worker=3 seq=4 ts=5 sig=" + "é" * 64,
    ):
        with pytest.raises(auth.AuthenticationError, match="^Malformed"):
            auth.parse(malformed)
    with pytest.raises(
        auth.AuthenticationError, match="^Unsupported auth scheme 'v2'; expected 'v1'.$"
    ):
        auth.parse("v2 worker=3 seq=4 ts=5 sig=ab")
    with pytest.raises(auth.AuthenticationError, match="^Malformed `X-KOS-Auth` header"):
        auth.parse("v1 worker=3 seq=4 ts=5")
