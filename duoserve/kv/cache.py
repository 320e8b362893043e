"""The KV cache tensors: one pool of blocks shared by all layers, plus block export/import.

Layout: `[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]`. A block id is
valid in every layer, so moving a request's KV (to another process, or another memory tier) is
moving the slices `data[:, :, block_ids]`, block by block.

A quantized cache (`--kv-cache-dtype fp8_e4m3|fp8_e5m2|int8`: duoserve/kv/quant.py) stores one byte a
value, plus a float16 scale per (token, KV head) row in a pool of its own, `scales`
`[num_layers, 2, num_blocks, block_size, num_kv_heads]`, indexed like the blocks. The scales live apart
so that the code rows keep their head_dim-byte alignment for the kernels' vector loads; blocks leave the
cache (`export_blocks`) with each row's scale appended to it (head_dim + 2 bytes a row), so everything that
moves exported blocks (P/D transfer, the offload tiers) carries the scales as part of the block's bytes.
The same memory holds 2 x head_dim / (head_dim + 2) times the blocks of a bfloat16 cache (1.94x at 64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from duoserve.kv.layer import LayerKV
from duoserve.kv.quant import SCALE_BYTES, SCALE_DTYPE, as_bytes, is_quantized


class ModelShape(Protocol):
    """What a cache's shape reads from a model's config (duoserve/models/config.py's ModelConfig has it):
    the KV cache sits below the models, which write into it, so it names no model class."""

    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the storage dtype: the model's, or a quantized one (torch.float8_*, torch.int8)

    @classmethod
    def for_model(cls, config: ModelShape, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, block_size, dtype)

    @property
    def quantized(self) -> bool:
        return is_quantized(self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes of one (token, KV head) row of K or V: its values, and a quantized row's scale."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.head_dim * element + (SCALE_BYTES if self.quantized else 0)

    @property
    def bytes_per_block(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.row_bytes

    def num_blocks_for(self, memory_bytes: int) -> int:
        return memory_bytes // self.bytes_per_block


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.data = torch.zeros(shape, dtype=spec.dtype, device=device)
        # A quantized cache's per-row scales (float16 [num_layers, 2, num_blocks, block_size, kv_heads]);
        # None otherwise.
        self.scales: torch.Tensor | None = None
        if spec.quantized:
            self.scales = torch.zeros(shape[:-1], dtype=SCALE_DTYPE, device=device)

    def layer(self, index: int) -> LayerKV:
        """One layer's K and V pools, each [num_blocks, block_size, kv_heads, head_dim], with its scales."""
        k, v = self.data[index]
        if self.scales is None:
            return LayerKV(k, v)
        k_scale, v_scale = self.scales[index]
        return LayerKV(k, v, k_scale, v_scale)

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of these blocks in every layer: [num_layers, 2, len(block_ids), block_size, heads, row],
        row = head_dim values, and for a quantized cache each row's float16 scale after them (2 more
        values of its 1-byte dtype, which only their bytes mean)."""
        index = torch.tensor(block_ids, device=self.data.device)
        codes = as_bytes(self.data)[:, :, index]
        if self.scales is None:
            return codes.contiguous().view(self.data.dtype)
        scales = self.scales[:, :, index].unsqueeze(-1).view(torch.uint8)  # [..., heads, 2]
        return torch.cat([codes, scales], dim=-1).view(self.data.dtype)

    def import_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Write blocks exported by a cache of the same spec into `block_ids`."""
        extra = 0 if self.scales is None else SCALE_BYTES
        expected = (*self.data.shape[:2], len(block_ids), *self.data.shape[3:-1], self.spec.head_dim + extra)
        if tuple(blocks.shape) != expected or blocks.dtype != self.data.dtype:
            raise ValueError(
                f"KV blocks of shape {tuple(blocks.shape)} {blocks.dtype} do not fit this cache's "
                f"{expected} {self.data.dtype}"
            )
        index = torch.tensor(block_ids, device=self.data.device)
        raw = as_bytes(blocks).to(self.data.device)
        dim = self.spec.head_dim
        as_bytes(self.data)[:, :, index] = raw[..., :dim]
        if self.scales is not None:
            self.scales[:, :, index] = raw[..., dim:].contiguous().view(SCALE_DTYPE)[..., 0]
