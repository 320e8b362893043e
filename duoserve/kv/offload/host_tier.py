"""The host-RAM tier: blocks evicted from a GPU's KV cache, kept in a slab of pinned host memory.

The slab is allocated once at start, `max_bytes // block bytes` slots of one block each (vLLM's CPU
offload does the same): no allocation per block, and pinned pages let the copies to and from the GPU
run at full PCIe speed. On a CPU-only host there is nothing to gain from it (the KV cache is host RAM
already: a larger --kv-cache-memory holds more), so the engine only builds it when asked.

LRU: a block stored or served moves to the back; the front one goes first, and goes to the next tier
(its copy made here, since the slot is reused at once). A block pinned by a load in flight stays.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from duoserve.kv.layout import KVLayout
from duoserve.kv.offload.record import BlockKey
from duoserve.kv.offload.tier import LoadResult, TierCounters


@dataclass
class _Slot:
    key: BlockKey
    index: int
    pins: int = 0


class HostTier:
    name = "cpu"
    durable = False
    backlogged = False  # copies into the slab are done at once

    def __init__(self, max_bytes: int, layout: KVLayout, pin_memory: bool = False) -> None:
        self.block_bytes = layout.nbytes(1)
        num_slots = max_bytes // self.block_bytes
        if num_slots < 1:
            raise ValueError(
                f"kv_offload_cpu_bytes={max_bytes} holds no KV block (one is {self.block_bytes} bytes)"
            )
        shape = (num_slots, layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.row)
        self.slab = torch.empty(shape, dtype=layout.torch_dtype, pin_memory=pin_memory)
        self.max_bytes = num_slots * self.block_bytes
        self.enabled = True  # nothing at run time can fail in RAM that was allocated at start
        self.counters = TierCounters()
        self._slots: OrderedDict[int, _Slot] = OrderedDict()  # block hash -> slot, least recent first
        self._free = list(range(num_slots - 1, -1, -1))
        self.events: list[tuple[bool, int]] | None = None

    def start_events(self) -> None:
        self.events = [(True, block_hash) for block_hash in self._slots]

    @property
    def used_bytes(self) -> int:
        return len(self._slots) * self.block_bytes

    def holds(self, key: BlockKey) -> bool:
        slot = self._slots.get(key.block_hash)
        return slot is not None and slot.key == key

    def touch(self, key: BlockKey) -> None:
        self._slots.move_to_end(key.block_hash)

    def put(self, key: BlockKey, block: torch.Tensor) -> list[tuple[BlockKey, torch.Tensor]]:
        if key.block_hash in self._slots:  # a collision's other block, or this one: keep what is here
            return [] if self.holds(key) else [(key, block)]
        spilled = []
        if not self._free:
            victim = next((s for s in self._slots.values() if s.pins == 0), None)
            if victim is None:  # every slot is being loaded from: pass the block on
                self.counters.stores_skipped += 1
                return [(key, block.to("cpu"))]
            del self._slots[victim.key.block_hash]
            spilled.append((victim.key, self.slab[victim.index].clone()))
            if self.events is not None:
                self.events.append((False, victim.key.block_hash))
            self._free.append(victim.index)
        index = self._free.pop()
        self.slab[index].copy_(block)
        self._slots[key.block_hash] = _Slot(key, index)
        self.counters.stores += 1
        self.counters.store_bytes += self.block_bytes
        if self.events is not None:
            self.events.append((True, key.block_hash))
        return spilled

    def read(self, keys: list[BlockKey], on_done: Callable[[LoadResult], None]) -> None:
        """The slots themselves, no copy: the caller has pinned them, and copies them into the cache."""
        on_done(([self.slab[self._slots[k.block_hash].index] for k in keys], None, 0.0))

    def pin(self, key: BlockKey) -> _Slot:
        slot = self._slots[key.block_hash]
        slot.pins += 1
        return slot

    def unpin(self, slot: _Slot) -> None:
        slot.pins -= 1

    def num_pinned(self) -> int:
        return sum(s.pins for s in self._slots.values())

    def copies(self) -> Iterator[tuple[BlockKey, torch.Tensor]]:
        """A copy of each block held, one at a time, least recently used first (kept at shutdown)."""
        for slot in list(self._slots.values()):
            yield slot.key, self.slab[slot.index].clone()

    def close(self) -> None:
        pass
