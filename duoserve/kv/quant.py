"""Quantized KV cache: storage dtypes, per-token scales, quantize and dequantize.

`--kv-cache-dtype fp8_e4m3 | fp8_e5m2 | int8` stores each K/V value in one byte (vLLM's names; `auto` is
the model's dtype), and each (token, KV head) row of head_dim values, K's and V's apart, has one float16
scale: a stored value means `code.to(float32) * scale[token, head]`. Writing (`quantize`), per row:

    scale = amax(|row|) / max_code, in float16    (127 for int8, 448 for E4M3, 57344 for E5M2)
    int8:  round(clamp(x / scale, -127, 127))      (symmetric: -128 is never written)
    fp8:   (x / scale).clamp(-max_code, max_code).to(fp8)

Why per token rather than one static scale per (layer, KV head) (duoserve's first design, calibrated at
start): a static scale must cover the head's largest value over every token and channel, so most rows
use a few of int8's levels. Measured with SmolLM2-135M in float32, teacher-forced over
benchmarks/kv_accuracy.txt (582 tokens; `python benchmarks/kv_accuracy.py --attention-backend cpu`):
mean KL divergence from the float32 cache (p99), top-1 agreement, and greedy agreement over 256 tokens:

                static per (layer, KV head)              per (token, KV head)
    int8        0.00239 (0.0127)  0.955  0.086          0.00058 (0.0035)  0.981  0.180
    fp8_e4m3    0.00564 (0.0349)  0.943  0.020          0.00352 (0.0207)  0.969  0.020
    fp8_e5m2    0.0215  (0.119)   0.883  0.004          0.0171  (0.113)   0.904  0.000

(the tests' tiny random model: int8 0.0046 -> 0.0013, E4M3 0.086 -> 0.033, E5M2 0.288 -> 0.126.)
llama.cpp's q8_0 KV, a float16 scale per 32 values, is ~0.001: int8 is now under it. Per-token scales are
better for every dtype, FP8's too, though less (its 3 or 2 mantissa bits bound it: a scale only spares it
clipped and subnormal values; E4M3 stays ~3.5x the aim), so there is no static mode: nothing to
calibrate, and nothing for two holders of blocks to agree on but the layout (KVLayout's `kv_scales` names
the mode: "token:float16").

The scale is float16 (llama.cpp's choice for q8_0): 2 bytes per row, 3% of a 64-value row (1.6% at 128),
where float32 would cost 6%. Rounding it to float16 may leave the row's amax up to 2^-11 past the largest
code, which is clamped (a negligible error on that one value); scales are kept within float16's normal
range ([2^-14, 60000]): a row smaller than 2^-14 x max_code is quantized with 2^-14 steps (absolute error
< 2^-15, below anything attention resolves).

Reading: the kernels multiply each K row's dot product by its scale (q . (s k) = s (q . k)) and each V row's
softmax probability by its scale before accumulating it: one multiply per row, none per value.
"""

from __future__ import annotations

import torch

# --kv-cache-dtype's quantized choices -> storage dtype.
QUANTIZED_KV_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}
_NAMES = {dtype: name for name, dtype in QUANTIZED_KV_DTYPES.items()}
# One scale per (token, KV head) row, K's and V's apart.
SCALE_DTYPE = torch.float16
SCALE_BYTES = 2
# What KVLayout.kv_scales says of a quantized cache's blocks (see the module docstring).
SCALE_MODE = "token:float16"
# Scales stay normal float16 numbers (see the module docstring).
_MIN_SCALE = 2.0**-14
_MAX_SCALE = 60000.0


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in _NAMES


def kv_dtype_name(dtype: torch.dtype) -> str:
    """--kv-cache-dtype's name of a storage dtype (e.g. "fp8_e4m3"); torch's for the unquantized ones."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def max_code(dtype: torch.dtype) -> float:
    """The largest magnitude a stored value may have: what a row's amax maps to."""
    return 127.0 if dtype == torch.int8 else float(torch.finfo(dtype).max)


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., kv_heads, dim] (any float dtype) -> (codes of `dtype` [..., kv_heads, dim], float16 scales
    [..., kv_heads]): one scale per row of `dim` values."""
    x = x.float()
    top = max_code(dtype)
    scale = (x.abs().amax(dim=-1) / top).clamp_(_MIN_SCALE, _MAX_SCALE).to(SCALE_DTYPE)
    y = x / scale.float()[..., None]
    if dtype == torch.int8:
        return y.round_().clamp_(-127, 127).to(torch.int8), scale
    return y.clamp_(-top, top).to(dtype), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes [..., kv_heads, dim] -> `dtype`, each row times its scale [..., kv_heads] (in float32)."""
    return (codes.float() * scale.float()[..., None]).to(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 1-byte tensor seen as uint8: copies and index ops on it then need no fp8 kernel of their own."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t
