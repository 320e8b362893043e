"""A tiny random model whose tokenizer can spell any text: byte-level BPE over 256 byte tokens and a few
merges of JSON's common pairs. The word-level tokenizer of tests/helpers.py has no `{` or `"`, so
structured outputs and tool calls are tested on this one. (The Hermes tags are spelled in bytes, not
added tokens: llguidance's forced-token mask offers an added token whose text a grammar forces, then
refuses it when consumed.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import tiny_hf_model

BYTE_VOCAB = 300
SPECIALS = ("<unk>", "<s>", "</s>")
EOS = 2
# Pairs merged into one token (in the GPT-2 byte alphabet: Ġ is a space), most useful first.
_MERGES = [
    ('"', ":"),
    ("{", '"'),
    ('"', ","),
    (",", '"'),
    ('"', "}"),
    ("Ġ", '"'),
    (":", "Ġ"),
    (",", "Ġ"),
    ("t", "r"),
    ("tr", "u"),
    ("tru", "e"),
    ("f", "a"),
    ("fa", "l"),
    ("fal", "s"),
    ("fals", "e"),
    ("n", "u"),
    ("nu", "l"),
    ("nul", "l"),
    ("[", '"'),
    ('"', "]"),
]
# The template shows the tools by name and description, and calls and tool results as Hermes does.
CHAT_TEMPLATE = (
    "{% if tools %}tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def _byte_alphabet() -> list[str]:
    from duoserve.tokenizer import _BYTE_TO_CHAR

    return [_BYTE_TO_CHAR[b] for b in range(256)]


def save_byte_tokenizer(directory: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for char in _byte_alphabet():
        vocab[char] = len(vocab)
    for a, b in _MERGES:
        vocab.setdefault(a + b, len(vocab))
    assert len(vocab) <= BYTE_VOCAB
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_MERGES))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def save_byte_model(directory: Path) -> str:
    """The tiny Llama of tests/helpers.py, with a longer context (byte-level prompts are long)."""
    model = tiny_hf_model("llama_gqa")
    model.config.max_position_embeddings = 1024
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    save_byte_tokenizer(directory)
    return str(directory)


def byte_prompt(seed: int, length: int = 12) -> str:
    """A random lowercase prompt, reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return "".join(chr(ord("a") + int(i)) for i in torch.randint(0, 26, (length,), generator=generator))
