"""The pool of KV cache blocks: reference counts, the prefix cache index, and LRU eviction.

A block is free when nobody references it. A free block may still hold a cached prefix (it has a
hash): it stays findable until the pool hands it out again. Free blocks wait in one LRU queue
(an OrderedDict, so taking, touching and returning a block are all O(1); a plain dict is not: taking
its first key scans past every key deleted before it); allocation takes from the front, which is
the least recently freed block, and only then drops its hash.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from duoserve.kv.connector import EvictedBlock

# The hash of the (empty) parent of a sequence's first block.
ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Chained block hash. Python's hash of an int tuple is stable across processes (no salt)."""
    return hash((parent_hash, tuple(token_ids)))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Set once the block is full and registered in the prefix cache; kept while free until evicted.
    block_hash: int | None = None
    # What the hash stands for, compared on every hit so that a hash collision is never reused.
    parent_hash: int = ROOT_HASH
    token_ids: tuple[int, ...] = ()


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        # KV events for a router's index, drained by the engine: (True: stored | False: removed, hash).
        self.events: list[tuple[bool, int]] | None = None
        # Cached blocks handed out again since the last take_evicted(), for KV connectors (offload).
        self._evicted: list[EvictedBlock] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        """Take `count` free blocks (least recently freed first), evicting their cached prefixes."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} blocks with {len(self._free)} free")
        taken = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._evicted.append(
                    EvictedBlock(block_id, block.block_hash, block.parent_hash, block.token_ids)
                )
            self._uncache(block)
            block.ref_count = 1
            taken.append(block_id)
        return taken

    def take_evicted(self) -> list[EvictedBlock]:
        """The cached blocks evicted (handed out again) since the last call; their KV is intact until a
        forward pass writes into them, so a connector can still copy them out."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks found by `lookup` (they may be free or in use)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def free(self, block_ids: Sequence[int], reuse_first: bool = False) -> None:
        """Drop one reference on each block; blocks reaching zero join the LRU queue in this order.

        `reuse_first` puts them at the front instead, to be handed out before any cached block is
        evicted: for blocks holding nothing worth keeping (rejected draft tokens).
        """
        for block_id in block_ids:
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if reuse_first:
                    self._free.move_to_end(block_id, last=False)
            elif block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than taken")

    def lookup(self, parent_hash: int, token_ids: Sequence[int]) -> int | None:
        """The cached block holding exactly `token_ids` after the block hashed `parent_hash`."""
        block_id = self._cached.get(hash_block(parent_hash, token_ids))
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.parent_hash != parent_hash or block.token_ids != tuple(token_ids):
            return None  # a hash collision: never reuse another sequence's KV
        return block_id

    def cache(self, block_id: int, parent_hash: int, token_ids: Sequence[int]) -> int | None:
        """Register a full block in the prefix cache; returns its hash (for the next block's chain).

        None when another block with other contents holds that hash (a collision): the chain must
        stop here, since a child registered under this hash would be found after that other block.
        """
        block_hash = hash_block(parent_hash, token_ids)
        if not self.enable_prefix_caching:
            return block_hash
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return block_hash  # already cached
        holder = self._cached.get(block_hash)
        if holder is not None:
            other = self.blocks[holder]
            if other.parent_hash != parent_hash or other.token_ids != tuple(token_ids):
                return None
            return block_hash  # cached in an identical block elsewhere
        block.block_hash, block.parent_hash, block.token_ids = block_hash, parent_hash, tuple(token_ids)
        self._cached[block_hash] = block_id
        if self.events is not None:
            self.events.append((True, block_hash))
        return block_hash

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            self._uncache(block)

    def _uncache(self, block: Block) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) == block.block_id:
                del self._cached[block.block_hash]
                if self.events is not None:
                    self.events.append((False, block.block_hash))
            block.block_hash, block.parent_hash, block.token_ids = None, ROOT_HASH, ()
