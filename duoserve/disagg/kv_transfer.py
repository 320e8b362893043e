"""Moving a request's KV blocks from a prefill worker to a decode worker, over ZeroMQ.

The flow is decode-first, as in Dynamo: the decode worker allocates blocks for the prompt (its own
prefix-cache hits included) and hands out a `KVTicket`; the prefill worker computes the prompt and,
after every step, pushes the blocks that step filled straight into the ticket's blocks, so transfer
overlaps the next chunk's compute. With the first token it sends `KVDone`, and the decode worker
continues from that token without computing it again.

Wire format: a three-frame message, an authentication tag (`duoserve.disagg.auth`: HMAC-SHA256
with the cluster secret over the other frames and the receiver's address, with a sequence number and
a timestamp against replays), a msgpack header (`KVBlocks`, never pickle) and the raw bytes of the
blocks `[layers, 2, n, block_size, kv_heads, head_dim]`, sent zero-copy (`KVDone` has no bytes).

The receiver's port is reachable by every pod of a cluster, so it trusts nothing it reads: a message
that is malformed, larger than any real one (ZeroMQ's MAXMSGSIZE drops the peer of an oversized
frame), unauthenticated, replayed, or foreign (another layout, a request this worker does not wait
for) is dropped and counted before a byte is written; the byte count must equal what the header's
block count and our own layout imply. `KVSender` and `KVReceiver` are the transport interface:
another one (NIXL, NCCL for GPUs) only has to move the same header and bytes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import torch
import zmq

from duoserve.disagg.auth import DropCounts, Signer, Verifier
from duoserve.disagg.endpoints import bind_tcp
from duoserve.kv.layout import KVLayout  # defined with the KV cache; imported from here too

# How long a prefill worker waits for a decode worker's socket to take a message before giving up.
SEND_TIMEOUT_MS = 2000
AUTH_PURPOSE = "kv_transfer"
# Largest header a receiver decodes: a few hundred bytes plus at most 9 per block id.
_HEADER_BASE_BYTES = 1024
# Messages one `receive` reads at most: a flood (garbage included) cannot keep the engine loop from
# stepping; the rest wait for the next turn of the loop, which then polls without blocking.
MAX_MESSAGES_PER_RECEIVE = 256


class KVTicket(msgspec.Struct):
    """Where a prefill worker sends one request's KV: the decode worker's address and blocks."""

    request_id: str  # the sequence id on the decode worker
    address: str  # its KVReceiver, tcp://host:port
    block_ids: list[int]  # its blocks for the whole prompt, in order
    num_cached_tokens: int  # leading tokens it already holds (prefix-cache hit, whole blocks): not sent
    layout: KVLayout


class KVTransferParams(msgspec.Struct):
    """A request's part in disaggregation: 'receive' (decode worker) or 'send' (prefill worker)."""

    role: str
    ticket: KVTicket | None = None  # for 'send'

    def __post_init__(self) -> None:
        if self.role not in ("receive", "send"):
            raise ValueError(f"kv_transfer.role must be 'receive' or 'send', got {self.role!r}")
        if self.role == "send" and self.ticket is None:
            raise ValueError("kv_transfer.role 'send' needs a ticket")


class KVBlocks(msgspec.Struct, tag=True):
    """Header of a frame of blocks; the next frame holds their bytes."""

    request_id: str
    block_ids: list[int]  # destination blocks on the decode worker
    layout: KVLayout
    nbytes: int


class KVDone(msgspec.Struct, tag=True):
    """The prompt's KV is all sent; the decode worker continues from `first_token`."""

    request_id: str
    first_token: int
    num_blocks: int  # blocks sent in all, so the receiver knows none is missing


KVMessage = KVBlocks | KVDone
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVMessage)


class KVTransferError(Exception):
    """A transfer could not be done: the request it belongs to is aborted and its blocks freed."""


@dataclass
class TransferStats:
    bytes: int = 0
    seconds: float = 0.0  # decode side: ticket issued -> KV complete (prefill compute included), summed
    requests: int = 0
    # Time the engine loop itself spent on transfers: exporting + sending (prefill side), or checking +
    # writing arrived blocks into the cache (decode side). This is what transfer takes away from compute.
    busy_seconds: float = 0.0


class KVSendTransport(Protocol):
    """What the engine core needs to push KV (ZeroMQ here; NIXL or NCCL would implement the same)."""

    stats: TransferStats

    def send_blocks(self, ticket: KVTicket, dest_block_ids: list[int], blocks: torch.Tensor) -> None: ...

    def send_done(self, ticket: KVTicket, first_token: int, num_blocks: int) -> None: ...


class KVReceiveTransport(Protocol):
    """What the engine loop needs to take KV in: an address for tickets, and what has arrived."""

    address: str
    socket: Any  # what the engine loop's zmq.Poller waits on: a ZeroMQ socket or a file descriptor
    drops: DropCounts  # messages it refused, by reason

    def receive(self, expects: Callable[[str], bool]) -> list[tuple[KVMessage, memoryview | None]]: ...


class KVSender:
    """The prefill worker's end: one PUSH socket per decode worker it has sent to."""

    def __init__(self, context: zmq.Context, secret: str | bytes | None = None) -> None:
        self.context = context
        self.sockets: dict[str, zmq.Socket] = {}
        self.stats = TransferStats()
        self.signer = Signer(secret, AUTH_PURPOSE)

    def send_blocks(self, ticket: KVTicket, dest_block_ids: list[int], blocks: torch.Tensor) -> None:
        start = time.perf_counter()
        nbytes = blocks.numel() * blocks.element_size()
        header = KVBlocks(ticket.request_id, dest_block_ids, ticket.layout, nbytes)
        payload = blocks.contiguous().view(torch.uint8).numpy()  # the tensor's memory, not a copy
        self._send(ticket.address, [_encoder.encode(header), payload])
        self.stats.bytes += header.nbytes
        self.stats.busy_seconds += time.perf_counter() - start

    def send_done(self, ticket: KVTicket, first_token: int, num_blocks: int) -> None:
        self._send(ticket.address, [_encoder.encode(KVDone(ticket.request_id, first_token, num_blocks))])
        self.stats.requests += 1

    def _send(self, address: str, frames: list) -> None:
        sock = self.sockets.get(address)
        if sock is None:
            sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # fail (after the timeout) rather than queue for a dead peer
            sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
            sock.connect(address)
            self.sockets[address] = sock
        try:
            sock.send_multipart([self.signer.sign(address, frames), *frames], copy=False)
        except zmq.ZMQError as err:
            sock.close()
            del self.sockets[address]
            raise KVTransferError(f"cannot send KV to {address}: {err}") from err

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()


class KVReceiver:
    """The decode worker's end: one PULL socket every prefill worker pushes to.

    `layout` is this worker's, and `max_blocks` the most blocks one message can carry (a whole prompt
    of max_model_len tokens): they bound what is read and let foreign layouts be dropped on arrival.
    """

    def __init__(
        self,
        context: zmq.Context,
        host: str,
        layout: KVLayout,
        max_blocks: int,
        secret: str | bytes | None = None,
        port: int = 0,
        advertise_host: str | None = None,
    ) -> None:
        """Binds on `host` (all interfaces for a wildcard) at `port` (0: a free one); its `address`, which
        tickets carry and tags are made over, names `advertise_host` (default: `host`)."""
        self.layout = layout
        self.max_blocks = max_blocks
        self.max_header_bytes = _HEADER_BASE_BYTES + 9 * max_blocks
        self.socket = context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        # Per frame: ZeroMQ disconnects a peer that sends a larger one, before buffering it.
        self.socket.setsockopt(zmq.MAXMSGSIZE, max(layout.nbytes(max_blocks), self.max_header_bytes))
        self.address = bind_tcp(self.socket, host, port, advertise_host or host)
        self.verifier = Verifier(secret, AUTH_PURPOSE)
        self.drops = DropCounts(AUTH_PURPOSE)

    def receive(self, expects: Callable[[str], bool]) -> list[tuple[KVMessage, memoryview | None]]:
        """Every valid message waiting now (without blocking): (header, bytes of the blocks or None).

        `expects(request_id)` says whether this worker waits for that request's KV; messages for any
        other request are dropped as foreign (late ones of an aborted request land there too).
        """
        messages = []
        for _ in range(MAX_MESSAGES_PER_RECEIVE):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            message, reason = self._check(frames, expects)
            if reason is not None:
                self.drops.drop(reason, f"from {_peer(frames[0])}")
                continue
            messages.append((message, frames[2].buffer if len(frames) == 3 else None))
        return messages

    def _check(
        self, frames: list[zmq.Frame], expects: Callable[[str], bool]
    ) -> tuple[KVMessage | None, str | None]:
        """The message's header, or why it is dropped."""
        if len(frames) not in (2, 3):
            return None, "malformed"
        if len(frames[1]) > self.max_header_bytes:
            return None, "oversized"
        reason = self.verifier.verify(frames[0].buffer, self.address, [f.buffer for f in frames[1:]])
        if reason is not None:
            return None, reason
        try:
            header = _decoder.decode(frames[1].buffer)
        except msgspec.DecodeError:  # ValidationError included
            return None, "malformed"
        if len(frames) != (2 if isinstance(header, KVDone) else 3):
            return None, "malformed"
        if isinstance(header, KVDone):
            return (header, None) if expects(header.request_id) else (None, "foreign")
        if header.layout != self.layout:
            return None, "foreign"
        if len(header.block_ids) > self.max_blocks:
            return None, "oversized"
        expected = self.layout.nbytes(len(header.block_ids))
        if not header.block_ids or header.nbytes != expected or len(frames[2]) != expected:
            return None, "malformed"
        if not expects(header.request_id):
            return None, "foreign"
        return header, None

    def close(self) -> None:
        self.socket.close()


def _peer(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
        return "an unknown peer"


def decode_blocks(header: KVBlocks, payload: memoryview | None, layout: KVLayout) -> torch.Tensor:
    """The blocks of a KVBlocks message as a tensor, after checking them against our own layout."""
    if header.layout != layout:
        raise KVTransferError(f"KV layout {header.layout} does not match this worker's {layout}")
    expected = layout.nbytes(len(header.block_ids))
    if payload is None or header.nbytes != expected or len(payload) != expected:
        got = None if payload is None else len(payload)
        raise KVTransferError(f"KV frame of {got} bytes (header says {header.nbytes}); expected {expected}")
    with warnings.catch_warnings():  # read-only frame: fine, the bytes are only copied into the cache
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(payload, dtype=torch.uint8)
    return flat.view(layout.torch_dtype).view(layout.shape(len(header.block_ids)))
