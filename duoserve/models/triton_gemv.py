"""A Triton matrix-vector product for steps of a few rows (GPU decode at small batch): y = x W^T + b.

Why (measured on an H200, 2026-12-04, BENCHMARKS.md): at batch 1 a Llama 3.2 1B-shaped decode step spent
0.81 ms in cuBLAS's matmuls against 0.59 ms for its 2.47 GB of weights at the copy bandwidth. lm_head and
gate_up ran near it, but the 8-13 MB q/k/v and o projections and the down projection well below: too few
thread blocks to keep the memory busy. Here each program reads BLOCK_N whole weight rows (contiguous along
K) once for all of the step's rows, in BLOCK_K slices, accumulating in float32.

Where it wins (benchmarks/triton_gemv_sweep.py on the H200, 2026-12-04, each launch in a CUDA graph and each
reading its weight from HBM, as in a model's step): at one row q/k/v 5.63 us against cuBLAS's 6.24, o 4.91
against 6.25, down 11.72 against 13.91 (cuBLAS's split-K and its reduction kernel); gate_up (16384 outputs)
stays faster in cuBLAS (18.45 against 19.11), as does lm_head; at two rows o and down win, q/k/v is even
(6.72 against 6.63); from 4 rows on cuBLAS wins every shape (its tiles reuse each weight across rows; ours
multiply on the CUDA cores). Splitting the inputs over programs lost at every shape (a version with the
last split of a block summing the partials, swept the same day: +1.5-2 us of partial store, ticket and sum;
not kept). So `gemv_chosen` takes 1-2 rows of weights of at most 8192 outputs,
with `tiles_for`'s tiles (4 rows, 1024 inputs, 4 warps: the fastest at every shape). In a whole graph-
replayed decode step of that model at batch 1 it took 7% off (1.264 -> 1.173 ms), so it is on by default
on CUDA (`LlamaModel.triton_gemv`). (An earlier sweep re-read one weight, which the 60 MB L2 held: its
winners lost 2% in the whole step.)
Under TRITON_INTERPRET=1 it runs on CPU tensors, for tests (tests/models/test_triton_gemv.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
MAX_ROWS = 8  # the largest step it computes; more rows reuse each weight enough for cuBLAS's tiles
CHOSEN_ROWS = 2  # the largest step where it beat cuBLAS (H200, module docstring)
CHOSEN_OUTPUTS = 8192  # and the widest weight (gate_up's 16384 outputs and lm_head's ran faster in cuBLAS)
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


def gemv_chosen(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a model's projection should run here rather than in torch's matmul: where it applies and
    beat cuBLAS (the module docstring's measurements)."""
    return x.shape[0] <= CHOSEN_ROWS and weight.shape[0] <= CHOSEN_OUTPUTS and gemv_applies(x, weight)


def tiles_for(n: int, k: int) -> GemvTiles:
    """The sweep's fastest tiles at one row for every Llama 1B projection (module docstring): 4 weight rows
    a program (512 programs for 2048 outputs), 1024 inputs a slice, 4 warps. (n, k: the shape, for a table
    per shape where one is measured to differ.)"""
    return GemvTiles(block_n=4, block_k=1024, num_warps=4)


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tiles: GemvTiles | None = None
) -> torch.Tensor:
    """x [rows, k] @ weight [n, k]^T (+ bias [n]) in x's dtype, accumulated in float32 (see gemv_applies);
    tiles: `tiles_for` the shape where None."""
    if not gemv_applies(x, weight):
        raise ValueError(f"gemv takes 1..{MAX_ROWS} rows of a matching float dtype (see gemv_applies)")
    rows, k = x.shape
    n = weight.shape[0]
    tiles = tiles_for(n, k) if tiles is None else tiles
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


__all__ = [
    "CHOSEN_ROWS",
    "INTERPRETED",
    "MAX_ROWS",
    "GemvTiles",
    "gemv",
    "gemv_applies",
    "gemv_chosen",
    "tiles_for",
]
