"""Every matmul of one SmolLM2 forward pass, per weight format, at decode and prefill sizes.

    python benchmarks/linear_kernels.py [--rows 1 4 8 16 64 512] [--threads N]

Builds the model's linears from the default GGUF three ways: float32 dense, bfloat16 dense, and
bfloat16 with the file's Q4_1 / Q8_0 codes (what `--dtype bfloat16 --quantization auto` runs), then
times one pass of all of them (30 layers x QKV, o_proj, gate/up, down, plus lm_head) on `rows` input rows.
Unlike a single small matmul, the weights (0.1-0.5 GB) do not fit in cache, as in a real decode step.
"""

from __future__ import annotations

import argparse
import time

import torch

from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.models.linear import QUANTIZED_MAX_ROWS
from duoserve.models.llama import LlamaModel
from duoserve.models.loader import load_model


def linears(model: LlamaModel) -> list:
    out = [model.lm_head]
    for layer in model.layers:
        out += layer.linears()
    return out


def pass_ms(model: LlamaModel, rows: int, repeats: int) -> float:
    inputs = {}
    for linear in linears(model):
        width = linear.in_features
        inputs.setdefault(width, torch.randn(rows, width).to(model.dtype))
    for _ in range(2):
        for linear in linears(model):
            linear(inputs[linear.in_features])
    start = time.perf_counter()
    for _ in range(repeats):
        for linear in linears(model):
            linear(inputs[linear.in_features])
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 64, 512])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(None, torch.float32)
    variants = {
        "float32 dense": (torch.float32, None),
        "bfloat16 dense": (torch.bfloat16, None),
        "bfloat16 + Q4_1/Q8_0 codes": (torch.bfloat16, loaded.quantized),
    }
    models = {
        name: LlamaModel(
            loaded.config, loaded.weights, TorchAttentionBackend(), torch.device("cpu"), dtype, 16, quantized
        )
        for name, (dtype, quantized) in variants.items()
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"codes used up to {QUANTIZED_MAX_ROWS} rows"
    )
    print("| rows | " + " | ".join(f"{name} ms" for name in models) + " |")
    print("|---" * (len(models) + 1) + "|")
    for rows in args.rows:
        cells = " | ".join(f"{pass_ms(model, rows, args.repeats):.1f}" for model in models.values())
        print(f"| {rows} | {cells} |")


if __name__ == "__main__":
    main()
