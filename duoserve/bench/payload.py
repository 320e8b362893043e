"""Turning a conversation turn (plus the answers so far) into an OpenAI request body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from duoserve.bench.datasets import Conversation, Prompt

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
# Between the system prefix and a user turn, and before each later user turn, in completion prompts.
TURN_SEPARATOR = "\n\n"


def is_chat(endpoint: str) -> bool:
    return endpoint.rstrip("/").endswith("/chat/completions")


@dataclass
class RequestOptions:
    model: str
    endpoint: str = "/v1/completions"
    ignore_eos: bool = False
    temperature: float | None = 0.0  # greedy by default, as vLLM's benchmark


def chat_messages(conv: Conversation, turn: int, answers: list[str]) -> list[dict[str, str]]:
    """System prompt, then every earlier user turn with the model's actual reply, then this turn."""
    messages = [{"role": "system", "content": str(conv.system)}] if conv.system is not None else []
    for k in range(turn):
        messages.append({"role": "user", "content": str(conv.turns[k].prompt)})
        messages.append({"role": "assistant", "content": answers[k]})
    messages.append({"role": "user", "content": str(conv.turns[turn].prompt)})
    return messages


def completion_prompt(conv: Conversation, turn: int, answers: list[str]) -> Prompt:
    """The same history as plain text (or token ids for single-turn id prompts).

    Each reply is appended right after the text that produced it, so turn k's prompt starts with exactly
    what the server saw and generated for turn k-1: a prefix cache can reuse all of it.
    """
    current = conv.turns[turn].prompt
    if isinstance(current, list):
        prefix = conv.system if isinstance(conv.system, list) else []
        return [*prefix, *current]
    text = f"{conv.system}{TURN_SEPARATOR}" if conv.system is not None else ""
    for k in range(turn):
        text += f"{conv.turns[k].prompt}{answers[k]}{TURN_SEPARATOR}"
    return text + current


def build_body(opts: RequestOptions, conv: Conversation, turn: int, answers: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": opts.model,
        "max_tokens": conv.turns[turn].output_len,
        "stream": True,
        # Exact output (and prompt) token counts; servers that ignore it fall back to counted chunks.
        "stream_options": {"include_usage": True},
    }
    if is_chat(opts.endpoint):
        body["messages"] = chat_messages(conv, turn, answers)
    else:
        body["prompt"] = completion_prompt(conv, turn, answers)
    if opts.temperature is not None:
        body["temperature"] = opts.temperature
    if opts.ignore_eos:  # only when asked: strict OpenAI servers reject unknown fields
        body["ignore_eos"] = True
    return body
