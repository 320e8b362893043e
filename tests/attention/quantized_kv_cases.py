"""1-byte KV pools for the kernels' tests: quantized from float pools with a float16 scale per (token, KV
head) row, and every finite byte pattern of each dtype. (The test's own quantizer: what the kernels are
checked against is the dequantized pool, whatever quantized it.)"""

from __future__ import annotations

import torch

ONE_BYTE = [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2]
# The largest finite magnitude of each: stored values are saturated to it.
LARGEST = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def quantize(pool: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A float pool [blocks, block_size, kv_heads, dim] as `dtype` and its float16 [blocks, block_size,
    kv_heads] row scales (each row's largest magnitude at about the dtype's largest value)."""
    pool = pool.float()
    amax = pool.nan_to_num(0.0).abs().amax(dim=3).clamp_min(1e-3)
    scale = (amax / LARGEST[dtype]).half()
    x = (pool / scale.float()[..., None]).clamp(-LARGEST[dtype], LARGEST[dtype])
    return (x.round() if dtype == torch.int8 else x).to(dtype), scale


def dequantize(pool: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return pool.float() * scale.float()[..., None]


def spread_pool(shape, generator: torch.Generator) -> torch.Tensor:
    """Random values over a wide range of magnitudes (so FP8's subnormals occur and row scales differ), a
    different size per KV head."""
    x = torch.randn(shape, generator=generator) * torch.exp(1.5 * torch.randn(shape, generator=generator))
    return x * torch.logspace(-1, 1, shape[2])[None, None, :, None]


def all_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 1-byte dtype, as that dtype (FP8's NaN and infinities are never stored)."""
    codes = torch.arange(256, dtype=torch.uint8)
    if dtype == torch.int8:
        return codes.view(torch.int8)
    values = codes.view(dtype)
    return values[values.float().isfinite()]


def poison(k_pool: torch.Tensor, v_pool: torch.Tensor, block: int) -> None:
    """A 1-byte pool's stand-in for a NaN block: the largest values, which a kernel that read them (outside
    a window) would weigh heavily."""
    for pool in (k_pool, v_pool):
        pool[block] = torch.tensor(LARGEST[pool.dtype]).to(pool.dtype)
