"""KVCache tensors: sizing, and moving blocks between caches."""

from __future__ import annotations

import pytest
import torch

from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.models.config import ModelConfig

SPEC = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)


def test_spec_sizes():
    config = ModelConfig(
        architecture="llama",
        vocab_size=10,
        hidden_size=48,
        intermediate_size=100,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
    )
    assert KVCacheSpec.for_model(config, 4, torch.float32) == SPEC
    # layers * (K, V) * block_size * heads * dim * 4 bytes
    assert SPEC.bytes_per_block == 3 * 2 * 4 * 2 * 8 * 4
    assert SPEC.num_blocks_for(10 * SPEC.bytes_per_block + 1) == 10
    assert KVCacheSpec(3, 2, 8, 4, torch.bfloat16).bytes_per_block == SPEC.bytes_per_block // 2
    cache = KVCache(SPEC, 5, torch.device("cpu"))
    assert cache.data.numel() * 4 == 5 * SPEC.bytes_per_block


def test_export_import_round_trip():
    source = KVCache(SPEC, 6, torch.device("cpu"))
    target = KVCache(SPEC, 9, torch.device("cpu"))
    torch.manual_seed(0)
    source.data.normal_()
    exported = source.export_blocks([4, 1, 2])
    assert exported.shape == (3, 2, 3, 4, 2, 8)
    target.import_blocks([0, 7, 3], exported)
    for src, dst in [(4, 0), (1, 7), (2, 3)]:
        assert torch.equal(target.data[:, :, dst], source.data[:, :, src])
    untouched = [b for b in range(9) if b not in (0, 7, 3)]
    assert not target.data[:, :, untouched].any()
    # The export is a copy: changing the source afterwards does not change it.
    source.data.zero_()
    assert exported.abs().sum() > 0


@pytest.mark.parametrize(
    "other",
    [
        KVCacheSpec(3, 2, 8, 8, torch.float32),  # block size
        KVCacheSpec(3, 1, 8, 4, torch.float32),  # kv heads
        KVCacheSpec(2, 2, 8, 4, torch.float32),  # layers
        KVCacheSpec(3, 2, 8, 4, torch.bfloat16),  # dtype
    ],
)
def test_import_refuses_blocks_of_another_spec(other):
    source = KVCache(other, 4, torch.device("cpu"))
    target = KVCache(SPEC, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="do not fit this cache"):
        target.import_blocks([0, 1], source.export_blocks([2, 3]))
    assert not target.data.any()


def test_import_refuses_a_block_count_mismatch():
    cache = KVCache(SPEC, 4, torch.device("cpu"))
    blocks = cache.export_blocks([0, 1])
    with pytest.raises(ValueError, match="do not fit"):
        cache.import_blocks([0, 1, 2], blocks)
