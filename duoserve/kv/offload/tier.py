"""What a tier of the offload store is (host RAM, disk), and the counters each keeps for /metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from duoserve.kv.offload.record import BlockKey

# What a tier read gives its `on_done`: the blocks in order (a list, or one tensor [n, layers, 2, block_size,
# heads, dim]), or why they cannot be served (a drop reason), and the seconds the reading itself took (I/O
# and checks; not the wait in the I/O queue).
LoadResult = tuple[list[torch.Tensor] | torch.Tensor | None, str | None, float]


@dataclass
class TierCounters:
    stores: int = 0  # blocks written into the tier
    store_bytes: int = 0
    stores_skipped: int = 0  # blocks it could not take (full of blocks being loaded, writes backed up, off)
    hits: int = 0  # blocks served from it into the KV cache
    load_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # blocks found bad and dropped, by reason

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class Tier(Protocol):
    name: str  # the `tier` label of its metrics: "cpu" or "disk"
    durable: bool  # whether what it holds outlives the process (a restart finds it)
    enabled: bool  # False once it failed at run time (it then holds and takes nothing)
    used_bytes: int
    max_bytes: int
    counters: TierCounters
    # KV events for a router (True: the tier now holds the block | False: no longer, block hash), recorded
    # once start_events() was called (None: nobody reads them), drained by the offload connector.
    events: list[tuple[bool, int]] | None

    def start_events(self) -> None:
        """Record events from now on, starting with one for each block already held (a restart's)."""
        ...

    def holds(self, key: BlockKey) -> bool:
        """Whether the tier can serve this block (same hash, parent and tokens)."""
        ...

    def touch(self, key: BlockKey) -> None:
        """Mark the block most recently used."""
        ...

    def put(self, key: BlockKey, block: torch.Tensor) -> list[tuple[BlockKey, torch.Tensor]]:
        """Keep a copy of `block` ([layers, 2, block_size, heads, dim], any device); returns the blocks
        it evicted to make room (host copies), for the next tier."""
        ...

    def read(self, keys: list[BlockKey], on_done: Callable[[LoadResult], None]) -> Callable[[], None] | None:
        """Read held blocks (pinned by the caller) into host tensors; `on_done` runs on the engine loop,
        at once or from a later poll. Returns, if anything, what to call once the caller is done with the
        blocks (whether they arrived or not): the disk tier reuses their buffer."""
        ...

    def pin(self, key: BlockKey) -> object:
        """Keep the block from being evicted (while a load reads it); returns the handle to unpin."""
        ...

    def unpin(self, handle: object) -> None: ...

    @property
    def backlogged(self) -> bool:
        """Whether a block put now would be skipped for the writes already waiting."""
        ...

    def copies(self) -> Iterator[tuple[BlockKey, torch.Tensor]]:
        """A copy of each block held (the non-durable tiers\' blocks are written to a durable one at
        shutdown)."""
        ...

    def num_pinned(self) -> int:
        """Pins held (0 once every load is done with: what tests check for leaks)."""
        ...

    def close(self) -> None: ...
