"""The KV cache tensors: one pool of blocks shared by all layers, plus block export/import.

Layout: `[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]`. A block id is
valid in every layer, so moving a request's KV (to another process, or another memory tier) is
moving the slices `data[:, :, block_ids]`, block by block.

A quantized cache (`--kv-cache-dtype fp8_e4m3|fp8_e5m2|int8`: duoserve/kv/quant.py) stores one byte a
value, so the same memory holds twice the blocks of a bfloat16 one, and its spec carries the per-(layer,
KV head) scales that give the bytes their meaning: blocks moved between caches mean the same only under
the same scales (KVLayout compares their digest).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from duoserve.kv.layer import LayerKV
from duoserve.kv.quant import KVScales, as_bytes, is_quantized
from duoserve.models.config import ModelConfig


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the storage dtype: the model's, or a quantized one (torch.float8_*, torch.int8)
    # A quantized cache's scales. None while the cache is only being sized (the scales are calibrated
    # with the model, which is built after the cache's size is known): `with_scales` completes the spec.
    scales: KVScales | None = None

    @classmethod
    def for_model(cls, config: ModelConfig, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, block_size, dtype)

    @property
    def quantized(self) -> bool:
        return is_quantized(self.dtype)

    def with_scales(self, scales: KVScales) -> KVCacheSpec:
        if not self.quantized:
            raise ValueError(f"a {self.dtype} KV cache takes no scales")
        if (scales.num_layers, scales.num_kv_heads) != (self.num_layers, self.num_kv_heads):
            raise ValueError(
                f"KV scales for {scales.num_layers} layers x {scales.num_kv_heads} KV heads do not fit a "
                f"cache of {self.num_layers} x {self.num_kv_heads}"
            )
        return dataclasses.replace(self, scales=scales)

    @property
    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * element

    def num_blocks_for(self, memory_bytes: int) -> int:
        return memory_bytes // self.bytes_per_block


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        if spec.quantized and spec.scales is None:
            raise ValueError(f"a {spec.dtype} KV cache needs its scales (KVCacheSpec.with_scales)")
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.data = torch.zeros(shape, dtype=spec.dtype, device=device)
        # float32 [num_layers, kv_heads] each; None unless quantized. The spec's values, on the device.
        self.k_scales: torch.Tensor | None = None
        self.v_scales: torch.Tensor | None = None
        if spec.scales is not None:
            self.k_scales, self.v_scales = spec.scales.tensors(device)

    def layer(self, index: int) -> LayerKV:
        """One layer's K and V pools, each [num_blocks, block_size, kv_heads, head_dim], with its scales."""
        k, v = self.data[index]
        if self.k_scales is None:
            return LayerKV(k, v)
        return LayerKV(k, v, self.k_scales[index], self.v_scales[index])

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of these blocks in every layer: [num_layers, 2, len(block_ids), block_size, heads, dim]."""
        index = torch.tensor(block_ids, device=self.data.device)
        return as_bytes(self.data)[:, :, index].contiguous().view(self.data.dtype)

    def import_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Write blocks exported by a cache of the same spec into `block_ids`."""
        expected = (*self.data.shape[:2], len(block_ids), *self.data.shape[3:])
        if tuple(blocks.shape) != expected or blocks.dtype != self.data.dtype:
            raise ValueError(
                f"KV blocks of shape {tuple(blocks.shape)} {blocks.dtype} do not fit this cache's "
                f"{expected} {self.data.dtype}"
            )
        index = torch.tensor(block_ids, device=self.data.device)
        as_bytes(self.data)[:, :, index] = as_bytes(blocks).to(self.data.device)
