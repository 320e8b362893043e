"""Resident memory of a loaded model against its file's size, the KV cache counted apart.

    python benchmarks/make_gguf.py /tmp/llama-1b-q4_k.gguf
    python benchmarks/memory.py /tmp/llama-1b-q4_k.gguf [--dtype auto|float32|bfloat16] [--prefill 512]

Builds the engine core (loader, model, KV cache; no tokenizer, so random GGUFs work) and reads the
process's resident memory (VmRSS in /proc/self/status) before loading and after. The KV cache's bytes
are subtracted (it is sized by flags, not by the model). `--prefill N` then runs one N-token prompt and
a few decode steps and reports the resident memory again: activations, and the scratch tiles large steps
dequantize into, are the only other growth. Linux only.
"""

from __future__ import annotations

import argparse
import os

import torch

from duoserve.config import EngineConfig
from duoserve.engine.core import EngineCore
from duoserve.models.loader import load_model
from duoserve.models.moe import MoE
from duoserve.sampling_params import SamplingParams


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def weight_bytes(core: EngineCore) -> int:
    """Bytes of every weight the model holds (codes and scales where quantized)."""
    model = core.model
    linears = [model.lm_head] + [linear for layer in model.layers for linear in layer.linears()]
    tensors = [model.norm.weight] + [t for layer in model.layers for t in layer.norms()]
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):  # routed experts are plain dense tensors
            tensors += [layer.mlp.router, layer.mlp.gate_up, layer.mlp.down]
    total = sum(linear.nbytes for linear in linears) + sum(t.numel() * t.element_size() for t in tensors)
    if not hasattr(model.embed, "weight"):  # lookups read the tied lm_head's codes (RowsOf): held once
        return total
    embed = getattr(model.embed.weight, "raw", model.embed.weight)  # a GGUFTensor's blocks, or dense
    shared = model.config.tie_word_embeddings and not hasattr(model.embed.weight, "raw")
    return total + (0 if shared else embed.numel() * embed.element_size())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--dtype", default="auto", help="auto: the host's default (duoserve env)")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--num-kv-blocks", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=0, help="then run one prompt of this many tokens")
    args = parser.parse_args()
    file_bytes = os.path.getsize(args.model)
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        num_kv_blocks=args.num_kv_blocks,
        device="cpu",
        max_num_batched_tokens=max(512, args.prefill),
    )
    before = rss_bytes()
    core = EngineCore(config, load_model(config.model, config.resolved_dtype()))
    after = rss_bytes()
    kv = core.kv_cache.data.numel() * core.kv_cache.data.element_size()
    mib = 2**20
    held = weight_bytes(core)
    grown = after - before - kv
    print(
        f"file {file_bytes / mib:.0f} MiB; dtype {args.dtype}, quantization {args.quantization}",
        f"weights held by the model: {held / mib:.0f} MiB ({held / file_bytes:.2f}x file)",
        f"RSS before load {before / mib:.0f} MiB (python + torch), after {after / mib:.0f} MiB",
        f"KV cache {kv / mib:.0f} MiB; load added {grown / mib:.0f} MiB more: {grown / file_bytes:.2f}x file",
        f"RSS after load minus KV cache {(after - kv) / mib:.0f} MiB: {(after - kv) / file_bytes:.2f}x file",
        sep="\n",
        flush=True,
    )
    if args.prefill:
        vocab = core.model_config.vocab_size
        prompt = [(i * 7919) % (vocab - 10) + 5 for i in range(args.prefill)]
        core.add_request("memory-probe", prompt, SamplingParams(max_tokens=4, ignore_eos=True), [])
        with torch.inference_mode():
            while core.has_unfinished():
                core.step()
        peak = (rss_bytes() - kv) / mib
        print(f"after a {args.prefill}-token prompt and 4 decode steps, minus KV cache: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
