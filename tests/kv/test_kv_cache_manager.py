"""KVCacheManager: block tables, allocation all-or-nothing, capacity, prefix hits, and blocks freed as they
slide out of a sliding window."""

from __future__ import annotations

import copy
import math

import pytest

from duoserve.kv import block_pool as block_pool_module
from duoserve.kv.kv_cache_manager import NULL_BLOCK, KVCacheManager

BS = 4


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def snapshot(kv: KVCacheManager):
    pool = kv.pool
    return (
        copy.deepcopy(kv.tables),
        [(b.ref_count, b.block_hash, b.parent_hash, b.token_ids) for b in pool.blocks],
        list(pool._free),
        dict(pool._cached),
    )


def test_blocks_follow_the_tokens():
    kv = KVCacheManager(10, BS)
    ids = tokens(6)
    assert kv.allocate_slots("a", ids, 0, 6)
    assert len(kv.block_ids("a")) == 2
    # Decoding: a new block only when a token crosses a block boundary.
    for num_computed, expected in [(6, 2), (7, 2), (8, 3), (9, 3), (11, 3), (12, 4)]:
        ids = tokens(num_computed + 1)
        assert kv.allocate_slots("a", ids, num_computed, 1)
        assert len(kv.block_ids("a")) == expected, num_computed
    kv.free("a")
    assert kv.pool.num_free_blocks == 10 and not kv.tables
    kv.free("a")  # freeing twice is harmless


def test_out_of_blocks_returns_false_and_changes_nothing():
    kv = KVCacheManager(6, BS)
    assert kv.allocate_slots("a", tokens(12), 0, 12)  # 3 blocks, all full and cached
    kv.free("a")  # free but still cached
    assert kv.allocate_slots("b", tokens(8, 100), 0, 8)  # takes 2 never-used blocks
    assert kv.pool.num_free_blocks == 4
    prompt = tokens(12) + [999] * 5
    hits = kv.find_cached_prefix(prompt)
    assert hits == [0, 1, 2]
    before = snapshot(kv)
    # c needs its 3 cached blocks plus 2 new ones; 4 blocks are free, but 3 of those are its hits.
    assert not kv.allocate_slots("c", prompt, 0, 5, hits)
    assert snapshot(kv) == before
    # A running request that cannot grow changes nothing either.
    assert not kv.allocate_slots("b", tokens(8, 100) + [1] * 17, 8, 17)
    assert snapshot(kv) == before
    # One new block is there.
    assert kv.allocate_slots("c", prompt, 0, 4, hits)
    assert kv.block_ids("c")[:3] == hits and kv.pool.num_free_blocks == 0


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_capacity_is_exactly_num_blocks_times_block_size(block_size):
    num_blocks = 12
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    capacity = num_blocks * block_size
    # Fill with requests of whole blocks until no token is left...
    lengths = [block_size * n for n in (5, 4, 3)]
    assert sum(lengths) == capacity
    for i, n in enumerate(lengths):
        assert kv.allocate_slots(str(i), tokens(n), 0, n)
    assert kv.pool.num_free_blocks == 0
    # ... and not one token more.
    assert not kv.allocate_slots("extra", [1], 0, 1)
    assert not kv.allocate_slots("0", tokens(lengths[0] + 1), lengths[0], 1)
    # A single request can use the whole cache.
    for i in range(3):
        kv.free(str(i))
    assert kv.allocate_slots("one", tokens(capacity), 0, capacity)
    assert not kv.allocate_slots("one", tokens(capacity + 1), capacity, 1)


def test_waste_is_under_one_block_per_sequence():
    kv = KVCacheManager(64, BS)
    lengths = [1, 3, 4, 5, 9, 16, 17, 30]
    for i, n in enumerate(lengths):
        # In uneven chunks, as chunked prefill and decoding grow a request.
        done = 0
        for chunk in (3, 1, 7, 1, 100):
            step = min(chunk, n - done)
            if step:
                assert kv.allocate_slots(str(i), tokens(n, 1000 * i), done, step)
                done += step
    held = [len(kv.block_ids(str(i))) for i in range(len(lengths))]
    assert held == [math.ceil(n / BS) for n in lengths]
    assert 64 - kv.pool.num_free_blocks == sum(math.ceil(n / BS) for n in lengths)


def test_prefix_hits_and_counters():
    kv = KVCacheManager(16, BS)
    first = tokens(10)
    assert kv.find_cached_prefix(first) == []
    assert kv.allocate_slots("a", first, 0, 10)
    # Exactly the full blocks computed so far are cached: 2 of 4 tokens.
    shared = first[:8]
    hits = kv.find_cached_prefix(shared + [50, 51, 52])
    assert hits == kv.block_ids("a")[:2]
    # Lookups alone count nothing: the scheduler records the lookup of each admitted request once.
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (0, 0)
    kv.record_prefix_lookup(11, 8)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (11, 8)
    # At least one token is left to compute, even when the whole prompt is cached.
    assert kv.find_cached_prefix(shared) == hits[:1]
    assert kv.find_cached_prefix(first[:9]) == hits
    # A different first block breaks the chain, even if later blocks match.
    assert kv.find_cached_prefix([99] + first[1:]) == []
    assert kv.allocate_slots("b", shared + [50, 51, 52], 0, 3, hits)
    assert kv.block_ids("b")[:2] == hits
    assert [kv.pool.blocks[h].ref_count for h in hits] == [2, 2]
    kv.free("a")
    kv.free("b")
    assert kv.pool.num_free_blocks == 16


def test_free_puts_the_tail_first_in_line_for_eviction():
    kv = KVCacheManager(4, BS)
    assert kv.allocate_slots("a", tokens(16), 0, 16)
    table = list(kv.block_ids("a"))
    kv.free("a")
    assert kv.pool.allocate(1) == [table[-1]]
    # The head of the prefix survives longest.
    assert kv.find_cached_prefix(tokens(16) + [1]) == table[:3]


def test_prefix_caching_disabled():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    assert kv.allocate_slots("a", tokens(12), 0, 12)
    assert kv.find_cached_prefix(tokens(13)) == []


def test_hash_collisions_are_caught_by_the_tokens(monkeypatch):
    monkeypatch.setattr(block_pool_module, "hash_block", lambda parent, token_ids: 7)
    kv = KVCacheManager(16, BS)
    a = tokens(12)
    assert kv.allocate_slots("a", a, 0, 12)
    # Every block of every sequence has the same hash: only verified tokens may hit.
    assert kv.find_cached_prefix(tokens(12, 100) + [1]) == []
    assert kv.find_cached_prefix(a[:4] + tokens(8, 100) + [1]) == kv.block_ids("a")[:1]


def test_a_collision_does_not_chain_later_blocks_onto_the_wrong_parent(monkeypatch):
    """Blocks X and Z collide. While Z holds the hash, a sequence X + Y cannot register X; its Y
    block must not be registered under that hash either, or Z + Y would reuse KV computed after X."""
    real_hash = block_pool_module.hash_block
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]

    def colliding(parent, token_ids):
        if parent == block_pool_module.ROOT_HASH and list(token_ids) in (x, z):
            return 777
        return real_hash(parent, token_ids)

    monkeypatch.setattr(block_pool_module, "hash_block", colliding)
    kv = KVCacheManager(16, BS)
    assert kv.allocate_slots("d", z + [0], 0, 5)
    assert kv.allocate_slots("a", x + y + [0], 0, 9)
    z_block = kv.block_ids("d")[0]
    assert kv.find_cached_prefix(z + y + [0]) == [z_block]
    assert kv.find_cached_prefix(x + y + [0]) == []
    kv.free("d")
    kv.free("a")
    assert kv.find_cached_prefix(z + y + [0]) == [z_block]


@pytest.mark.parametrize(("window", "block_size"), [(7, 4), (8, 4), (1, 4), (20, 5), (3, 16)])
def test_blocks_that_slid_out_of_the_window_are_freed(window, block_size):
    """After N computed tokens, queries from position N on see positions > N - window: the blocks wholly
    before N - window + 1 are freed, and only those."""
    kv = KVCacheManager(64, block_size, sliding_window=window)
    ids = tokens(200)
    assert kv.allocate_slots("a", ids, 0, 10)
    for num_computed in range(10, 200):
        kv.free_out_of_window("a", ids, num_computed)
        assert kv.allocate_slots("a", ids, num_computed, 1)
        table = kv.block_ids("a")
        first_needed = max(0, num_computed - window + 1) // block_size
        assert table[:first_needed] == [NULL_BLOCK] * first_needed
        assert NULL_BLOCK not in table[first_needed:]
        assert kv.num_held_blocks("a") == len(table) - first_needed == 64 - kv.pool.num_free_blocks
        assert kv.num_held_blocks("a") <= -(-(window - 1 + block_size - 1) // block_size) + 1
    kv.free("a")
    assert kv.pool.num_free_blocks == 64 and all(b.ref_count == 0 for b in kv.pool.blocks)


def test_without_a_window_nothing_is_freed():
    kv = KVCacheManager(16, BS)
    assert kv.allocate_slots("a", tokens(40), 0, 40)
    kv.free_out_of_window("a", tokens(40), 40)
    assert NULL_BLOCK not in kv.block_ids("a") and kv.num_held_blocks("a") == 10


def test_freed_blocks_stay_in_the_prefix_cache():
    """A block freed out of one request's window can still serve another request's prefix."""
    kv = KVCacheManager(16, BS, sliding_window=5)
    a = tokens(30)
    assert kv.allocate_slots("a", a, 0, 30)
    kv.free_out_of_window("a", a, 30)
    assert kv.block_ids("a")[:6] == [NULL_BLOCK] * 6  # positions < 26 are out of every window
    hits = kv.find_cached_prefix(tokens(26) + [999])
    assert len(hits) == 6
    assert kv.allocate_slots("b", tokens(26) + [999], 0, 3, hits)
    assert kv.block_ids("b")[:6] == hits
    kv.free("a")
    kv.free("b")
    assert kv.pool.num_free_blocks == 16


def test_blocks_are_registered_before_they_are_freed():
    """Blocks allocated unregistered (their KV came from another worker) enter the prefix cache when they
    slide out, so they stay findable; a block freed unregistered ends the request's hash chain."""
    kv = KVCacheManager(16, BS, sliding_window=4)
    prompt = tokens(20)
    assert kv.allocate_slots("a", prompt, 0, 20, register=False)
    assert kv.find_cached_prefix(prompt + [1]) == []
    kv.free_out_of_window("a", prompt, 20)  # the KV has arrived: 20 tokens computed
    assert kv.block_ids("a")[:4] == [NULL_BLOCK] * 4
    assert len(kv.find_cached_prefix(prompt + [1])) == 5


def test_a_block_freed_before_its_registration_ends_the_chain(monkeypatch):
    """Under a hash collision a block is not registered (and its successors wait); once it is freed, the
    successors are never registered under it."""
    monkeypatch.setattr(block_pool_module, "hash_block", lambda parent, token_ids: 1234)
    kv = KVCacheManager(16, BS, sliding_window=4)
    assert kv.allocate_slots("x", tokens(4, 500), 0, 4)  # holds hash 1234
    ids = tokens(24)
    assert kv.allocate_slots("a", ids, 0, 24)  # its first block collides: nothing registered
    assert kv.tables["a"].block_hashes == []
    kv.free_out_of_window("a", ids, 24)
    assert kv.block_ids("a")[0] == NULL_BLOCK
    assert kv.allocate_slots("a", ids + [1, 2, 3, 4], 24, 4)  # registration stops at the freed block
    assert kv.tables["a"].block_hashes == []


def test_blocks_of_another_root_never_match():
    """A LoRA adapter's requests chain their blocks from the adapter's root: same tokens, no hit."""
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = tokens(13)
    assert kv.allocate_slots("base", prompt, 0, len(prompt))
    assert kv.allocate_slots("lora", prompt, 0, len(prompt), root_hash=12345)
    kv.free("base")
    kv.free("lora")
    assert len(kv.find_cached_prefix(prompt)) == 3
    assert len(kv.find_cached_prefix(prompt, root_hash=12345)) == 3
    assert kv.find_cached_prefix(prompt, root_hash=999) == []
    base, lora = kv.find_cached_prefix(prompt), kv.find_cached_prefix(prompt, root_hash=12345)
    assert not set(base) & set(lora)
