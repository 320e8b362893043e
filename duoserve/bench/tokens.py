"""Sizing prompts in tokens: a real tokenizer.json when given, else a word-count estimate.

The load generator must build prompts of a requested token length for servers whose tokenizer it may
not have. Without one we build prompts from short, common English words, which byte-level BPE and
SentencePiece vocabularies both hold as single tokens, so "N words" is close to "N tokens". Output token
counts never depend on this: they come from the server's `usage` (or counted stream chunks).
"""

from __future__ import annotations

import os
import re
from typing import Protocol

import numpy as np

_WORD_TEXT = """
the of and to in is was for on that with as it by at from his her he she they we you are be this have not
but had which one all were when there can an their more if will so no out up about who been them than its
would what some time into has only new other could may two first any like over after also did most made
back people way where then year see very just many well day these good our make through long before must
much great work life old world down man own part place small still while same high last know under never
house hand night here end home water light name word air door city line book story eye dog cat car tree
sun sea sky red blue green black white big hot cold fast run walk read play open close take give find tell
ask help show try call keep let put set turn move live stop start land food head face road game king war
"""
# Short words that are one token in GPT-2/Llama/Qwen/SmolLM vocabularies when preceded by a space.
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))

_WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]")

# Without a tokenizer, token-id prompts draw from this id range: above the special/control tokens most
# vocabularies put first, and below 32000, the smallest vocabulary size in common use (Llama 2, Mistral).
FALLBACK_ID_RANGE = (1000, 30000)


class TokenCounter(Protocol):
    """What dataset generators need from a tokenizer."""

    def count(self, text: str) -> int: ...

    def fit_text(self, text: str, n_tokens: int) -> str: ...

    def random_ids(self, n: int, rng: np.random.Generator) -> list[int]: ...


class WordEstimator:
    """~1 token per word or punctuation mark: right for the generated prompts, close for English prose."""

    def count(self, text: str) -> int:
        return len(_WORD_OR_PUNCT.findall(text))

    def fit_text(self, text: str, n_tokens: int) -> str:
        pieces = _WORD_OR_PUNCT.findall(text)
        return " ".join(pieces[:n_tokens])

    def random_ids(self, n: int, rng: np.random.Generator) -> list[int]:
        low, high = FALLBACK_ID_RANGE
        return rng.integers(low, high, size=n).tolist()


class FileTokenizer:
    """A Hugging Face `tokenizer.json` (via the `tokenizers` package, imported only when used)."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - tokenizers is a duoserve dependency
            raise RuntimeError("--tokenizer needs the 'tokenizers' package") from e
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for missing or invalid files
            raise ValueError(f"cannot load tokenizer {path}: {e}") from e
        added = self._tok.get_added_tokens_decoder()
        # Special/added tokens would make a random id prompt end or restructure the sequence early.
        self._ids = np.array(
            [i for i in range(self._tok.get_vocab_size(with_added_tokens=False)) if i not in added]
        )

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def fit_text(self, text: str, n_tokens: int) -> str:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._tok.decode(ids[:n_tokens])

    def random_ids(self, n: int, rng: np.random.Generator) -> list[int]:
        return rng.choice(self._ids, size=n).tolist()


def make_counter(tokenizer_path: str | None) -> TokenCounter:
    return FileTokenizer(tokenizer_path) if tokenizer_path else WordEstimator()


def random_words(n: int, rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=max(n, 0)).tolist())


def random_text(n_tokens: int, counter: TokenCounter, rng: np.random.Generator) -> str:
    """Random words measuring about `n_tokens` tokens under `counter`.

    A real tokenizer merges or splits some words, so we top up or trim a few times; decoding then
    re-encoding a trimmed sequence can shift the count by a token, which is why this is not one pass.
    """
    text = random_words(n_tokens, rng)
    for _ in range(4):
        have = counter.count(text)
        if have == n_tokens:
            break
        if have > n_tokens:
            text = counter.fit_text(text, n_tokens)
        else:
            text = f"{text} {random_words(n_tokens - have, rng)}"
    return text
