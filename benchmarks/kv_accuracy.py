"""The quantized KV cache's accuracy gate: each --kv-cache-dtype against the model's own-dtype cache.

    python benchmarks/kv_accuracy.py                       # SmolLM2-135M (the default GGUF) and a tiny model
    python benchmarks/kv_accuracy.py --models tiny --generate 64

The model computes in float32 (so the reference is exact); quantized dtypes keep a float16 scale per
(token, KV head) row (duoserve/kv/quant.py). Teacher-forced over benchmarks/kv_accuracy.txt
(a text of our own): mean and p99 KL divergence of next-token distributions
and top-1 agreement; then 256 greedy tokens from the text's first 32 tokens, agreement = the fraction equal
to the reference's before the first that differs (duoserve/engine/kv_accuracy.py). The tiny model is the
tests' (tests/helpers.py, llama_gqa: 2 layers, 3 KV heads of 8), on pseudo-random token ids; its thresholds
are tests/engine/test_kv_accuracy.py's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.helpers

from duoserve.attention.selector import make_attention_backend  # noqa: E402
from duoserve.engine.kv_accuracy import measure  # noqa: E402
from duoserve.models.llama import LlamaModel  # noqa: E402
from duoserve.models.loader import default_model_path, load_model  # noqa: E402
from duoserve.tokenizer import load_tokenizer  # noqa: E402

DTYPES = ["bfloat16", "fp8_e4m3", "fp8_e5m2", "int8"]
TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kv_accuracy.txt")
PROMPT_TOKENS = 32


def build(path: str, backend: str, max_positions: int) -> LlamaModel:
    loaded = load_model(path, torch.float32)
    device = torch.device("cpu")
    attention = make_attention_backend(backend, device)
    return LlamaModel(loaded.config, loaded.weights, attention, device, torch.float32, max_positions)


def smollm2(args) -> tuple[LlamaModel, list[int]]:
    path = default_model_path()
    tokenizer = load_tokenizer(path)
    with open(TEXT, encoding="utf-8") as f:
        text_ids = tokenizer.encode(f.read())
    model = build(path, args.attention_backend, 2048)
    return model, text_ids


def tiny(args, directory: str) -> tuple[LlamaModel, list[int]]:
    from tests.helpers import random_prompt, save_tiny_model, tiny_hf_model

    path = save_tiny_model(tiny_hf_model("llama_gqa"), Path(directory))
    model = build(path, args.attention_backend, 1024)
    return model, random_prompt(255, seed=5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="smollm2,tiny", help="comma-separated: smollm2, tiny")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--generate", type=int, default=256, help="greedy tokens compared")
    parser.add_argument("--attention-backend", default="torch", help="torch (the reference), cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{'model':8} {'kv dtype':9} {'mean KLD':>10} {'p99 KLD':>10} {'top-1':>7} {'greedy':>7}  positions"
    )
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models.split(","):
            model, text_ids = smollm2(args) if name == "smollm2" else tiny(args, directory)
            prompt = text_ids[:PROMPT_TOKENS]
            for r in measure(model, text_ids, prompt, args.dtypes.split(","), args.generate):
                print(
                    f"{name:8} {r.kv_cache_dtype:9} {r.mean_kld:10.5f} {r.p99_kld:10.5f} "
                    f"{r.top1_agreement:7.3f} {r.greedy_agreement:7.3f}  {r.num_positions} "
                    f"(+{r.num_generated} generated)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
