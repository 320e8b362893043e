"""Write a random Llama-shaped GGUF of a chosen quantization type (no tokenizer: for memory and speed runs).

    python benchmarks/make_gguf.py /tmp/llama-1b-q4_k.gguf [--shape llama-1b] [--type Q4_K] [--mix q4_k_m]

Weights are random blocks of the type (gguf_quants.random_blocks: random codes and sub-scales, fp16 scales
keeping values in about +-0.05), norms are float32 ones: the file has the size and layout of a real model
of that shape and type, which is what load time, resident memory and kernel speed depend on. `--mix q4_k_m`
stores output.weight and some layers' attn_v / ffn_down in Q6_K, as llama.cpp's Q4_K_M does (its
use_more_bits rule: the first and last eighth of the layers, and every third one in between).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import gguf
import torch

from duoserve.models.gguf_quants import BLOCK_LAYOUT, random_blocks


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False


SHAPES = {
    # Llama 3.2 1B's body (16 layers, GQA 32/8, 8192 FFN) with Llama 2's 32000-token vocabulary.
    "llama-1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000),
    # SmolLM2-135M: hidden 576 is not a multiple of 256, so only the 32-value block types fit it.
    "smollm2-135m": Shape(
        hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True
    ),
}


def tensor_types(shape: Shape, type_name: str, mix: str | None) -> dict[str, tuple[str, tuple[int, int]]]:
    """GGUF tensor name -> (type, (rows, cols)) for every matrix."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    out = {"token_embd.weight": (type_name, (shape.vocab, shape.hidden))}
    if not shape.tied:
        out["output.weight"] = ("Q6_K" if mix == "q4_k_m" else type_name, (shape.vocab, shape.hidden))
    for i in range(shape.layers):
        more_bits = i < shape.layers // 8 or i >= 7 * shape.layers // 8 or (i - shape.layers // 8) % 3 == 2
        wide = "Q6_K" if mix == "q4_k_m" and more_bits else type_name
        p = f"blk.{i}."
        out[p + "attn_q.weight"] = (type_name, (shape.hidden, shape.hidden))
        out[p + "attn_k.weight"] = (type_name, (kv, shape.hidden))
        out[p + "attn_v.weight"] = (wide, (kv, shape.hidden))
        out[p + "attn_output.weight"] = (type_name, (shape.hidden, shape.hidden))
        out[p + "ffn_gate.weight"] = (type_name, (shape.intermediate, shape.hidden))
        out[p + "ffn_up.weight"] = (type_name, (shape.intermediate, shape.hidden))
        out[p + "ffn_down.weight"] = (wide, (shape.hidden, shape.intermediate))
    for name, (kind, (_, cols)) in out.items():
        if cols % BLOCK_LAYOUT[kind][0]:
            raise ValueError(
                f"{name}: rows of {cols} values do not fit {kind}'s {BLOCK_LAYOUT[kind][0]}-value blocks"
            )
    return out


def write(path: str, shape: Shape, type_name: str, mix: str | None = None, seed: int = 0) -> int:
    """Write the file; returns its size in bytes."""
    types = tensor_types(shape, type_name, mix)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"random {type_name}{' ' + mix if mix else ''}")
    writer.add_block_count(shape.layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_vocab_size(shape.vocab)
    generator = torch.Generator().manual_seed(seed)
    for name, (kind, (rows, cols)) in types.items():
        raw = random_blocks(kind, rows, cols, generator, scale=0.05)
        writer.add_tensor(name, raw.numpy(), raw_dtype=gguf.GGMLQuantizationType[kind])
    norms = ["output_norm.weight"]
    norms += [f"blk.{i}.{n}.weight" for i in range(shape.layers) for n in ("attn_norm", "ffn_norm")]
    for name in norms:
        writer.add_tensor(name, torch.ones(shape.hidden).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.path.getsize(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--type", default="Q4_K", choices=sorted(BLOCK_LAYOUT), help="type of every matrix")
    parser.add_argument("--mix", choices=["q4_k_m"], default=None, help="llama.cpp's Q6_K exceptions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = write(args.path, SHAPES[args.shape], args.type, args.mix, args.seed)
    mix = f", {args.mix}" if args.mix else ""
    print(f"{args.path}: {size / 2**20:.1f} MiB ({args.shape}, {args.type}{mix})")


if __name__ == "__main__":
    main()
