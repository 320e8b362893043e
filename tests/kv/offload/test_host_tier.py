"""The host-RAM tier: a byte limit in whole slots, LRU order, spills, and pins that keep loads safe."""

from __future__ import annotations

import pytest
import torch

from duoserve.kv.offload.host_tier import HostTier
from tests.kv.offload.conftest import LAYOUT, chain, random_blocks

KEYS = chain(list(range(100, 124)))  # 6 blocks
BLOCKS = random_blocks(6)


def read(tier: HostTier, keys) -> list[torch.Tensor]:
    got = []
    tier.read(keys, lambda result: got.append(result))
    ((blocks, error, _),) = got
    assert error is None
    return [b.clone() for b in blocks]


def test_byte_limit_is_whole_blocks():
    tier = HostTier(3 * LAYOUT.nbytes(1) + 7, LAYOUT)
    assert tier.max_bytes == 3 * LAYOUT.nbytes(1)
    with pytest.raises(ValueError, match="holds no KV block"):
        HostTier(LAYOUT.nbytes(1) - 1, LAYOUT)


def test_lru_spills_the_least_recent_block():
    tier = HostTier(3 * LAYOUT.nbytes(1), LAYOUT)
    for key, block in zip(KEYS[:3], BLOCKS[:3], strict=True):
        assert tier.put(key, block) == []
    tier.touch(KEYS[0])  # now KEYS[1] is the least recently used
    ((spilled_key, spilled),) = tier.put(KEYS[3], BLOCKS[3])
    assert spilled_key == KEYS[1] and torch.equal(spilled, BLOCKS[1])
    assert [tier.holds(k) for k in KEYS[:4]] == [True, False, True, True]
    assert tier.used_bytes == tier.max_bytes
    assert all(torch.equal(a, b) for a, b in zip(read(tier, [KEYS[3], KEYS[0]]), BLOCKS[[3, 0]], strict=True))
    # The spilled copy is its own: the slot it came from now holds another block.
    assert torch.equal(spilled, BLOCKS[1])
    assert tier.counters.stores == 4


def test_pinned_blocks_stay_until_unpinned():
    tier = HostTier(2 * LAYOUT.nbytes(1), LAYOUT)
    tier.put(KEYS[0], BLOCKS[0])
    tier.put(KEYS[1], BLOCKS[1])
    handles = [tier.pin(KEYS[0])]
    ((spilled_key, _),) = tier.put(KEYS[2], BLOCKS[2])
    assert spilled_key == KEYS[1]  # not the pinned least recent one
    handles.append(tier.pin(KEYS[2]))
    # Every slot pinned: the new block is passed on whole, nothing evicted.
    ((passed_key, passed),) = tier.put(KEYS[3], BLOCKS[3])
    assert passed_key == KEYS[3] and torch.equal(passed, BLOCKS[3])
    assert tier.counters.stores_skipped == 1 and tier.holds(KEYS[0]) and tier.holds(KEYS[2])
    for handle in handles:
        tier.unpin(handle)
    assert tier.num_pinned() == 0
    ((spilled_key, _),) = tier.put(KEYS[3], BLOCKS[3])
    assert spilled_key == KEYS[0]


def test_a_key_with_the_same_hash_and_other_tokens_is_not_served():
    tier = HostTier(2 * LAYOUT.nbytes(1), LAYOUT)
    tier.put(KEYS[0], BLOCKS[0])
    collision = type(KEYS[0])(KEYS[0].block_hash, KEYS[0].parent_hash, (9, 9, 9, 9))
    assert not tier.holds(collision)
    ((passed_key, _),) = tier.put(collision, BLOCKS[1])  # passed on; the block held stays
    assert passed_key == collision and tier.holds(KEYS[0])
