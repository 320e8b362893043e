"""Per-request block tables on top of the block pool, and prefix-cache hits.

A request's block table maps its token positions to pool blocks: position p lives in block
`block_ids[p // block_size]` at offset `p % block_size`. Blocks are allocated as tokens are
scheduled, so a request never holds more than one partly filled block.

When every layer of the model attends through a sliding window (Mistral), the blocks that slid out
of the window are freed while the request runs (vLLM's sliding-window manager): its table keeps
their places as NULL_BLOCK, which attention never reads, since no query of the request sees those
positions any more. A freed block keeps its prefix-cache entry until the pool hands it out again,
so other requests sharing the prefix can still hit it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from duoserve.kv.block_pool import ROOT_HASH, BlockPool

# The table entry of a block freed because it slid out of the request's window.
NULL_BLOCK = -1


@dataclass
class BlockTable:
    block_ids: list[int] = field(default_factory=list)
    # Hashes of the leading full blocks already registered in the prefix cache (the chain so far).
    block_hashes: list[int] = field(default_factory=list)
    # Leading entries freed out of the sliding window (now NULL_BLOCK).
    num_freed: int = 0
    root_hash: int = ROOT_HASH  # parent of the first block: one per LoRA adapter (Request.block_root)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        """`sliding_window`: the window of every layer (ModelConfig.kv_sliding_window), None when some
        layer sees the whole context: then no block is freed before its request ends."""
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.tables: dict[str, BlockTable] = {}
        # Prefix cache counters in tokens, as vLLM's prefix_cache_queries / prefix_cache_hits.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table; entries freed out of its window are NULL_BLOCK."""
        return self.tables[request_id].block_ids

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request holds (its table's entries that were not freed)."""
        table = self.tables[request_id]
        return len(table.block_ids) - table.num_freed

    def free_out_of_window(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Free the request's leading blocks that no query from position `num_computed` on can see.

        A query at p >= num_computed sees keys at positions > p - window, so the blocks wholly before
        num_computed - window + 1 are done with. Full blocks not in the prefix cache yet (KV imported
        from another worker) are registered first, so that they stay findable once freed.
        """
        table = self.tables.get(request_id)
        if self.sliding_window is None or table is None:
            return
        end = max(0, num_computed - self.sliding_window + 1) // self.block_size
        if end <= table.num_freed:
            return
        self._cache_full_blocks(table, token_ids, num_computed)
        self.pool.free(table.block_ids[table.num_freed : end])
        table.block_ids[table.num_freed : end] = [NULL_BLOCK] * (end - table.num_freed)
        table.num_freed = end

    def find_cached_prefix(self, token_ids: list[int], root_hash: int = ROOT_HASH) -> list[int]:
        """Blocks of the longest cached prefix of token_ids, leaving at least one token to compute.

        The last token is always computed again: its logits are what the request samples from.
        `root_hash`: the chain's root, the request's adapter's (Request.block_root).
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = root_hash
        num_full = (len(token_ids) - 1) // self.block_size
        for i in range(num_full):
            chunk = token_ids[i * self.block_size : (i + 1) * self.block_size]
            block_id = self.pool.lookup(parent, chunk)
            if block_id is None:
                break
            hits.append(block_id)
            parent = self.pool.blocks[block_id].block_hash
        return hits

    def num_blocks_to_admit(self, num_tokens: int, cached_blocks: list[int]) -> int:
        """Free blocks a request new to the pool takes to hold `num_tokens` positions after its prefix hit
        `cached_blocks` (those sitting free in the LRU queue count: they leave it)."""
        reclaimed = sum(1 for b in cached_blocks if self.pool.blocks[b].ref_count == 0)
        return max(0, -(-num_tokens // self.block_size) - len(cached_blocks)) + reclaimed

    def num_blocks_to_grow(self, request_id: str, num_tokens: int) -> int:
        """Blocks a request holding some must still take to hold `num_tokens` positions."""
        table = self.tables.get(request_id)
        held = len(table.block_ids) if table else 0
        return max(0, -(-num_tokens // self.block_size) - held)

    def cache_blocks(self, request_id: str, token_ids: list[int], num_tokens: int) -> None:
        """Register the request's full blocks among its first `num_tokens` positions in the prefix cache:
        for KV a connector wrote in (a load that landed), so that a preemption keeps it findable."""
        table = self.tables.get(request_id)
        if table is not None:
            self._cache_full_blocks(table, token_ids, num_tokens)

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (not every retry of a request waiting for blocks)."""
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit_tokens

    def allocate_slots(
        self,
        request_id: str,
        token_ids: list[int],
        num_computed: int,
        num_new: int,
        cached_blocks: list[int] = (),
        register: bool = True,
        root_hash: int = ROOT_HASH,
    ) -> bool:
        """Make room for tokens [num_computed, num_computed + num_new) of a request.

        `cached_blocks` (from find_cached_prefix, for a request not yet holding blocks) become the
        head of its table. Returns False, changing nothing, when the pool cannot supply the blocks.
        `register=False` keeps the new blocks out of the prefix cache: their KV comes from a KV connector
        later (another worker, an offload tier), and nobody may hit them before it has arrived (the next
        allocation registers them).
        `root_hash` roots the chain of a request new to the cache (Request.block_root).
        """
        table = self.tables.get(request_id)
        end = num_computed + num_new
        if (
            table is not None
            and not cached_blocks
            and end <= len(table.block_ids) * self.block_size
            and (not register or min(end, len(token_ids)) // self.block_size <= len(table.block_hashes))
        ):
            return True  # its blocks hold the tokens and none fills up: a decode's usual step
        held = len(table.block_ids) if table else 0
        num_cached_tokens = len(cached_blocks) * self.block_size
        needed = (
            -(-(num_cached_tokens + num_computed + num_new) // self.block_size) - held - len(cached_blocks)
        )
        # Cached blocks sitting free in the LRU queue are about to be taken off it.
        reclaimed = sum(1 for b in cached_blocks if self.pool.blocks[b].ref_count == 0)
        if needed > self.pool.num_free_blocks - reclaimed:
            return False
        if table is None:
            table = self.tables[request_id] = BlockTable(root_hash=root_hash)
        if cached_blocks:
            self.pool.touch(cached_blocks)
            table.block_ids.extend(cached_blocks)
            table.block_hashes.extend(self.pool.blocks[b].block_hash for b in cached_blocks)
        if needed > 0:
            table.block_ids.extend(self.pool.allocate(needed))
        if register:
            self._cache_full_blocks(table, token_ids, num_cached_tokens + num_computed + num_new)
        return True

    def _cache_full_blocks(self, table: BlockTable, token_ids: list[int], num_tokens: int) -> None:
        """Register the blocks that the scheduled tokens fill up.

        Registering before the step runs is safe: every step writes all its new K/V into the pool
        before any attention reads it, so a request that hits these blocks in the same step reads
        what this one writes.
        """
        bs = self.block_size
        # Only positions of token_ids (the request's committed tokens) are hashed: slots scheduled past
        # them hold speculative draft tokens, which may be rejected.
        for i in range(len(table.block_hashes), min(num_tokens, len(token_ids)) // bs):
            if table.block_ids[i] == NULL_BLOCK:
                break  # freed out of the window before it could be registered: the chain ends here
            parent = table.block_hashes[-1] if table.block_hashes else table.root_hash
            block_hash = self.pool.cache(table.block_ids[i], parent, token_ids[i * bs : (i + 1) * bs])
            if block_hash is None:
                break  # a hash collision: this block and those after it stay out (retried next time)
            table.block_hashes.append(block_hash)

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Free the blocks past the first `num_tokens` positions (the KV of rejected draft tokens).

        Those blocks were never registered in the prefix cache (see _cache_full_blocks): they go to
        the front of the free queue, so that reusing them evicts no cached prefix.
        """
        table = self.tables[request_id]
        keep = -(-num_tokens // self.block_size)
        if keep < len(table.block_hashes):
            raise RuntimeError(f"trimming {request_id} to {num_tokens} tokens would drop cached blocks")
        self.pool.free(table.block_ids[keep:], reuse_first=True)
        del table.block_ids[keep:]

    def free(self, request_id: str) -> None:
        """Release a request's blocks; its tail goes first in the LRU queue, so it is evicted first."""
        table = self.tables.pop(request_id, None)
        if table is not None:
            self.pool.free(list(reversed(table.block_ids[table.num_freed :])))
