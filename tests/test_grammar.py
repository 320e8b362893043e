"""Constraints become llguidance grammars, and bad ones are ValueErrors naming the problem."""

from __future__ import annotations

import pytest

from duoserve.grammar import MAX_SCHEMA_DEPTH, build_grammar
from duoserve.sampling_params import SamplingParams, StructuredOutputsParams


@pytest.mark.parametrize(
    "spec",
    [
        {"json": {"type": "object", "properties": {"a": {"type": "integer"}}}},
        {"json": '{"type": "array", "items": {"type": "string"}}'},
        {"json": True},  # the schema `true`: any JSON value
        {"regex": r"[a-z]{3}-\d+"},
        {"choice": ["yes", "no", 'a "quoted" one', ""]},
        {"grammar": 'start: "a" b\nb: "b"+'},
        {"grammar": 'root ::= "a" b\nb ::= "b"+'},  # GBNF (llama.cpp's EBNF)
        {"json_object": True},
        {"json": {"type": "object"}, "disable_any_whitespace": True, "disable_additional_properties": True},
    ],
)
def test_valid_constraints_build(spec):
    params = SamplingParams(structured_outputs=spec)
    assert isinstance(params.structured_outputs, StructuredOutputsParams)
    assert build_grammar(params.structured_outputs)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({}, ["exactly one", "none"]),
        ({"json": {"type": "object"}, "regex": "a"}, ["exactly one", "json, regex"]),
        ({"json": "{not json"}, ["structured_outputs.json", "not valid JSON"]),
        ({"json": {"type": "nonsense"}}, ["structured_outputs.json"]),
        ({"json": 5}, ["structured_outputs.json"]),
        ({"regex": "(unclosed"}, ["structured_outputs.regex"]),
        ({"regex": ""}, ["structured_outputs.regex"]),
        ({"choice": []}, ["structured_outputs.choice"]),
        ({"choice": ["a", 1]}, ["structured_outputs.choice"]),
        ({"grammar": "start: undefined_rule"}, ["structured_outputs.grammar"]),
        ({"grammar": "root ::= (("}, ["structured_outputs.grammar"]),
        ({"json_object": False}, ["exactly one"]),
        ({"json_object": True, "disable_any_whitespace": 1}, ["disable_any_whitespace"]),
        ({"jsonn": {}}, ["structured_outputs", "jsonn"]),
    ],
)
def test_invalid_constraints_name_the_problem(spec, words):
    with pytest.raises(ValueError) as info:
        SamplingParams(structured_outputs=spec)
    for word in words:
        assert word in str(info.value)


def test_deep_schema_is_refused_not_a_crash():
    schema: dict = {"type": "object"}
    for _ in range(5 * MAX_SCHEMA_DEPTH):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(ValueError, match="nested more than"):
        SamplingParams(structured_outputs={"json": schema})


def test_equal_constraints_share_one_build():
    a = StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "string"}}})
    b = StructuredOutputsParams(json={"properties": {"x": {"type": "string"}}, "type": "object"})
    assert build_grammar(a) is build_grammar(b)  # key order does not matter: one cached grammar
