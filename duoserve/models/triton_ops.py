"""A decode layer's small ops as Triton kernels, for the GPU path: RMSNorm (with the residual add before
it), RoPE of q and k, and the MLP's act(gate) * up, one launch each; and greedy sampling's argmax over the
logits (`argmax_rows`).

In torch a Llama layer's norms and RoPE are ~30 elementwise launches (each norm: the add, two casts, the
square, mean, rsqrt and two multiplies; RoPE per tensor: negation, cat, two multiplies and an add), each
reading and writing its whole tensor. At decode batch sizes every one of them is a launch of a few
microseconds doing almost no work, which a CUDA graph replays back to back: ~0.5-1 ms of a step whose
weights take 0.6 ms to read on an H200 (BENCHMARKS.md, issue 17). These kernels read their inputs once
and write their outputs once, four launches a layer (add + norm before attention, RoPE, add + norm
before the MLP, the activation times up; Gemma's sandwich norms and Qwen3's q/k norms one more each).

They compute what llama.py's torch ops compute, rounding where those round:

- `rms_norm`, `add_rms_norm`: transformers' RMSNorm. The residual add is rounded to the rows' dtype (as
  torch's add); the sum of squares is taken in float32 (a tree reduction, pairwise like torch's mean,
  which keeps the digits that SmolLM2's outlier channels need: see llama.py's RMSNorm); a weight of the
  rows' dtype scales the normalised row rounded to that dtype (Llama: `normed.to(dtype) * weight`), a
  float32 one (Gemma's 1 + w) scales it in float32 before the one rounding.
- `rope_qk_`: rotate_half RoPE of q and k in place on the first `rotary` dims of each head (the rest is
  not touched: partial rotary), from cos/sin already gathered at the tokens' positions (one gather per
  table per step, shared by all layers; every rope type, default/linear/llama3/YaRN/LongRoPE, is only
  a different table). x*cos, rotated*sin and their sum are each rounded to the dtype, as torch's three
  ops round them, so bfloat16/float16 results equal torch's bit for bit.
  `rope_qk_store_` also writes the rotated K and V into a float KV pool (the attention backend's store,
  in the same launch: the Triton backend then skips its own, `kv_stored`).
- `act_mul`: SwiGLU's silu(gate) * up and GeGLU's tanh-GELU(gate) * up of the fused gate/up output, the
  activation rounded to the dtype before the product, as torch's two ops round (the activation itself
  from exp, within float32 ulps of torch's).

q and k are strided views of the fused QKV output (any stride between tokens and heads; dims contiguous):
RoPE writes them in place, so nothing is copied. Launch shapes depend on tensor shapes only: the kernels
can be captured in a decode step's CUDA graph.

Under TRITON_INTERPRET=1 (set before this module is imported) they run on CPU tensors, for tests.
`INTERPRETED` records which way this module's kernels were defined.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernels' ROUND constexpr


def check_device(device: torch.device) -> None:
    """These kernels run on CUDA; on the CPU only where they were defined for Triton's interpreter."""
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return
    raise ValueError(
        f"duoserve's Triton ops run on CUDA tensors, not on {device} "
        "(on the CPU only under TRITON_INTERPRET=1, set before triton is first imported: tests)"
    )


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _warps(block: int) -> int:
    """One program a row: enough warps that each thread holds a few dozen values of a long row."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


@triton.jit
def _round(x, ROUND: tl.constexpr):
    """float32 x rounded to the model's dtype (ROUND: 0 float32, 1 bfloat16, 2 float16), to nearest with
    ties to even as torch rounds, and kept in float32. Rounded by its bits, not by a cast there and back:
    Triton's interpreter truncates a float32 -> bfloat16 cast where GPUs round, and the compiler drops a
    float32 -> float16 -> float32 round trip and fuses the product into an FMA (seen on an H200, Triton
    3.6: RoPE's float16 products one ulp off torch's); the tests compare with torch bit for bit.
    float16: by its bits inside its normal range (all a model makes but subnormals), by the cast outside."""
    if ROUND == 1:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        y = bits.to(tl.float32, bitcast=True)
    elif ROUND == 2:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0xFFF + ((bits >> 13) & 1)) & -8192
        normal = (tl.abs(x) >= 6.103515625e-05) & (tl.abs(x) < 65520.0)
        y = tl.where(normal, bits.to(tl.float32, bitcast=True), x.to(tl.float16).to(tl.float32))
    else:
        y = x
    return y


# ------------------------------------------------------------------ RMSNorm


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    delta_ptr,
    sum_ptr,
    out_ptr,
    w_ptr,
    heads,  # rows per token: 1 for [T, H], the heads for a per-head norm over [T, heads, dim]
    stride_xt,
    stride_xh,
    stride_dt,
    eps,
    H: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_DELTA: tl.constexpr,  # out = norm(x + delta), and x + delta into sum_ptr
    WEIGHT_F32: tl.constexpr,  # scale the float32 normalised row (Gemma's 1 + w), else its rounding
    ROUND: tl.constexpr,  # the rows' dtype (see _round)
):
    """One row per program: row r is head r % heads of token r // heads; outputs are contiguous."""
    row = tl.program_id(0).to(tl.int64)
    t, h = row // heads, row % heads
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(delta_ptr + t * stride_dt + cols, mask=mask, other=0.0).to(tl.float32)
        x = _round(x + d, ROUND)  # torch's add rounds the sum to the dtype
        tl.store(sum_ptr + row * H + cols, x.to(dtype), mask=mask)
    mean_square = tl.sum(x * x, axis=0) / H
    normed = x * (1.0 / tl.sqrt(mean_square + eps))
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if WEIGHT_F32:  # noqa: SIM108 (a constexpr branch: one side is compiled)
        y = normed * w
    else:
        y = _round(normed, ROUND) * w
    tl.store(out_ptr + row * H + cols, _round(y, ROUND).to(dtype), mask=mask)


def norm_applies(x: torch.Tensor, weight: torch.Tensor, plus_one: bool) -> bool:
    """Whether `rms_norm` computes this norm as llama.py's torch ops do: float rows with contiguous
    values, scaled by a weight of their dtype, or by a float32 1 + w."""
    want = torch.float32 if plus_one else x.dtype
    return (
        x.dtype in DTYPES
        and x.dim() in (2, 3)
        and x.stride(-1) == 1
        and weight.dtype == want
        and weight.is_contiguous()
        and weight.numel() == x.shape[-1]
    )


def add_norm_applies(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, plus_one: bool) -> bool:
    """`norm_applies` for `add_rms_norm`: [T, H] rows, and a delta of their shape and dtype."""
    return (
        x.dim() == 2
        and delta.shape == x.shape
        and delta.dtype == x.dtype
        and delta.stride(-1) == 1
        and norm_applies(x, weight, plus_one)
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of x ([T, H], or [T, heads, dim] per head), into a new contiguous tensor."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_norm(x, None, None, out, weight, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, its RMSNorm), both new contiguous [T, H] tensors, from one read of x and delta."""
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty_like(total)
    _launch_norm(x, delta, total, out, weight, eps)
    return total, out


def _launch_norm(x, delta, total, out, weight, eps: float) -> None:
    size = x.shape[-1]
    heads = x.shape[1] if x.dim() == 3 else 1
    rows = x.shape[0] * heads
    if rows == 0:
        return
    block = _pow2(size)
    _rms_norm_kernel[(rows,)](
        x,
        x if delta is None else delta,  # (not read without HAS_DELTA)
        out if total is None else total,
        out,
        weight,
        heads,
        x.stride(0),
        x.stride(1) if x.dim() == 3 else 0,
        0 if delta is None else delta.stride(0),
        eps,
        H=size,
        BLOCK=block,
        HAS_DELTA=delta is not None,
        WEIGHT_F32=weight.dtype == torch.float32,
        ROUND=_KIND[x.dtype],
        num_warps=_warps(block),
    )


# ------------------------------------------------------------------ RoPE


@triton.jit
def _rope_heads(
    x_ptr,
    stride_h,
    c1,
    s1,
    c2,
    s2,
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    ROUND: tl.constexpr,
):
    """One token's heads in place: x[:half] * c1 - x[half:] * s1, x[half:] * c2 + x[:half] * s2 (also
    returned, in float32: [heads, half] each)."""
    h = tl.arange(0, HEADS_PAD)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (i < HALF)
    lo_ptrs = x_ptr + h * stride_h + i
    dtype = x_ptr.dtype.element_ty
    lo = tl.load(lo_ptrs, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(lo_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    # Each product and the sum rounded to the dtype, as torch's mul, mul and add round them.
    new_lo = _round(_round(lo * c1, ROUND) + _round(-hi * s1, ROUND), ROUND)
    new_hi = _round(_round(hi * c2, ROUND) + _round(lo * s2, ROUND), ROUND)
    tl.store(lo_ptrs, new_lo.to(dtype), mask=mask)
    tl.store(lo_ptrs + HALF, new_hi.to(dtype), mask=mask)
    return new_lo, new_hi


@triton.jit
def _rope_qk_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    stride_st,
    v_ptr,
    k_pool,
    v_pool,
    slots,
    stride_vt,
    stride_vh,
    stride_pb,
    stride_pt,
    stride_ph,
    block_size,
    NUM_Q_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    ROUND: tl.constexpr,
    STORE: tl.constexpr,  # also the token's rotated K and its V into the pools at its slot
):
    """One token per program: its cos/sin row loaded once for every head of q and of k. With STORE, the
    KV store's work too (attention/triton_kernels.store_kv's, for a float pool of [blocks, block_size,
    kv_heads, dim]; a negative slot, a padded row, writes nothing): one launch instead of two."""
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF_PAD)[None, :]
    mask = i < HALF
    c1 = tl.load(cos_ptr + t * stride_ct + i, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + i, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_st + i, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_st + HALF + i, mask=mask, other=0.0).to(tl.float32)
    q_row, k_row = q_ptr + t * stride_qt, k_ptr + t * stride_kt
    _rope_heads(q_row, stride_qh, c1, s1, c2, s2, NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD, ROUND)
    k_lo, k_hi = _rope_heads(
        k_row, stride_kh, c1, s1, c2, s2, NUM_K_HEADS, K_HEADS_PAD, HALF, HALF_PAD, ROUND
    )
    if STORE:
        slot = tl.load(slots + t)
        if slot >= 0:  # (a padded row: nothing)
            h = tl.arange(0, K_HEADS_PAD)[:, None]
            dest = (slot // block_size) * stride_pb + (slot % block_size) * stride_pt + h * stride_ph
            kv_mask = (h < NUM_K_HEADS) & (i < HALF)
            tl.store(k_pool + dest + i, k_lo.to(k_pool.dtype.element_ty), mask=kv_mask)
            tl.store(k_pool + dest + HALF + i, k_hi.to(k_pool.dtype.element_ty), mask=kv_mask)
            # V's row in its two halves, as K's (full rotary: the head size is 2 * HALF)
            v_row = v_ptr + t * stride_vt + h * stride_vh + i
            v_lo = tl.load(v_row, mask=kv_mask, other=0.0)
            v_hi = tl.load(v_row + HALF, mask=kv_mask, other=0.0)
            tl.store(v_pool + dest + i, v_lo.to(v_pool.dtype.element_ty), mask=kv_mask)
            tl.store(v_pool + dest + HALF + i, v_hi.to(v_pool.dtype.element_ty), mask=kv_mask)


def rope_applies(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rope_qk_` computes llama.py's `_rope` of q and k: [T, heads, dim] views with contiguous
    dims, cos/sin [T, 1, rotary] (rotary even, at most dim) of their dtype with contiguous rows."""
    return (
        q.dtype in DTYPES
        and q.dim() == 3
        and k.dim() == 3
        and k.dtype == q.dtype
        and cos.dtype == q.dtype
        and sin.dtype == q.dtype
        and q.stride(-1) == 1
        and k.stride(-1) == 1
        and k.shape[0] == q.shape[0]
        and k.shape[2] == q.shape[2]
        and cos.dim() == 3
        and cos.shape == sin.shape
        and cos.shape[0] == q.shape[0]
        and cos.shape[1] == 1
        and cos.shape[2] % 2 == 0
        and 0 < cos.shape[2] <= q.shape[2]
        and cos.stride(-1) == 1
        and sin.stride(-1) == 1
    )


class KVWrite(NamedTuple):
    """Where `rope_qk_store_` writes a step's K/V: its V [T, kv_heads, dim], the layer's float pools
    [num_blocks, block_size, kv_heads, dim] and each token's slot (block * block_size + row; negative: a
    padded row, not stored)."""

    v: torch.Tensor
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    slots: torch.Tensor


def rope_store_applies(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVWrite
) -> bool:
    """Whether `rope_qk_store_` takes this step: `rope_applies`, full rotary (the pool rows are the
    rotated halves), v shaped as k with contiguous dims, float pools of equal strides with contiguous
    dims, a slot per token."""
    return (
        rope_applies(q, k, cos, sin)
        and cos.shape[-1] == q.shape[-1]
        and kv.v.shape == k.shape
        and kv.v.stride(-1) == 1
        and kv.k_pool.dim() == 4
        and kv.k_pool.shape == kv.v_pool.shape
        and kv.k_pool.stride() == kv.v_pool.stride()
        and kv.k_pool.stride(-1) == 1
        and kv.k_pool.shape[2:] == k.shape[1:]
        and kv.k_pool.dtype in DTYPES
        and kv.v_pool.dtype in DTYPES
        and kv.slots.shape == (q.shape[0],)
        and not kv.slots.is_floating_point()
    )


def rope_qk_store_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVWrite
) -> None:
    """RoPE of q and k in place and the rotated K with V into the pools at their slots, one launch (see
    rope_store_applies) instead of RoPE's and the attention backend's store: 3.2% of a Llama 1B-shaped
    batch-1 decode step on an H200, 2.3% at batch 64 (BENCHMARKS.md)."""
    _rope_launch(q, k, cos, sin, kv)


def rope_qk_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q [T, heads, dim] and k [T, kv_heads, dim] in place (one launch); returns them."""
    _rope_launch(q, k, cos, sin, None)
    return q, k


def _rope_launch(q, k, cos, sin, store: KVWrite | None) -> None:
    tokens = q.shape[0]
    if tokens == 0:
        return
    half = cos.shape[-1] // 2
    v, k_pool, v_pool, slots = store if store is not None else (q, q, q, q)  # (not read without STORE)
    _rope_qk_kernel[(tokens,)](
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        v,
        k_pool,
        v_pool,
        slots,
        v.stride(0),
        v.stride(1),
        k_pool.stride(0) if store is not None else 0,
        k_pool.stride(1) if store is not None else 0,
        k_pool.stride(2) if store is not None else 0,
        k_pool.shape[1] if store is not None else 1,
        NUM_Q_HEADS=q.shape[1],
        Q_HEADS_PAD=_pow2(q.shape[1]),
        NUM_K_HEADS=k.shape[1],
        K_HEADS_PAD=_pow2(k.shape[1]),
        HALF=half,
        HALF_PAD=_pow2(half),
        ROUND=_KIND[q.dtype],
        STORE=store is not None,
        num_warps=_warps(_pow2(q.shape[1]) * _pow2(half)),
    )


# ------------------------------------------------------------------ the MLP's activation


@triton.jit
def _act_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_t,
    inter,
    BLOCK: tl.constexpr,
    GELU: tl.constexpr,  # GeGLU's tanh GELU (Gemma), else SwiGLU's SiLU
    ROUND: tl.constexpr,
):
    """act(gate) * up for BLOCK columns of one token's [gate | up] row."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    row = gate_up_ptr + t * stride_t
    g = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # torch's formulas, so that their roundings match too: tanh(y) = 2 sigmoid(2y) - 1 is (nearly always)
    # float32's tanh, and 1 + tanh cancels where torch's does.
    if GELU:  # 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    else:
        a = g / (1.0 + tl.exp(-g))
    y = _round(_round(a, ROUND) * u, ROUND)  # torch rounds the activation, then the product
    tl.store(out_ptr + t * inter + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def act_mul_applies(gate_up: torch.Tensor, activation: str) -> bool:
    """Whether `act_mul` computes llama.py's `act(gate) * up` of this [T, 2 * inter] output."""
    return (
        activation in ACTIVATIONS
        and gate_up.dtype in DTYPES
        and gate_up.dim() == 2
        and gate_up.stride(-1) == 1
        and gate_up.shape[-1] % 2 == 0
    )


def act_mul(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up of a fused [gate | up] output [T, 2 * inter], into a new [T, inter] tensor: one
    launch and one pass over the intermediate activations instead of two (the activation, the product)."""
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if tokens == 0 or inter == 0:
        return out
    block = min(1024, _pow2(inter))
    _act_mul_kernel[(tokens, triton.cdiv(inter, block))](
        gate_up,
        out,
        gate_up.stride(0),
        inter,
        BLOCK=block,
        GELU=activation == "gelu_pytorch_tanh",
        ROUND=_KIND[gate_up.dtype],
        num_warps=4,
    )
    return out


# ------------------------------------------------------------------ greedy sampling's argmax

ARGMAX_CHUNK = 4096  # logits a program reads: a 128k vocabulary is 32 programs a row
_ARGMAX_BLOCK = 1024
_argmax_counters: dict[torch.device, torch.Tensor] = {}  # per device, zero between launches


@triton.jit
def _argmax_kernel(
    x_ptr,
    stride_row,
    vocab,
    part_val,
    part_idx,
    counters,
    out_ptr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
):
    """Program (row, c): the first index of the largest logit in chunk c of the row, then the row's last
    program to finish (a counter per row, taken with acquire-release ordering) reduces the chunks' and sets
    the counter back to 0 for the next launch. One launch, as many programs as a step's logits need."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    best_v = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK], dtype=tl.int32)
    for k in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
        idx = k + offs
        v = tl.load(x_ptr + row * stride_row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        better = v > best_v  # strictly: each lane keeps its earliest index of a tie
        best_v = tl.where(better, v, best_v)
        best_i = tl.where(better, idx, best_i)
    m = tl.max(best_v, 0)
    i = tl.min(tl.where(best_v == m, best_i, 2147483647), 0)  # the earliest index among the lanes' ties
    tl.store(part_val + row * NUM_CHUNKS + c, m)
    tl.store(part_idx + row * NUM_CHUNKS + c, i)
    if tl.atomic_add(counters + row, 1, sem="acq_rel") == NUM_CHUNKS - 1:
        cs = tl.arange(0, CHUNKS_PAD)
        ok = cs < NUM_CHUNKS
        # .cg: from L2, where the other programs' stores are, never a stale L1 line
        vals = tl.load(part_val + row * NUM_CHUNKS + cs, mask=ok, other=float("-inf"), cache_modifier=".cg")
        idxs = tl.load(part_idx + row * NUM_CHUNKS + cs, mask=ok, other=2147483647, cache_modifier=".cg")
        m = tl.max(vals, 0)
        tl.store(out_ptr + row, tl.min(tl.where(vals == m, idxs, 2147483647), 0).to(tl.int64))
        tl.atomic_xchg(counters + row, 0)


def argmax_applies(x: torch.Tensor) -> bool:
    """Whether `argmax_rows` takes these logits: a 2-D float tensor of contiguous rows, on CUDA (or the CPU
    under the interpreter)."""
    return (
        (x.is_cuda or (x.is_cpu and INTERPRETED))
        and x.dim() == 2
        and x.shape[0] > 0
        and 0 < x.shape[1] < 2**31
        and x.stride(1) == 1
        and x.dtype in DTYPES
    )


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of logits [rows, vocab] (int64, first index on ties) in one launch.

    Why: torch's argmax over a 128k vocabulary took 27 us of a batch-1 decode step on an H200 (38 us at
    batch 64; a whole step is 1.3 ms), one program walking each row; the CPU path's block trick
    (sampler.argmax) is 4-5 launches. Here each row is read by ~32 programs of 4096 logits and the last to
    finish reduces. NaN logits are passed over (torch's argmax would pick them): such a step is broken
    either way. The counters are shared by the device's launches: one stream at a time (the engine's)."""
    if not argmax_applies(x):
        raise ValueError("argmax_rows takes 2-D float logits of contiguous rows (see argmax_applies)")
    rows, vocab = x.shape
    num_chunks = triton.cdiv(vocab, ARGMAX_CHUNK)
    counters = _argmax_counters.get(x.device)
    if counters is None or counters.numel() < rows:
        counters = torch.zeros(max(rows, 256), dtype=torch.int32, device=x.device)
        _argmax_counters[x.device] = counters
    part_val = torch.empty(rows, num_chunks, dtype=torch.float32, device=x.device)
    part_idx = torch.empty(rows, num_chunks, dtype=torch.int32, device=x.device)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    _argmax_kernel[(rows, num_chunks)](
        x,
        x.stride(0),
        vocab,
        part_val,
        part_idx,
        counters,
        out,
        CHUNK=ARGMAX_CHUNK,
        BLOCK=_ARGMAX_BLOCK,
        NUM_CHUNKS=num_chunks,
        CHUNKS_PAD=_pow2(num_chunks),
        num_warps=4,
    )
    return out
