"""What the bytes of one KV block are: the layout two holders of blocks must agree on exactly.

Both P/D transfer (duoserve/disagg/kv_transfer.py: checked on every message) and the offload tiers
(duoserve/kv/offload: part of every stored block's fingerprint) describe blocks with it. It lives here,
not with the transport, so that the engine side can use it without importing ZeroMQ.
"""

from __future__ import annotations

import msgspec
import torch

from duoserve.kv.cache import KVCacheSpec


class KVLayout(msgspec.Struct, frozen=True):
    """What the bytes of one block are; both ends must agree on it exactly."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # a torch dtype's name, e.g. "float32"

    @classmethod
    def of(cls, spec: KVCacheSpec) -> KVLayout:
        dtype = str(spec.dtype).removeprefix("torch.")
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_size, dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def nbytes(self, num_blocks: int) -> int:
        count = 1
        for size in self.shape(num_blocks):
            count *= size
        return count * torch.empty((), dtype=self.torch_dtype).element_size()
