"""Attention in plain torch: the reference backend, and the CPU one.

Reads go through the block tables: every layer gathers each sequence's context blocks from the
pool (whole blocks, so the gather copies contiguous runs of block_size * kv_heads * head_dim
values). The gather is a transient batch buffer, not a per-request copy of the cache; a fused
kernel (Triton) reads the blocks in place. Decodes of the whole batch run as one padded
attention call; each prefill chunk runs as one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from duoserve.attention.backend import AttentionMetadata, PrefillChunk


class TorchAttentionBackend:
    def __init__(self) -> None:
        self._decode_blocks: torch.Tensor | None = None
        self._decode_bias: torch.Tensor | None = None
        self._prefill_masks: list[torch.Tensor | None] = []

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step work shared by all layers: the flattened block tables and the masks."""
        if meta.num_decode_tokens:
            tables, lens = meta.decode_block_tables, meta.decode_context_lens
            self._decode_blocks = tables.flatten()
            positions = torch.arange(tables.shape[1] * meta.block_size, device=lens.device)
            bias = torch.zeros((len(lens), len(positions)), dtype=torch.float32, device=lens.device)
            bias.masked_fill_(positions[None, :] >= lens[:, None], -math.inf)
            self._decode_bias = bias[:, None, None, :]
        self._prefill_masks = [_causal_mask(chunk) for chunk in meta.prefills]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        k_pool, v_pool = kv_cache
        _, block_size, kv_heads, dim = k_pool.shape
        k_pool.view(-1, kv_heads, dim).index_copy_(0, meta.slot_mapping, k.to(k_pool.dtype))
        v_pool.view(-1, kv_heads, dim).index_copy_(0, meta.slot_mapping, v.to(v_pool.dtype))
        out = torch.empty_like(q)
        num_decodes = meta.num_decode_tokens
        if num_decodes:
            out[:num_decodes] = self._decode(q[:num_decodes], k_pool, v_pool, scale)
        for chunk, mask in zip(meta.prefills, self._prefill_masks, strict=True):
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            if mask is None:  # no earlier context: attend to this chunk's own K/V
                keys, values = k[rows], v[rows]
            else:
                keys = _gather(k_pool, chunk.block_table)[: chunk.context_len]
                values = _gather(v_pool, chunk.block_table)[: chunk.context_len]
            out[rows] = _attend(q[rows], keys, values, mask, scale)
        return out

    def _decode(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float
    ) -> torch.Tensor:
        num = q.shape[0]
        # [D * max_blocks, block_size, kv_heads, dim] -> [D, kv_heads, max_blocks * block_size, dim]
        keys = _gather(k_pool, self._decode_blocks).view(num, -1, *k_pool.shape[2:]).transpose(1, 2)
        values = _gather(v_pool, self._decode_blocks).view(num, -1, *v_pool.shape[2:]).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],
            keys.to(q.dtype),
            values.to(q.dtype),
            attn_mask=self._decode_bias.to(q.dtype),
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
