"""Per-request sampling parameters, with vLLM's names, defaults and meanings."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

# OpenAI caps top_logprobs at 20; vLLM's default max_logprobs is 20 too.
MAX_LOGPROBS = 20

# OpenAI bounds each logit_bias value so.
MAX_LOGIT_BIAS = 100.0

# Below this temperature a request samples greedily (dividing by ~0 would overflow the logits).
_GREEDY_EPS = 1e-5


def _as_int(name: str, value: object, *, minimum: int | None = None) -> int:
    # bool is an int subclass, but `n=True` is a caller bug, not a count.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _as_optional_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int | None:
    if value is None:
        return None
    value = _as_int(name, value, minimum=minimum)
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _as_stop_list(value: object) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"stop must be a string or a list of strings, got {value!r}")
    if any(s == "" for s in stops):
        raise ValueError("stop must not contain empty strings")
    return list(stops)


def _as_token_id_list(name: str, value: object) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of token ids, got {value!r}")
    return [_as_int(name, v, minimum=0) for v in value]


def _as_logit_bias(value: object) -> dict[int, float] | None:
    """OpenAI's logit_bias: token id -> a bias in [-100, 100] added to its logit."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {value!r}")
    bias = {}
    for token, amount in value.items():
        if isinstance(token, str) and token.isdigit():  # OpenAI sends the ids as JSON object keys
            token = int(token)
        token_id = _as_int("logit_bias", token, minimum=0)
        amount = _as_float("logit_bias", amount)
        if not -MAX_LOGIT_BIAS <= amount <= MAX_LOGIT_BIAS:
            raise ValueError(
                f"logit_bias must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {amount} "
                f"for token {token_id}"
            )
        bias[token_id] = amount
    return bias or None


@dataclass
class StructuredOutputsParams:
    """A constraint on the output, vLLM's `structured_outputs`: exactly one of json (a JSON schema, as a
    dict or its text), regex, choice (the output is one of these strings), grammar (Lark, as llguidance
    reads it, or GBNF/EBNF with `::=` rules) and json_object (any JSON object).

    `__post_init__` checks the constraint compiles (duoserve.grammar; no tokenizer needed), so a bad
    schema, regex or grammar is a ValueError naming the problem before any engine sees it.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's options: JSON without whitespace between tokens; objects without unlisted properties.
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:
        from duoserve.grammar import CONSTRAINT_KINDS, build_grammar

        given = [kind for kind in CONSTRAINT_KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of "
                f"{', '.join(CONSTRAINT_KINDS)}; got {', '.join(given) if given else 'none'}"
            )
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs.{name} must be a bool, got {getattr(self, name)!r}")
        if self.choice is not None:
            self.choice = list(self.choice) if isinstance(self.choice, (list, tuple)) else self.choice
        build_grammar(self)  # ValueError naming the problem; cached, so the engine's call is free

    @property
    def kind(self) -> str:
        from duoserve.grammar import CONSTRAINT_KINDS

        return next(kind for kind in CONSTRAINT_KINDS if getattr(self, kind) not in (None, False))


def _as_structured_outputs(value: object) -> StructuredOutputsParams | None:
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, dict):
        try:
            return StructuredOutputsParams(**value)
        except TypeError as err:  # an unknown key
            raise ValueError(f"structured_outputs: {err}") from err
    raise ValueError(f"structured_outputs must be a StructuredOutputsParams or a dict, got {value!r}")


@dataclass
class SamplingParams:
    """How to pick tokens for one request (vLLM-compatible).

    `__post_init__` validates and normalises every field (ValueError naming the field), and copies
    the list fields, so `dataclasses.replace(params, ...)` / `clone()` yield an independent,
    validated object.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, normalised to 0) disables top-k
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None  # normalised to list[str]
    stop_token_ids: list[int] | None = None  # normalised to list[int]
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length (resolved by the engine)
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI semantics)
    structured_outputs: StructuredOutputsParams | None = None  # a dict is read as one

    def __post_init__(self) -> None:
        self.n = _as_int("n", self.n, minimum=1)
        self._validate_floats()
        self.top_k = _as_int("top_k", self.top_k, minimum=-1)
        if self.top_k == -1:
            self.top_k = 0
        self.seed = None if self.seed is None else _as_int("seed", self.seed)
        self.max_tokens = _as_optional_int("max_tokens", self.max_tokens, minimum=1)
        self.min_tokens = _as_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens}, "
                f"max_tokens={self.max_tokens}"
            )
        self.logprobs = _as_optional_int("logprobs", self.logprobs, minimum=0, maximum=MAX_LOGPROBS)
        self.prompt_logprobs = _as_optional_int(
            "prompt_logprobs", self.prompt_logprobs, minimum=0, maximum=MAX_LOGPROBS
        )
        self.stop = _as_stop_list(self.stop)
        self.stop_token_ids = _as_token_id_list("stop_token_ids", self.stop_token_ids)
        self.logit_bias = _as_logit_bias(self.logit_bias)
        self.structured_outputs = _as_structured_outputs(self.structured_outputs)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def _validate_floats(self) -> None:
        self.temperature = _as_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.top_p = _as_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.min_p = _as_float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _as_float(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)
        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def clone(self) -> SamplingParams:
        return dataclasses.replace(self)
