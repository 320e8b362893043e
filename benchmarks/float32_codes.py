"""float32 models' 4-bit linears both ways at many row counts: duoserve's kernel on the GGUF codes
(models/csrc/quantized_matmul_cpu.cpp: the int16 GEMV at 1 row, the int16 GEMM from 2) against what runs
above the host's threshold (float32 tiles dequantized by q4_dequantize, then torch's float32 GEMM), on
SmolLM2-135M's four layer matrices (qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536) x 4 layers,
random codes, alternated, median of --reps.

    PYTHONPATH=. python benchmarks/float32_codes.py --rows 16 64 256 1024 3800

As an AVX2-only CPU (the row these kernels serve by default), on any x86 host:

    DUOSERVE_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        PYTHONPATH=. python benchmarks/float32_codes.py

hardware.py's first-start measurement (FLOAT32_ROWS) makes the same comparison on one 4096 x 2048 matrix.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from duoserve.cpu_kernels import cpu_kernels_available

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256, 1024, 3800])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if not cpu_kernels_available():
        raise SystemExit("duoserve's CPU kernels did not build")
    ops = torch.ops.duoserve_cpu
    gen = torch.Generator().manual_seed(0)
    mats = []
    for n, k in LAYER * args.layers:
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
        mats.append((codes, (torch.rand(n, 2, k // 32, generator=gen) * 0.02).half(), n, k))
    tiles = {(n, k): torch.empty(n, k) for _, _, n, k in mats}

    def dense(x: torch.Tensor, codes: torch.Tensor, scale_min: torch.Tensor, n: int, k: int) -> torch.Tensor:
        ops.q4_dequantize(codes, scale_min, 0, n, tiles[n, k])
        return torch.nn.functional.linear(x, tiles[n, k])

    def kernel(x: torch.Tensor, codes: torch.Tensor, scale_min: torch.Tensor, n: int, k: int) -> torch.Tensor:
        return ops.q4_matmul(x, codes, scale_min, 16)

    print(f"{torch.get_num_threads()} threads; SmolLM2 layer matrices x {args.layers}, ms per pass")
    print("| rows | float32 tiles + GEMM | int16 kernel | kernel / tiles |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for rows in args.rows:
            xs = {k: torch.randn(rows, k, generator=gen) for k in {k for _, k in LAYER}}
            times: dict[str, list[float]] = {"tiles": [], "kernel": []}
            for _ in range(args.reps):
                for name, run in (("tiles", dense), ("kernel", kernel)):
                    start = time.perf_counter()
                    for codes, scale_min, n, k in mats:
                        run(xs[k], codes, scale_min, n, k)
                    times[name].append(time.perf_counter() - start)
            a, b = (statistics.median(times[name]) * 1e3 for name in ("tiles", "kernel"))
            print(f"| {rows} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
