"""Triton kernels of the paged attention backend: one KV store, one attention kernel, one split reduction.

Every kernel reads the pool in place, `[num_blocks, block_size, kv_heads, head_dim]` per layer
(`kv/cache.py`), through the block tables: token j of a sequence lives in block `table[j // block_size]`
at row `j % block_size`, for any block size (the table lookup is per token, so block sizes need not be
powers of two nor match the kernels' tiles).

One attention kernel serves decodes and prefill chunks. A program owns one tile of query rows of one
sequence and one KV head: `TOKENS` query tokens times the `GROUP` query heads that share that KV head
(rows padded to powers of two), so each K/V tile it loads serves every query head of its group (GQA read
once). Decodes are tiles of one token (the group's heads padded to 16 rows, the smallest `tl.dot`);
prefill chunks are tiles of several tokens, causal within the chunk and full over the cached context
before it. Scores go through an online softmax in float32 (base-2 exponentials, the scale folded in).

Long contexts with few sequences would leave most of a GPU idle at one program per (sequence, KV head):
decodes then split their keys over `num_splits` programs, each writing a partial output and its log-sum-exp,
and the last of them to finish combines them (a counter per row and KV head the caller keeps zeroed:
`split_counters`), or, without counters, a reduction kernel after it. The split count depends only on
shapes (batch size, heads, the table's width), never on the context lengths' values, so a captured CUDA
graph stays valid across steps.

The pools' dtype is taken from the tensors: float32/float16/bfloat16 caches under any model dtype, and
1-byte caches (int8, FP8 E4M3/E5M2) with their per-row float16 scales (`kv_scales.py`): the attention
kernel widens each K/V tile as it loads it (exact in float16/bfloat16/float32) and loads the tile's row
scales; K's multiply the tile's scores after the dot product (q . (s k) = s (q . k)), V's multiply the
tile's rows before it (a tile of real values, in the query's dtype, like an unquantized cache's: the
probabilities stay in [0, 1], where float16 has its precision). FP8 is decoded from its bytes (into an
fp16's fields) rather than by Triton's fp8 casts, which not every GPU generation compiles. `store_kv`
writes what it is given: a 1-byte cache's new K/V come to it already quantized, with their row scales.

Under TRITON_INTERPRET=1 these run on CPU tensors (for tests; slowly): `INTERPRETED` records whether this
module's kernels were built for the interpreter, which is decided when the module is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from duoserve.attention.backend import PrefillChunk
from duoserve.attention.kv_scales import check_kv_scales

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch shape of the kernels (per device kind: see `tiles_for`)."""

    decode_block_n: int  # keys per iteration of a decode program
    prefill_rows: int  # query rows (tokens x padded group heads) per prefill program
    prefill_block_n: int  # keys per iteration of a prefill program
    target_programs: int  # decodes split their keys until about this many programs run
    store_tokens: int = 1  # new tokens per program of the KV store
    prefill_num_warps: int = 4
    prefill_num_stages: int = 3  # Triton's default on NVIDIA (software pipelining of the key loop)
    decode_num_warps: int = 4
    decode_num_stages: int = 3  # Triton's default on NVIDIA (software pipelining of the key loop)


def tiles_for(device: torch.device) -> Tiles:
    """GPU: about 4 programs per multiprocessor. The interpreter runs programs one after another and each
    operation costs the same at any tile size, so there few, large tiles are fastest."""
    if device.type == "cuda":
        return gpu_tiles(torch.cuda.get_device_properties(device).multi_processor_count)
    return Tiles(decode_block_n=64, prefill_rows=64, prefill_block_n=64, target_programs=4, store_tokens=64)


def gpu_tiles(multiprocessors: int) -> Tiles:
    """A GPU's tiles. The decode kernel's were swept on an H200 (benchmarks/triton_attention_sweep.py, Llama
    3.2 1B's heads over 1024-token contexts, each launch timed in a CUDA graph, 2026-12-04): 32 keys an
    iteration, 2 warps and 2 pipeline stages read the cache in 6.3 / 46.5 / 155 us at batch 1 / 64 / 256,
    against 6.5 / 66.6 / 197 us with 4 warps and Triton's 3 stages (the geometric mean of time over each
    batch's best: 1.05 against 1.30); a whole decode step took 15% less at batch 64 and 256
    (BENCHMARKS.md). (benchmarks/triton_aot_check.py compiles the tests' launches with these tiles.)"""
    return Tiles(
        decode_block_n=32,
        prefill_rows=64,
        prefill_block_n=64,
        target_programs=4 * multiprocessors,
        store_tokens=4,
        decode_num_warps=2,
        decode_num_stages=2,
    )


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------ KV store


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_pool,
    v_pool,
    k_scale_ptr,
    v_scale_ptr,
    k_scale_pool,
    v_scale_pool,
    slots,
    num_tokens,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_pb,
    stride_pt,
    stride_ph,
    block_size,
    TOKENS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SCALES: tl.constexpr,  # 1-byte pools: each row's scale too ([tokens, kv_heads] into [slots, kv_heads])
):
    """TOKENS new tokens per program: their K and V rows of every KV head into the pool at their slots.
    A negative slot (a padded row of a captured decode batch) writes nothing."""
    t = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)[:, None, None]
    h = tl.arange(0, HEADS_PAD)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    slot = tl.load(slots + t, mask=t < num_tokens, other=-1)
    mask = (slot >= 0) & (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    dest = (slot // block_size) * stride_pb + (slot % block_size) * stride_pt + h * stride_ph + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(k_pool + dest, k.to(k_pool.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_pool + dest, v.to(v_pool.dtype.element_ty), mask=mask)
    if SCALES:
        row_mask = (slot >= 0) & (h < NUM_KV_HEADS)
        rows = slot * NUM_KV_HEADS + h
        source = t * NUM_KV_HEADS + h
        tl.store(k_scale_pool + rows, tl.load(k_scale_ptr + source, mask=row_mask), mask=row_mask)
        tl.store(v_scale_pool + rows, tl.load(v_scale_ptr + source, mask=row_mask), mask=row_mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_mapping: torch.Tensor,
    tokens_per_program: int = 1,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """k, v [tokens, kv_heads, dim] into the pools at slot_mapping [tokens] (block * block_size + row);
    with 1-byte pools, `scales` = (k's, v's row scales [tokens, kv_heads], the pools' k_scale, v_scale
    [num_blocks, block_size, kv_heads]), all contiguous: the rows' scales go to the same slots."""
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, block_size, kv_heads, dim = k_pool.shape
    _check_rows(k, v, k_pool, v_pool)
    if scales is not None and not all(t.is_contiguous() for t in scales):
        raise ValueError("store_kv: the scales must be contiguous")
    _store_kv_kernel[(-(-num_tokens // tokens_per_program),)](
        k,
        v,
        k_pool,
        v_pool,
        *(scales or (k, v, k_pool, v_pool)),  # (not read without SCALES)
        slot_mapping,
        num_tokens,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        k_pool.stride(2),
        block_size,
        TOKENS=tokens_per_program,
        NUM_KV_HEADS=kv_heads,
        HEADS_PAD=_pow2(kv_heads),
        HEAD_DIM=dim,
        BLOCK_D=max(16, _pow2(dim)),
        SCALES=scales is not None,
    )


# ------------------------------------------------------------------ attention


@triton.jit
def _paged_attention_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    split_counters,
    q_ptr,
    k_pool,
    v_pool,
    k_scale_ptr,
    v_scale_ptr,
    block_tables,
    context_lens,
    query_starts,
    query_lens,
    tile_seqs,
    tile_tokens,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    num_heads,
    num_kv_heads,
    scale,
    soft_cap,
    window,
    block_size,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # rows per query token (a power of two >= GROUP)
    TOKENS: tl.constexpr,  # query tokens per program
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,  # split decodes: the last split of a (row, KV head) reduces (split_counters)
    DECODE: tl.constexpr,  # program (tile) i is decode row i; else tile_seqs/tile_tokens say which
    USE_CAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
    KV_FORMAT: tl.constexpr,  # 0: the pools' own float dtype; 1: int8; 2: E4M3 bytes; 3: E5M2 bytes
    KV_UNIT: tl.constexpr,  # what a widened 1-byte value is to be multiplied by (E4M3: 2^8)
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        seq = tile.to(tl.int64)
        first_token = 0
        row0 = seq
        q_len = 1
    else:
        seq = tl.load(tile_seqs + tile)
        first_token = tl.load(tile_tokens + tile)
        row0 = tl.load(query_starts + seq) + first_token
        q_len = tl.load(query_lens + seq)
    ctx = tl.load(context_lens + seq)

    r = tl.arange(0, TOKENS * GROUP_PAD)  # rows: query token r // GROUP_PAD, head r % GROUP_PAD of the group
    token = r // GROUP_PAD
    g = r % GROUP_PAD
    head = kv_head * GROUP + g
    row_valid = (first_token + token < q_len) & (g < GROUP)
    position = ctx - q_len + first_token + token  # each row's query position in its sequence
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    q_mask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(
        q_ptr + (row0 + token)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=q_mask,
        other=0.0,
    )

    # Keys this tile's queries see: up to its last query; from its first query's window start.
    if DECODE:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        hi = ctx
    else:
        hi = ctx - q_len + tl.minimum(first_token + TOKENS, q_len)
    lo = hi * 0
    if USE_WINDOW:
        lo = tl.maximum(ctx - q_len + first_token - window + 1, 0)
    # (Inline arithmetic, no tl.cdiv: each call of a jitted helper costs milliseconds in the interpreter.)
    per_split = ((hi - lo + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(hi, start + per_split)

    qk_scale = scale
    if KV_FORMAT != 0:  # what a widened 1-byte value is to be multiplied by (besides its row's scale)
        qk_scale = scale * KV_UNIT

    m_i = tl.full([TOKENS * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TOKENS * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([TOKENS * GROUP_PAD, BLOCK_D], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_valid = j < end
        blocks = tl.load(block_tables + seq * stride_bt + j // block_size, mask=j_valid, other=0)
        rows = j % block_size
        kv_mask = j_valid[:, None] & d_valid[None, :]
        # K and V tiles [BLOCK_N, BLOCK_D] as the pool stores them, 1-byte values widened here (inline, not a
        # jitted helper: see above). E4M3 (sign, 4 exponent bits of bias 7, 3 mantissa bits) moves into an
        # fp16's fields (exponent bias 15): the value / 2^8 exactly, subnormals included. E5M2 is the upper
        # byte of an fp16.
        kv_rows = blocks[:, None] * stride_kb + rows[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
        if KV_FORMAT == 0:
            k = tl.load(k_pool + kv_rows, mask=kv_mask, other=0.0).to(q.dtype)
        elif KV_FORMAT == 1:
            k = tl.load(k_pool + kv_rows, mask=kv_mask, other=0).to(tl.float32).to(q.dtype)
        elif KV_FORMAT == 2:
            b = tl.load(k_pool + kv_rows, mask=kv_mask, other=0).to(tl.int16)
            k = (((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(tl.float16, bitcast=True).to(q.dtype)
        else:
            b = tl.load(k_pool + kv_rows, mask=kv_mask, other=0).to(tl.int16)
            k = (b << 8).to(tl.float16, bitcast=True).to(q.dtype)
        if IEEE:  # exact float32 (the GPU's default for float32 operands is tf32)
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if KV_FORMAT != 0:  # each K row's scale: q.(s k) = s (q.k)
            scale_rows = (blocks * block_size + rows) * num_kv_heads + kv_head
            s = s * tl.load(k_scale_ptr + scale_rows, mask=j_valid, other=0.0).to(tl.float32)[None, :]
        if USE_CAP:  # cap * tanh(s / cap), tanh from exp (no tanh in tl); exp(-2|x|) cannot overflow
            x = s * qk_scale / soft_cap
            e = tl.exp(-2.0 * tl.abs(x))
            t = (1.0 - e) / (1.0 + e)
            s = tl.where(x < 0, -t, t) * (soft_cap * 1.4426950408889634)
        else:
            s = s * (qk_scale * 1.4426950408889634)
        visible = j_valid[None, :] & (j[None, :] <= position[:, None])
        if USE_WINDOW:
            visible = visible & (j[None, :] > position[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet stay at 0
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = blocks[:, None] * stride_vb + rows[:, None] * stride_vt + kv_head * stride_vh + d[None, :]
        if KV_FORMAT == 0:
            v = tl.load(v_pool + v_rows, mask=kv_mask, other=0.0).to(q.dtype)
        elif KV_FORMAT == 1:
            v = tl.load(v_pool + v_rows, mask=kv_mask, other=0).to(tl.float32).to(q.dtype)
        elif KV_FORMAT == 2:
            b = tl.load(v_pool + v_rows, mask=kv_mask, other=0).to(tl.int16)
            v = (((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(tl.float16, bitcast=True).to(q.dtype)
        else:
            b = tl.load(v_pool + v_rows, mask=kv_mask, other=0).to(tl.int16)
            v = (b << 8).to(tl.float16, bitcast=True).to(q.dtype)
        if KV_FORMAT != 0:  # each V row times its scale: the tile's real values
            v_scales = tl.load(v_scale_ptr + scale_rows, mask=j_valid, other=0.0).to(tl.float32) * KV_UNIT
            v = (v.to(tl.float32) * v_scales[:, None]).to(q.dtype)
        if IEEE:
            pv = tl.dot(p.to(q.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(q.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + (row0 + token)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # Partials of a decode row: [num_decodes, num_heads, NUM_SPLITS, BLOCK_D] and its base-2 lse.
        part = (seq * num_heads + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * BLOCK_D + d[None, :], out, mask=q_mask)
        # An empty split (past a short context) has lse -inf: it weighs nothing in the reduction.
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_valid)
        if FUSED_REDUCE:
            # The last of the row's splits to finish (its counter, taken with acquire-release ordering,
            # so the others' partials are visible) combines them as _reduce_splits_kernel does, for the
            # group's heads, and sets the counter back to 0 for the next launch: one launch a layer.
            ticket = split_counters + seq * num_kv_heads + kv_head
            if tl.atomic_add(ticket, 1, sem="acq_rel") == NUM_SPLITS - 1:
                # Head by head (unrolled: the group's loads are all in flight at once; a loop over the
                # splits instead, one dependent load after another, made the batch-1 attention launch
                # 4 us longer on an H200), each head's [splits, dim] partials in one load. .cg: from L2,
                # where the other programs' stores are.
                sp = tl.arange(0, SPLITS_PAD)
                for g1 in tl.static_range(GROUP):
                    h1 = kv_head * GROUP + g1
                    first = (seq * num_heads + h1) * NUM_SPLITS
                    head_lse = tl.load(
                        part_lse_ptr + first + sp,
                        mask=sp < NUM_SPLITS,
                        other=float("-inf"),
                        cache_modifier=".cg",
                    )
                    pieces = tl.load(
                        part_out_ptr + (first + sp)[:, None] * BLOCK_D + d[None, :],
                        mask=(sp < NUM_SPLITS)[:, None],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    top = tl.max(head_lse, 0)
                    w = tl.exp2(head_lse - tl.where(top == float("-inf"), 0.0, top))
                    mass = tl.sum(w, 0)
                    combined = tl.sum(pieces * w[:, None], 0) / tl.where(mass == 0.0, 1.0, mass)
                    tl.store(
                        out_ptr + row0 * stride_ot + h1 * stride_oh + d,
                        combined.to(out_ptr.dtype.element_ty),
                        mask=d_valid,
                    )
                tl.atomic_xchg(ticket, 0)


@triton.jit
def _reduce_splits_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    stride_ot,
    stride_oh,
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """One program per (decode row, head): the splits' partial outputs weighted by their share of the
    softmax's total mass. Empty splits (past a short context) have lse -inf and weigh nothing."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    base = (row * num_heads + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + s, mask=s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    parts = tl.load(
        part_out_ptr + (base + s)[:, None] * BLOCK_D + d[None, :], mask=(s < NUM_SPLITS)[:, None], other=0.0
    )
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + row * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM
    )


def decode_splits(num_seqs: int, num_kv_heads: int, max_context: int, tiles: Tiles) -> int:
    """Programs per (decode row, KV head): enough for about `tiles.target_programs` in all, each with at
    least two key tiles to read. A function of shapes only (see the module docstring)."""
    programs = num_seqs * num_kv_heads
    if programs >= tiles.target_programs:
        return 1
    most = max(1, max_context // (2 * tiles.decode_block_n))
    return max(1, min(-(-tiles.target_programs // programs), most, 64))


def paged_decode(
    out: torch.Tensor,
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    tiles: Tiles,
    *,
    num_splits: int | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    split_counters: torch.Tensor | None = None,
) -> None:
    """out[i] = attention of q[i] [heads, dim] (position context_lens[i] - 1) over that sequence's first
    context_lens[i] pooled tokens (their last `sliding_window` only; the entries before are never read).
    A row with context 0 (padding of a captured batch) gets zeros. 1-byte pools need k_scale and v_scale
    (float16 [num_blocks, block_size, kv_heads]: each row's scale).

    split_counters: zeroed int32, at least one per (row, KV head), which the kernels leave zeroed (the
    caller's to keep, not to share between streams): split decodes then reduce inside the attention launch
    (its last split per row and head) instead of in a second kernel. None, or too few: the second kernel."""
    num_seqs, num_heads, dim = q.shape
    check_kv_scales(k_pool, k_scale, v_scale)
    if num_seqs == 0:
        return
    kv_heads = k_pool.shape[2]
    _check_rows(q, out, k_pool, v_pool)
    if num_splits is None:
        num_splits = decode_splits(num_seqs, kv_heads, block_tables.shape[1] * k_pool.shape[1], tiles)
    block_d = max(16, _pow2(dim))
    parts = lse = out  # unused when not split
    if num_splits > 1:
        parts = torch.empty(num_seqs, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    group = num_heads // kv_heads
    fused = num_splits > 1 and split_counters is not None and split_counters.numel() >= num_seqs * kv_heads
    _attention(
        (num_seqs, kv_heads, num_splits),
        out,
        parts,
        lse,
        split_counters if fused else lse,  # (not read unless fused)
        q,
        k_pool,
        v_pool,
        k_scale,
        v_scale,
        block_tables,
        context_lens,
        context_lens,  # query starts/lens and the tile map: unused by decodes
        context_lens,
        context_lens,
        context_lens,
        scale,
        sliding_window,
        logits_soft_cap,
        group=group,
        group_pad=max(16, _pow2(group)),
        tokens=1,
        block_n=tiles.decode_block_n,
        num_splits=num_splits,
        fused_reduce=fused,
        decode=True,
        num_warps=tiles.decode_num_warps,
        num_stages=tiles.decode_num_stages,
    )
    if num_splits > 1 and not fused:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            out,
            parts,
            lse,
            out.stride(0),
            out.stride(1),
            num_heads,
            HEAD_DIM=dim,
            BLOCK_D=block_d,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=_pow2(num_splits),
        )


@dataclass
class PrefillTiles:
    """A step's prefill chunks as the kernel reads them: per chunk [query_start, query_len, context_len]
    and its block table (padded), and per program the chunk and the first query token it owns."""

    starts: torch.Tensor
    lens: torch.Tensor
    contexts: torch.Tensor
    block_tables: torch.Tensor  # [chunks, widest table]
    tile_seqs: torch.Tensor
    tile_tokens: torch.Tensor
    tokens_per_tile: int


def prefill_tiles(chunks: list[PrefillChunk], tokens_per_tile: int, device: torch.device) -> PrefillTiles:
    """Built once per step from the chunks' host-side integers (and their device block tables)."""
    info = torch.tensor(
        [[c.query_start, c.query_len, c.context_len] for c in chunks], dtype=torch.long
    ).T.contiguous()
    tiles = [(i, t) for i, c in enumerate(chunks) for t in range(0, c.query_len, tokens_per_tile)]
    tile_map = torch.tensor(tiles, dtype=torch.long).T.contiguous()
    width = max(c.block_table.shape[0] for c in chunks)
    tables = torch.zeros(len(chunks), width, dtype=torch.long, device=device)
    for i, c in enumerate(chunks):
        tables[i, : c.block_table.shape[0]] = c.block_table
    info, tile_map = info.to(device), tile_map.to(device)
    return PrefillTiles(info[0], info[1], info[2], tables, tile_map[0], tile_map[1], tokens_per_tile)


def prefill_tokens_per_tile(num_heads: int, num_kv_heads: int, tiles: Tiles) -> int:
    return max(1, tiles.prefill_rows // _pow2(num_heads // num_kv_heads))


def paged_prefill(
    out: torch.Tensor,
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    chunks: PrefillTiles,
    scale: float,
    tiles: Tiles,
    *,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """The rows of every prefill chunk: causal within the chunk, over all its cached context before it
    (its own new K/V must already be in the pool). 1-byte pools need k_scale and v_scale."""
    check_kv_scales(k_pool, k_scale, v_scale)
    num_heads = q.shape[1]
    kv_heads = k_pool.shape[2]
    _check_rows(q, out, k_pool, v_pool)
    group = num_heads // kv_heads
    _attention(
        (chunks.tile_seqs.shape[0], kv_heads, 1),
        out,
        out,
        out,
        out,
        q,
        k_pool,
        v_pool,
        k_scale,
        v_scale,
        chunks.block_tables,
        chunks.contexts,
        chunks.starts,
        chunks.lens,
        chunks.tile_seqs,
        chunks.tile_tokens,
        scale,
        sliding_window,
        logits_soft_cap,
        group=group,
        group_pad=_pow2(group),
        tokens=chunks.tokens_per_tile,
        block_n=tiles.prefill_block_n,
        num_splits=1,
        decode=False,
        num_warps=tiles.prefill_num_warps,
        num_stages=tiles.prefill_num_stages,
    )


def _attention(
    grid,
    out,
    parts,
    lse,
    split_counters,
    q,
    k_pool,
    v_pool,
    k_scale,
    v_scale,
    block_tables,
    context_lens,
    query_starts,
    query_lens,
    tile_seqs,
    tile_tokens,
    scale,
    sliding_window,
    logits_soft_cap,
    *,
    group,
    group_pad,
    tokens,
    block_n,
    num_splits,
    decode,
    num_warps,
    num_stages,
    fused_reduce=False,
) -> None:
    dim = q.shape[2]
    kv_format = _KV_FORMATS.get(k_pool.dtype, 0)
    if kv_format >= 2:  # FP8: decoded from its bytes
        k_pool, v_pool = k_pool.view(torch.uint8), v_pool.view(torch.uint8)
    _paged_attention_kernel[grid](
        out,
        parts,
        lse,
        split_counters,
        q,
        k_pool,
        v_pool,
        out if k_scale is None else k_scale,  # (not read without a 1-byte pool)
        out if v_scale is None else v_scale,
        block_tables,
        context_lens,
        query_starts,
        query_lens,
        tile_seqs,
        tile_tokens,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        k_pool.stride(2),
        v_pool.stride(0),
        v_pool.stride(1),
        v_pool.stride(2),
        block_tables.stride(0),
        q.shape[1],
        k_pool.shape[2],
        scale,
        logits_soft_cap or 1.0,
        sliding_window or 0,
        k_pool.shape[1],
        GROUP=group,
        GROUP_PAD=group_pad,
        TOKENS=tokens,
        HEAD_DIM=dim,
        BLOCK_D=max(16, _pow2(dim)),
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        SPLITS_PAD=_pow2(num_splits),
        FUSED_REDUCE=fused_reduce,
        DECODE=decode,
        USE_CAP=logits_soft_cap is not None,
        USE_WINDOW=sliding_window is not None,
        # Triton's interpreter multiplies bfloat16 operands wrongly (3.9: as their raw 16-bit patterns), so
        # interpreted dots convert them to float32 first.
        IEEE=q.dtype == torch.float32 or INTERPRETED,
        KV_FORMAT=kv_format,
        KV_UNIT=256.0 if kv_format == 2 else 1.0,
        num_warps=num_warps,
        num_stages=num_stages,
    )


# The kernel's KV_FORMAT of each 1-byte pool dtype (0 for the others).
_KV_FORMATS = {torch.int8: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}


def _check_rows(*tensors: torch.Tensor) -> None:
    """The kernels index the last dimension with stride 1."""
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"attention tensors need a contiguous last dimension, got strides {t.stride()}")


__all__ = [
    "INTERPRETED",
    "PrefillTiles",
    "Tiles",
    "decode_splits",
    "gpu_tiles",
    "paged_decode",
    "paged_prefill",
    "prefill_tiles",
    "prefill_tokens_per_tile",
    "store_kv",
    "tiles_for",
]
