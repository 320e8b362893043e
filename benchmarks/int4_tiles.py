"""A bfloat16 model's 4-bit linear at 1-64 rows, each way it can run, on one matrix from memory.

    python benchmarks/int4_tiles.py [--out 16384] [--width 2048] [--rows 1 8 16 32 64] [--repeats 7]

Times (p10 / median ms over --repeats calls, after a warm-up): torch's int4 kernel on the codes
(`q4`); duoserve's fused kernel on the same codes (`fused`, int4pack.fused_matmul, where it builds for
this CPU); the many-rows path, dequantized tiles of --tile-values values + the dense GEMM on each, with
the tiles from duoserve's C++ op (`tiles`) and from the torch ops (`tiles/torch`); the dequantization
alone both ways; and the dense bfloat16 GEMM on a ready matrix (`dense`, what a
dense copy would cost).
The matrix (--out x --width, default 2048 x 16384 as hardware.measure_formats on a 32 MiB L3) is
larger than the cache, so its codes come from memory as a model's would.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from duoserve import int4pack


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    seconds.sort()
    return seconds[len(seconds) // 10] * 1e3, statistics.median(seconds) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=int, default=16384)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--tile-values", type=int, nargs="+", default=[int4pack.TILE_VALUES])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-torch-tiles", action="store_true", help="skip the torch ops' tiles")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out, width, block = args.out, args.width, int4pack.BLOCK
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (out, width), dtype=torch.int32, generator=generator)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    pairs = (torch.randn(width // 32, out, 2, generator=generator) * 0.01).bfloat16()
    dense = torch.randn(out, width, generator=generator).bfloat16()
    fast = int4pack.fast_dequantize_available()
    fused = int4pack.fused_matmul_available()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, block {block}, C++ op {fast}, "
        f"fused kernel {fused}"
    )

    def dequantize(values: int, torch_ops: bool) -> Callable[[], object]:
        step = int4pack.tile_rows(width, block, values)
        tile = torch.empty(step, width, dtype=torch.bfloat16)

        def run() -> None:
            for start in range(0, out, step):
                end = min(start + step, out)
                if torch_ops:
                    int4pack.dequantize_rows_torch(packed, pairs, start, end, tile[: end - start], block)
                else:
                    int4pack.dequantize_rows(packed, pairs, start, end, tile[: end - start], block)

        return run

    def tiles(x: torch.Tensor, values: int, torch_ops: bool) -> Callable[[], object]:
        step = int4pack.tile_rows(width, block, values)
        tile = torch.empty(step, width, dtype=torch.bfloat16)

        def run() -> torch.Tensor:
            y = torch.empty(x.shape[0], out, dtype=x.dtype)
            for start in range(0, out, step):
                end = min(start + step, out)
                part = tile[: end - start]
                if torch_ops:
                    int4pack.dequantize_rows_torch(packed, pairs, start, end, part, block)
                else:
                    int4pack.dequantize_rows(packed, pairs, start, end, part, block)
                y[:, start:end] = F.linear(x, part)
            return y

        return run

    with torch.inference_mode():
        for values in args.tile_values:
            rows_per_tile = int4pack.tile_rows(width, block, values)
            cell = timed(dequantize(values, False), args.repeats)
            print(f"dequantize, C++ op, tiles of {rows_per_tile} rows: {cell[0]:.2f} / {cell[1]:.2f}")
            if not args.skip_torch_tiles:
                cell = timed(dequantize(values, True), args.repeats)
                print(f"dequantize, torch ops, tiles of {rows_per_tile} rows: {cell[0]:.2f} / {cell[1]:.2f}")
        header = ["q4", "fused"] if fused else ["q4"]
        header.append("dense")
        header += [f"tiles {int4pack.tile_rows(width, block, v)}" for v in args.tile_values]
        if not args.skip_torch_tiles:
            header.append("tiles/torch")
        print("| rows | " + " | ".join(f"{h} ms p10 / median" for h in header) + " |")
        print("|---" * (len(header) + 1) + "|")
        for rows in args.rows:
            x = torch.randn(rows, width, generator=generator).bfloat16()
            runs = [lambda x=x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, pairs)]
            if fused:
                runs.append(lambda x=x: int4pack.fused_matmul(x, packed, pairs))
            runs.append(lambda x=x: F.linear(x, dense))
            runs += [tiles(x, v, False) for v in args.tile_values]
            if not args.skip_torch_tiles:
                runs.append(tiles(x, int4pack.TILE_VALUES, True))
            cells = [timed(run, args.repeats) for run in runs]
            print(f"| {rows} | " + " | ".join(f"{p10:.2f} / {median:.2f}" for p10, median in cells) + " |")


if __name__ == "__main__":
    main()
