"""Shared test helpers: tiny random Llama-family models saved as HF directories, a word-level tokenizer
for them, transformers references, and a recorder of the logits the engine computes at every position."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

# Word-level vocabulary of the tiny models: 3 specials, then "w3" ... "w{V-1}".
TINY_VOCAB = 300
UNK, BOS, EOS = 0, 1, 2
_SPECIALS = ("<unk>", "<s>", "</s>")


def word(token_id: int) -> str:
    return _SPECIALS[token_id] if token_id < len(_SPECIALS) else f"w{token_id}"


def save_word_tokenizer(directory: Path, vocab_size: int = TINY_VOCAB) -> None:
    """A `tokenizers` word-level tokenizer (one token per whitespace-separated word, decoded joined by
    spaces) plus the tokenizer_config.json naming its special tokens, as `Tokenizer.from_hf_dir` reads."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {word(i): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in _SPECIALS])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


# name -> (architecture, config overrides). Odd sizes on purpose: hidden 48, 3 KV heads, head_dim 8/12.
TINY_KINDS: dict[str, tuple[str, dict]] = {
    # GQA (6 query heads over 3 KV heads), untied head.
    "llama_gqa": ("llama", dict(num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False)),
    # MHA, tied embeddings, head_dim 12.
    "llama_mha_tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    # Qwen2: q/k/v biases, GQA 6/3, untied, its own RoPE base.
    "qwen2": (
        "qwen2",
        dict(num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False, rope_theta=1e6),
    ),
}


def tiny_hf_model(kind: str, seed: int = 0):
    """A random fp32 transformers model. Weights are drawn wider than the default init (std 0.3) so the
    logits spread out: greedy choices then have clear margins and do not collapse into a loop at once."""
    import transformers

    arch, overrides = TINY_KINDS[kind]
    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=48,
        intermediate_size=100,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    config_cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    config = config_cls(**common, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model.eval()


def save_tiny_model(model, directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    save_word_tokenizer(directory, model.config.vocab_size)
    return str(directory)


def random_prompt(length: int, seed: int, vocab_size: int = TINY_VOCAB) -> list[int]:
    """Token ids of ordinary words (no specials), reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(len(_SPECIALS), vocab_size, (length,), generator=generator).tolist()


# ---------------------------------------------------------------------------------------------------
# transformers references


@torch.no_grad()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """fp32 logits [len, vocab] of every position of one unpadded sequence."""
    return model(torch.tensor([token_ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None, **kwargs):
    """transformers' greedy continuation (new tokens only). eos_token_id None never stops early."""
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        **kwargs,
    )
    return out[0, len(prompt) :].tolist()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


# ---------------------------------------------------------------------------------------------------
# What the engine computes


@dataclass
class StepRecord:
    # (core request id, first position, number of tokens) of each scheduled chunk, in schedule order.
    chunks: list[tuple[str, int, int]]
    num_preempted: int
    num_free_blocks: int  # after the step's allocations
    tables: dict[str, list[int]]  # block table of every request holding blocks, after allocation


@dataclass
class EngineRecorder:
    """Hooks an EngineCore to keep the logits of every computed position, not only the sampled rows.

    Each scheduled token's row in the step is found through the slot it writes (unique within a
    step), so this does not depend on how the model runner lays the batch out.
    """

    core: object
    logits: dict[tuple[str, int], list[torch.Tensor]] = field(default_factory=dict)
    requests: dict[str, object] = field(default_factory=dict)  # core request id -> Request
    steps: list[StepRecord] = field(default_factory=list)
    # Inputs the host did not know yet when recorded (async scheduling feeds a step's token from the
    # device): (request, position, token id fed), checked once the request has that token.
    unchecked: list[tuple[object, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        core = self.core
        schedule, forward = core.scheduler.schedule, core.model.forward
        state = {}

        def recording_schedule():
            plan = schedule()
            state["plan"] = plan
            kv = core.kv
            self.steps.append(
                StepRecord(
                    chunks=[
                        (s.request.request_id, s.request.num_computed_tokens, s.num_new_tokens)
                        for s in plan.scheduled
                    ],
                    num_preempted=len(plan.preempted),
                    num_free_blocks=kv.pool.num_free_blocks,
                    tables={rid: list(t.block_ids) for rid, t in kv.tables.items()},
                )
            )
            return plan

        signature = inspect.signature(forward)

        def recording_forward(*args, **kwargs):
            hidden = forward(*args, **kwargs)
            named = signature.bind(*args, **kwargs).arguments
            meta = named["meta"]
            self._record(state["plan"], named["input_ids"], named["positions"], meta.slot_mapping, hidden)
            return hidden

        core.scheduler.schedule = recording_schedule
        core.model.forward = recording_forward

    def _record(self, plan, input_ids, positions, slot_mapping, hidden) -> None:
        logits = self.core.model.compute_logits(hidden)
        row_of_slot = {slot: row for row, slot in enumerate(slot_mapping.tolist())}
        assert len(row_of_slot) == len(slot_mapping), "two tokens of one step write the same slot"
        bs = self.core.kv.block_size
        for s in plan.scheduled:
            request = s.request
            self.requests[request.request_id] = request
            table = self.core.kv.block_ids(request.request_id)
            start = request.num_computed_tokens
            for p in range(start, start + s.num_new_tokens):
                row = row_of_slot[table[p // bs] * bs + p % bs]
                if p < request.num_tokens:
                    assert int(input_ids[row]) == request.all_token_ids[p]
                else:
                    self.unchecked.append((request, p, int(input_ids[row])))
                assert int(positions[row]) == p
                self.logits.setdefault((request.request_id, p), []).append(logits[row].clone())

    def max_rel_err_vs(self, hf_model) -> float:
        """Compare every recorded position with transformers on the request's final token sequence."""
        assert self.logits, "nothing was computed"
        for request, p, token_id in self.unchecked:
            assert request.all_token_ids[p] == token_id, f"position {p} was fed {token_id}"
        worst = 0.0
        for request_id, request in self.requests.items():
            ref = hf_logits(hf_model, request.all_token_ids)
            keys = [key for key in self.logits if key[0] == request_id]
            for _, p in keys:
                for ours in self.logits[(request_id, p)]:
                    worst = max(worst, rel_err(ours, ref[p]))
        return worst

    def positions_of(self, request_id: str) -> list[int]:
        return sorted(p for rid, p in self.logits if rid == request_id)


def wait_for(condition, timeout: float = 60.0, what: str = "condition", interval: float = 0.05):
    """Poll until `condition()` is truthy and return its value: a test waits for the state it needs.

    The timeout is a deadline, never a measure: reaching it fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(interval)


def run_compiled_triton(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a Python process at the repository root with Triton compiling, not interpreting (the kernels
    are defined that way at import, so it takes a process of its own), for a GPU target with the ptxas
    Triton's wheel carries: skips the test where this Triton has none."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )
