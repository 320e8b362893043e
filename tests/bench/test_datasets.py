"""Workload generators and the request bodies built from them."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from duoserve.bench.datasets import DatasetConfig, first_exchange, load_dataset, sample_lengths
from duoserve.bench.payload import RequestOptions, build_body, chat_messages, completion_prompt
from duoserve.bench.tokens import FALLBACK_ID_RANGE, WORDS, FileTokenizer, WordEstimator, random_text

EST = WordEstimator()


def test_sample_lengths_range_and_validation() -> None:
    rng = np.random.default_rng(0)
    lens = sample_lengths(100, 0.25, 2000, rng)
    assert min(lens) == 75 and max(lens) == 125  # both ends reachable with 2000 draws
    assert sample_lengths(100, 0.0, 5, rng) == [100] * 5
    assert min(sample_lengths(1, 0.9, 50, rng)) >= 1
    with pytest.raises(ValueError):
        sample_lengths(100, 1.0, 1, rng)


def test_random_dataset_lengths_in_range_and_seeded() -> None:
    cfg = DatasetConfig(
        "random", num_prompts=50, random_input_len=40, random_output_len=20, random_range_ratio=0.5
    )
    convs = load_dataset(cfg, EST)
    assert len(convs) == 50 and all(len(c.turns) == 1 for c in convs)
    for c in convs:
        turn = c.turns[0]
        assert 20 <= turn.prompt_len <= 60
        assert turn.prompt_len == EST.count(turn.prompt)
        assert 10 <= turn.output_len <= 30
        assert set(turn.prompt.split()) <= set(WORDS)
    assert len({c.turns[0].prompt for c in convs}) == 50
    assert [c.turns[0].prompt for c in load_dataset(cfg, EST)] == [c.turns[0].prompt for c in convs]


def test_random_token_id_prompts_have_exact_lengths() -> None:
    cfg = DatasetConfig("random", num_prompts=5, random_input_len=64, prompt_format="token-ids")
    convs = load_dataset(cfg, EST)
    low, high = FALLBACK_ID_RANGE
    for c in convs:
        ids = c.turns[0].prompt
        assert isinstance(ids, list) and len(ids) == 64 == c.turns[0].prompt_len
        assert all(low <= i < high for i in ids)
    body = build_body(RequestOptions("m"), convs[0], 0, [])
    assert body["prompt"] == convs[0].turns[0].prompt
    with pytest.raises(ValueError):
        load_dataset(DatasetConfig("multi-turn", num_prompts=1, prompt_format="token-ids"), EST)


def _word_level_tokenizer(path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>"])
    out = str(path / "tokenizer.json")
    tok.save(out)
    return out


def test_file_tokenizer_sizes_prompts_exactly(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    tok = FileTokenizer(_word_level_tokenizer(tmp_path))
    rng = np.random.default_rng(1)
    text = random_text(33, tok, rng)
    assert tok.count(text) == 33
    assert tok.fit_text(text, 5) == " ".join(text.split()[:5])
    ids = tok.random_ids(500, rng)
    assert 1 not in ids and len(set(ids)) > 100  # special tokens excluded, the vocabulary used
    assert FileTokenizer(str(tmp_path)).count("the cat") == 2  # a directory holding tokenizer.json
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        FileTokenizer(str(tmp_path / "missing.json"))


def test_shared_prefix_reuses_each_prefix_with_distinct_questions() -> None:
    cfg = DatasetConfig(
        "shared-prefix",
        num_prompts=40,
        prefix_num_prefixes=4,
        prefix_len=30,
        prefix_suffix_len=8,
        prefix_output_len=5,
    )
    convs = load_dataset(cfg, EST)
    uses = collections.Counter(c.system for c in convs)
    assert len(uses) == 4 and set(uses.values()) == {10}
    assert len({c.turns[0].prompt for c in convs}) == 40
    assert all(
        c.system_len == 30 and c.turns[0].prompt_len == 8 and c.turns[0].output_len == 5 for c in convs
    )
    # Shuffled: the first 10 requests do not all share one prefix.
    assert len({c.system for c in convs[:10]}) > 1
    chat = chat_messages(convs[0], 0, [])
    assert chat == [
        {"role": "system", "content": convs[0].system},
        {"role": "user", "content": convs[0].turns[0].prompt},
    ]
    prompt = completion_prompt(convs[0], 0, [])
    assert prompt.startswith(convs[0].system) and prompt.endswith(convs[0].turns[0].prompt)


def test_shared_prefix_token_ids_prepend_the_prefix() -> None:
    cfg = DatasetConfig(
        "shared-prefix", num_prompts=4, prefix_num_prefixes=2, prefix_len=6, prefix_suffix_len=3
    )
    conv = load_dataset(DatasetConfig(**{**cfg.__dict__, "prompt_format": "token-ids"}), EST)[0]
    assert completion_prompt(conv, 0, []) == [*conv.system, *conv.turns[0].prompt]


def test_multi_turn_requests_carry_previous_turns_and_answers() -> None:
    cfg = DatasetConfig(
        "multi-turn", num_prompts=3, multi_turn_turns=3, random_input_len=6, random_output_len=4
    )
    convs = load_dataset(cfg, EST)
    assert len(convs) == 3 and all(len(c.turns) == 3 for c in convs)
    conv = convs[0]
    u = [t.prompt for t in conv.turns]
    answers = ["A0", "A1"]
    assert chat_messages(conv, 2, answers) == [
        {"role": "user", "content": u[0]},
        {"role": "assistant", "content": "A0"},
        {"role": "user", "content": u[1]},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": u[2]},
    ]
    # Completion prompts grow by appending: turn k's prompt starts with turn k-1's prompt plus its answer.
    p1, p2 = completion_prompt(conv, 1, answers), completion_prompt(conv, 2, answers)
    assert p2.startswith(p1 + "A1")
    assert completion_prompt(conv, 0, []) == u[0]
    body = build_body(RequestOptions("m", "/v1/chat/completions", ignore_eos=True), conv, 1, answers)
    assert body["max_tokens"] == conv.turns[1].output_len and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True} and "prompt" not in body


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": who, "value": text} for who, text in pairs]


def _sharegpt_file(path: Path) -> str:
    entries = [
        {"id": "ok", "conversations": _turns(("human", "tell me about cats please"), ("gpt", "word " * 30))},
        {
            "id": "gpt-first",
            "conversations": _turns(
                ("gpt", "hello there"), ("human", "one two three four five"), ("gpt", "a b c d e f")
            ),
        },
        {"id": "too-short", "conversations": _turns(("human", "hi"), ("gpt", "hello to you too"))},
        {"id": "no-reply", "conversations": _turns(("human", "is anyone there at all"))},
        {"id": "empty", "conversations": []},
    ]
    out = path / "sharegpt.json"
    out.write_text(json.dumps(entries))
    return str(out)


def test_sharegpt_takes_first_human_turn_and_reply_length(tmp_path: Path) -> None:
    path = _sharegpt_file(tmp_path)
    assert first_exchange(
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    ) == ("q", "a")
    convs = load_dataset(DatasetConfig("sharegpt", num_prompts=2, dataset_path=path), EST)
    got = sorted((c.turns[0].prompt, c.turns[0].prompt_len, c.turns[0].output_len) for c in convs)
    assert got == [("one two three four five", 5, 6), ("tell me about cats please", 5, 30)]
    fixed = load_dataset(
        DatasetConfig("sharegpt", num_prompts=2, dataset_path=path, sharegpt_output_len=3), EST
    )
    assert {c.turns[0].output_len for c in fixed} == {3}
    with pytest.warns(UserWarning, match="repeating"):
        many = load_dataset(DatasetConfig("sharegpt", num_prompts=5, dataset_path=path), EST)
    assert len(many) == 5 and len({c.turns[0].prompt for c in many}) == 2
    with pytest.raises(ValueError):
        load_dataset(DatasetConfig("sharegpt", num_prompts=1), EST)
