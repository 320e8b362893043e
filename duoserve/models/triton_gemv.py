"""A Triton matrix-vector product for steps of a few rows (GPU decode at small batch): y = x W^T + b.

Why (measured on an H200, 2026-12-04, BENCHMARKS.md): at batch 1 a Llama 3.2 1B-shaped decode step spent
0.81 ms in cuBLAS's matmuls against 0.59 ms for its 2.47 GB of weights at the copy bandwidth. lm_head and
gate_up ran at 86-100% of it, but the 8-13 MB q/k/v and o projections at ~42% and down at 61%: too few
thread blocks to keep the memory busy. Here each program reads BLOCK_N whole weight rows (contiguous along
K) once for all of the step's rows, in BLOCK_K slices, accumulating in float32 and reducing once at the
end, so a 2048-wide o projection is 256 programs of 8 rows, about two per multiprocessor.

Not measured yet: no GPU was lent after it was written. `LlamaModel.triton_gemv` switches it on (off by
default); benchmarks/gpu_suite.py times decode steps with and without it (`graph_ms_gemv`) and
benchmarks/triton_gemv_sweep.py its tiles against cuBLAS, shape by shape. Under TRITON_INTERPRET=1 it runs
on CPU tensors, for tests (tests/models/test_triton_gemv.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
MAX_ROWS = 8  # the largest step it serves; more rows reuse each weight enough for cuBLAS's tiles
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ACC_PER_THREAD = 64  # float32 accumulators a thread holds at most before REDUCE_EACH (255 registers)


@dataclass(frozen=True)
class GemvTiles:
    block_n: int = 8  # weight rows (outputs) per program
    block_k: int = 256  # inputs per iteration
    num_warps: int = 4


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    rows,
    n,
    k,
    stride_xm,
    stride_wn,
    stride_om,
    ROWS_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    REDUCE_EACH: tl.constexpr,
):
    """Outputs [pid * BLOCK_N, +BLOCK_N) of every row: x [rows, k] times w [n, k] (row-major).

    REDUCE_EACH: sum each slice's products at once (an [rows, BLOCK_N] accumulator) instead of once at
    the end (an [rows, BLOCK_N, BLOCK_K] one): chosen where the latter would not fit in registers."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, ROWS_PAD)
    kk = tl.arange(0, BLOCK_K)
    col_ok = cols < n
    row_ok = r < rows
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + r.to(tl.int64)[:, None] * stride_xm
    if REDUCE_EACH:
        y = tl.zeros([ROWS_PAD, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([ROWS_PAD, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        k_ok = (k0 + kk) < k
        w = tl.load(w_rows + (k0 + kk)[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_rows + (k0 + kk)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if REDUCE_EACH:
            y += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        else:
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if not REDUCE_EACH:
        y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + r.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` takes this product: a 2-D x of 1..MAX_ROWS rows with unit stride along its inputs,
    a contiguous 2-D weight of the same float dtype, on CUDA (or any device under the interpreter)."""
    return (
        (x.is_cuda or INTERPRETED)
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.stride(1) == 1
        and weight.dim() == 2
        and weight.is_contiguous()
        and weight.dtype == x.dtype
        and x.dtype in _DTYPES
        and x.shape[1] == weight.shape[1]
    )


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tiles: GemvTiles = GemvTiles()
) -> torch.Tensor:
    """x [rows, k] @ weight [n, k]^T (+ bias [n]) in x's dtype, accumulated in float32 (see gemv_applies)."""
    if not gemv_applies(x, weight):
        raise ValueError(f"gemv takes 1..{MAX_ROWS} rows of a matching float dtype (see gemv_applies)")
    rows, k = x.shape
    n = weight.shape[0]
    rows_pad = 1 << (rows - 1).bit_length()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, tiles.block_n),)](
        x,
        weight,
        out if bias is None else bias,  # (not read without a bias)
        out,
        rows,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        ROWS_PAD=rows_pad,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        HAS_BIAS=bias is not None,
        REDUCE_EACH=rows_pad * tiles.block_n * tiles.block_k > _ACC_PER_THREAD * 32 * tiles.num_warps,
        num_warps=tiles.num_warps,
    )
    return out


__all__ = ["INTERPRETED", "MAX_ROWS", "GemvTiles", "gemv", "gemv_applies"]
