"""KVCache tensors: sizing (quantized ones too, with their row scales), and moving blocks between caches."""

from __future__ import annotations

import pytest
import torch

from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.kv.quant import QUANTIZED_KV_DTYPES
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


@pytest.mark.parametrize("dtype", list(QUANTIZED_KV_DTYPES.values()), ids=list(QUANTIZED_KV_DTYPES))
def test_quantized_cache_holds_about_2x_bfloat16_blocks(dtype):
    """One byte a value plus a 2-byte scale a row: rows of 8 + 2 bytes against bfloat16's 16 (1.6x), of
    64 + 2 against 128 at SmolLM2's head size (1.94x)."""
    memory = 100 * SPEC.bytes_per_block + 7
    spec = KVCacheSpec(3, 2, 8, 4, dtype)
    assert spec.bytes_per_block == 3 * 2 * 4 * 2 * (8 + 2)
    assert spec.num_blocks_for(memory) == 100 * 32 // 10
    cache = KVCache(spec, spec.num_blocks_for(memory), torch.device("cpu"))
    assert cache.data.dtype == dtype and cache.data.nbytes + cache.scales.nbytes <= memory
    assert cache.data.nbytes + cache.scales.nbytes == spec.num_blocks_for(memory) * spec.bytes_per_block
    wide = KVCacheSpec(30, 3, 64, 16, dtype).num_blocks_for(10**9)
    assert wide == 10**9 // (30 * 2 * 16 * 3 * 66)
    assert 1.93 < wide / KVCacheSpec(30, 3, 64, 16, torch.bfloat16).num_blocks_for(10**9) < 1.94


def test_engine_block_count_doubles_for_the_same_kv_cache_memory(tiny_models, single_torch_thread):
    from duoserve.config import EngineConfig
    from duoserve.engine.core import EngineCore
    from duoserve.models.loader import load_model

    path = tiny_models("llama_gqa")[1]
    loaded = load_model(path, torch.float32)

    def blocks(kv_cache_dtype: str) -> int:
        config = EngineConfig(
            model=path, device="cpu", dtype="float32", kv_cache_dtype=kv_cache_dtype, kv_cache_memory=memory
        )
        return EngineCore(config, loaded).kv.num_blocks

    # float32 blocks of 16 tokens: 2 layers x (K, V) x 16 x 3 KV heads x 8 dims x 4 bytes; int8 rows are
    # 8 bytes and a 2-byte scale.
    memory = 50 * 2 * 2 * 16 * 3 * 8 * 4
    assert blocks("auto") == 50 and blocks("bfloat16") == 100
    assert blocks("int8") == 50 * 32 // 10


def test_quantized_cache_gives_each_layer_its_row_scales():
    cache = KVCache(KVCacheSpec(3, 2, 8, 4, torch.int8), 2, torch.device("cpu"))
    assert cache.scales.shape == (3, 2, 2, 4, 2) and cache.scales.dtype == torch.float16
    cache.scales[1, 0, 1, 3, 1] = 0.5
    cache.scales[1, 1, 0, 2, 0] = 3.0
    layer = cache.layer(1)
    assert layer.quantized and layer.k.dtype == torch.int8 and layer.k.shape == (2, 4, 2, 8)
    assert layer.k_scale.shape == layer.v_scale.shape == (2, 4, 2)
    assert layer.k_scale[1, 3, 1] == 0.5 and layer.v_scale[0, 2, 0] == 3.0  # views of the cache's scales
    assert layer.k_scale.is_contiguous() and layer.v_scale.is_contiguous()
    assert not KVCache(SPEC, 2, torch.device("cpu")).layer(0).quantized
    assert KVCache(SPEC, 2, torch.device("cpu")).scales is None


@pytest.mark.parametrize("dtype", list(QUANTIZED_KV_DTYPES.values()), ids=list(QUANTIZED_KV_DTYPES))
def test_quantized_blocks_move_byte_for_byte_with_their_scales(dtype):
    spec = KVCacheSpec(3, 2, 8, 4, dtype)
    source, target = KVCache(spec, 5, torch.device("cpu")), KVCache(spec, 5, torch.device("cpu"))
    torch.manual_seed(0)
    source.data.view(torch.uint8).copy_(torch.randint(0, 120, source.data.shape, dtype=torch.uint8))
    source.scales.uniform_(0.01, 10.0)
    exported = source.export_blocks([3, 0])
    # Each row: its 8 values, then its float16 scale's 2 bytes.
    assert exported.dtype == dtype and exported.shape == (3, 2, 2, 4, 2, 8 + 2)
    assert torch.equal(exported.view(torch.uint8)[:, :, 0, ..., :8], source.data.view(torch.uint8)[:, :, 3])
    target.import_blocks([1, 4], exported)
    assert torch.equal(target.data.view(torch.uint8)[:, :, 1], source.data.view(torch.uint8)[:, :, 3])
    assert torch.equal(target.data.view(torch.uint8)[:, :, 4], source.data.view(torch.uint8)[:, :, 0])
    assert torch.equal(target.scales[:, :, 1], source.scales[:, :, 3])
    assert torch.equal(target.scales[:, :, 4], source.scales[:, :, 0])
    assert not target.scales[:, :, [0, 2, 3]].any()
    with pytest.raises(ValueError, match="do not fit"):
        target.import_blocks([1, 4], exported.view(torch.uint8))
    with pytest.raises(ValueError, match="do not fit"):  # rows without their scales
        target.import_blocks([1, 4], exported[..., :8].contiguous())
