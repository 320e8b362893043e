"""Authenticating what workers and routers send each other, with a shared cluster secret.

Every KV transfer message, KV event and `/internal/*` HTTP request carries a tag: the sender's id
(random per process), a sequence number, a wall-clock timestamp and an HMAC-SHA256 (keyed with the
cluster secret) over those, the message's purpose and destination, and every frame of the message.
A receiver drops a message whose MAC does not verify (`unauthenticated`), and one it has already seen
or whose timestamp is outside the window (`replayed`): a frame captured on the network can neither be
altered nor sent again, nor sent to another worker or socket than the one it was meant for.

Without a secret (one box, everything on 127.0.0.1) messages carry a tag with an empty MAC and are
not checked: only their structure is. `warn_if_exposed` says so once when such a server binds beyond
loopback. Every dropped message is counted by reason in `DropCounts`, exported by the server as
`duoserve:untrusted_messages_dropped_total{socket, reason}`.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

logger = logging.getLogger("duoserve.auth")

SECRET_ENV = "DUOSERVE_CLUSTER_SECRET"
# How far a tag's timestamp may be from the receiver's clock (network and queueing delay, clock skew
# between hosts). A captured message older than this is refused whatever its sequence number, which
# is what lets a receiver forget senders it has not heard from for this long.
REPLAY_WINDOW_SECONDS = 60.0
# How far behind the newest sequence number of a sender another may arrive and still be accepted
# (once): HTTP requests of one router race each other on several connections. ZeroMQ keeps order.
REORDER_WINDOW = 4096
MAC_BYTES = 32
TAG_MAX_BYTES = 128  # a tag's msgpack: 16 + 9 + 9 + 34 bytes and a few of framing

# malformed: does not decode; invalid: decodes, but into no message of this socket's; foreign: a
# well-formed message about something this receiver does not await.
DROP_REASONS = ("malformed", "invalid", "oversized", "unauthenticated", "replayed", "foreign")
DROPPED_STAT = "untrusted_messages_dropped"


class Tag(msgspec.Struct, array_like=True):
    """What travels with each message (as its first frame, or an HTTP header)."""

    sender: bytes  # random per signer: sequence numbers are per sender
    seq: int
    time_ms: int  # sender's wall clock, in milliseconds since the epoch
    mac: bytes  # HMAC-SHA256, or empty without a secret


_tag_encoder = msgspec.msgpack.Encoder()
_tag_decoder = msgspec.msgpack.Decoder(Tag)


def secret_bytes(secret: str | bytes | None) -> bytes | None:
    if not secret:
        return None
    return secret.encode() if isinstance(secret, str) else secret


def _mac(key: bytes, purpose: bytes, destination: str, tag: Tag, frames: Sequence[Any]) -> bytes:
    """HMAC-SHA256 of everything the tag vouches for; every part is length-prefixed, so none can be
    shifted into another."""
    mac = hmac.new(key, digestmod="sha256")  # a string digestmod: OpenSSL's HMAC, which frees the GIL
    for part in (purpose, destination.encode(), tag.sender):
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    mac.update(tag.seq.to_bytes(8, "big", signed=True))
    mac.update(tag.time_ms.to_bytes(8, "big", signed=True))
    for frame in frames:  # anything with a contiguous buffer: bytes, ZeroMQ frames, numpy arrays
        view = memoryview(frame)
        mac.update(view.nbytes.to_bytes(8, "big"))
        mac.update(view)
    return mac.digest()


class Signer:
    """Tags the messages one sender sends for one purpose (`kv_transfer`, `kv_events`, ...)."""

    def __init__(self, secret: str | bytes | None, purpose: str) -> None:
        self.key = secret_bytes(secret)
        self.purpose = purpose.encode()
        self.sender = os.urandom(16)
        self.seq = 0

    def sign(self, destination: str, frames: Sequence[Any]) -> bytes:
        """The encoded tag of a message of these frames to `destination` (an address, a route)."""
        self.seq += 1
        tag = Tag(self.sender, self.seq, int(time.time() * 1000), b"")
        if self.key is not None:
            tag.mac = _mac(self.key, self.purpose, destination, tag, frames)
        return _tag_encoder.encode(tag)


@dataclass
class _SenderState:
    highest: int
    newest_ms: int
    seen: set[int] = field(default_factory=set)  # sequence numbers in (highest - REORDER_WINDOW, highest]


class Verifier:
    """Checks the tags of messages for one purpose; remembers what it accepted, to refuse replays."""

    def __init__(
        self,
        secret: str | bytes | None,
        purpose: str,
        window_seconds: float = REPLAY_WINDOW_SECONDS,
        reorder: int = REORDER_WINDOW,
    ) -> None:
        self.key = secret_bytes(secret)
        self.purpose = purpose.encode()
        self.window_ms = int(window_seconds * 1000)
        self.reorder = reorder
        self._senders: dict[bytes, _SenderState] = {}
        self._last_prune_ms = 0

    def verify(self, encoded_tag: Any, destination: str, frames: Sequence[Any]) -> str | None:
        """None if the message may be used; else the reason to drop it (one of DROP_REASONS)."""
        if len(encoded_tag) > TAG_MAX_BYTES:
            return "oversized"
        try:
            tag = _tag_decoder.decode(encoded_tag)
        except msgspec.DecodeError:  # ValidationError included
            return "malformed"
        if self.key is None:
            return None
        if len(tag.mac) != MAC_BYTES or not hmac.compare_digest(
            tag.mac, _mac(self.key, self.purpose, destination, tag, frames)
        ):
            return "unauthenticated"
        now_ms = int(time.time() * 1000)
        if abs(now_ms - tag.time_ms) > self.window_ms or not self._first_time(tag):
            return "replayed"
        self._prune(now_ms)
        return None

    def _first_time(self, tag: Tag) -> bool:
        state = self._senders.get(tag.sender)
        if state is None:
            self._senders[tag.sender] = _SenderState(tag.seq, tag.time_ms, {tag.seq})
            return True
        if tag.seq <= state.highest - self.reorder or tag.seq in state.seen:
            return False
        state.seen.add(tag.seq)
        state.newest_ms = max(state.newest_ms, tag.time_ms)
        if tag.seq > state.highest:
            state.highest = tag.seq
            if len(state.seen) > 2 * self.reorder:
                floor = state.highest - self.reorder
                state.seen = {s for s in state.seen if s > floor}
        return True

    def _prune(self, now_ms: int) -> None:
        """Forget senders silent for a whole window: any message of theirs now fails the time check."""
        if now_ms - self._last_prune_ms < self.window_ms:
            return
        self._last_prune_ms = now_ms
        stale = [s for s, state in self._senders.items() if now_ms - state.newest_ms > self.window_ms]
        for sender in stale:
            del self._senders[sender]


class DropCounts:
    """Messages one kind of socket dropped, by reason. Its owner is the only writer."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.counts = dict.fromkeys(DROP_REASONS, 0)

    def drop(self, reason: str, detail: str = "") -> None:
        if self.counts[reason] == 0:  # the first of each kind is logged; the counter tells the rest
            logger.warning("dropped a %s message on the %s socket %s", reason, self.socket, detail)
        self.counts[reason] += 1

    def stats(self) -> dict[str, float]:
        """As engine stats: `untrusted_messages_dropped:<socket>:<reason>` (every reason, zeros too)."""
        return {f"{DROPPED_STAT}:{self.socket}:{reason}": n for reason, n in self.counts.items()}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, secret: str | bytes | None) -> None:
    """Warn (once per process start) when a server listens beyond loopback without a cluster secret."""
    if not secret and not is_loopback(host):
        logger.warning(
            "binding %s without a cluster secret: anyone who reaches this host can call /internal/* and "
            "send KV or KV events to its workers. Set --cluster-secret or $%s on every worker and router",
            host,
            SECRET_ENV,
        )


# ---------------------------------------------------------------------- the /internal/* HTTP routes

AUTH_HEADER = "X-Duoserve-Auth"
HTTP_PURPOSE = "internal_http"


def http_auth_header(signer: Signer, method: str, path: str, body: bytes) -> dict[str, str]:
    """The header that authenticates a router's request to a worker (nothing without a secret).

    The secret itself never travels: the header is a tag over the method, path and body.
    """
    if signer.key is None:
        return {}
    tag = signer.sign(f"{method} {path}", [body])
    return {AUTH_HEADER: base64.urlsafe_b64encode(tag).decode()}


def verify_http(verifier: Verifier, header: str | None, method: str, path: str, body: bytes) -> str | None:
    """None if the request may be served (or no secret is set); else why not."""
    if verifier.key is None:
        return None
    if not header:
        return "unauthenticated"
    try:
        tag = base64.urlsafe_b64decode(header.encode("ascii"))
    except (ValueError, UnicodeEncodeError):  # binascii.Error is a ValueError
        return "malformed"
    return verifier.verify(tag, f"{method} {path}", [body])
