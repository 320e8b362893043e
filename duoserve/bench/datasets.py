"""Workload generators. Every dataset yields conversations; single-turn datasets yield one-turn ones.

A conversation is the unit the runner schedules: its turns run one after another because each turn's
request carries the earlier turns and the model's actual answers (see payload.py).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from duoserve.bench.tokens import TokenCounter, random_text

DATASETS = ("random", "sharegpt", "shared-prefix", "multi-turn")
PROMPT_FORMATS = ("text", "token-ids")

# ShareGPT filtering as vLLM does it, so results stay comparable: drop near-empty turns and pairs that
# would overflow a 2k context.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048
_HUMAN_ROLES = frozenset({"human", "user"})
_MODEL_ROLES = frozenset({"gpt", "assistant", "chatgpt", "model", "bard", "bing"})

Prompt = str | list[int]
Rng = np.random.Generator


@dataclass
class Turn:
    prompt: Prompt  # the user's text, or token ids for /v1/completions
    prompt_len: int  # tokens of `prompt` (estimated unless a tokenizer was given)
    output_len: int  # max_tokens to request


@dataclass
class Conversation:
    conv_id: int
    turns: list[Turn]
    system: Prompt | None = None  # a shared system prompt / prefix, sent before the first turn
    system_len: int = 0


@dataclass
class DatasetConfig:
    name: str = "random"
    num_prompts: int = 1000
    seed: int = 0
    dataset_path: str | None = None
    prompt_format: str = "text"
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    sharegpt_output_len: int | None = None
    prefix_num_prefixes: int = 10
    prefix_len: int = 256
    prefix_suffix_len: int = 256
    prefix_output_len: int = 128
    multi_turn_turns: int = 4


def sample_lengths(mean: int, range_ratio: float, n: int, rng: Rng) -> list[int]:
    """Uniform integers in [mean*(1-r), mean*(1+r)], as vLLM's --random-range-ratio; r=0 is fixed."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n).tolist()


def make_prompt(n_tokens: int, fmt: str, counter: TokenCounter, rng: Rng) -> tuple[Prompt, int]:
    """A fresh random prompt of about `n_tokens` tokens and its measured length."""
    if fmt == "token-ids":
        return counter.random_ids(n_tokens, rng), n_tokens
    text = random_text(n_tokens, counter, rng)
    return text, counter.count(text)


def random_dataset(cfg: DatasetConfig, counter: TokenCounter, rng: Rng) -> list[Conversation]:
    n = cfg.num_prompts
    in_lens = sample_lengths(cfg.random_input_len, cfg.random_range_ratio, n, rng)
    out_lens = sample_lengths(cfg.random_output_len, cfg.random_range_ratio, n, rng)
    convs = []
    for i, (in_len, out_len) in enumerate(zip(in_lens, out_lens, strict=True)):
        prompt, plen = make_prompt(in_len, cfg.prompt_format, counter, rng)
        convs.append(Conversation(i, [Turn(prompt, plen, out_len)]))
    return convs


def shared_prefix_dataset(cfg: DatasetConfig, counter: TokenCounter, rng: Rng) -> list[Conversation]:
    """`prefix_num_prefixes` system prompts, each reused by ~num_prompts/N requests with distinct questions.

    Requests are assigned to prefixes round-robin and then shuffled, so each prefix recurs throughout the
    run instead of in one block, which is what exercises a prefix cache under eviction pressure.
    """
    prefixes = [
        make_prompt(cfg.prefix_len, cfg.prompt_format, counter, rng) for _ in range(cfg.prefix_num_prefixes)
    ]
    order = rng.permutation(cfg.num_prompts)
    convs = []
    for i, slot in enumerate(order.tolist()):
        system, system_len = prefixes[slot % len(prefixes)]
        question, qlen = make_prompt(cfg.prefix_suffix_len, cfg.prompt_format, counter, rng)
        convs.append(Conversation(i, [Turn(question, qlen, cfg.prefix_output_len)], system, system_len))
    return convs


def multi_turn_dataset(cfg: DatasetConfig, counter: TokenCounter, rng: Rng) -> list[Conversation]:
    """`num_prompts` conversations of `multi_turn_turns` user turns, sized like the random dataset."""
    turns = cfg.multi_turn_turns
    if turns < 1:
        raise ValueError("--multi-turn-turns must be >= 1")
    convs = []
    for i in range(cfg.num_prompts):
        in_lens = sample_lengths(cfg.random_input_len, cfg.random_range_ratio, turns, rng)
        out_lens = sample_lengths(cfg.random_output_len, cfg.random_range_ratio, turns, rng)
        conv_turns = []
        for in_len, out_len in zip(in_lens, out_lens, strict=True):
            text, plen = make_prompt(in_len, "text", counter, rng)
            conv_turns.append(Turn(text, plen, out_len))
        convs.append(Conversation(i, conv_turns))
    return convs


def first_exchange(entry: dict) -> tuple[str, str] | None:
    """The first human message and the model reply that follows it, or None if there is none."""
    turns = entry.get("conversations") or entry.get("conversation") or []
    for i, turn in enumerate(turns[:-1]):
        nxt = turns[i + 1]
        if turn.get("from") in _HUMAN_ROLES and nxt.get("from") in _MODEL_ROLES:
            return str(turn.get("value", "")), str(nxt.get("value", ""))
    return None


def _sharegpt_pairs(cfg: DatasetConfig, counter: TokenCounter, rng: Rng) -> Iterator[Turn]:
    with open(cfg.dataset_path or "", encoding="utf-8") as f:
        entries = json.load(f)
    for idx in rng.permutation(len(entries)).tolist():
        pair = first_exchange(entries[idx])
        if pair is None:
            continue
        prompt_len = counter.count(pair[0])
        output_len = cfg.sharegpt_output_len or counter.count(pair[1])
        # A fixed --sharegpt-output-len replaces the reply, so the reply's own length no longer matters.
        short_reply = cfg.sharegpt_output_len is None and output_len < SHAREGPT_MIN_LEN
        too_short = prompt_len < SHAREGPT_MIN_LEN or short_reply
        too_long = prompt_len > SHAREGPT_MAX_PROMPT_LEN or prompt_len + output_len > SHAREGPT_MAX_TOTAL_LEN
        if not (too_short or too_long):
            yield Turn(pair[0], prompt_len, output_len)


def sharegpt_dataset(cfg: DatasetConfig, counter: TokenCounter, rng: Rng) -> list[Conversation]:
    """First human turn as prompt, the gpt reply's length as output length; shuffled with the seed."""
    if not cfg.dataset_path:
        raise ValueError("--dataset sharegpt needs --dataset-path FILE.json")
    picked: list[Turn] = []
    for turn in _sharegpt_pairs(cfg, counter, rng):
        picked.append(turn)
        if len(picked) == cfg.num_prompts:
            break
    if not picked:
        raise ValueError(f"no usable conversations in {cfg.dataset_path}")
    if len(picked) < cfg.num_prompts:
        warnings.warn(f"only {len(picked)} usable ShareGPT prompts; repeating them", stacklevel=2)
    return [Conversation(i, [picked[i % len(picked)]]) for i in range(cfg.num_prompts)]


def load_dataset(cfg: DatasetConfig, counter: TokenCounter) -> list[Conversation]:
    if cfg.prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {cfg.prompt_format!r}")
    if cfg.prompt_format == "token-ids" and cfg.name not in ("random", "shared-prefix"):
        raise ValueError("token-id prompts are only generated for the random and shared-prefix datasets")
    rng = np.random.default_rng(cfg.seed)
    builders = {
        "random": random_dataset,
        "sharegpt": sharegpt_dataset,
        "shared-prefix": shared_prefix_dataset,
        "multi-turn": multi_turn_dataset,
    }
    if cfg.name not in builders:
        raise ValueError(f"unknown dataset {cfg.name!r}; choose from {', '.join(DATASETS)}")
    return builders[cfg.name](cfg, counter, rng)
