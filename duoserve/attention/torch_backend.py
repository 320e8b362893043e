"""Attention in plain torch: the reference backend, and the CPU one.

Reads go through the block tables: every layer gathers each sequence's context blocks from the
pool (whole blocks, so the gather copies contiguous runs of block_size * kv_heads * head_dim
values). The gather is a transient batch buffer, not a per-request copy of the cache; a fused
kernel (Triton) reads the blocks in place. Decodes run as a few padded attention
calls, one per group of similar context lengths; each prefill chunk runs as one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from duoserve.attention.backend import AttentionMetadata, PrefillChunk

# Decodes are grouped by context length so that padding each group to its longest context wastes
# little: a group closes when the next (longer) context needs this many times the first one's blocks.
_DECODE_GROUP_SPREAD = 1.25


@dataclass
class _DecodeGroup:
    rows: torch.Tensor  # decode rows (0 .. num_decodes - 1) of this group
    block_ids: torch.Tensor  # [rows * width] the rows' block tables cut to the group's widest
    bias: torch.Tensor  # [rows, 1, 1, width * block_size]: 0 inside each context, -inf past it


class TorchAttentionBackend:
    def __init__(self) -> None:
        self._decode_groups: list[_DecodeGroup] = []
        self._prefill_masks: list[torch.Tensor | None] = []

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step work shared by all layers: decode groups with their masks, prefill masks."""
        self._decode_groups = _decode_groups(meta) if meta.num_decode_tokens else []
        self._prefill_masks = [_causal_mask(chunk) for chunk in meta.prefills]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        scale: float,
        *,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        k_pool, v_pool = kv_cache
        _, block_size, kv_heads, dim = k_pool.shape
        k_pool.view(-1, kv_heads, dim).index_copy_(0, meta.slot_mapping, k.to(k_pool.dtype))
        v_pool.view(-1, kv_heads, dim).index_copy_(0, meta.slot_mapping, v.to(v_pool.dtype))
        if sliding_window is not None or logits_soft_cap is not None:
            return _reference_attention(q, k_pool, v_pool, meta, scale, sliding_window, logits_soft_cap)
        out = torch.empty_like(q)
        if meta.num_decode_tokens:
            self._decode_into(out, q, k_pool, v_pool, meta, scale)
        for chunk, mask in zip(meta.prefills, self._prefill_masks, strict=True):
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            if mask is None:  # no earlier context: attend to this chunk's own K/V
                keys, values = k[rows], v[rows]
            else:
                keys = _gather(k_pool, chunk.block_table)[: chunk.context_len]
                values = _gather(v_pool, chunk.block_table)[: chunk.context_len]
            out[rows] = _attend(q[rows], keys, values, mask, scale)
        return out

    def _decode_into(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> None:
        """Attention of the decode rows [0, num_decode_tokens) into `out`."""
        for group in self._decode_groups:
            out.index_copy_(
                0, group.rows, _decode(q.index_select(0, group.rows), k_pool, v_pool, group, scale)
            )


def _decode_groups(meta: AttentionMetadata) -> list[_DecodeGroup]:
    lens = meta.decode_context_lens
    num_blocks = (lens + meta.block_size - 1) // meta.block_size
    order = torch.argsort(num_blocks)
    sorted_blocks = num_blocks[order].tolist()
    groups, first = [], 0
    for i in range(1, len(sorted_blocks) + 1):
        if i == len(sorted_blocks) or sorted_blocks[i] > _DECODE_GROUP_SPREAD * sorted_blocks[first]:
            rows = order[first:i]
            width = sorted_blocks[i - 1]
            positions = torch.arange(width * meta.block_size, device=lens.device)
            bias = torch.zeros((len(rows), len(positions)), dtype=torch.float32, device=lens.device)
            bias.masked_fill_(positions[None, :] >= lens[rows][:, None], -math.inf)
            table = meta.decode_block_tables.index_select(0, rows)[:, :width]
            groups.append(_DecodeGroup(rows, table.flatten(), bias[:, None, None, :]))
            first = i
    return groups


def _decode(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, group: _DecodeGroup, scale: float
) -> torch.Tensor:
    """One SDPA call over a decode group: q [rows, heads, dim] against its padded, gathered context."""
    num = q.shape[0]
    # [rows * width, block_size, kv_heads, dim] -> [rows, kv_heads, width * block_size, dim]
    keys = _gather(k_pool, group.block_ids).view(num, -1, *k_pool.shape[2:]).transpose(1, 2)
    values = _gather(v_pool, group.block_ids).view(num, -1, *v_pool.shape[2:]).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],
        keys.to(q.dtype),
        values.to(q.dtype),
        attn_mask=group.bias.to(q.dtype),
        scale=scale,
        enable_gqa=True,
    )
    return out[:, :, 0, :]


def _gather(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks of a pool, in table order, as [num * block_size, kv_heads, dim]."""
    return pool.index_select(0, block_ids).flatten(0, 1)


def _causal_mask(chunk: PrefillChunk) -> torch.Tensor | None:
    """[query_len, context_len] additive mask of a chunk with earlier context; None when it is all new.

    Additive (0 / -inf), like the decode bias, so both paths hand SDPA the same kind of mask.
    """
    if chunk.context_len == chunk.query_len:
        return None
    positions = torch.arange(chunk.context_len, device=chunk.block_table.device)
    future = positions[None, :] > positions[chunk.context_len - chunk.query_len :, None]
    return torch.zeros(future.shape, device=future.device).masked_fill_(future, -math.inf)


def _attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Causal attention of one sequence: q [T, heads, dim] over keys/values [C, kv_heads, dim].

    Inputs get a batch dimension: with 3-d inputs torch's CPU SDPA takes its unfused math path,
    ~20x slower than the flash kernel it uses for 4-d ones (measured in BENCHMARKS.md).
    """
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        keys.transpose(0, 1).to(q.dtype)[None],
        values.transpose(0, 1).to(q.dtype)[None],
        attn_mask=None if mask is None else mask.to(q.dtype),
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _reference_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    """Sliding-window and soft-capped attention in eager math, one sequence at a time (slow).

    A stand-in until the attention backends implement both natively: correct (transformers' eager
    math: scores * scale, cap * tanh(scores / cap), window i - j < sliding_window, float32 softmax),
    not fast. The CPU backend inherits it through `forward`.
    """
    sequences = [
        (row, 1, int(length), meta.decode_block_tables[row])
        for row, length in enumerate(meta.decode_context_lens[: meta.num_decode_tokens].tolist())
    ]
    sequences += [(c.query_start, c.query_len, c.context_len, c.block_table) for c in meta.prefills]
    out = torch.empty_like(q)
    for start, length, context_len, table in sequences:
        keys = _gather(k_pool, table)[:context_len].to(q.dtype)
        values = _gather(v_pool, table)[:context_len].to(q.dtype)
        groups = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start : start + length], keys) * scale
        if logits_soft_cap is not None:
            scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
        query_pos = torch.arange(context_len - length, context_len, device=q.device)[:, None]
        key_pos = torch.arange(context_len, device=q.device)[None, :]
        hidden = key_pos > query_pos
        if sliding_window is not None:
            hidden |= query_pos - key_pos >= sliding_window
        probs = torch.softmax(scores.masked_fill(hidden, -math.inf), dim=-1, dtype=torch.float32)
        out[start : start + length] = torch.einsum("hqk,khd->qhd", probs.to(q.dtype), values)
    return out
