import dataclasses

import pytest

from duoserve.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None and p.logprobs is None and p.prompt_logprobs is None
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.max_tokens, p.min_tokens) == (16, 0)
    assert not p.ignore_eos and p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", 1.5),
        ("n", True),
        ("temperature", -0.1),
        ("temperature", "0.7"),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_k", False),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 3),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", None),
        ("max_tokens", 0),
        ("max_tokens", "16"),
        ("min_tokens", -1),
        ("min_tokens", 17),  # > max_tokens=16
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("logprobs", True),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", MAX_LOGPROBS + 1),
        ("seed", 1.0),
        ("seed", "42"),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", 5),
        ("stop", ["ok", 5]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", 7),
        ("ignore_eos", 1),
        ("skip_special_tokens", None),
    ],
)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0},
        {"top_p": 1},
        {"top_k": 1},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"max_tokens": None, "min_tokens": 10_000},
        {"min_tokens": 16},
        {"logprobs": 0, "prompt_logprobs": MAX_LOGPROBS},
        {"seed": 0},
        {"seed": -1},
    ],
)
def test_valid_edge_values(kwargs):
    SamplingParams(**kwargs)


def test_normalisations():
    p = SamplingParams(stop="\n\n", top_k=-1, temperature=0, stop_token_ids=(3, 4))
    assert p.stop == ["\n\n"]
    assert p.top_k == 0
    assert p.stop_token_ids == [3, 4]
    assert isinstance(p.temperature, float)
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_greedy_threshold():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy


def test_clone_and_replace_are_independent_and_validated():
    p = SamplingParams(stop=["x"], stop_token_ids=[1])
    q = p.clone()
    assert q == p
    q.stop.append("y")
    q.stop_token_ids.append(2)
    assert p.stop == ["x"] and p.stop_token_ids == [1]
    assert dataclasses.replace(p, temperature=0.5).temperature == 0.5
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(p, top_p=2.0)


@pytest.mark.parametrize(
    "value",
    [{-1: 1.0}, {"x": 1.0}, {5: 100.5}, {5: -101}, {5: float("nan")}, {5: "1"}, [5, 1.0], {1.5: 1.0}],
)
def test_invalid_logit_bias_is_refused(value):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=value)


def test_logit_bias_takes_openai_string_keys():
    assert SamplingParams(logit_bias={"5": 100, 7: -100.0}).logit_bias == {5: 100.0, 7: -100.0}
    assert SamplingParams(logit_bias={}).logit_bias is None
