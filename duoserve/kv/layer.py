"""One layer's view of the KV pool, as the attention backends receive it.

It lives with the cache (duoserve/kv), not with the backends, so that the cache can hand it out without
importing the attention package: attention depends on kv, never the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerKV:
    """One layer's K and V pools, [num_blocks, block_size, kv_heads, head_dim] each, and for quantized
    pools (float8_e4m3fn, float8_e5m2, int8) their per-row scales, float16 [num_blocks, block_size,
    kv_heads] each: a stored value is worth `code * scale[block, row, head]` (duoserve/kv/quant.py)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


def layer_kv(kv_cache: LayerKV | tuple[torch.Tensor, torch.Tensor]) -> LayerKV:
    """A layer's pools as LayerKV: unquantized ones may also be given as a (K, V) pair."""
    if isinstance(kv_cache, LayerKV):
        return kv_cache
    k, v = kv_cache
    if k.element_size() == 1:
        raise ValueError(f"{k.dtype} KV pools need their scales: pass a LayerKV")
    return LayerKV(k, v)
