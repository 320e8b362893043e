"""The CPU backend: decodes read K/V from the paged pool in place, in a C++ kernel built on first use.

At 256 decoding sequences the torch backend spends most of a step gathering every sequence's blocks
into a padded buffer, layer after layer, before SDPA reads them a second time (BENCHMARKS.md). The
kernel (`csrc/paged_attention_cpu.cpp`) walks each sequence's block table instead and reads every K/V
row once. It is part of duoserve's CPU kernel library (`duoserve/cpu_kernels.py`: compiled for the host
on first use, cached).

Prefill chunks are compute-bound. SDPA's CPU flash kernel ran them at 40-134 GFLOP/s on a Zen 5 (no AMX),
a tenth of what the same host's bf16 GEMMs do, so with `prefill_kernel` a bfloat16 model's causal chunks
(no window cutting in, no soft cap, head sizes 64 and 128) run duoserve's flash kernel instead
(`csrc/prefill_attention_cpu.cpp`, AVX512-BF16 builds: 4-6x SDPA's speed there, BENCHMARKS.md). The
host measurement (duoserve/hardware.py) times both where the kernel builds and picks the faster: with
AMX, SDPA's kernel multiplies on AMX tiles and may win. Everything else takes SDPA.

Quantized pools (fp8, int8: duoserve/kv/quant.py) go to the kernel with their per-row scales: it reads
them in place, widening each row in registers and multiplying its dot product (K) or probability (V) by
the row's scale.
"""

from __future__ import annotations

import torch

from duoserve.attention.backend import AttentionMetadata, check_variant
from duoserve.attention.kv_scales import check_kv_scales
from duoserve.attention.torch_backend import PrefillPlan, TorchAttentionBackend, attend_chunk
from duoserve.cpu_kernels import cpu_kernels_available, prefill_attention_available
from duoserve.kv.layer import LayerKV, layer_kv

__all__ = [
    "CpuAttentionBackend",
    "cpu_kernels_available",
    "paged_decode",
    "prefill_attention",
    "prefill_attention_available",
]

# What the prefill kernel takes: head sizes, and query heads per KV head at most.
_PREFILL_HEAD_SIZES = (64, 128)
_PREFILL_MAX_GROUP = 16


def prefill_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of q [T, heads, dim] (bfloat16), the last T of keys/values [S, kv_heads, dim]:
    query i sits at position S - T + i and sees keys 0 ..= S - T + i."""
    return torch.ops.duoserve_cpu.prefill_attention(q, keys, values, scale)


def _kernel_chunk(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    plan: PrefillPlan,
    scale: float,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    """A prefill chunk through the kernel where it applies, SDPA otherwise (a ChunkAttention)."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    if (
        plan.causal
        and logits_soft_cap is None
        and q.dtype == keys.dtype == values.dtype == torch.bfloat16
        and q.shape[2] in _PREFILL_HEAD_SIZES
        and heads % kv_heads == 0
        and heads // kv_heads <= _PREFILL_MAX_GROUP
    ):
        return prefill_attention(q, keys, values, scale)
    return attend_chunk(q, keys, values, plan, scale, logits_soft_cap)


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [num_seqs, heads, dim] attending to each sequence's first context_lens[i] pooled tokens, or only
    to its last `sliding_window` of them (the table entries before those are never read).

    Pools of int8 or FP8 (E4M3, E5M2) are read as they are, with their per-row scales k_scale and v_scale
    (float16 [num_blocks, block_size, num_kv_heads]; `kv_scales.py`): required with those pools, refused
    with others."""
    try:
        return torch.ops.duoserve_cpu.paged_decode(
            q.contiguous(),
            k_pool,
            v_pool,
            block_tables.contiguous(),
            context_lens.contiguous(),
            scale,
            sliding_window or 0,
            logits_soft_cap or 0.0,
            k_scale,
            v_scale,
        )
    except RuntimeError:
        # The op checks the scales itself, at no cost; the Python checks (several times this wrapper's own
        # cost per call, measured) run only once it has refused something, to raise a refusal about the
        # scales as a ValueError.
        check_kv_scales(k_pool, k_scale, v_scale)
        raise


class CpuAttentionBackend(TorchAttentionBackend):
    """The torch backend with its decodes in the kernel (which needs no padded groups), and with
    `prefill_kernel` (where it was built) its bfloat16 prefill chunks in the prefill kernel."""

    def __init__(self, prefill_kernel: bool = True) -> None:
        super().__init__(_kernel_chunk if prefill_kernel and prefill_attention_available() else None)

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
    ) -> torch.Tensor:
        """A pure decode step into a pool of the model's dtype goes straight to the kernels: one op stores
        the new K/V rows (index_copy_ twice: 7 us a layer at batch 1, measured; the op 2 us) and the
        attention's output is returned as it is, not copied into a buffer for the prefills' rows."""
        kv = layer_kv(kv_cache)
        direct = kv.k.dtype == k.dtype or (kv.quantized and k.dtype in (torch.bfloat16, torch.float32))
        if meta.prefills or not direct or not kv.k.is_contiguous():
            return super().forward(
                q, k, v, kv, meta, scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap
            )
        check_variant(sliding_window, logits_soft_cap)
        if kv.quantized:
            # One op quantizes and stores the rows: torch's quantize, index_copy_ and the dequantized
            # copy the prefills' path returns were ~20 ops a layer (2.3 ms of a 5.4 ms batch-1 step).
            torch.ops.duoserve_cpu.store_kv_quantized(
                kv.k, kv.v, kv.k_scale, kv.v_scale, k, v, meta.slot_mapping
            )
        else:
            torch.ops.duoserve_cpu.store_kv(kv.k, kv.v, k, v, meta.slot_mapping)
        return _paged_decode_of(q, kv, meta, scale, sliding_window, logits_soft_cap)

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
        num = meta.num_decode_tokens
        out[:num] = _paged_decode_of(q[:num], kv, meta, scale, sliding_window, logits_soft_cap)


def _paged_decode_of(
    q: torch.Tensor,
    kv: LayerKV,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    """The step's decode rows q through the kernel, over a layer's pools (with their scales if quantized)."""
    return paged_decode(
        q,
        kv.k,
        kv.v,
        meta.decode_block_tables,
        meta.decode_context_lens,
        scale,
        sliding_window,
        logits_soft_cap,
        k_scale=kv.k_scale,
        v_scale=kv.v_scale,
    )
