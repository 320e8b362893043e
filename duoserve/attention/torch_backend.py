"""Attention in plain torch: the reference backend, and the CPU one.

Reads go through the block tables: every layer gathers each sequence's context blocks from the
pool (whole blocks, so the gather copies contiguous runs of block_size * kv_heads * head_dim
values). The gather is a transient batch buffer, not a per-request copy of the cache; a fused
kernel (Triton) reads the blocks in place. Decodes run as a few padded attention
calls, one per group of similar context lengths; each prefill chunk runs as one call.

A sliding window starts each gather at the block holding the first key any of the sequence's
queries sees, so the blocks before it (freed, maybe reused by other requests) are never read, and
a decode reads at most window / block_size + 1 blocks however long its context. Soft-capped scores
(Gemma 2) cannot go through SDPA: those layers run attention as plain matmuls, as transformers'
eager attention does.

It is also the reference for quantized KV pools (duoserve/kv/quant.py): new K/V are quantized as they
are written (a float16 scale per (token, KV head) row), and every read dequantizes the blocks it gathers
to the query's dtype (in float32, each row times its scale): a decode group's, or a prefill chunk's
context, a transient like the gather. A chunk that starts its sequence reads its own K/V through the
same quantize-dequantize round trip rather than at full precision, so that a prompt computed in one
chunk, in several, after a prefix-cache hit or again after a preemption sees the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from duoserve.attention.backend import AttentionMetadata, PrefillChunk, check_variant
from duoserve.kv.layer import LayerKV, layer_kv
from duoserve.kv.quant import as_bytes, dequantize, quantize

# Decodes are grouped by context length so that padding each group to its longest context wastes
# little: a group closes when the next (longer) context needs this many times the first one's blocks.
_DECODE_GROUP_SPREAD = 1.25


@dataclass
class _DecodeGroup:
    rows: torch.Tensor  # decode rows (0 .. num_decodes - 1) of this group
    block_ids: torch.Tensor  # [rows * width] the rows' visible blocks, padded to the group's widest
    bias: torch.Tensor  # [rows, 1, 1, width * block_size]: 0 where a key is visible, -inf elsewhere


@dataclass
class PrefillPlan:
    """How one prefill chunk reads its keys under one layer kind (window or not)."""

    # Keys from the chunk's own new K/V (it starts the sequence), else from the pool's blocks
    # [first_block, ...) of its table.
    own_kv: bool
    first_block: int
    mask: torch.Tensor | None  # additive [query_len, keys]; None: plain causal over its own K/V
    # The mask only hides keys after each query's position (no window cuts in): the chunk's queries are
    # the last of keys [0, context_len).
    causal: bool


# How a backend runs one prefill chunk's attention: (q, keys, values, plan, scale, logits_soft_cap) ->
# out, q [T, heads, dim] over keys/values [C, kv_heads, dim] as the plan says (`attend_chunk` below).
ChunkAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, PrefillPlan, float, float | None], torch.Tensor
]


class TorchAttentionBackend:
    def __init__(self, chunk_attention: ChunkAttention | None = None) -> None:
        # Prefill chunks' attention: SDPA (attend_chunk), unless a backend brings its own kernel.
        self._chunk_attention = chunk_attention or attend_chunk
        # Per step and per sliding window (a model has one or two layer kinds): derived on first use.
        self._decode_groups: dict[int | None, list[_DecodeGroup]] = {}
        self._prefill_plans: dict[int | None, list[PrefillPlan]] = {}

    def prepare(self, meta: AttentionMetadata) -> None:
        """Called once per step: drop the last step's groups and masks (each layer kind derives its own
        on first use, and the layers after it share them)."""
        self._decode_groups.clear()
        self._prefill_plans.clear()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: LayerKV | tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        scale: float,
        *,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        check_variant(sliding_window, logits_soft_cap)
        kv = layer_kv(kv_cache)
        _, block_size, kv_heads, dim = kv.k.shape
        k, v = _store(kv, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.num_decode_tokens:
            self._decode_into(out, q, kv, meta, scale, sliding_window, logits_soft_cap)
        plans = self._prefill_plans.get(sliding_window)
        if plans is None:
            plans = [_prefill_plan(c, block_size, sliding_window) for c in meta.prefills]
            self._prefill_plans[sliding_window] = plans
        for chunk, plan in zip(meta.prefills, plans, strict=True):
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            if plan.own_kv:
                keys, values = k[rows], v[rows]
            else:
                table = chunk.block_table[plan.first_block : -(-chunk.context_len // block_size)]
                num_keys = chunk.context_len - plan.first_block * block_size
                keys = _gather(kv.k, table, kv.k_scale, q.dtype)[:num_keys]
                values = _gather(kv.v, table, kv.v_scale, q.dtype)[:num_keys]
            out[rows] = self._chunk_attention(q[rows], keys, values, plan, scale, logits_soft_cap)
        return out

    def _decode_into(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        kv: LayerKV,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        logits_soft_cap: float | None,
    ) -> None:
        """Attention of the decode rows [0, num_decode_tokens) into `out`."""
        groups = self._decode_groups.get(sliding_window)
        if groups is None:
            groups = self._decode_groups[sliding_window] = _decode_groups(meta, sliding_window)
        for group in groups:
            rows_q = q.index_select(0, group.rows)
            out.index_copy_(0, group.rows, _decode(rows_q, kv, group, scale, logits_soft_cap))


def _store(
    kv: LayerKV, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the step's new K/V [tokens, kv_heads, dim] at their slots; returns them as the pools now hold
    them (for a quantized pool: quantized and dequantized again, in k's dtype)."""
    _, _, kv_heads, dim = kv.k.shape
    if not kv.quantized:
        kv.k.view(-1, kv_heads, dim).index_copy_(0, slot_mapping, k.to(kv.k.dtype))
        kv.v.view(-1, kv_heads, dim).index_copy_(0, slot_mapping, v.to(kv.v.dtype))
        return k, v
    (stored_k, k_scale), (stored_v, v_scale) = quantize(k, kv.k.dtype), quantize(v, kv.v.dtype)
    as_bytes(kv.k).view(-1, kv_heads, dim).index_copy_(0, slot_mapping, as_bytes(stored_k))
    as_bytes(kv.v).view(-1, kv_heads, dim).index_copy_(0, slot_mapping, as_bytes(stored_v))
    kv.k_scale.view(-1, kv_heads).index_copy_(0, slot_mapping, k_scale)
    kv.v_scale.view(-1, kv_heads).index_copy_(0, slot_mapping, v_scale)
    return dequantize(stored_k, k_scale, k.dtype), dequantize(stored_v, v_scale, v.dtype)


def _decode_groups(meta: AttentionMetadata, window: int | None) -> list[_DecodeGroup]:
    """Decode rows grouped by how many blocks they read, with their visible blocks and masks.

    A decode's query sits at position len - 1 and sees keys [first, len), first = len - window.
    """
    lens = meta.decode_context_lens
    bs = meta.block_size
    first = torch.zeros_like(lens) if window is None else (lens - window).clamp_(min=0)
    first_block = first // bs
    num_blocks = (lens + bs - 1) // bs - first_block
    order = torch.argsort(num_blocks)
    sorted_blocks = num_blocks[order].tolist()
    last_column = meta.decode_block_tables.shape[1] - 1
    groups, start = [], 0
    for i in range(1, len(sorted_blocks) + 1):
        if i == len(sorted_blocks) or sorted_blocks[i] > _DECODE_GROUP_SPREAD * sorted_blocks[start]:
            rows = order[start:i]
            width = sorted_blocks[i - 1]
            # Columns past a row's own blocks are padding the mask hides (clamped to stay in the table).
            columns = (first_block[rows][:, None] + torch.arange(width, device=lens.device)).clamp_(
                max=last_column
            )
            table = meta.decode_block_tables.index_select(0, rows).gather(1, columns)
            positions = first_block[rows][:, None] * bs + torch.arange(width * bs, device=lens.device)
            hidden = (positions >= lens[rows][:, None]) | (positions < first[rows][:, None])
            bias = torch.zeros(hidden.shape, dtype=torch.float32, device=lens.device)
            bias.masked_fill_(hidden, -math.inf)
            groups.append(_DecodeGroup(rows, table.flatten(), bias[:, None, None, :]))
            start = i
    return groups


def _decode(
    q: torch.Tensor,
    kv: LayerKV,
    group: _DecodeGroup,
    scale: float,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """One attention call over a decode group: q [rows, heads, dim] against its padded, gathered context."""
    num = q.shape[0]
    # [rows * width, block_size, kv_heads, dim] -> [rows, kv_heads, width * block_size, dim]
    shape = (num, -1, *kv.k.shape[2:])
    keys = _gather(kv.k, group.block_ids, kv.k_scale, q.dtype).view(shape).transpose(1, 2)
    values = _gather(kv.v, group.block_ids, kv.v_scale, q.dtype).view(shape).transpose(1, 2)
    out = _sdpa(q[:, :, None, :], keys, values, group.bias.to(q.dtype), scale, logits_soft_cap)
    return out[:, :, 0, :]


def _gather(
    pool: torch.Tensor, block_ids: torch.Tensor, pool_scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Blocks of a pool, in table order, as [num * block_size, kv_heads, dim] of `dtype` (a quantized
    pool's values dequantized with their rows' scales, [num_blocks, block_size, kv_heads])."""
    if pool_scale is None:
        return pool.index_select(0, block_ids).flatten(0, 1).to(dtype)
    stored = as_bytes(pool).index_select(0, block_ids).flatten(0, 1).view(pool.dtype)
    return dequantize(stored, pool_scale.index_select(0, block_ids).flatten(0, 1), dtype)


def _prefill_plan(chunk: PrefillChunk, block_size: int, window: int | None) -> PrefillPlan:
    """Which keys a chunk reads and its additive (0 / -inf) mask, like the decode bias.

    Queries sit at positions [context_len - query_len, context_len); a query at p sees keys
    (p - window, p]. The first query's window start decides the first block read.
    """
    ctx, first_query = chunk.context_len, chunk.context_len - chunk.query_len
    windowed = window is not None and ctx > window  # some query has keys outside its window
    own_kv = first_query == 0
    if own_kv and not windowed:
        return PrefillPlan(own_kv=True, first_block=0, mask=None, causal=True)
    first_block = 0 if own_kv or not windowed else max(0, first_query - window + 1) // block_size
    device = chunk.block_table.device
    keys = torch.arange(first_block * block_size, ctx, device=device)
    queries = torch.arange(first_query, ctx, device=device)
    hidden = keys[None, :] > queries[:, None]
    if windowed:
        hidden |= keys[None, :] <= queries[:, None] - window
    mask = torch.zeros(hidden.shape, device=device).masked_fill_(hidden, -math.inf)
    return PrefillPlan(own_kv=own_kv, first_block=first_block, mask=mask, causal=not windowed)


def attend_chunk(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    plan: PrefillPlan,
    scale: float,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    """Causal attention of one prefill chunk through SDPA (ChunkAttention's default): q [T, heads, dim]
    over keys/values [C, kv_heads, dim], masked as the plan says.

    Inputs get a batch dimension: with 3-d inputs torch's CPU SDPA takes its unfused math path,
    ~20x slower than the flash kernel it uses for 4-d ones (measured in BENCHMARKS.md).
    """
    out = _sdpa(
        q.transpose(0, 1)[None],
        keys.transpose(0, 1).to(q.dtype)[None],
        values.transpose(0, 1).to(q.dtype)[None],
        None if plan.mask is None else plan.mask.to(q.dtype),
        scale,
        logits_soft_cap,
    )
    return out[0].transpose(0, 1)


def _sdpa(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    """Attention of q [B, heads, T, dim] over keys/values [B, kv_heads, S, dim]; causal when mask is None.

    With a soft cap, in transformers' eager order (Gemma 2): scores in the model's dtype, capped, masked,
    softmax in float32.
    """
    if logits_soft_cap is None:
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
        )
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu_(1)
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask, -math.inf)
    probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values)
