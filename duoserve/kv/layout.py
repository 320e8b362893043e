"""What the bytes of one KV block are: the layout two holders of blocks must agree on exactly.

Both P/D transfer (duoserve/disagg/kv_transfer.py: checked on every message) and the offload tiers
(duoserve/kv/offload: part of every stored block's fingerprint) describe blocks with it. It lives here,
not with the transport, so that the engine side can use it without importing ZeroMQ.

A quantized cache's bytes mean something only with its scales (duoserve/kv/quant.py): the layout names
the storage dtype ("float8_e4m3fn", "int8", ...) and a digest of the scales, so blocks quantized under
other scales are refused (P/D) or never found (offload: another fingerprint) instead of read wrong.
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
    dtype: str  # the storage dtype's torch name, e.g. "float32", "float8_e4m3fn", "int8"
    kv_scales: str = ""  # a quantized cache's KVScales.digest; "" for an unquantized one

    @classmethod
    def of(cls, spec: KVCacheSpec) -> KVLayout:
        if spec.quantized and spec.scales is None:
            raise ValueError("a quantized KV cache's layout needs its scales (KVCacheSpec.with_scales)")
        dtype = str(spec.dtype).removeprefix("torch.")
        scales = "" if spec.scales is None else spec.scales.digest
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_size, dtype, scales)

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
