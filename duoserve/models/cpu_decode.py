"""A pure decode step of a bfloat16 or float32 CPU model through all its decoder layers in one C++ call.

At batch 1 a SmolLM2-135M decode step on a 2-core Zen 5 spent ~1.5 of its 4.5 ms in Python and torch's
dispatch around its ~18 ops a layer (perf: 41% of the main thread's samples in Python, dispatch and
libc, the OpenMP worker spinning idle half the step), against 2.0 ms for reading its weights; in one
call the step takes 4.3 ms (0.72x; 0.84x at batch 4, 0.91x at 64; BENCHMARKS.md). The op
`decode_layers` (models/csrc/decode_layers_cpu.cpp) runs the same ops in the same order on the same
tensors from C++, so its results are the layers' own, bit for bit (tests/models/test_cpu_decode.py).

It covers the layers llama.py runs for Llama, Mistral, Qwen2 and SmolLM2-style models in bfloat16: the
norms, fused QKV, full RoPE, the CPU backend's KV store and paged decode kernel, o_proj, SiLU-gated MLP,
each linear a fused 4-bit or 8-bit kernel (int4pack_mm, int8_mm) or a dense matrix; and the same layers
in float32, each linear dense or on the file's codes (q4_matmul, q8_matmul: the AVX2-only CPUs' default,
where a SmolLM2 batch-1 step spent ~7 of its 11.5 ms outside the matmuls; BENCHMARKS.md). Anything else
(q/k norms, sandwich norms, sliding windows, soft-capping, experts, LoRA, biases, quantized KV, Triton's
ops) and every step that is not a pure decode within the kernels' rows take the Python layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from duoserve.attention.backend import AttentionBackend, AttentionMetadata
from duoserve.attention.cpu_backend import CpuAttentionBackend
from duoserve.hardware import ALL_ROWS  # a dense linear's range (and a measured one's): any step
from duoserve.kv.cache import KVCache
from duoserve.models.cpu_quant_linear import CpuQ4Linear, CpuQ8Linear
from duoserve.models.linear import DenseLinear, Int4Linear, Int8Linear

logger = logging.getLogger(__name__)

# The C++ loop's linear kinds (decode_layers_cpu.cpp); float32 models' GGUF codes add their activation
# bits (16 or 8) to theirs.
_INT4, _INT8, _DENSE, _Q4_CODES, _Q8_CODES = 4, 8, 16, 400, 800
DTYPES = (torch.bfloat16, torch.float32)  # the models the loop runs


@dataclass(frozen=True)
class PlainLayer:
    """What a decoder layer hands the C++ loop (llama.py's `_Layer.plain_parts`): its two norms' weights
    and epsilon, its four linears, and its RoPE table."""

    input_norm: torch.Tensor
    mlp_norm: torch.Tensor
    eps: float
    linears: tuple[object, object, object, object]  # qkv, o_proj, gate_up, down_proj
    heads: tuple[int, int, int]
    rope: object


def _linear_args(linear: object) -> tuple[int, torch.Tensor, torch.Tensor, tuple[int, int]] | None:
    """(kind, a, b, the rows it runs that way) of a linear the C++ loop runs; None for any other."""
    if getattr(linear, "bias", None) is not None:
        return None
    if type(linear) is Int4Linear and linear.fused:
        return _INT4, linear.packed, linear.scales_and_zeros, linear.fused_rows
    if type(linear) is Int8Linear and linear.fused:
        return _INT8, linear.codes, linear.scales, linear.fused_rows
    if type(linear) is DenseLinear and linear.few_rows is None and linear.weight.dtype in DTYPES:
        return _DENSE, linear.weight, linear.weight, (1, ALL_ROWS)
    if type(linear) is CpuQ4Linear:
        return _Q4_CODES + linear.activation_bits, linear.codes, linear.scale_min, (1, linear.max_rows)
    if type(linear) is CpuQ8Linear:
        return _Q8_CODES + linear.activation_bits, linear.codes, linear.scales, (1, linear.max_rows)
    return None


@dataclass(frozen=True)
class CpuDecodeLayers:
    """Every layer's weights as `decode_layers` takes them, and when a step may run it."""

    weights: object  # torch.classes.duoserve_cpu.DecodeWeights: every layer's tensors and linear kinds
    rows: tuple[int, int]  # the step sizes every linear runs as the C++ loop runs it
    heads: tuple[int, int, int]
    eps: float
    rope: object
    dtype: torch.dtype  # the model's: its norms', RoPE table's and KV pools'

    @classmethod
    def of(cls, layers: Sequence[PlainLayer | None]) -> CpuDecodeLayers | None:
        """The loop over these layers, or None where one of them has something it does not run."""
        if not layers or any(layer is None for layer in layers):
            return None
        first = layers[0]
        dtype = first.input_norm.dtype
        weights: list[torch.Tensor] = []
        kinds: list[int] = []
        low, high = 1, ALL_ROWS
        for layer in layers:
            # One RoPE table for all (compared by identity: its tensors have no single truth value).
            if (layer.heads, layer.eps) != (first.heads, first.eps) or layer.rope is not first.rope:
                return None
            if dtype not in DTYPES or layer.input_norm.dtype != dtype or layer.mlp_norm.dtype != dtype:
                return None
            weights += [layer.input_norm, layer.mlp_norm]
            for linear in layer.linears:
                args = _linear_args(linear)
                if args is None:
                    return None
                kind, a, b, (first_row, last_row) = args
                kinds.append(kind)
                weights += [a, b]
                low, high = max(low, first_row), min(high, last_row)
        if low > high:
            return None
        rows = f"{low}-{high}" if high < ALL_ROWS else f"{low} or more"
        logger.info("pure decode steps of %s rows run the %d layers in one C++ call", rows, len(layers))
        held = torch.classes.duoserve_cpu.DecodeWeights(weights, kinds)
        return cls(held, (low, high), first.heads, first.eps, first.rope, dtype)

    def applies(
        self,
        rows: int,
        cos: torch.Tensor,
        attention: AttentionBackend,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> bool:
        """Whether this step runs in the loop: a pure decode within the linears' rows, on the CPU
        backend's kernel path (pools of the model's dtype, not quantized), with RoPE over the whole head."""
        low, high = self.rows
        return (
            low <= rows <= high
            and not meta.prefills
            and meta.num_decode_tokens == rows
            and type(attention) is CpuAttentionBackend
            and kv_cache.scales is None
            and kv_cache.data.dtype == self.dtype
            and kv_cache.data.is_contiguous()
            and cos.dtype == self.dtype
            and cos.shape[-1] == self.heads[2]
        )

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """The residual stream after the last layer (its output added), as LlamaModel._forward's."""
        num_heads, num_kv_heads, head_dim = self.heads
        return torch.ops.duoserve_cpu.decode_layers(
            x,
            self.weights,
            cos,
            sin,
            kv_cache.data,
            meta.slot_mapping,
            meta.decode_block_tables,
            meta.decode_context_lens,
            scale,
            self.eps,
            num_heads,
            num_kv_heads,
            head_dim,
        )
