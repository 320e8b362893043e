"""The OpenAI streaming wire format: server-sent-event lines to per-chunk facts.

OpenAI-compatible servers (vLLM, llama-server, SGLang, OpenAI) send one JSON object per `data:` line
and end with `data: [DONE]`. We take each data line as one event as soon as it arrives, rather than
waiting for the blank line that closes an SSE event: that timestamps chunks at the earliest moment and
tolerates servers that omit the blank lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DONE = "[DONE]"


def sse_data(line: str) -> str | None:
    """The payload of a `data:` line; None for blank lines, comments (`:`) and other fields."""
    field, sep, value = line.rstrip("\r\n").partition(":")
    if field != "data" or not sep:
        return None
    return value[1:] if value.startswith(" ") else value


@dataclass
class StreamEvent:
    text: str = ""  # generated text (content, reasoning or tool-call arguments)
    n_tokens: int | None = None  # exact token count, when the chunk carries logprobs
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False

    @property
    def has_tokens(self) -> bool:
        """A chat stream's role-only first chunk has neither text nor logprobs, so it is not a token."""
        return bool(self.text) or bool(self.n_tokens)


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _chat_text(choice: dict[str, Any]) -> tuple[str, int | None]:
    delta = choice.get("delta") or {}
    parts = [delta.get("content"), delta.get("reasoning_content"), delta.get("reasoning")]
    for call in delta.get("tool_calls") or []:
        parts.append((call.get("function") or {}).get("arguments"))
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    return "".join(p for p in parts if isinstance(p, str)), (len(tokens) if tokens else None)


def _completion_text(choice: dict[str, Any]) -> tuple[str, int | None]:
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    return str(choice.get("text") or ""), (len(tokens) if tokens else None)


def parse_event(payload: str, chat: bool) -> StreamEvent:
    """One data payload of a /v1/completions (`chat=False`) or /v1/chat/completions stream."""
    if payload.strip() == DONE:
        return StreamEvent(done=True)
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError:
        return StreamEvent(error=f"malformed stream chunk: {payload[:200]!r}")
    if not isinstance(obj, dict):
        return StreamEvent(error=f"unexpected stream chunk: {payload[:200]!r}")
    if obj.get("error"):
        return StreamEvent(error=_error_text(obj["error"]))
    event = StreamEvent(usage=obj.get("usage") if isinstance(obj.get("usage"), dict) else None)
    choices = obj.get("choices") or []
    if choices:  # we always request n=1; the usage-only final chunk has no choices
        choice = choices[0]
        event.text, event.n_tokens = _chat_text(choice) if chat else _completion_text(choice)
        event.finish_reason = choice.get("finish_reason")
    return event
