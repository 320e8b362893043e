"""Attention in plain torch: the reference backend, and the CPU one.

Reads go through the block tables: each step turns the tables into flat slot indices once, and
every layer gathers its context K/V from the pool with them. The gather is a transient batch
buffer, not a per-request copy of the cache; a fused kernel (Triton) reads the blocks in place.
Decodes of the whole batch run as one padded attention call; prefill chunks run one call each.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from duoserve.attention.backend import AttentionMetadata, PrefillChunk


def _slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat pool slots of `positions` through a block table ([..., max_blocks] -> [..., len(positions)])."""
    return block_table[..., positions // block_size] * block_size + positions % block_size


class TorchAttentionBackend:
    def __init__(self) -> None:
        self._decode_slots: torch.Tensor | None = None
        self._decode_bias: torch.Tensor | None = None
        self._prefill_context: list[tuple[torch.Tensor, torch.Tensor] | None] = []

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step work shared by all layers: slot indices and masks."""
        bs = meta.block_size
        if meta.num_decode_tokens:
            lens = meta.decode_context_lens
            positions = torch.arange(int(lens.max()), device=lens.device)
            self._decode_slots = _slots(meta.decode_block_tables, positions, bs)
            bias = torch.zeros(self._decode_slots.shape, dtype=torch.float32, device=lens.device)
            bias.masked_fill_(positions[None, :] >= lens[:, None], -math.inf)
            self._decode_bias = bias[:, None, None, :]
        self._prefill_context = [self._chunk_context(chunk, bs) for chunk in meta.prefills]

    @staticmethod
    def _chunk_context(chunk: PrefillChunk, block_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(context slots, causal mask) of a chunk that has earlier context; None when it is all new."""
        if chunk.context_len == chunk.query_len:
            return None
        device = chunk.block_table.device
        positions = torch.arange(chunk.context_len, device=device)
        query_positions = positions[chunk.context_len - chunk.query_len :]
        mask = positions[None, :] <= query_positions[:, None]
        return _slots(chunk.block_table, positions, block_size), mask

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
        k_pool.index_copy_(0, meta.slot_mapping, k.to(k_pool.dtype))
        v_pool.index_copy_(0, meta.slot_mapping, v.to(v_pool.dtype))
        out = torch.empty_like(q)
        num_decodes = meta.num_decode_tokens
        if num_decodes:
            out[:num_decodes] = self._decode(q[:num_decodes], k_pool, v_pool, scale)
        for chunk, context in zip(meta.prefills, self._prefill_context, strict=True):
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            if context is None:  # no earlier context: attend to this chunk's own K/V
                keys, values, mask = k[rows], v[rows], None
            else:
                slots, mask = context
                keys, values = k_pool[slots], v_pool[slots]
            out[rows] = _attend(q[rows], keys, values, mask, scale)
        return out

    def _decode(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float
    ) -> torch.Tensor:
        # [D, C, kv_heads, dim] -> [D, kv_heads, C, dim]; q: [D, heads, 1, dim]
        keys = k_pool[self._decode_slots].transpose(1, 2).to(q.dtype)
        values = v_pool[self._decode_slots].transpose(1, 2).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],
            keys,
            values,
            attn_mask=self._decode_bias.to(q.dtype),
            scale=scale,
            enable_gqa=True,
        )
        return out[:, :, 0, :]


def _attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Causal attention of one sequence: q [T, heads, dim] over keys/values [C, kv_heads, dim]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        keys.transpose(0, 1).to(q.dtype),
        values.transpose(0, 1).to(q.dtype),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)
