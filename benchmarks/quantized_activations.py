"""The 4-bit codes with float32 vs bfloat16 activations, against both dense formats, on every matmul of a
SmolLM2 forward (as `linear_kernels.py`), with the codes used at every row count to show the crossover.

    python benchmarks/quantized_activations.py [--rows 1 4 8 16 64 512] [--threads N] [--fp32-code-rows 8]

torch's `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm` accept float32 activations too; this says
what they cost there, which decides whether an AVX2-only CPU (float32 by default, duoserve/hardware.py)
should run its decode steps on the codes. Codes with float32 activations are timed up to
--fp32-code-rows only (they are 10-20x slower). One pass per cell after a warm-up, in ms.
"""

from __future__ import annotations

import argparse
import time

import torch

from duoserve.models.linear import DenseLinear, make_linear
from duoserve.models.loader import load_model

_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_NAMES += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build(loaded, dtype: torch.dtype, codes: bool) -> list[DenseLinear]:
    """One linear per weight matrix (unfused), the codes' kernels run at every row count where `codes`."""
    names = ["model.embed_tokens.weight" if loaded.config.tie_word_embeddings else "lm_head.weight"]
    for i in range(loaded.config.num_hidden_layers):
        names += [f"model.layers.{i}.{n}.weight" for n in _NAMES]
    cpu = torch.device("cpu")
    return [
        make_linear([loaded.weights[n]], None, dtype, cpu, quantized=codes, max_rows=1 << 30) for n in names
    ]


def pass_ms(linears: list[DenseLinear], rows: int, dtype: torch.dtype, repeats: int) -> float:
    inputs = {w: torch.randn(rows, w).to(dtype) for w in {lin.in_features for lin in linears}}

    def once() -> None:
        for linear in linears:
            linear(inputs[linear.in_features])

    once()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 64, 512])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp32-code-rows", type=int, default=8, help="time fp32-activation codes up to this")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(None, torch.float32)
    variants = {
        "float32 dense": (torch.float32, False),
        "bfloat16 dense": (torch.bfloat16, False),
        "codes, float32 activations": (torch.float32, True),
        "codes, bfloat16 activations": (torch.bfloat16, True),
    }
    models = {name: (dtype, build(loaded, dtype, codes)) for name, (dtype, codes) in variants.items()}
    isa = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {isa}")
    print("| rows | " + " | ".join(f"{name} ms" for name in models) + " |")
    print("|---" * (len(models) + 1) + "|")
    for rows in args.rows:
        cells = []
        for name, (dtype, linears) in models.items():
            if name == "codes, float32 activations" and rows > args.fp32_code_rows:
                cells.append("-")
                continue
            cells.append(f"{pass_ms(linears, rows, dtype, args.repeats if rows <= 64 else 1):.1f}")
        print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
