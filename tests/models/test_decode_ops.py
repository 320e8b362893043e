"""The decode layer's C++ ops (models/csrc/decode_ops_cpu.cpp) against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from duoserve.cpu_kernels import cpu_kernels_available
from duoserve.kv.quant import QUANTIZED_KV_DTYPES, as_bytes, quantize
from duoserve.models.llama import RMSNorm, _rope, _rope_qk

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="the C++ kernels did not build")
ops = torch.ops.duoserve_cpu if cpu_kernels_available() else None


def torch_norm(x: torch.Tensor, weight: torch.Tensor, plus_one: bool, eps: float = 1e-5) -> torch.Tensor:
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return (normed * weight).to(x.dtype) if plus_one else normed.to(x.dtype) * weight


def outlier_rows(rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows with a few large channels, as SmolLM2's residual stream has."""
    x = torch.randn(rows, hidden)
    x[:, 7] *= 300.0
    return x.to(dtype)


@pytest.mark.parametrize("rows", [1, 5, 300])  # 300 rows of 576: the parallel path
@pytest.mark.parametrize("plus_one", [False, True])
def test_bfloat16_norm_rounds_as_torch(rows, plus_one) -> None:
    torch.manual_seed(rows)
    x, delta = outlier_rows(rows, 576, torch.bfloat16), torch.randn(rows, 576).to(torch.bfloat16)
    weight = 1.0 + torch.randn(576) if plus_one else torch.randn(576).to(torch.bfloat16)
    norm = RMSNorm(weight, 1e-5, plus_one)
    assert norm._in_kernel(x)
    # The sums of squares differ in order (double here, float32 pairwise in torch): allow one bf16 step
    # where a value falls on a rounding boundary, and no more than a handful of those.
    for ours, want in [
        (norm(x), torch_norm(x, weight, plus_one)),
        (norm.add(x, delta)[1], torch_norm(x + delta, weight, plus_one)),
    ]:
        assert ours.dtype == torch.bfloat16
        diff = (ours.float() - want.float()).abs() / want.float().abs().clamp(min=1e-3)
        assert diff.max() <= 2**-7 and (diff > 0).float().mean() < 1e-2
    total, _ = norm.add(x, delta)
    assert torch.equal(total, x + delta)


@pytest.mark.parametrize("plus_one", [False, True])
def test_float32_norm_matches_torch(plus_one) -> None:
    torch.manual_seed(0)
    x, delta, weight = outlier_rows(4, 96, torch.float32), torch.randn(4, 96), torch.randn(96)
    norm = RMSNorm(weight, 1e-6, plus_one)
    torch.testing.assert_close(norm(x), torch_norm(x, weight, plus_one, 1e-6), rtol=1e-6, atol=1e-6)
    total, normed = norm.add(x, delta)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, torch_norm(x + delta, weight, plus_one, 1e-6), rtol=1e-6, atol=1e-6)


def test_norm_of_heads_keeps_shape() -> None:
    """Qwen3's q/k norms: [T, heads, dim] views normalised per head."""
    q = torch.randn(3, 4, 32).to(torch.bfloat16)
    weight = torch.randn(32).to(torch.bfloat16)
    norm = RMSNorm(weight, 1e-6, False)
    assert torch.equal(norm(q), norm(q.reshape(-1, 32)).view(3, 4, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# full, partial (Phi-3: the rest passes through), and halves of 16 vector lanes plus a scalar tail
@pytest.mark.parametrize("rotary", [64, 32, 40])
@pytest.mark.parametrize("tokens", [5, 300])  # 300: the parallel path
def test_rope_matches_rotate_half(dtype, rotary, tokens) -> None:
    torch.manual_seed(rotary)
    heads, kv_heads, dim = 6, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)  # strided views
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    angles = torch.randn(tokens, 1, rotary)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    ours_q, ours_k = _rope_qk(q, k, cos, sin)
    assert ours_q.is_contiguous() and ours_k.is_contiguous()
    if dtype == torch.bfloat16:  # every product and the sum rounded where torch rounds them
        assert torch.equal(ours_q, _rope(q, cos, sin)) and torch.equal(ours_k, _rope(k, cos, sin))
    else:
        torch.testing.assert_close(ours_q, _rope(q, cos, sin), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours_k, _rope(k, cos, sin), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inter"), [(1, 1536), (3, 40), (200, 1536)])  # tails; the parallel path
def test_silu_mul_is_torchs_act_times_up(dtype, rows, inter) -> None:
    torch.manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * inter) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0]).to(dtype)  # exp's under- and overflow
    gate, up = gate_up.chunk(2, dim=-1)
    ours, theirs = ops.silu_mul(gate_up), F.silu(gate) * up
    assert ours.shape == (rows, inter) and ours.dtype == dtype
    if dtype == torch.float32:  # exp (a polynomial here, Sleef's there) differs in its last bits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    else:  # silu rounded to bfloat16 where torch rounds it: equal but where exp's last bits cross a tie
        diff = (ours.float() - theirs.float()).abs() / theirs.float().abs().clamp(min=1e-30)
        assert diff.max() <= 2**-7 and (diff > 0).float().mean() < 1e-2
    assert torch.isfinite(ours).all()


def test_silu_mul_refuses_a_strided_input() -> None:
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.silu_mul(torch.randn(4, 64)[:, :32])


def test_rope_of_no_tokens() -> None:
    q, k = torch.empty(0, 4, 16), torch.empty(0, 2, 16)
    ours_q, ours_k = _rope_qk(q, k, torch.empty(0, 1, 16), torch.empty(0, 1, 16))
    assert ours_q.shape == q.shape and ours_k.shape == k.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_writes_slots_and_skips_negative_ones(dtype) -> None:
    k_pool, v_pool = torch.zeros(4, 8, 2, 16, dtype=dtype), torch.zeros(4, 8, 2, 16, dtype=dtype)
    kv = torch.randn(3, 2 * 2 * 16).to(dtype)
    k, v = (part.view(3, 2, 16) for part in kv.split([32, 32], dim=-1))  # rows of a fused output
    slots = torch.tensor([9, -1, 30])
    ops.store_kv(k_pool, v_pool, k, v, slots)
    want_k, want_v = torch.zeros_like(k_pool), torch.zeros_like(v_pool)
    want_k.view(-1, 2, 16)[[9, 30]] = k[[0, 2]]
    want_v.view(-1, 2, 16)[[9, 30]] = v[[0, 2]]
    assert torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)
    ops.store_kv(k_pool, v_pool, k.transpose(1, 2).contiguous().transpose(1, 2), v, slots)  # heads strided
    assert torch.equal(k_pool, want_k)
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.store_kv(k_pool, v_pool, k, v, torch.tensor([0, 1, 32]))


@pytest.mark.parametrize("kv_dtype", list(QUANTIZED_KV_DTYPES.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_quantized_is_quantize_bit_for_bit(kv_dtype, dtype) -> None:
    """Codes and float16 scales equal duoserve/kv/quant.py's quantize, on rows with outliers, rows below
    the smallest scale, zero rows and rows past the largest one; negative slots are skipped."""
    tokens, heads, dim = 7, 3, 64
    k = torch.randn(tokens, heads, dim) * torch.logspace(-6, 3, tokens)[:, None, None]
    k[0, 1] = 0.0
    k[2, 0, 5] = 5e4  # an outlier channel
    k[3] *= 1e5  # past the largest scale: clamped codes
    qkv = torch.cat([k.flatten(1), torch.randn(tokens, heads * dim)], dim=-1).to(dtype)
    k, v = (part.view(tokens, heads, dim) for part in qkv.split(heads * dim, dim=-1))  # strided rows
    slots = torch.tensor([9, -1, 30, 0, 31, 17, 2])
    pools = [torch.zeros(4, 8, heads, dim, dtype=kv_dtype) for _ in range(2)]
    scales = [torch.zeros(4, 8, heads, dtype=torch.float16) for _ in range(2)]
    ops.store_kv_quantized(*pools, *scales, k, v, slots)
    kept = slots >= 0
    for pool, scale, given in zip(pools, scales, (k, v), strict=True):
        codes, want_scale = quantize(given[kept], kv_dtype)
        want_pool = torch.zeros_like(as_bytes(pool))
        want_pool.view(-1, heads, dim)[slots[kept]] = as_bytes(codes)
        assert torch.equal(as_bytes(pool), want_pool)
        assert torch.equal(scale.view(-1, heads)[slots[kept]], want_scale)
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.store_kv_quantized(*pools, *scales, k, v, torch.tensor([0, 1, 2, 3, 4, 5, 32]))
    with pytest.raises(RuntimeError, match="float16"):
        ops.store_kv_quantized(*pools, scales[0].float(), scales[1], k, v, slots)
