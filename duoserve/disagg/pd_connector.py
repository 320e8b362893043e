"""Prefill/decode disaggregation as two KV connectors, so that the engine core knows no transport.

The flow is decode-first, as in Dynamo (duoserve/disagg/kv_transfer.py has it, and the wire format):

- `KVReceiveConnector`, the decode worker's half: a request whose `kv_transfer_params` say 'receive'
  has its whole prompt supplied asynchronously. The scheduler allocates its blocks (its own
  prefix-cache hit included) and holds it in WAITING_FOR_KV; the connector hands the blocks out as
  a `KVTicket` before the step's forward pass (`publish`), so the router can send the prompt to a
  prefill worker at once. Arrived blocks are checked and written into the cache before each forward
  pass; `KVDone` brings the prefill worker's first token, and the request decodes on from it. A bad
  transfer, or KV still missing `timeout` seconds after the request came, aborts it.
- `KVSendConnector`, the prefill worker's half: a request whose params say 'send' (with the ticket)
  stops at its first token; after every step, the blocks that step filled go straight into the
  ticket's blocks, so transfer overlaps the next chunk's compute, and `KVDone` with the first token
  follows when the request finishes. A failed send aborts the request in the same step, before its
  token goes out (the decode worker times out its own half).

Every worker runs both (`pd_connectors`): the router decides which half a request is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from duoserve.disagg.kv_transfer import (
    KVBlocks,
    KVDone,
    KVLayout,
    KVMessage,
    KVReceiveTransport,
    KVSendTransport,
    KVTicket,
    KVTransferError,
    KVTransferParams,
    TransferStats,
    decode_blocks,
)
from duoserve.engine.request import Request, RequestStatus
from duoserve.engine.scheduler import ScheduledRequest
from duoserve.kv.cache import KVCache
from duoserve.kv.connector import ConnectorEvents, EvictedBlock, KVConnector, MultiConnector
from duoserve.kv.kv_cache_manager import NULL_BLOCK, KVCacheManager

if TYPE_CHECKING:
    from duoserve.engine.core import EngineCore

logger = logging.getLogger(__name__)

# A request whose prompt KV has not all arrived this long after it came is aborted (the prefill
# worker died or was never told); the router normally aborts it much sooner.
KV_TRANSFER_TIMEOUT = 30.0


def pd_connectors(
    core: EngineCore,
    receiver: KVReceiveTransport,
    sender: KVSendTransport,
    publish: Callable[[list[KVTicket]], None],
    timeout: float = KV_TRANSFER_TIMEOUT,
) -> MultiConnector:
    """Both halves for a worker's core (any worker can be asked to play either)."""
    layout = KVLayout.of(core.kv_cache.spec)
    return MultiConnector(
        [
            KVReceiveConnector(receiver, layout, core.model_config.vocab_size, publish, timeout),
            KVSendConnector(sender, core.kv, layout),
        ]
    )


def _role(request: Request) -> str | None:
    params = request.kv_transfer_params
    return params.role if isinstance(params, KVTransferParams) else None


class _NoKV:
    """The hooks a half has nothing to do in."""

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        pass

    def on_blocks_evicted(self, blocks: list[EvictedBlock]) -> None:
        pass

    def start_load_kv(self, kv_cache: KVCache) -> None:
        pass

    def save_kv(self, kv_cache: KVCache, scheduled: list[ScheduledRequest]) -> None:
        pass


# ---------------------------------------------------------------------------------------- decode side


@dataclass
class _Receive:
    ticket: KVTicket
    arrival: float  # the request's arrival (time.monotonic): the timeout counts from it
    issued: float  # when the ticket was made: kv_transfer_seconds counts from it
    num_blocks_received: int = 0
    done: bool = False  # its KV is all here: it decodes on this worker now (a preemption recomputes it)


class KVReceiveConnector(_NoKV, KVConnector):
    def __init__(
        self,
        receiver: KVReceiveTransport,
        layout: KVLayout,
        vocab_size: int,
        publish: Callable[[list[KVTicket]], None],
        timeout: float = KV_TRANSFER_TIMEOUT,
    ) -> None:
        """`publish` gets each schedule's new tickets before the forward pass (the engine process sends
        them to the router at once); `timeout`: seconds after its arrival a request's KV may take."""
        self.receiver = receiver
        self.layout = layout
        self.vocab_size = vocab_size
        self.publish = publish
        self.timeout = timeout
        self.transfer = TransferStats()
        self._receives: dict[str, _Receive] = {}  # requests holding a ticket, until they end
        self._tickets: list[KVTicket] = []  # made by this schedule, not published yet
        self._events = ConnectorEvents()

    # ---- scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """The whole prompt after our own prefix hit, from the prefill worker; nothing if the request
        is not a receive, or already had its KV (then preempted: it recomputes here)."""
        if _role(request) != "receive" or request.request_id in self._receives:
            return 0, False
        return request.num_tokens - num_computed_tokens, True

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        if num_external_tokens == 0:
            return
        num_cached = request.num_computed_tokens - num_external_tokens
        ticket = KVTicket(request.request_id, self.receiver.address, block_ids, num_cached, self.layout)
        self._receives[request.request_id] = _Receive(ticket, request.arrival_time, time.monotonic())
        self._tickets.append(ticket)

    def request_finished(self, request: Request) -> bool:
        """Forget it: KV arriving for it from now on is dropped as foreign, never written."""
        self._receives.pop(request.request_id, None)
        return False

    # ---- worker side

    def start_load_kv(self, kv_cache: KVCache) -> None:
        """Hand out this schedule's tickets, write what arrived into the cache, and give up on waits
        past the timeout."""
        if self._tickets:
            tickets, self._tickets = self._tickets, []
            self.publish(tickets)
        for message, payload in self.receiver.receive(self.expects):
            self._take(message, payload, kv_cache)
        self._expire()

    def expects(self, request_id: str) -> bool:
        """Whether KV for this request may arrive now: it holds a ticket and its KV is not all here."""
        receive = self._receives.get(request_id)
        return receive is not None and not receive.done

    def _take(self, message: KVMessage, payload: memoryview | None, kv_cache: KVCache) -> None:
        receive = self._receives.get(message.request_id)
        if receive is None or receive.done:
            return  # failed earlier in this same batch
        try:
            if isinstance(message, KVBlocks):
                self._write(receive, message, payload, kv_cache)
            else:
                self._finish(receive, message)
        except KVTransferError as err:
            logger.warning("KV transfer of request %s failed: %s", message.request_id, err)
            self._abort(message.request_id)

    def _write(
        self, receive: _Receive, message: KVBlocks, payload: memoryview | None, kv_cache: KVCache
    ) -> None:
        start = time.perf_counter()
        blocks = decode_blocks(message, payload, self.layout)
        ticket = receive.ticket
        allowed = ticket.block_ids[ticket.num_cached_tokens // self.layout.block_size :]
        if not set(message.block_ids) <= set(allowed):
            raise KVTransferError(f"blocks {message.block_ids} are not the ticket's")
        kv_cache.import_blocks(message.block_ids, blocks)
        receive.num_blocks_received += len(message.block_ids)
        self.transfer.bytes += message.nbytes
        self.transfer.busy_seconds += time.perf_counter() - start

    def _finish(self, receive: _Receive, message: KVDone) -> None:
        ticket = receive.ticket
        expected = len(ticket.block_ids) - ticket.num_cached_tokens // self.layout.block_size
        if message.num_blocks != expected or receive.num_blocks_received != expected:
            raise KVTransferError(
                f"{receive.num_blocks_received} of {expected} blocks arrived "
                f"(the sender says {message.num_blocks})"
            )
        if not 0 <= message.first_token < self.vocab_size:
            raise KVTransferError(f"first token {message.first_token} is out of the vocabulary")
        receive.done = True
        self.transfer.seconds += time.monotonic() - receive.issued
        self.transfer.requests += 1
        # Sampled by the prefill worker, which sent it to the client: not computed again here.
        self._events.finished_loading[message.request_id] = [message.first_token]

    def _expire(self) -> None:
        now = time.monotonic()
        for request_id, receive in list(self._receives.items()):
            if not receive.done and now - receive.arrival > self.timeout:
                logger.warning(
                    "request %s: no KV from the prefill worker after %.0fs; aborted", request_id, self.timeout
                )
                self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        del self._receives[request_id]
        self._events.aborted.add(request_id)

    def get_finished(self) -> ConnectorEvents:
        events, self._events = self._events, ConnectorEvents()
        return events

    def stats(self) -> dict[str, float]:
        return {
            "kv_transfer_bytes": self.transfer.bytes,
            "kv_transfer_seconds": self.transfer.seconds,
            "kv_transfer_requests": self.transfer.requests,
            "kv_transfer_busy_seconds": self.transfer.busy_seconds,
        }


# --------------------------------------------------------------------------------------- prefill side


class KVSendConnector(_NoKV, KVConnector):
    def __init__(self, sender: KVSendTransport, kv: KVCacheManager, layout: KVLayout) -> None:
        """`kv`: the block tables the sent blocks are read through."""
        self.sender = sender
        self.kv = kv
        self.layout = layout
        self.block_size = layout.block_size
        # Per sending request, the next prompt block to send: kept across a preemption, since what
        # was sent stays valid on the decode worker.
        self._next_block: dict[str, int] = {}
        self._events = ConnectorEvents()

    def check_request(self, request: Request) -> int | None:
        """A send's ticket must fit our layout and the prompt; it stops at the first token."""
        if _role(request) != "send":
            return None
        ticket = request.kv_transfer_params.ticket
        bs, num_prompt = self.block_size, request.num_prompt_tokens
        if ticket.layout != self.layout:
            raise ValueError(
                f"kv_transfer: the decode worker's KV layout {ticket.layout} is not ours ({self.layout})"
            )
        if len(ticket.block_ids) != -(-num_prompt // bs):
            raise ValueError(
                f"kv_transfer: {len(ticket.block_ids)} blocks cannot hold a {num_prompt}-token prompt"
            )
        if ticket.num_cached_tokens % bs or not 0 <= ticket.num_cached_tokens < num_prompt:
            raise ValueError(
                f"kv_transfer: num_cached_tokens={ticket.num_cached_tokens} is not whole blocks of the prompt"
            )
        return 1  # the decode worker generates the rest

    def save_kv(self, kv_cache: KVCache, scheduled: list[ScheduledRequest]) -> None:
        for s in scheduled:
            if _role(s.request) == "send" and s.request.request_id not in self._events.aborted:
                self._send_blocks(s, kv_cache)

    def _send_blocks(self, s: ScheduledRequest, kv_cache: KVCache) -> None:
        """Push the prompt blocks this step completed: the full ones, and all the rest once the prompt
        is done (the step samples). Called before the scheduler's update: computed is still the old."""
        request, bs = s.request, self.block_size
        ticket: KVTicket = request.kv_transfer_params.ticket
        start = self._next_block.setdefault(request.request_id, ticket.num_cached_tokens // bs)
        num_computed = min(request.num_computed_tokens + s.num_new_tokens, request.num_prompt_tokens)
        end = -(-num_computed // bs) if s.samples else num_computed // bs
        if end <= start:
            return
        source = self.kv.block_ids(request.request_id)[start:end]
        try:
            if NULL_BLOCK in source:  # sent the step they filled, before any schedule frees them: a bug
                raise KVTransferError(f"blocks {start}..{end - 1} were freed before they were sent")
            self.sender.send_blocks(ticket, ticket.block_ids[start:end], kv_cache.export_blocks(source))
            self._next_block[request.request_id] = end
        except KVTransferError as err:
            logger.warning("request %s: %s; aborted", request.request_id, err)
            self._events.aborted.add(request.request_id)

    def request_finished(self, request: Request) -> bool:
        """With its first token (not when aborted), tell the decode worker its KV is all sent."""
        self._next_block.pop(request.request_id, None)
        if _role(request) != "send" or request.status == RequestStatus.FINISHED_ABORTED:
            return False
        ticket: KVTicket = request.kv_transfer_params.ticket
        num_sent = len(ticket.block_ids) - ticket.num_cached_tokens // self.block_size
        try:
            self.sender.send_done(ticket, request.output_token_ids[-1], num_sent)
        except KVTransferError as err:  # the decode worker times its half out
            logger.warning("request %s: %s", request.request_id, err)
        return False

    def get_finished(self) -> ConnectorEvents:
        events, self._events = self._events, ConnectorEvents()
        return events

    def stats(self) -> dict[str, float]:
        return {
            "kv_transfer_bytes": self.sender.stats.bytes,
            "kv_transfer_busy_seconds": self.sender.stats.busy_seconds,
        }
