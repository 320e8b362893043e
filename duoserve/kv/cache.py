"""The KV cache tensors: one pool of blocks shared by all layers, plus block export/import.

Layout: `[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]`. A block id is
valid in every layer, so moving a request's KV (to another process, or another memory tier) is
moving the slices `data[:, :, block_ids]`, block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duoserve.models.config import ModelConfig


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def for_model(cls, config: ModelConfig, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * element

    def num_blocks_for(self, memory_bytes: int) -> int:
        return memory_bytes // self.bytes_per_block


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.data = torch.zeros(shape, dtype=spec.dtype, device=device)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer, each [num_blocks, block_size, kv_heads, head_dim]."""
        k, v = self.data[index]
        return k, v

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of these blocks in every layer: [num_layers, 2, len(block_ids), block_size, heads, dim]."""
        return self.data[:, :, torch.tensor(block_ids, device=self.data.device)].contiguous()

    def import_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Write blocks exported by a cache of the same spec into `block_ids`."""
        expected = (*self.data.shape[:2], len(block_ids), *self.data.shape[3:])
        if tuple(blocks.shape) != expected or blocks.dtype != self.data.dtype:
            raise ValueError(
                f"KV blocks of shape {tuple(blocks.shape)} {blocks.dtype} do not fit this cache's "
                f"{expected} {self.data.dtype}"
            )
        self.data[:, :, torch.tensor(block_ids, device=self.data.device)] = blocks.to(self.data.device)
