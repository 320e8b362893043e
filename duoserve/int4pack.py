"""torch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`): recognising it, dequantizing rows
of it into the tiles that a bfloat16 model's 4-bit linears (models/linear.py) multiply by many rows, and
multiplying bfloat16 rows by it in place (`fused_matmul`, AVX512-BF16 hosts: at 1-64 rows 1.75-2.7x faster
than torch's int4 kernel or the tiles on a Zen 5, hardware.py).

Its own module, not models/linear.py's, because the host measurement (hardware.py) times the tiles as
the engine makes them, and the models package may not be imported from there (tests/test_layering.py).

The tiles come from a C++ op where the CPU kernels build (models/csrc/int4pack_dequantize_cpu.cpp, one
pass, AVX-512 / AVX2), from torch ops otherwise; both give the same values, bit for bit. The torch ops
(unpack, convert, addcmul through a float32 scratch, round) made a 32-row SmolLM2 decode step spend
most of its time dequantizing (Zen 5, 2 cores: 138 ms a step, against ~64 ms with a dense copy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

GROUP_SIZE = 32  # values per torch int4 group (one scale and zero each): GGUF's Q4 blocks and sub-blocks
ZERO_CODE = 8  # torch's int4 kernels dequantize as (code - 8) * scale + zero

# Values per dequantized tile (4 MiB in bfloat16): large enough for the GEMM to run at full speed on
# hundreds of output rows, small enough to stay in cache between dequantizing and use. 2 M rather than 1 M
# puts SmolLM2's gate_up (3072 x 576) in one tile, whose product is then the output, not copied into it:
# prompt tokens/s +2-4% (4 alternations on a Zen 5, BENCHMARKS.md).
TILE_VALUES = 1 << 21


def tile_rows(cols: int, align: int, values: int = TILE_VALUES) -> int:
    """Output rows per tile of `values` values (a multiple of `align`, at least one)."""
    return max(align, values // cols // align * align)


def unpack(packed: torch.Tensor, start: int, end: int, cols: int, block: int) -> torch.Tensor:
    """uint8 codes [end - start, cols] of rows start:end (block-aligned) of torch's int4 layout.

    `_convert_weight_to_int4pack_for_cpu` stores [out, in] codes as blocks of B output rows (B = 64 with
    AVX-512, 32 with AVX2), each [in, B/2] bytes whose low nibbles are the block's first B/2 rows and
    high nibbles the last B/2.
    """
    blocks = packed.view(-1, cols, block // 2)[start // block : end // block]
    out = torch.empty(blocks.shape[0], block, cols, dtype=torch.uint8, device=packed.device)
    half = block // 2
    torch.bitwise_and(blocks.transpose(1, 2), 0x0F, out=out[:, :half])
    torch.bitwise_right_shift(blocks.transpose(1, 2), 4, out=out[:, half:])
    return out.view(-1, cols)


def pack_rows() -> int | None:
    """Rows per block of torch's CPU int4 layout, found by packing a known matrix (None: unrecognised).
    The layout is the kernel's private business, so it is checked, not assumed."""
    rows, cols = 128, 64
    codes = torch.arange(rows * cols, dtype=torch.int32).view(rows, cols) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for block in (64, 32):
        if torch.equal(unpack(packed, 0, rows, cols, block).int(), codes):
            return block
    return None


BLOCK = pack_rows()


@functools.cache
def fast_dequantize_available() -> bool:
    """Whether duoserve's C++ op is there (it builds with the CPU kernels, cpu_kernels.py)."""
    from duoserve.cpu_kernels import cpu_kernels_available

    return cpu_kernels_available() and hasattr(torch.ops.duoserve_cpu, "int4pack_dequantize")


@functools.cache
def fused_matmul_available() -> bool:
    """Whether duoserve's fused op (models/csrc/int4pack_mm_cpu.cpp: bfloat16 x times the codes, no
    tile) runs here: built for an AVX512-BF16 + VBMI CPU, on torch's AVX-512 layout (blocks of 64)."""
    from duoserve.cpu_kernels import cpu_kernels_available

    if BLOCK != FUSED_BLOCK or not cpu_kernels_available():
        return False
    return bool(torch.ops.duoserve_cpu.int4pack_mm_available())


FUSED_BLOCK = 64  # the layout the fused op reads: torch's on AVX-512 hosts


def fused_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, amx_min_rows: int | None = None
) -> torch.Tensor:
    """x [M, K] (bfloat16, contiguous) @ W.T for the [N, K] int4-packed W, read in place: y [M, N].

    Per group of 32 columns, scale * sum(x * (q - 8)) + zero * sum(x) in float32, rounded once to
    bfloat16: no weight is rounded (the tiles round each to bfloat16 before the GEMM). Needs
    fused_matmul_available() and N a multiple of 64. On AMX hosts steps of `amx_min_rows` rows or more
    (None: the kernel's own threshold, cpu_kernels.fused_amx_rows) sum on AMX tiles: tests pin a path."""
    return torch.ops.duoserve_cpu.int4pack_mm(x, packed, scales_and_zeros, amx_min_rows)


def dequantize_rows(
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    start: int,
    end: int,
    out: torch.Tensor,
    block: int | None = BLOCK,
    float32_scratch: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
) -> None:
    """Rows start:end (whole blocks) of the [N, K] int4-packed matrix, as (q - 8) * scale + zero, into
    `out` [end - start, K] (bfloat16 or float32); scales_and_zeros [K / 32, N, 2].

    Computed in float32 (exact but for the sum) and rounded once: rounding the product and the sum in
    bfloat16 each quadrupled the weight error (SmolLM2's Q4_1: 0.55% against dense bfloat16's 0.14%;
    0.24% this way, the rest being the kernel's bfloat16 scales and zeros). `float32_scratch(shape)`:
    where the torch ops path keeps its float32 values (default: a new tensor).
    """
    if block is None:
        raise ValueError("torch's int4 layout was not recognised on this host")
    fast = out.dtype in (torch.bfloat16, torch.float32) and scales_and_zeros.dtype == torch.bfloat16
    if fast and out.device.type == "cpu" and out.is_contiguous() and fast_dequantize_available():
        torch.ops.duoserve_cpu.int4pack_dequantize(packed, scales_and_zeros, start, end, block, out)
        return
    dequantize_rows_torch(packed, scales_and_zeros, start, end, out, block, float32_scratch)


def dequantize_rows_torch(
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    start: int,
    end: int,
    out: torch.Tensor,
    block: int,
    float32_scratch: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
) -> None:
    """dequantize_rows with torch ops: where the C++ op is unavailable, and its reference in tests."""
    rows, cols = end - start, out.shape[1]
    codes = unpack(packed, start, end, cols, block)
    pairs = scales_and_zeros[:, start:end].transpose(0, 1).float()  # [rows, groups, 2]
    scales, zeros = pairs[..., 0:1], pairs[..., 1:2]
    exact = out
    if out.dtype != torch.float32:
        shape = tuple(out.shape)
        exact = float32_scratch(shape) if float32_scratch else torch.empty(shape, device=out.device)
    groups = exact.view(rows, -1, GROUP_SIZE)
    groups.copy_(codes.view(rows, -1, GROUP_SIZE))
    torch.addcmul(zeros - ZERO_CODE * scales, groups, scales, out=groups)
    if exact is not out:
        out.copy_(exact)
