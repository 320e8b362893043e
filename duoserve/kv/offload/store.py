"""The tier chain: host RAM, then disk. A block is stored in the first tier; what one tier evicts goes to
the next; a lookup asks them in order. Loads pin their blocks in whichever tier holds each one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from duoserve.kv.offload.io_worker import IOWorker
from duoserve.kv.offload.record import BlockKey
from duoserve.kv.offload.tier import LoadResult, Tier

# How long close() lets queued writes finish, so that a restart finds them.
CLOSE_TIMEOUT_S = 30.0


@dataclass
class PendingLoad:
    """Blocks being read out of the tiers for one request, in the request's order."""

    keys: list[BlockKey]
    tiers: list[Tier]
    started: float
    tier: Tier  # the deepest tier it reads from: the one its latency is counted in
    blocks: list[torch.Tensor | None] = field(default_factory=list)
    # All of them as one tensor [n, layers, 2, block_size, heads, dim] when one tier read them all as one
    # (the disk tier does): the connector imports it with one copy, no per-block stacking.
    batch: torch.Tensor | None = None
    error: str | None = None  # why it failed (a drop reason), once a read failed
    handles: list[tuple[Tier, object]] = field(default_factory=list)  # pins to release
    returns: list[Callable[[], None]] = field(default_factory=list)  # buffers to hand back to the tiers
    num_waiting: int = 0  # tier reads not back yet
    read_seconds: float = 0.0  # the tiers' reading itself (the wait in the I/O queue left out)

    @property
    def done(self) -> bool:
        return self.num_waiting == 0

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks if b is not None)


class TieredStore:
    def __init__(self, tiers: list[Tier], io: IOWorker | None = None) -> None:
        """`io`: the thread the tiers' file I/O runs on (polled here), if any tier has files."""
        if not tiers:
            raise ValueError("the KV offload store needs at least one tier")
        self.tiers = tiers
        self.io = io

    @property
    def empty(self) -> bool:
        """Whether no tier holds a block (then no prompt can match: nothing to look up)."""
        return all(tier.used_bytes == 0 for tier in self.tiers)

    @property
    def busy(self) -> bool:
        """Whether file reads or writes are queued or done and not yet polled."""
        return self.io is not None and self.io.num_pending > 0

    def holder(self, key: BlockKey) -> Tier | None:
        """The first tier that can serve the block, or None."""
        return next((t for t in self.tiers if t.holds(key)), None)

    def store(self, keys: list[BlockKey], blocks: torch.Tensor) -> None:
        """Keep `blocks` ([n, layers, 2, block_size, heads, dim], any device) under their keys; a block some
        tier already holds is only marked recently used there."""
        for key, block in zip(keys, blocks, strict=True):
            holder = self.holder(key)
            if holder is not None:
                holder.touch(key)
            else:
                self._put(0, key, block)

    def _put(self, index: int, key: BlockKey, block: torch.Tensor) -> None:
        for spilled_key, spilled in self.tiers[index].put(key, block):
            if index + 1 < len(self.tiers):
                self._put(index + 1, spilled_key, spilled)

    def promote(self, keys: list[BlockKey], blocks: list[torch.Tensor], tiers: list[Tier]) -> None:
        """Blocks a load read from a deeper tier (disk) go into the first one (host RAM) too: a prefix
        that came back once is likely to come back again, and RAM serves it sooner. The deeper copy
        stays (what RAM evicts later goes back there for nothing: only marked recently used)."""
        first = self.tiers[0]
        for key, block, tier in zip(keys, blocks, tiers, strict=True):
            if tier is not first and first.enabled and not first.holds(key):
                self._put(0, key, block)

    def persist(self, keys: list[BlockKey], blocks: torch.Tensor) -> None:
        """Write blocks into the durable tier (disk), waiting for its writes when they back up: at
        shutdown, so that a restart finds them. Without a durable tier, nothing to do."""
        self._persist(zip(keys, blocks, strict=True))

    def persist_held(self) -> None:
        """persist() what the other tiers (host RAM) hold, one copy at a time."""
        self._persist(itertools.chain(*(t.copies() for t in self.tiers if not t.durable)))

    def _persist(self, pairs: Iterable[tuple[BlockKey, torch.Tensor]]) -> None:
        durable = next((t for t in self.tiers if t.durable), None)
        if durable is None:
            return
        for key, block in pairs:
            if durable.holds(key):
                continue
            if durable.backlogged and not self.wait(CLOSE_TIMEOUT_S):
                return
            durable.put(key, block)

    def start_load(self, keys: list[BlockKey], tiers: list[Tier]) -> PendingLoad:
        """Pin the blocks where they are and start reading them; poll() completes the reads."""
        deepest = max(tiers, key=self.tiers.index)
        load = PendingLoad(keys, tiers, time.perf_counter(), deepest, blocks=[None] * len(keys))
        for key, tier in zip(keys, tiers, strict=True):
            load.handles.append((tier, tier.pin(key)))
            tier.touch(key)
        for tier in dict.fromkeys(tiers):  # each tier once, in chain order
            positions = [i for i, t in enumerate(tiers) if t is tier]
            load.num_waiting += 1
            give_back = tier.read(
                [keys[i] for i in positions], lambda result, p=positions: _arrived(load, p, result)
            )
            if give_back is not None:
                load.returns.append(give_back)
        return load

    def release(self, load: PendingLoad) -> None:
        """The load is done with (written into the cache, failed, or its request gone): unpin its blocks."""
        for tier, handle in load.handles:
            tier.unpin(handle)
        load.handles.clear()
        for give_back in load.returns:
            give_back()
        load.returns.clear()

    def poll(self) -> None:
        """Finish what the I/O thread has done (file writes, reads of loads) on this thread."""
        if self.io is not None:
            self.io.poll()

    def wait_for(self, load: PendingLoad, timeout: float) -> bool:
        """Wait up to `timeout` for one load's reads (the I/O thread's other callbacks run meanwhile);
        whether they all landed (or failed: see load.error)."""
        if load.done or self.io is None:
            return load.done
        return self.io.wait_for(lambda: load.done, timeout)

    def wait(self, timeout: float) -> bool:
        """Wait for every queued file write and read (tests, shutdown); False if `timeout` passed."""
        return self.io is None or self.io.wait(timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Finish the queued writes (so a restart finds them), stop the I/O thread, release the tiers."""
        if self.io is not None:
            self.io.close(timeout)
        for tier in self.tiers:
            tier.close()


def _arrived(load: PendingLoad, positions: list[int], result: LoadResult) -> None:
    blocks, error, seconds = result
    load.num_waiting -= 1
    load.read_seconds += seconds
    if error is not None:
        load.error = load.error or error
        return
    if isinstance(blocks, torch.Tensor) and len(positions) == len(load.keys):
        load.batch = blocks
    for i, block in zip(positions, blocks, strict=True):
        load.blocks[i] = block
