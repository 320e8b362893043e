"""What the bytes of one KV block are: the layout two holders of blocks must agree on exactly.

Both P/D transfer (duoserve/disagg/kv_transfer.py: checked on every message) and the offload tiers
(duoserve/kv/offload: part of every stored block's fingerprint) describe blocks with it. It lives here,
not with the transport, so that the engine side can use it without importing ZeroMQ.

A quantized cache's bytes mean something only with their scales (duoserve/kv/quant.py): exported blocks
carry a float16 scale after each (token, KV head) row (KVCache.export_blocks), and the layout names the
storage dtype ("float8_e4m3fn", "int8", ...) and that scale mode ("token:float16"), so blocks of another
scheme (another mode, or an older duoserve's static per-head scales, whose digest this field held) are
refused (P/D) or never found (offload: another fingerprint) instead of read wrong.
"""

from __future__ import annotations

import msgspec
import torch

from duoserve.kv.cache import KVCacheSpec
from duoserve.kv.quant import SCALE_BYTES, SCALE_MODE


class KVLayout(msgspec.Struct, frozen=True):
    """What the bytes of one block are; both ends must agree on it exactly."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # the storage dtype's torch name, e.g. "float32", "float8_e4m3fn", "int8"
    kv_scales: str = ""  # a quantized cache's scale mode (quant.SCALE_MODE); "" for an unquantized one

    @classmethod
    def of(cls, spec: KVCacheSpec) -> KVLayout:
        dtype = str(spec.dtype).removeprefix("torch.")
        scales = SCALE_MODE if spec.quantized else ""
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_size, dtype, scales)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def row(self) -> int:
        """Values of `dtype` per (token, KV head) row: head_dim, then a quantized row's scale bytes (a
        layout of another scale mode is refused by comparison before its rows are read)."""
        return self.head_dim + (SCALE_BYTES if self.kv_scales else 0)

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.row)

    def nbytes(self, num_blocks: int) -> int:
        count = 1
        for size in self.shape(num_blocks):
            count *= size
        return count * torch.empty((), dtype=self.torch_dtype).element_size()
