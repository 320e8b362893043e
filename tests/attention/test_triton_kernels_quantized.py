"""The Triton attention kernel over 1-byte KV pools (int8, FP8 E4M3 and E5M2) with per-row scales:
decodes (split and not, windowed and soft-capped) and prefill chunks over a cached context, against the
same kernel over the pools dequantized to float32.

Without a GPU these run in Triton's interpreter (tests/attention/conftest.py): the shapes stay tiny.
"""

from __future__ import annotations

import pytest
import torch

from duoserve.attention.backend import PrefillChunk
from tests.attention.quantized_kv_cases import (
    LARGEST,
    ONE_BYTE,
    all_values,
    dequantize,
    poison,
    quantize,
    spread_pool,
)
from tests.attention.test_torch_backend import _reference, poisoned_case, rel_err

pytest.importorskip("triton")
kernels = pytest.importorskip("duoserve.attention.triton_kernels")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not kernels.INTERPRETED:
    pytest.skip(
        "triton's kernels were defined outside its interpreter: no GPU to run them", allow_module_level=True
    )
pytestmark = pytest.mark.usefixtures("single_torch_thread")

SMALL = kernels.Tiles(
    decode_block_n=32, prefill_rows=32, prefill_block_n=32, target_programs=8, store_tokens=4
)


def _on(*tensors):
    return [t.to(DEVICE) for t in tensors]


def _decode(q, k_pool, v_pool, tables, lens, k_scale=None, v_scale=None, **kwargs):
    q, k_pool, v_pool, tables, lens = _on(q, k_pool, v_pool, tables, lens)
    scales = {} if k_scale is None else dict(zip(("k_scale", "v_scale"), _on(k_scale, v_scale), strict=True))
    out = torch.full_like(q, float("nan"))
    kernels.paged_decode(out, q, k_pool, v_pool, tables, lens, q.shape[-1] ** -0.5, SMALL, **scales, **kwargs)
    return out.cpu()


@pytest.mark.parametrize("dtype", ONE_BYTE, ids=str)
def test_decode_matches_the_dequantized_pool(dtype):
    """GQA group 4, a block size that splits key tiles, keys split over 2 programs."""
    gen = torch.Generator().manual_seed(0)
    q, k_pool, v_pool, tables, lens = poisoned_case(8, 2, 64, 5, [1, 37, 64], None)
    k_pool, k_scale = quantize(spread_pool(k_pool.shape, gen), dtype)
    v_pool, v_scale = quantize(spread_pool(v_pool.shape, gen), dtype)
    out = _decode(q, k_pool, v_pool, tables, lens, k_scale, v_scale, num_splits=2)
    ref = _reference(q, dequantize(k_pool, k_scale), dequantize(v_pool, v_scale), tables, lens, 0.125)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", ONE_BYTE, ids=str)
def test_decode_window_soft_cap_and_every_value(dtype):
    """Pools of random codes, so every finite value of the dtype occurs; before each window, blocks of the
    largest values (a read would change the output); bfloat16 queries (the tiles widened to bfloat16,
    exactly)."""
    q, k_pool, v_pool, tables, lens = poisoned_case(4, 2, 64, 5, [3, 21, 40], 7)
    codes = all_values(dtype).view(torch.uint8)
    gen = torch.Generator().manual_seed(2)
    k_pool, v_pool = (
        codes[torch.randint(len(codes), k_pool.shape, generator=gen)].view(dtype) for _ in range(2)
    )
    poison(k_pool, v_pool, k_pool.shape[0] - 1)
    # Row scales over a wide range (powers of two apart, each head its own size), in float16.
    rows = k_pool.shape[:3]
    k_scale = (torch.exp2(torch.randint(-4, 4, rows, generator=gen)) * torch.tensor([2.0, 0.5])).div(
        LARGEST[dtype]
    )
    v_scale = (torch.exp2(torch.randint(-4, 4, rows, generator=gen)) * torch.tensor([1.0, 3.0])).div(
        LARGEST[dtype]
    )
    k_scale, v_scale = k_scale.half(), v_scale.half()
    variant = {"sliding_window": 7, "logits_soft_cap": 2.5, "num_splits": 2}
    out = _decode(q.bfloat16(), k_pool, v_pool, tables, lens, k_scale, v_scale, **variant)
    k_ref, v_ref = dequantize(k_pool, k_scale), dequantize(v_pool, v_scale)
    ref = _reference(q.bfloat16().float(), k_ref, v_ref, tables, lens, 0.125, 7, 2.5)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("dtype", ONE_BYTE, ids=str)
def test_prefill_over_cached_context(dtype):
    """Two chunks: one starting its sequence, one after 12 cached tokens (starting mid-block)."""
    heads, kv_heads, dim, block_size = 4, 2, 64, 5
    gen = torch.Generator().manual_seed(1)
    shape = (12, block_size, kv_heads, dim)
    k_pool, k_scale = quantize(spread_pool(shape, gen), dtype)
    v_pool, v_scale = quantize(spread_pool(shape, gen), dtype)
    chunks = [
        PrefillChunk(query_start=0, query_len=6, context_len=6, block_table=torch.tensor([3, 7])),
        PrefillChunk(query_start=6, query_len=9, context_len=21, block_table=torch.tensor([0, 9, 4, 1, 11])),
    ]
    q = torch.randn(15, heads, dim, generator=gen) / 4
    tiles = kernels.prefill_tiles(chunks, kernels.prefill_tokens_per_tile(heads, kv_heads, SMALL), DEVICE)

    def prefill(k_pool, v_pool, **scales):
        out = torch.full_like(q, float("nan"), device=DEVICE)
        kernels.paged_prefill(out, *_on(q, k_pool, v_pool), tiles, dim**-0.5, SMALL, **scales)
        return out.cpu()

    out = prefill(k_pool, v_pool, **dict(zip(("k_scale", "v_scale"), _on(k_scale, v_scale), strict=True)))
    ref = prefill(dequantize(k_pool, k_scale), dequantize(v_pool, v_scale))
    assert torch.isfinite(out).all() and rel_err(out, ref.double()) < 1e-5


def test_bad_scales_raise():
    q, k_pool, v_pool, tables, lens = poisoned_case(4, 2, 64, 5, [6], None)
    k8, scale = quantize(k_pool, torch.int8)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        _decode(q, k8, k8, tables, lens)
    with pytest.raises(ValueError, match=r"float16 \[num_blocks, block_size, num_kv_heads\]"):
        _decode(q, k8, k8, tables, lens, scale, torch.ones(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16"):
        _decode(q, k8, k8, tables, lens, scale, scale.float())
    with pytest.raises(ValueError, match="1-byte KV caches"):
        _decode(q, k_pool, v_pool, tables, lens, scale, scale)
