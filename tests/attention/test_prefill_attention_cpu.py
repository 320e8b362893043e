"""The CPU prefill attention kernel (attention/csrc/prefill_attention_cpu.cpp) against causal attention in
float64, on whole prompts and on chunks after cached context, and the CPU backend's use of it: bfloat16
causal chunks go to the kernel, windowed ones and other dtypes to SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from duoserve.attention.backend import AttentionMetadata, PrefillChunk
from duoserve.attention.cpu_backend import (
    CpuAttentionBackend,
    prefill_attention,
    prefill_attention_available,
)
from duoserve.attention.torch_backend import TorchAttentionBackend

pytestmark = pytest.mark.skipif(
    not prefill_attention_available(), reason="the prefill kernel is built on AVX512-BF16 hosts only"
)


def _case(q_len, keys, heads, kv_heads, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(q_len, heads, dim, generator=gen).bfloat16()
    k = torch.randn(keys, kv_heads, dim, generator=gen).bfloat16()
    v = torch.randn(keys, kv_heads, dim, generator=gen).bfloat16()
    return q, k, v


def _reference(q, k, v, scale):
    """Causal attention in float64: query i at position S - T + i sees keys 0 ..= S - T + i."""
    q_len, keys = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (t.double().transpose(0, 1) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(group, 0), vd.repeat_interleave(group, 0)
    scores = qd @ kd.transpose(1, 2) * scale
    hidden = torch.ones(q_len, keys, dtype=torch.bool).tril(keys - q_len).logical_not()
    scores = scores.masked_fill(hidden, -math.inf)
    return (scores.softmax(-1) @ vd).transpose(0, 1)


def _sdpa_bf16(q, k, v, scale):
    """torch's SDPA on the same bfloat16 inputs (what the kernel replaces)."""
    q_len, keys = q.shape[0], k.shape[0]
    mask = torch.ones(q_len, keys, dtype=torch.bool).tril(keys - q_len)
    out = F.scaled_dot_product_attention(
        *(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)


@pytest.mark.parametrize(
    ("q_len", "keys", "heads", "kv_heads", "dim"),
    [
        (1, 1, 9, 3, 64),  # one token
        (5, 5, 9, 3, 64),  # a short prompt: one partial key block
        (100, 100, 9, 3, 64),  # several query blocks, a partial last key block
        (471, 471, 9, 3, 64),  # SmolLM2's shape, a long prompt
        (37, 300, 9, 3, 64),  # a chunk after 263 cached tokens
        (130, 200, 8, 2, 128),  # head size 128, group 4
        (65, 65, 4, 4, 128),  # no GQA
        (33, 1000, 16, 1, 64),  # group 16 (the most the kernel takes), a long context
    ],
)
def test_kernel_matches_causal_attention(q_len, keys, heads, kv_heads, dim) -> None:
    q, k, v = _case(q_len, keys, heads, kv_heads, dim)
    scale = dim**-0.5
    ref = _reference(q, k, v, scale)
    out = prefill_attention(q, k, v, scale)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    error = (out.double() - ref).abs()
    sdpa_error = (_sdpa_bf16(q, k, v, scale).double() - ref).abs()
    # bf16 inputs, P rounded to bf16 like SDPA's bf16 kernel, the output rounded once: about SDPA's error.
    assert error.max().item() < 2e-2
    assert error.mean().item() < 1.5 * sdpa_error.mean().item() + 1e-4


def test_kernel_reads_strided_views_of_a_fused_qkv() -> None:
    """q, k, v as the model hands them over: views of one [tokens, (heads + 2 kv_heads) * dim] row."""
    tokens, heads, kv_heads, dim = 70, 9, 3, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).bfloat16()
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    out = prefill_attention(q, k, v, 0.125)
    assert torch.equal(out, prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.125))
    assert (out.double() - _reference(q, k, v, 0.125)).abs().max().item() < 2e-2


def test_large_scores_rescale_without_overflow() -> None:
    """Scores far apart across key blocks: the running max must rescale earlier blocks' sums."""
    q, k, v = _case(200, 200, 9, 3, 64, seed=3)
    q = (q.float() * 30).bfloat16()
    out = prefill_attention(q, k, v, 0.125)
    assert torch.isfinite(out).all()
    ref = _reference(q, k, v, 0.125)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_bad_inputs_raise() -> None:
    q, k, v = _case(8, 8, 9, 3, 64)
    with pytest.raises(RuntimeError, match="bfloat16"):
        prefill_attention(q.float(), k.float(), v.float(), 0.125)
    with pytest.raises(RuntimeError, match="head sizes"):
        prefill_attention(q[..., :48], k[..., :48], v[..., :48], 0.125)
    with pytest.raises(RuntimeError, match="multiple"):
        prefill_attention(q[:, :8], k, v, 0.125)
    with pytest.raises(RuntimeError, match="keys >= queries"):
        prefill_attention(q, k[:4], v[:4], 0.125)


def _prefill_step(dtype, window=None):
    """Two prefill chunks (a whole prompt, and a chunk after 30 cached tokens) through both backends."""
    heads, kv_heads, dim, block_size = 9, 3, 64, 16
    gen = torch.Generator().manual_seed(1)
    k_pool = torch.randn(10, block_size, kv_heads, dim, generator=gen).to(dtype)
    v_pool = torch.randn(10, block_size, kv_heads, dim, generator=gen).to(dtype)
    prefills = [
        PrefillChunk(query_start=0, query_len=20, context_len=20, block_table=torch.tensor([1, 2])),
        PrefillChunk(query_start=20, query_len=10, context_len=40, block_table=torch.tensor([3, 4, 5])),
    ]
    slots = [16 + i for i in range(20)] + [3 * 16 + 30 + i for i in range(10)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefills=prefills,
        block_size=block_size,
    )
    q = torch.randn(30, heads, dim, generator=gen).to(dtype)
    k = torch.randn(30, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(30, kv_heads, dim, generator=gen).to(dtype)
    outs = []
    for backend in (TorchAttentionBackend(), CpuAttentionBackend()):
        pools = (k_pool.clone(), v_pool.clone())
        backend.prepare(meta)
        outs.append(backend.forward(q, k, v, pools, meta, dim**-0.5, sliding_window=window))
    keys = [k[:20], torch.cat([pools[0][3:5].flatten(0, 1)[:30], k[20:]])]
    values = [v[:20], torch.cat([pools[1][3:5].flatten(0, 1)[:30], v[20:]])]
    return q, keys, values, outs


def test_backend_runs_bfloat16_causal_chunks_in_the_kernel() -> None:
    q, keys, values, (torch_out, cpu_out) = _prefill_step(torch.bfloat16)
    kernel = torch.cat(
        [
            prefill_attention(q[:20], keys[0], values[0], 0.125),
            prefill_attention(q[20:], keys[1], values[1], 0.125),
        ]
    )
    assert torch.equal(cpu_out, kernel)
    assert not torch.equal(cpu_out, torch_out)  # SDPA rounds differently: the kernel did run
    assert ((cpu_out - torch_out).float().norm() / torch_out.float().norm()).item() < 1e-2


def test_backend_keeps_sdpa_for_windows_and_float32() -> None:
    """A window that cuts into the second chunk's keys and a float32 model: SDPA, as the torch backend."""
    *_, (torch_out, cpu_out) = _prefill_step(torch.bfloat16, window=25)
    assert torch.equal(cpu_out[20:], torch_out[20:])
    *_, (torch_out, cpu_out) = _prefill_step(torch.float32)
    assert torch.equal(cpu_out, torch_out)


def test_backend_without_the_kernel_is_sdpa() -> None:
    """prefill_kernel=False (the host table's choice where AMX exists): SDPA for every chunk."""
    q, k, v = _case(20, 20, 9, 3, 64)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(16, 36),
        num_decode_tokens=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefills=[
            PrefillChunk(query_start=0, query_len=20, context_len=20, block_table=torch.tensor([1, 2]))
        ],
        block_size=16,
    )
    outs = []
    for backend in (TorchAttentionBackend(), CpuAttentionBackend(prefill_kernel=False)):
        pools = (
            torch.zeros(4, 16, 3, 64, dtype=torch.bfloat16),
            torch.zeros(4, 16, 3, 64, dtype=torch.bfloat16),
        )
        backend.prepare(meta)
        outs.append(backend.forward(q, k, v, pools, meta, 0.125))
    assert torch.equal(outs[0], outs[1])
