"""The GPU backend: paged attention in Triton kernels that read K/V from the pool in place.

Per layer: one kernel stores the step's new K/V at their slots, one attends every decode row (a long
context split over several programs is combined by the last of them: this backend keeps their counters),
one attends every prefill chunk
(`triton_kernels.py` has the tiling). Nothing is gathered into a copy, and nothing waits on the GPU:
decode launches depend only on tensor shapes, so a decode step can be captured in a CUDA graph
(`engine/model_runner.py`) and replayed with new inputs.

On a CPU device it runs only under TRITON_INTERPRET=1 (Triton's interpreter, for tests: slow).

Quantized pools (fp8, int8: duoserve/kv/quant.py): the step's new K/V are quantized in torch (a few
elementwise ops over [tokens, kv_heads, dim]) and stored as bytes with their rows' scales; the attention
kernels take the pools' row scales and dequantize as they load each tile.
"""

from __future__ import annotations

import torch

from duoserve.attention.backend import AttentionMetadata, check_variant
from duoserve.attention.triton_kernels import (
    INTERPRETED,
    PrefillTiles,
    paged_decode,
    paged_prefill,
    prefill_tiles,
    prefill_tokens_per_tile,
    store_kv,
    tiles_for,
)
from duoserve.kv.layer import LayerKV, layer_kv
from duoserve.kv.quant import as_bytes, quantize

SPLIT_COUNTERS = 1 << 16  # 256 KiB: e.g. 8192 decode rows of 8 KV heads


class TritonAttentionBackend:
    # Decode steps may be captured in CUDA graphs: no host sync, launch shapes from tensor shapes only.
    supports_cuda_graphs = True
    # Where attention runs Triton's kernels the model runs its norms and RoPE in Triton too
    # (LlamaModel.fused_ops, duoserve/models/triton_ops.py).
    runs_triton = True

    def __init__(self, device: torch.device) -> None:
        if device.type == "cpu" and not INTERPRETED:
            raise ValueError(
                "attention_backend triton runs on CUDA; on the CPU only under TRITON_INTERPRET=1 "
                "(set before triton is first imported), for tests"
            )
        self.device = device
        self._tiles = None  # per device, read on first use (a CUDA query)
        self._meta: AttentionMetadata | None = None
        self._prefill: PrefillTiles | None = None
        # Split decodes' counters (one per row and KV head; the kernels leave them at 0), allocated on
        # the first forward: an eager one (a decode graph is captured after an eager warm-up
        # run), so no captured graph allocates them. Batches beyond SPLIT_COUNTERS (row, KV head) pairs
        # reduce in a second kernel.
        self._split_counters: torch.Tensor | None = None
        # False: split decodes reduce in a second kernel (benchmarks/gpu_suite.py times both ways). A
        # captured graph keeps the way it was captured with.
        self.fused_split_reduce = True

    def model_store_pools(
        self, kv_cache: LayerKV | tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's K and V pools where the caller may write a step's K/V itself (then `forward` with
        kv_stored=True): float pools, [num_blocks, block_size, kv_heads, head_dim], a token's slot block *
        block_size + row. None for 1-byte pools (quantized and stored with their scales here)."""
        kv = layer_kv(kv_cache)
        return None if kv.quantized else (kv.k, kv.v)

    def prepare(self, meta: AttentionMetadata) -> None:
        """The prefill chunks' tile map is built by the first layer that needs it, shared by the rest."""
        self._meta = meta
        self._prefill = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: LayerKV | tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        scale: float,
        *,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        """kv_stored: the caller already wrote k and v into the pools `model_store_pools` gave it (the
        model's fused RoPE + store, models/triton_ops.rope_qk_store_)."""
        check_variant(sliding_window, logits_soft_cap)
        if self._tiles is None:
            self._tiles = tiles_for(q.device)
        if self._split_counters is None:
            self._split_counters = torch.zeros(SPLIT_COUNTERS, dtype=torch.int32, device=q.device)
        kv = layer_kv(kv_cache)
        k_pool, v_pool = kv.k, kv.v
        scales = {}
        if kv_stored:
            if kv.quantized:
                raise ValueError(
                    "kv_stored: a 1-byte pool's K/V are quantized and stored here, not by the caller"
                )
        elif kv.quantized:
            scales = {"k_scale": kv.k_scale, "v_scale": kv.v_scale}
            (k, k_rows), (v, v_rows) = quantize(k, k_pool.dtype), quantize(v, v_pool.dtype)
            store_kv(
                as_bytes(k),
                as_bytes(v),
                as_bytes(k_pool),
                as_bytes(v_pool),
                meta.slot_mapping,
                self._tiles.store_tokens,
                scales=(k_rows, v_rows, kv.k_scale, kv.v_scale),
            )
        else:
            store_kv(k, v, k_pool, v_pool, meta.slot_mapping, self._tiles.store_tokens)
        out = torch.empty_like(q)
        num_decodes = meta.num_decode_tokens
        variant = {"sliding_window": sliding_window, "logits_soft_cap": logits_soft_cap, **scales}
        if num_decodes:
            paged_decode(
                out[:num_decodes],
                q[:num_decodes],
                k_pool,
                v_pool,
                meta.decode_block_tables,
                meta.decode_context_lens,
                scale,
                self._tiles,
                split_counters=self._split_counters if self.fused_split_reduce else None,
                **variant,
            )
        if meta.prefills:
            if self._prefill is None or self._meta is not meta:
                tokens = prefill_tokens_per_tile(q.shape[1], k_pool.shape[2], self._tiles)
                self._meta, self._prefill = meta, prefill_tiles(meta.prefills, tokens, q.device)
            paged_prefill(out, q, k_pool, v_pool, self._prefill, scale, self._tiles, **variant)
        return out
