"""The scales of a 1-byte KV cache, as the paged attention kernels take them.

A pool of int8 or FP8 (E4M3, E5M2) values keeps the layout of a 2-byte one, and each layer has two
float16 tensors of per-row scales, [num_blocks, block_size, num_kv_heads] (indexed like the pool's rows):
a stored K value is worth `stored.float() * k_scale[block, row, head]`, a V value likewise with v_scale
(duoserve/kv/quant.py). The kernels (`cpu_backend.paged_decode`, `triton_kernels`) multiply each K row's
dot product and each V row's probability by its scale. Wider pools have no scales.
"""

from __future__ import annotations

import torch

from duoserve.kv.quant import SCALE_DTYPE

ONE_BYTE_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)


def check_kv_scales(k_pool: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """ValueError unless the scales come exactly with a 1-byte pool, each float16 [num_blocks, block_size,
    num_kv_heads] and contiguous on its device (a kernel reads them by pointer: a wrong shape or dtype would
    be read wrongly, not caught)."""
    if k_pool.dtype not in ONE_BYTE_KV_DTYPES:
        if k_scale is not None or v_scale is not None:
            raise ValueError(
                f"k_scale and v_scale are for 1-byte KV caches (int8, float8), not {k_pool.dtype}"
            )
        return
    shape = tuple(k_pool.shape[:3])
    if k_scale is None or v_scale is None:
        rows = "float16 [num_blocks, block_size, kv_heads]"
        raise ValueError(f"a {k_pool.dtype} KV cache needs k_scale and v_scale ({rows})")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(scale, torch.Tensor) or scale.dtype != SCALE_DTYPE or tuple(scale.shape) != shape:
            got = (
                f"{scale.dtype} {tuple(scale.shape)}"
                if isinstance(scale, torch.Tensor)
                else type(scale).__name__
            )
            raise ValueError(
                f"{name} must be float16 [num_blocks, block_size, num_kv_heads] = {list(shape)}, got {got}"
            )
        if scale.device != k_pool.device or not scale.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous on the pool's device {k_pool.device}, got {scale.device}"
            )
