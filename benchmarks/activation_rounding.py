"""Which rounding of the activations could let float32 models multiply in int8: each scheme simulated on
the dense float32 default model, against the model unrounded.

    python benchmarks/activation_rounding.py [--tokens 256] [--greedy-tokens 128]

Issue 10's AVX2 row asks c=32 at 3x llama-server and offline at 5x transformers fp32, beyond what int16
products reach on that CPU kind (BENCHMARKS.md); int8 products (`vpmaddubsw`) would double the rate, but
llama.cpp's rounding (int8 per group of 32) fails hardware.py's gate (passes_int8_gate). This
asks whether any int8 scheme a kernel could run keeps the accuracy: each is applied to x before chosen
matmuls (`DenseLinear.__call__` wrapped) of the file's weights dequantized exactly, then compared with the
same model unrounded as `quantized_activations.py` does (KL divergence of teacher-forced next-token
distributions over its fixed text, 1-row steps; greedy tokens after the text's first 32):

- `int16` / `int8` per group of 32 (duoserve's rounding / llama.cpp's q8 blocks), and int8 per group of 16;
- int8 on one kind of matmul only (qkv, o, gate_up, down, lm_head), the rest unrounded: where the error
  comes from;
- int8 plus a second int8 pass on the residual of the groups whose largest value exceeds t times their
  mean magnitude (the share of groups flagged is printed: each costs a second product);
- int8 with values beyond t times their group's RMS kept in float32 (outliers as LLM.int8() keeps them).

A simulation: the kernels' int32 sums are exact, so rounding x and multiplying in float32 differs from them
only by float32's own rounding, far below these errors.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from quantized_activations import TEXT, Decoder, build, compare

from duoserve.hardware import passes_int8_gate
from duoserve.models.linear import DenseLinear
from duoserve.models.loader import load_model
from duoserve.tokenizer import load_tokenizer

GROUP = 32
KINDS = ("qkv", "o", "gate_up", "down", "lm_head")
PROMPT_TOKENS = 32


def _groups(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], -1, group)


def _round(g: torch.Tensor, bits: int) -> torch.Tensor:
    """Each group (last dim) to signed `bits`-bit codes on its largest magnitude, and back."""
    scale = g.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (g / scale).round() * scale


class Scheme:
    """A rounding of x (rows x features), and the share of groups or values it treated specially."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], tuple[torch.Tensor, float]]) -> None:
        self.name, self.fn, self.shares = name, fn, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rounded, share = self.fn(x)
        self.shares.append(share)
        return rounded


def plain(bits: int, group: int = GROUP) -> Callable:
    return lambda x: (_round(_groups(x, group), bits).reshape(x.shape), 0.0)


def residual(t: float) -> Callable:
    def fn(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        g = _groups(x, GROUP)
        first = _round(g, 8)
        flagged = g.abs().amax(-1, keepdim=True) > t * g.abs().mean(-1, keepdim=True)
        out = torch.where(flagged, first + _round(g - first, 8), first)
        return out.reshape(x.shape), flagged.float().mean().item()

    return fn


def outliers_float(t: float) -> Callable:
    def fn(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        g = _groups(x, GROUP)
        outlier = g.abs() > t * g.pow(2).mean(-1, keepdim=True).sqrt()
        rest = _round(torch.where(outlier, torch.zeros_like(g), g), 8)
        return torch.where(outlier, g, rest).reshape(x.shape), outlier.float().mean().item()

    return fn


def schemes() -> list[tuple[Scheme, tuple[str, ...]]]:
    """Each scheme with the kinds of matmul whose x it rounds, in the table's order."""
    return [
        (Scheme("int16", plain(16)), KINDS),
        (Scheme("int8", plain(8)), KINDS),
        *((Scheme(f"int8 on {kind} only", plain(8)), (kind,)) for kind in KINDS),
        (Scheme("int8, groups of 16", plain(8, 16)), KINDS),
        *((Scheme(f"int8 + residual pass where max > {t} x mean", residual(t)), KINDS) for t in (4, 6, 10)),
        (Scheme("int8, values > 4 x RMS kept float", outliers_float(4)), KINDS),
    ]


def run(loaded, tokens: list[int], greedy_tokens: int, scheme: Scheme | None, kinds: tuple[str, ...]):
    """Teacher-forced logits and greedy tokens of the dense float32 model with `scheme` on `kinds`."""
    max_tokens = max(len(tokens), PROMPT_TOKENS + greedy_tokens) + 1
    model = build(loaded, None, max_tokens)
    model.cpu_decode_layers = False  # the one-call C++ loop would bypass the wrapped matmuls
    targets = {id(model.lm_head)} if "lm_head" in kinds else set()
    for layer in model.layers:
        mlp = layer.mlp
        named = {"qkv": layer.qkv, "o": layer.o_proj, "gate_up": mlp.gate_up, "down": mlp.down_proj}
        targets |= {id(linear) for kind, linear in named.items() if kind in kinds}
    unwrapped = DenseLinear.__call__

    def call(self: DenseLinear, x: torch.Tensor) -> torch.Tensor:
        return unwrapped(self, scheme(x) if scheme is not None and id(self) in targets else x)

    DenseLinear.__call__ = call
    try:
        logits = Decoder(model, max_tokens).teacher_forced(tokens)
        greedy = Decoder(model, max_tokens).greedy(tokens[:PROMPT_TOKENS], greedy_tokens)
    finally:
        DenseLinear.__call__ = unwrapped
    return logits, greedy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=256, help="teacher-forced positions")
    parser.add_argument("--greedy-tokens", type=int, default=128)
    args = parser.parse_args()
    loaded = load_model(None)
    tokens = load_tokenizer(loaded.source, loaded.gguf_reader).encode(TEXT)[: args.tokens]
    reference, reference_greedy = run(loaded, tokens, args.greedy_tokens, None, ())
    print(f"teacher-forced over {len(tokens)} tokens; greedy {args.greedy_tokens} after {PROMPT_TOKENS}")
    columns = ("activations", "mean KLD", "p99 KLD", "top-1 agree", "max rel. logit err", "greedy identical")
    print("| " + " | ".join((*columns, "gate", "flagged")) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme, kinds in schemes():
        logits, greedy = run(loaded, tokens, args.greedy_tokens, scheme, kinds)
        r = compare(logits, reference)
        same = sum(a == b for a, b in zip(greedy, reference_greedy, strict=True))
        passed = passes_int8_gate(r["mean_kld"], r["p99_kld"], r["top1"], same == len(greedy))
        flagged = f"{sum(scheme.shares) / len(scheme.shares):.3f}" if any(scheme.shares) else "-"
        print(
            f"| {scheme.name} | {r['mean_kld']:.2e} | {r['p99_kld']:.2e} | {r['top1']:.3f} "
            f"| {r['max_rel']:.2e} "
            f"| {same}/{len(greedy)} | {'passes' if passed else 'fails'} | {flagged} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
