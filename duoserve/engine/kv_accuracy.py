"""How much a quantized KV cache changes a model's outputs: the measurements of the accuracy gate.

Teacher-forced: a text's tokens run through the model as a serving engine would meet them: a first
token as a decode, then chunks that read every earlier key (their own too) from the paged pool. Once
with the reference cache (the model's dtype, float32 in the gate) and once per candidate KV dtype; per
position, KL(reference || candidate) of the next-token distributions, and whether both put the same token
first. Greedy: tokens generated from a prompt one decode step at a time with each cache; the agreement is
the fraction of them equal to the reference's before the first one that differs (llama.cpp reports KLD and
top-token agreement the same way for its KV types: q8_0 KV costs about 0.001 KLD).

benchmarks/kv_accuracy.py prints these for SmolLM2 and a tiny random model; tests/engine/test_kv_accuracy.py
holds the documented thresholds (`THRESHOLDS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duoserve.config import parse_kv_cache_dtype
from duoserve.engine.model_runner import SeqChunk, layout_batch
from duoserve.kv.cache import KVCache, KVCacheSpec

# Tokens per teacher-forced chunk after the first one (a decode): every chunk but the first reads the pool.
CHUNK = 32


@dataclass
class KVAccuracy:
    kv_cache_dtype: str
    mean_kld: float
    p99_kld: float
    top1_agreement: float  # teacher-forced: positions whose most likely next token is the reference's
    greedy_agreement: float  # generated tokens equal to the reference's before the first that is not
    num_positions: int
    num_generated: int


def kv_spec(model, dtype_name: str, block_size: int = 16) -> KVCacheSpec:
    """A cache spec of `model` in --kv-cache-dtype `dtype_name` (auto: the model's)."""
    dtype = model.dtype if dtype_name == "auto" else parse_kv_cache_dtype(dtype_name)
    return KVCacheSpec.for_model(model.config, block_size, dtype)


def _cache(spec: KVCacheSpec, num_tokens: int, device: torch.device) -> tuple[KVCache, list[int]]:
    num_blocks = -(-num_tokens // spec.block_size)
    return KVCache(spec, num_blocks, device), list(range(num_blocks))


@torch.inference_mode()
def teacher_forced_logprobs(
    model, token_ids: list[int], spec: KVCacheSpec, chunk: int = CHUNK
) -> torch.Tensor:
    """float32 log-probabilities [len(token_ids), vocab] of the token after each position."""
    cache, block_ids = _cache(spec, len(token_ids), model.device)
    rows, start = [], 0
    while start < len(token_ids):
        end = 1 if start == 0 else min(start + chunk, len(token_ids))
        layout = layout_batch(
            [SeqChunk(token_ids[start:end], start, block_ids)], spec.block_size, model.device
        )
        hidden = model.forward(layout.input_ids, layout.positions, cache, layout.meta)
        rows.append(torch.log_softmax(model.compute_logits(hidden), dim=-1))
        start = end
    return torch.cat(rows)


@torch.inference_mode()
def greedy_tokens(model, prompt: list[int], num_tokens: int, spec: KVCacheSpec) -> list[int]:
    """`num_tokens` greedy tokens after `prompt`: the prompt as one chunk, then one decode step a token."""
    cache, block_ids = _cache(spec, len(prompt) + num_tokens, model.device)
    chunk, out = SeqChunk(list(prompt), 0, block_ids), []
    while len(out) < num_tokens:
        layout = layout_batch([chunk], spec.block_size, model.device)
        hidden = model.forward(layout.input_ids, layout.positions, cache, layout.meta)
        out.append(int(model.compute_logits(hidden[-1:]).argmax(dim=-1)))
        chunk = SeqChunk([out[-1]], chunk.start + len(chunk.token_ids), block_ids)
    return out


def kl_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """KL(reference || candidate) per row, from log-probabilities [rows, vocab]."""
    return (reference.exp() * (reference - candidate)).sum(dim=-1).clamp_(min=0)


def measure(
    model,
    text_ids: list[int],
    prompt: list[int],
    dtype_names: list[str],
    num_generated: int = 256,
) -> list[KVAccuracy]:
    """Each KV dtype against the model's own (`auto`), over `text_ids` and `num_generated` greedy tokens."""
    reference_spec = kv_spec(model, "auto")
    reference = teacher_forced_logprobs(model, text_ids, reference_spec)
    reference_top = reference.argmax(dim=-1)
    reference_greedy = greedy_tokens(model, prompt, num_generated, reference_spec)
    results = []
    for name in dtype_names:
        spec = kv_spec(model, name)
        candidate = teacher_forced_logprobs(model, text_ids, spec)
        kld = kl_divergence(reference, candidate)
        generated = greedy_tokens(model, prompt, num_generated, spec)
        same = next(
            (i for i, (a, b) in enumerate(zip(generated, reference_greedy, strict=True)) if a != b),
            num_generated,
        )
        results.append(
            KVAccuracy(
                kv_cache_dtype=name,
                mean_kld=kld.mean().item(),
                p99_kld=torch.quantile(kld.double(), 0.99).item(),
                top1_agreement=(candidate.argmax(dim=-1) == reference_top).float().mean().item(),
                greedy_agreement=same / num_generated,
                num_positions=len(text_ids),
                num_generated=num_generated,
            )
        )
    return results
