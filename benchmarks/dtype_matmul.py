"""Which dtype to default to on this CPU: fp32 vs bf16 (vs fp16) matmul speed at SmolLM2's shapes.

    python benchmarks/dtype_matmul.py

Prints GFLOP/s of F.linear for a decode-sized (1 and 32 rows) and a prefill-sized (512 rows) input
against each of the model's weight shapes. The engine's default dtype on CPU follows this table.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

# (out, in) of SmolLM2-135M's matmuls: fused QKV, o_proj, fused gate/up, down_proj.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
ROWS = [1, 32, 512]


def gflops(rows: int, out_features: int, in_features: int, dtype: torch.dtype, repeats: int = 20) -> float:
    x = torch.randn(rows, in_features).to(dtype)
    w = torch.randn(out_features, in_features).to(dtype)
    for _ in range(3):
        F.linear(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        F.linear(x, w)
    seconds = (time.perf_counter() - start) / repeats
    return 2 * rows * out_features * in_features / seconds / 1e9


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| rows | " + " | ".join(f"{o}x{i}" for o, i in SHAPES) + " | dtype |")
    print("|---" * (len(SHAPES) + 2) + "|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows in ROWS:
            cells = " | ".join(f"{gflops(rows, o, i, dtype):.0f}" for o, i in SHAPES)
            print(f"| {rows} | {cells} | {str(dtype).removeprefix('torch.')} |")


if __name__ == "__main__":
    main()
