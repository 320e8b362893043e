"""Structured-output constraints as llguidance grammars, built and validated without a tokenizer.

The grammar engine is llguidance, chosen over outlines-core by measurement (benchmarks/structured_outputs.py,
SmolLM2's 49k-token vocabulary, a 6-property JSON schema; BENCHMARKS.md has the table):
compiling the schema (with the first mask) took 4.2 ms with llguidance against 3.2 s with outlines-core,
which builds its whole token index up front; per token (advance + mask), p50 98 us against 4 us, mean
299 us against 582 us (outlines-core's index lookups are cheap, its misses are not). Compile time decides:
every new schema (each tool set, each response_format) would stall the engine for seconds with
outlines-core. (Measured on a shared 2-core VM while other jobs ran: ratios, not absolute figures.)
outlines-core also has no context-free grammars at all (only regexes, so no `grammar` constraint, no
recursive JSON schemas), while llguidance takes JSON schemas, regexes, Lark and GBNF; it drops the GIL
while it computes a mask, so masks are computed on a thread while the forward pass runs
(duoserve.engine.structured). xgrammar was not considered: it pulls in transformers and triton.

Every constraint becomes one llguidance grammar string here (cached: n sequences, retries and the
engine process's copy of the params cost one build) and validated without a tokenizer,
so a bad schema, regex or grammar is a ValueError naming the problem before a request is admitted.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import llguidance

if TYPE_CHECKING:
    from duoserve.sampling_params import StructuredOutputsParams

CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object")

# A JSON schema nested deeper than this is refused: the schema compiler recurses over it, and a
# hostile one a few thousand levels deep must be a 400, not a stack overflow.
MAX_SCHEMA_DEPTH = 64


def build_grammar(params: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint; ValueError naming what is wrong with it."""
    kind = params.kind
    value = getattr(params, kind)
    if kind == "json":
        text = value if isinstance(value, str) else _dump(value)
    elif kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        text = _dump(value)
    elif kind == "json_object":
        if value is not True:
            raise ValueError(f"structured_outputs.json_object must be true, got {value!r}")
        text = ""
    else:
        if not isinstance(value, str) or not value:
            raise ValueError(f"structured_outputs.{kind} must be a non-empty string")
        text = value
    return _grammar(kind, text, params.disable_any_whitespace, params.disable_additional_properties)


@lru_cache(maxsize=256)
def _grammar(kind: str, text: str, no_whitespace: bool, no_additional_properties: bool) -> str:
    try:
        grammar = _source(kind, text, no_whitespace, no_additional_properties)
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except _InvalidConstraint:
        raise
    except BaseException as err:
        # What the engine says of the input is the input's problem (a Rust panic is a BaseException).
        if not isinstance(err, Exception) and type(err).__name__ != "PanicException":
            raise
        raise ValueError(f"structured_outputs.{kind} is invalid: {err}") from err
    if error:
        raise ValueError(f"structured_outputs.{kind} is invalid: {error}")
    return grammar


class _InvalidConstraint(ValueError):
    """A problem this module found itself (its message already names the field)."""


def _source(kind: str, text: str, no_whitespace: bool, no_additional_properties: bool) -> str:
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else _schema(text)
        if no_additional_properties:
            _close_objects(schema)
        options = {"whitespace_flexible": not no_whitespace}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_regex(_choice_regex(json.loads(text)))
    return llguidance.LLMatcher.grammar_from_lark(_gbnf_to_lark(text) if "::=" in text else text)


def _dump(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"structured_outputs: not JSON-serialisable: {err}") from err


def _schema(text: str) -> dict[str, Any] | bool:
    try:
        schema = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise _InvalidConstraint(f"structured_outputs.json is not valid JSON: {err}") from err
    if schema is True:  # the schema that accepts anything
        schema = {}
    if not isinstance(schema, dict):
        raise _InvalidConstraint("structured_outputs.json must be a JSON schema (an object, or true)")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise _InvalidConstraint(
            f"structured_outputs.json is nested more than {MAX_SCHEMA_DEPTH} levels deep"
        )
    return schema


def _depth(value: Any) -> int:
    """How deeply dicts and lists nest in value (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > MAX_SCHEMA_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _close_objects(schema: Any) -> None:
    """vLLM's disable_additional_properties: objects with listed properties allow no others."""
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if isinstance(item.get("properties"), dict) and "additionalProperties" not in item:
                item["additionalProperties"] = False
            stack.extend(v for v in item.values() if isinstance(v, dict | list))


# What a (Rust) regex must escape to match itself.
_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")


def _choice_regex(choices: list[str]) -> str:
    """One literal alternative per choice (an empty choice is an empty alternative)."""
    return (
        "("
        + "|".join("".join("\\" + c if c in _REGEX_META else c for c in choice) for choice in choices)
        + ")"
    )


def _gbnf_to_lark(text: str) -> str:
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        return gbnf_to_lark(text)
    except Exception as err:  # its parser raises plain exceptions for bad input
        raise _InvalidConstraint(f"structured_outputs.grammar is not a valid GBNF grammar: {err}") from err
