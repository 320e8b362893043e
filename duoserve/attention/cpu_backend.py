"""The CPU backend: decodes read K/V from the paged pool in place, in a C++ kernel built on first use.

At 256 decoding sequences the torch backend spends most of a step gathering every sequence's blocks
into a padded buffer, layer after layer, before SDPA reads them a second time (BENCHMARKS.md). The
kernel (`csrc/paged_attention_cpu.cpp`) walks each sequence's block table instead and reads every K/V
row once. It is part of duoserve's CPU kernel library (`duoserve/cpu_kernels.py`: compiled for the host
on first use, cached). Prefill chunks stay on the torch path: they are compute-bound, and SDPA's flash
kernel does them well.

Quantized pools (fp8, int8: duoserve/kv/quant.py) go to the kernel with their per-head scales where it
reads them in place (`PAGED_DECODE_QUANTIZED_KV`, set with that kernel); without it, decodes over them take
the torch reference path.
"""

from __future__ import annotations

import torch

from duoserve.attention.backend import AttentionMetadata, LayerKV
from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.cpu_kernels import cpu_kernels_available

__all__ = ["CpuAttentionBackend", "cpu_kernels_available", "paged_decode"]


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """q [num_seqs, heads, dim] attending to each sequence's first context_lens[i] pooled tokens, or only
    to its last `sliding_window` of them (the table entries before those are never read)."""
    return torch.ops.duoserve_cpu.paged_decode(
        q.contiguous(),
        k_pool,
        v_pool,
        block_tables.contiguous(),
        context_lens.contiguous(),
        scale,
        sliding_window or 0,
        logits_soft_cap or 0.0,
    )


def _kernel_reads_quantized_kv() -> bool:
    """Whether `paged_decode` takes quantized pools and their scales (the kernel that reads them in place
    defines PAGED_DECODE_QUANTIZED_KV = True in this module; absent: it does not)."""
    return bool(globals().get("PAGED_DECODE_QUANTIZED_KV", False))


class CpuAttentionBackend(TorchAttentionBackend):
    """The torch backend with its decodes in the kernel (which needs no padded groups)."""

    def _decode_into(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        kv: LayerKV,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        logits_soft_cap: float | None,
    ) -> None:
        if kv.quantized and not _kernel_reads_quantized_kv():
            super()._decode_into(out, q, kv, meta, scale, sliding_window, logits_soft_cap)
            return
        scales = {"k_scale": kv.k_scale, "v_scale": kv.v_scale} if kv.quantized else {}
        num = meta.num_decode_tokens
        out[:num] = paged_decode(
            q[:num],
            kv.k,
            kv.v,
            meta.decode_block_tables,
            meta.decode_context_lens,
            scale,
            sliding_window,
            logits_soft_cap,
            **scales,
        )
