"""The attention backend interface and the per-step metadata every backend reads.

A step's tokens are laid out decodes first (sequences with one new token), then the prefill
chunks. Each layer's attention first writes the step's new K/V into the paged pool at
`slot_mapping`, then reads every sequence's context through its block table.

Layers may differ in two ways, given per call: a sliding window (Mistral, Gemma 2/3's local layers)
and soft-capped scores (Gemma 2). Block table entries before a sequence's window may name blocks
that were freed (and reused by others): a backend never reads them.

A layer's pools may be quantized (one byte a value: duoserve/kv/quant.py), with a float16 scale per
(token, KV head) row; a backend quantizes what it writes (setting each row's scale) and reads the stored
values times their row's scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from duoserve.kv.layer import LayerKV


@dataclass
class PrefillChunk:
    query_start: int  # first row of this chunk in the step's tokens
    query_len: int
    context_len: int  # tokens of context after this chunk (cached + this chunk)
    block_table: torch.Tensor  # [num_blocks] int64 pool block ids


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: flat pool slot of each new token's K/V
    num_decode_tokens: int  # rows [0, num_decode_tokens) are decodes, one per sequence
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, padded with 0
    decode_context_lens: torch.Tensor  # [num_decodes] int64
    prefills: list[PrefillChunk]
    block_size: int


class AttentionBackend(Protocol):
    def prepare(self, meta: AttentionMetadata) -> None:
        """Called once per step before the layers run: derive what all layers share."""
        ...

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim], RoPE applied
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: LayerKV | tuple[torch.Tensor, torch.Tensor],  # K, V pools (+ scales): see LayerKV
        meta: AttentionMetadata,
        scale: float,
        *,
        # A query at position p attends to keys at positions p - sliding_window < j <= p (transformers'
        # sliding-window mask: the window holds the query and the sliding_window - 1 keys before it).
        sliding_window: int | None = None,
        # Gemma 2: scores = cap * tanh(scores / cap), scores being q.k * scale, before the softmax.
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


def check_variant(sliding_window: int | None, logits_soft_cap: float | None) -> None:
    """The per-layer attention variants every backend accepts: a window of at least 1, a positive cap."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1 (or None), got {sliding_window}")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be positive (or None), got {logits_soft_cap}")
