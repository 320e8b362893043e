"""LoRA: output tokens/s of one batch with 0, 1 and 4 adapters in it, same prompts, one process.

    python benchmarks/lora.py --batch-size 32 --max-tokens 64 --rank 16

The default model (SmolLM2-135M-Instruct, its GGUF's 4-bit codes) or --model; random adapters of
--rank on all seven projections (q/k/v/o, gate/up/down), written as PEFT files to a temporary
directory. Each configuration runs the same B prompts at once (LLM.generate, greedy, ignore_eos):
0 adapters (the base model), 1 (every request on one adapter), 4 (requests spread over four, with
--max-loras 4). Configurations are interleaved and repeated (the fastest run counts), so the ratios
hold on a noisy machine better than the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

from duoserve.llm import LLM
from duoserve.lora.adapter import CONFIG_FILE, TARGET_SITES, WEIGHTS_FILE, target_shapes
from duoserve.lora.request import LoRARequest
from duoserve.sampling_params import SamplingParams


def write_adapter(directory: str, config, rank: int, seed: int) -> None:
    """A random PEFT adapter of every projection of every layer (B not zero: it changes the outputs)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for target, (in_features, out_features) in target_shapes(config).items():
            module = "self_attn" if TARGET_SITES[target] in ("qkv", "o") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{module}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.02
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE))
    peft = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGET_SITES)}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(peft, f)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads (default: the host's)")
    args = parser.parse_args()

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        enable_lora=True,
        max_loras=4,
        max_lora_rank=args.rank,
        num_threads=args.num_threads,
        enable_prefix_caching=False,  # every run prefills its prompts: runs compare like with like
    )
    config = llm.engine.core.model_config
    vocab = config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(100, vocab, (args.prompt_tokens,), generator=generator).tolist()
        for _ in range(args.batch_size)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as root:
        loras = []
        for index in range(4):
            directory = os.path.join(root, f"adapter{index}")
            write_adapter(directory, config, args.rank, seed=index)
            loras.append(LoRARequest(f"adapter{index}", index + 1, directory))
        configurations = {
            "0 adapters": [None] * args.batch_size,
            "1 adapter": [loras[0]] * args.batch_size,
            "4 adapters": [loras[i % 4] for i in range(args.batch_size)],
        }
        best = dict.fromkeys(configurations, float("inf"))
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up: kernels, first allocations
        for _ in range(args.repeats):
            for name, per_prompt in configurations.items():
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False, lora_request=per_prompt)
                best[name] = min(best[name], time.perf_counter() - start)
    tokens = args.batch_size * args.max_tokens
    base = tokens / best["0 adapters"]
    print(
        f"model {llm.engine.model_name}, dtype {llm.engine.config.resolved_dtype()}, rank {args.rank}, "
        f"batch {args.batch_size}, prompt {args.prompt_tokens}, output {args.max_tokens} tokens"
    )
    for name, seconds in best.items():
        rate = tokens / seconds
        print(f"{name:>11}: {rate:8.1f} output tok/s ({rate / base:.2f}x the base model)")


if __name__ == "__main__":
    main()
