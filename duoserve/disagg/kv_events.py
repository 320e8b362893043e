"""KV events: workers publish which prefix blocks they hold; a router indexes them.

A worker's block pool records every block it registers in (stored) or evicts from (removed) its
prefix cache, by chained block hash; the engine loop publishes them after each step on a ZeroMQ PUB
socket. The router subscribes to every worker and keeps `KVIndex`: for a new prompt it hashes the
prompt's full blocks the same way (the hash of an int tuple is the same in every process) and counts,
per worker, how many leading blocks that worker already holds.

Each message is two frames, an authentication tag (`duoserve.disagg.auth`, over the events and the
publisher's address) and the msgpack `KVEvents`. The router's `KVEventSubscriber` drops (and counts)
any message that is oversized, malformed, unauthenticated or replayed before it reaches the index,
so a forged event can neither crash the router nor steer its routing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import msgspec
import zmq
import zmq.asyncio

from duoserve.disagg.auth import DropCounts, Signer, Verifier
from duoserve.disagg.endpoints import bind_tcp
from duoserve.kv.block_pool import ROOT_HASH, hash_block

AUTH_PURPOSE = "kv_events"
# Largest event message a router reads (ZeroMQ disconnects a publisher that sends more, and it
# reconnects): ~9 bytes a hash, so 400k blocks stored or evicted in one step, far past any real step.
MAX_EVENTS_BYTES = 4 * 2**20
# A PUB socket only ever reads subscriptions (a byte and a topic; we subscribe to everything).
_MAX_SUBSCRIPTION_BYTES = 256


class KVEvents(msgspec.Struct):
    # The device's prefix cache (the block pool): blocks registered, blocks handed out again.
    stored: list[int] = []
    removed: list[int] = []
    # Offload tiers (issue 14), by tier name ("cpu", "disk"): blocks a tier now holds, blocks it dropped.
    # A block evicted from the device into a tier comes as `removed` and a tier's stored: the router then
    # counts it as a tier hit, not a miss.
    tier_stored: dict[str, list[int]] = {}
    tier_removed: dict[str, list[int]] = {}
    # Per tier: loading a block from it as a share of computing it, by the worker's measured speeds.
    tier_costs: dict[str, float] = {}

    @classmethod
    def of(
        cls,
        events: list[tuple[bool, int]],
        tier_events: dict[str, list[tuple[bool, int]]] | None = None,
        tier_costs: dict[str, float] | None = None,
    ) -> KVEvents:
        """From the pool's (stored?, hash) events and, per tier, the offload connector's."""
        tier_events = tier_events or {}
        return cls(
            stored=[h for stored, h in events if stored],
            removed=[h for stored, h in events if not stored],
            tier_stored={t: [h for stored, h in e if stored] for t, e in tier_events.items()},
            tier_removed={t: [h for stored, h in e if not stored] for t, e in tier_events.items()},
            tier_costs=dict(tier_costs or {}),
        )


_encoder = msgspec.msgpack.Encoder()
events_decoder = msgspec.msgpack.Decoder(KVEvents)


class KVEventPublisher:
    def __init__(
        self,
        context: zmq.Context,
        host: str,
        secret: str | bytes | None = None,
        port: int = 0,
        advertise_host: str | None = None,
    ) -> None:
        self.socket = context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, _MAX_SUBSCRIPTION_BYTES)
        # Bound on `host`, named (for subscribers and tags) by `advertise_host`: duoserve.disagg.endpoints.
        self.address = bind_tcp(self.socket, host, port, advertise_host or host)
        self.signer = Signer(secret, AUTH_PURPOSE)

    def publish(
        self,
        events: list[tuple[bool, int]],
        tier_events: dict[str, list[tuple[bool, int]]] | None = None,
        tier_costs: dict[str, float] | None = None,
    ) -> None:
        """The pool's events and the offload tiers' (by tier name, with their relative load costs)."""
        if not events and not tier_events:
            return
        message = KVEvents.of(events, tier_events, tier_costs)
        payload = _encoder.encode(message)
        self.socket.send_multipart([self.signer.sign(self.address, [payload]), payload], zmq.NOBLOCK)

    def close(self) -> None:
        self.socket.close()


class KVEventSubscriber:
    """A router's subscription to one worker's KV events; only checked events come out of it.

    `drops` is shared by all of a router's subscriptions (its owner, the router, exports it).
    """

    def __init__(
        self,
        context: zmq.asyncio.Context,
        address: str,
        drops: DropCounts,
        secret: str | bytes | None = None,
    ) -> None:
        self.address = address
        self.drops = drops
        self.verifier = Verifier(secret, AUTH_PURPOSE)
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_EVENTS_BYTES)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(address)

    async def receive(self) -> KVEvents:
        """The next valid message (the ones before it that were not are dropped and counted)."""
        while True:
            frames = await self.socket.recv_multipart()
            events, reason = self.check(frames)
            if reason is None:
                return events
            self.drops.drop(reason, f"from the publisher at {self.address}")
            await asyncio.sleep(0)  # a flood must not starve the router's other tasks

    def check(self, frames: list[bytes]) -> tuple[KVEvents | None, str | None]:
        """The events of a message, or why it is dropped."""
        if len(frames) != 2:
            return None, "malformed"
        reason = self.verifier.verify(frames[0], self.address, frames[1:])
        if reason is not None:
            return None, reason
        try:
            return events_decoder.decode(frames[1]), None
        except msgspec.DecodeError:  # ValidationError included
            return None, "malformed"

    def close(self) -> None:
        self.socket.close()


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, root_hash: int = ROOT_HASH) -> list[int]:
    """Chained hashes of the prompt's full blocks, as a worker's prefix cache computes them: from the
    root of the request's LoRA adapter (duoserve.lora.request.prefix_root_hash; ROOT_HASH: the base model),
    so the index never counts another adapter's blocks as a hit."""
    hashes, parent = [], root_hash
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


# A tier hit's cost (a share of computing the block) until the worker has said its own.
DEFAULT_TIER_COST = 0.5


class KVIndex:
    """Which worker holds which prefix blocks (by hash), on its device or in an offload tier, from their
    KV events."""

    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}
        self._held: dict[str, set[int]] = {}
        # worker -> block hash -> the offload tiers holding it; worker -> tier -> relative load cost
        self._tiers: dict[str, dict[int, set[str]]] = {}
        self._tier_costs: dict[str, dict[str, float]] = {}

    def apply(self, worker: str, events: KVEvents) -> None:
        held = self._held.setdefault(worker, set())
        for block_hash in events.stored:
            self._holders.setdefault(block_hash, set()).add(worker)
            held.add(block_hash)
        for block_hash in events.removed:
            holders = self._holders.get(block_hash)
            if holders is not None:
                holders.discard(worker)
                if not holders:
                    del self._holders[block_hash]
            held.discard(block_hash)
        if events.tier_stored or events.tier_removed:
            self._apply_tiers(self._tiers.setdefault(worker, {}), events)
        if events.tier_costs:
            self._tier_costs.setdefault(worker, {}).update(events.tier_costs)

    @staticmethod
    def _apply_tiers(tiers: dict[int, set[str]], events: KVEvents) -> None:
        for tier, hashes in events.tier_stored.items():
            for block_hash in hashes:
                tiers.setdefault(block_hash, set()).add(tier)
        for tier, hashes in events.tier_removed.items():
            for block_hash in hashes:
                holders = tiers.get(block_hash)
                if holders is not None:
                    holders.discard(tier)
                    if not holders:
                        del tiers[block_hash]

    def drop(self, worker: str) -> None:
        """Forget a worker's blocks (it went away; a restarted one announces what its disk tier holds)."""
        self.apply(worker, KVEvents(removed=list(self._held.pop(worker, ()))))
        self._held.pop(worker, None)
        self._tiers.pop(worker, None)
        self._tier_costs.pop(worker, None)

    def prefill_cost(self, worker: str, hashes: list[int]) -> float:
        """What the prompt costs the worker, in blocks computed: 0 for each leading block on its device,
        a tier's relative load cost for each block after them that a tier holds (the cheapest tier), 1
        for each block from the first one it holds nowhere."""
        device = self.overlap(worker, hashes)
        tiers = self._tiers.get(worker)
        if not tiers:
            return float(len(hashes) - device)
        costs = self._tier_costs.get(worker, {})
        cost, index = 0.0, device
        while index < len(hashes) and (holders := tiers.get(hashes[index])):
            cost += min(costs.get(tier, DEFAULT_TIER_COST) for tier in holders)
            index += 1
        return cost + len(hashes) - index

    def num_tier_blocks(self, worker: str) -> int:
        return len(self._tiers.get(worker, ()))

    def overlap(self, worker: str, hashes: list[int]) -> int:
        """How many leading blocks of the prompt the worker holds."""
        count = 0
        for block_hash in hashes:
            if worker not in self._holders.get(block_hash, ()):
                break
            count += 1
        return count

    def num_blocks(self, worker: str) -> int:
        return len(self._held.get(worker, ()))
