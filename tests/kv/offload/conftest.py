"""Shared pieces of the offload tests: a small KV layout, keys of real block-hash chains, and tiers."""

from __future__ import annotations

import pytest
import torch

from duoserve.kv.block_pool import ROOT_HASH, hash_block
from duoserve.kv.cache import KVCacheSpec
from duoserve.kv.layout import KVLayout
from duoserve.kv.offload.disk_tier import DiskTier
from duoserve.kv.offload.fingerprint import KVFingerprint
from duoserve.kv.offload.io_worker import IOWorker
from duoserve.kv.offload.record import BlockKey

SPEC = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
LAYOUT = KVLayout.of(SPEC)
FINGERPRINT = KVFingerprint(bytes(range(16)), {"test": "layout 3x2x8, block 4"})
BLOCK_SHAPE = (SPEC.num_layers, 2, SPEC.block_size, SPEC.num_kv_heads, SPEC.head_dim)
WAIT_S = 30.0  # generous: the machine is shared


def chain(token_ids: list[int], block_size: int = SPEC.block_size) -> list[BlockKey]:
    """Keys of the full blocks of token_ids, chained as the block pool hashes them."""
    keys, parent = [], ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = tuple(token_ids[start : start + block_size])
        block_hash = hash_block(parent, tokens)
        keys.append(BlockKey(block_hash, parent, tokens))
        parent = block_hash
    return keys


def random_blocks(count: int, seed: int = 0) -> torch.Tensor:
    """[count, layers, 2, block_size, heads, dim] of distinct random values."""
    return torch.randn((count, *BLOCK_SHAPE), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def io():
    worker = IOWorker()
    yield worker
    worker.close(WAIT_S)


@pytest.fixture
def make_disk(tmp_path, io):
    """DiskTier factory over tmp_path/kv (closed at the end: each holds the directory's lock)."""
    made = []

    def make(max_bytes: int | None = None, fingerprint: KVFingerprint = FINGERPRINT, worker=None) -> DiskTier:
        tier = DiskTier(str(tmp_path / "kv"), fingerprint, LAYOUT, worker or io, max_bytes)
        made.append(tier)
        return tier

    yield make
    for tier in made:
        tier.close()
