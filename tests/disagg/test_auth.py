"""Message authentication between workers and routers: what a Verifier accepts, and what it refuses."""

from __future__ import annotations

import pytest

from duoserve.disagg.auth import (
    AUTH_HEADER,
    Signer,
    Tag,
    Verifier,
    _mac,
    _tag_decoder,
    _tag_encoder,
    http_auth_header,
    is_loopback,
    verify_http,
)

ADDRESS = "tcp://10.0.0.2:5555"
FRAMES = [b"header", memoryview(b"payload" * 100)]


def test_a_signed_message_is_accepted_once():
    signer, verifier = Signer("s3cret", "kv_transfer"), Verifier("s3cret", "kv_transfer")
    tag = signer.sign(ADDRESS, FRAMES)
    assert verifier.verify(tag, ADDRESS, FRAMES) is None
    assert verifier.verify(tag, ADDRESS, FRAMES) == "replayed"
    # The next one from the same sender is fine.
    assert verifier.verify(signer.sign(ADDRESS, FRAMES), ADDRESS, FRAMES) is None


@pytest.mark.parametrize(
    "change",
    ["other secret", "other purpose", "other destination", "altered frame", "frame moved", "no mac"],
)
def test_anything_changed_is_unauthenticated(change):
    secret, purpose, address, frames = "s3cret", "kv_transfer", ADDRESS, list(FRAMES)
    if change == "other secret":
        secret = "guess"
    elif change == "other purpose":
        purpose = "kv_events"
    elif change == "other destination":
        address = "tcp://10.0.0.3:5555"
    tag = Signer(secret, purpose).sign(address, frames)
    if change == "altered frame":
        frames[1] = b"payload" * 99 + b"paYload"
    elif change == "frame moved":  # the same bytes, split differently between frames
        frames = [b"headerp", b"ayload" + b"payload" * 99]
    elif change == "no mac":
        tag = Signer(None, purpose).sign(address, frames)
    assert Verifier("s3cret", "kv_transfer").verify(tag, ADDRESS, frames) == "unauthenticated"


def test_stale_and_future_timestamps_are_refused():
    signer, verifier = Signer("s3cret", "kv_events"), Verifier("s3cret", "kv_events", window_seconds=60)
    for offset_ms in (-61_000, 61_000):
        tag = _tag_decoder.decode(signer.sign(ADDRESS, FRAMES))
        tag.time_ms += offset_ms
        assert verifier.verify(_resign(signer, tag), ADDRESS, FRAMES) == "replayed"


def _resign(signer: Signer, tag: Tag) -> bytes:
    """The tag with its MAC recomputed (a sender whose clock is off by that much)."""
    tag.mac = _mac(signer.key, signer.purpose, ADDRESS, tag, FRAMES)
    return _tag_encoder.encode(tag)


def test_out_of_order_sequence_numbers_within_the_window_are_accepted_once():
    signer, verifier = Signer("s3cret", "internal_http"), Verifier("s3cret", "internal_http", reorder=4)
    tags = [signer.sign(ADDRESS, FRAMES) for _ in range(8)]
    assert verifier.verify(tags[5], ADDRESS, FRAMES) is None
    assert verifier.verify(tags[3], ADDRESS, FRAMES) is None  # late, but within 4 of the newest
    assert verifier.verify(tags[3], ADDRESS, FRAMES) == "replayed"
    assert verifier.verify(tags[1], ADDRESS, FRAMES) == "replayed"  # too far behind to tell: refused
    assert verifier.verify(tags[7], ADDRESS, FRAMES) is None


def test_garbage_tags_are_malformed_or_oversized():
    verifier = Verifier("s3cret", "kv_transfer")
    assert verifier.verify(b"\xc1not msgpack", ADDRESS, FRAMES) == "malformed"
    assert verifier.verify(_tag_encoder.encode(["a", 1]), ADDRESS, FRAMES) == "malformed"
    assert verifier.verify(b"\x00" * 1000, ADDRESS, FRAMES) == "oversized"


def test_without_a_secret_only_the_structure_is_checked():
    verifier = Verifier(None, "kv_transfer")
    assert verifier.verify(Signer(None, "kv_transfer").sign(ADDRESS, FRAMES), ADDRESS, FRAMES) is None
    assert verifier.verify(Signer("x", "other").sign("elsewhere", []), ADDRESS, FRAMES) is None
    assert verifier.verify(b"\xc1", ADDRESS, FRAMES) == "malformed"


def test_http_header_never_carries_the_secret():
    signer = Signer("s3cret", "internal_http")
    headers = http_auth_header(signer, "POST", "/internal/generate", b"body")
    assert "s3cret" not in headers[AUTH_HEADER]
    verifier = Verifier("s3cret", "internal_http")
    value = headers[AUTH_HEADER]
    assert verify_http(verifier, value, "POST", "/internal/abort", b"body") == "unauthenticated"
    assert verify_http(verifier, value, "POST", "/internal/generate", b"body") is None
    assert verify_http(verifier, value, "POST", "/internal/generate", b"body") == "replayed"
    assert verify_http(verifier, None, "GET", "/internal/info", b"") == "unauthenticated"
    assert verify_http(verifier, "%%%", "GET", "/internal/info", b"") == "malformed"
    assert http_auth_header(Signer(None, "internal_http"), "GET", "/internal/info", b"") == {}


def test_loopback_hosts():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "::", "worker-0.svc"))
