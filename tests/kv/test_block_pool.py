"""BlockPool: reference counts, the LRU queue of free blocks, and the prefix-cache index.

That the free queue's operations stay O(1) as the pool's history grows is a matter of speed, measured
by benchmarks/block_pool.py (`--check` fails at a 3x slowdown), not by a wall-clock test here.
"""

from __future__ import annotations

import pytest

from duoserve.kv import block_pool as block_pool_module
from duoserve.kv.block_pool import ROOT_HASH, BlockPool, hash_block


def ref_counts(pool: BlockPool) -> list[int]:
    return [b.ref_count for b in pool.blocks]


def test_allocate_touch_free_ref_counts():
    pool = BlockPool(6)
    a = pool.allocate(2)
    b = pool.allocate(3)
    assert a == [0, 1] and b == [2, 3, 4]
    assert pool.num_free_blocks == 1 and pool.usage() == pytest.approx(5 / 6)
    pool.touch(a)  # a second owner of a
    assert ref_counts(pool) == [2, 2, 1, 1, 1, 0]
    pool.free(a)
    assert pool.num_free_blocks == 1  # still held once
    pool.free(a + b)
    assert pool.num_free_blocks == 6 and ref_counts(pool) == [0] * 6 and pool.usage() == 0.0
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([3])


def test_over_allocation_raises_and_changes_nothing():
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(RuntimeError, match="asked for 2 blocks with 1 free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1 and ref_counts(pool) == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


def test_lru_order_least_recently_freed_first():
    pool = BlockPool(6)
    pool.allocate(6)
    pool.free([4, 1, 5])
    pool.free([0])
    assert pool.allocate(2) == [4, 1]
    pool.free([2, 4])
    assert pool.allocate(4) == [5, 0, 2, 4]


def test_touching_a_free_cached_block_takes_it_off_the_queue():
    pool = BlockPool(4)
    ids = pool.allocate(4)
    for i, block_id in enumerate(ids):
        pool.cache(block_id, ROOT_HASH, [i, i])
    pool.free(ids)
    hit = pool.lookup(ROOT_HASH, [1, 1])
    assert hit == 1
    pool.touch([hit])  # a prefix hit revives it
    assert pool.num_free_blocks == 3 and pool.blocks[1].ref_count == 1
    assert pool.allocate(3) == [0, 2, 3]  # the revived block is not handed out
    pool.free([hit])
    # Re-freed last, so evicted last; it kept its cached contents meanwhile.
    assert pool.lookup(ROOT_HASH, [1, 1]) == 1


def test_allocation_evicts_the_cached_prefix():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    h = pool.cache(block, ROOT_HASH, [7, 8])
    assert h == hash_block(ROOT_HASH, [7, 8])
    pool.free([block])
    assert pool.lookup(ROOT_HASH, [7, 8]) == block  # free, but still findable
    pool.allocate(2)  # takes the other free block first, then this one
    assert pool.lookup(ROOT_HASH, [7, 8]) is None
    assert pool.blocks[block].block_hash is None and pool.blocks[block].token_ids == ()


def test_cache_registers_once_and_can_be_disabled():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    h = pool.cache(a, ROOT_HASH, [1, 2])
    # An identical block elsewhere is not registered again: the first one keeps serving hits.
    assert pool.cache(b, ROOT_HASH, [1, 2]) == h
    assert pool.lookup(ROOT_HASH, [1, 2]) == a and pool.blocks[b].block_hash is None
    # The chain: the same tokens after another parent are another block.
    assert pool.lookup(h, [1, 2]) is None
    pool.reset_prefix_cache()
    assert pool.lookup(ROOT_HASH, [1, 2]) is None
    off = BlockPool(2, enable_prefix_caching=False)
    (c,) = off.allocate(1)
    assert off.cache(c, ROOT_HASH, [1, 2]) == h
    assert off.lookup(ROOT_HASH, [1, 2]) is None


def test_hash_collision_is_never_reused(monkeypatch):
    monkeypatch.setattr(block_pool_module, "hash_block", lambda parent, tokens: 42)
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.cache(a, ROOT_HASH, [1, 2]) == 42
    assert pool.lookup(ROOT_HASH, [1, 2]) == a
    # Same hash, other tokens or another parent: a miss, not a's KV.
    assert pool.lookup(ROOT_HASH, [1, 3]) is None
    assert pool.lookup(42, [1, 2]) is None
    # b cannot take the hash a holds, and says so: a chain must not continue past a collision.
    assert pool.cache(b, 42, [5, 6]) is None
    assert pool.lookup(42, [5, 6]) is None
    # An identical block is no collision: its hash continues the chain.
    assert pool.cache(b, ROOT_HASH, [1, 2]) == 42 and pool.blocks[b].block_hash is None
