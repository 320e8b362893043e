"""OpenAI response bodies and Server-Sent Events chunks built from RequestOutputs.

Outputs are cumulative (each carries a choice's whole text so far), so a stream keeps, per choice,
how much text and how many tokens it already sent and emits only the rest. While a choice runs, the
last len(longest stop string) - 1 characters are held back: they could be the start of a stop string
that must never reach the client. The detokenizer already holds back incomplete UTF-8 characters.
With tools, a chat reply's text goes through a reader (duoserve.server.tool_calls) that turns it into
content and `tool_calls` deltas.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from duoserve.outputs import CompletionOutput, Logprob, RequestOutput
from duoserve.server.tool_calls import CallDelta, ToolCalling, ToolReader

# JSON has no -Infinity; vLLM clamps logprobs the same way.
_MIN_LOGPROB = -9999.0


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class _ChoiceProgress:
    text_sent: int = 0
    tokens_sent: int = 0
    text_offset: int = 0  # completions logprobs: where the next token's text starts
    finished: bool = False


@dataclass
class Delta:
    """What a choice gained since the last chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None  # set once, on the delta that finishes the choice
    stop_reason: int | str | None


@dataclass
class StreamTracker:
    """Turns cumulative outputs into per-choice deltas (choice index = prompt index * n + sequence index)."""

    n: int
    holdback: int  # characters of a running choice not sent yet: len(longest stop string) - 1
    choices: dict[int, _ChoiceProgress] = field(default_factory=dict)

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[Delta]:
        deltas = []
        for completion in output.outputs:
            index = prompt_index * self.n + completion.index
            progress = self.choices.setdefault(index, _ChoiceProgress())
            if not progress.finished:
                deltas.append(self._delta(index, completion, progress))
        return deltas

    def _delta(self, index: int, completion: CompletionOutput, progress: _ChoiceProgress) -> Delta:
        finished = completion.finish_reason is not None
        visible = len(completion.text) if finished else len(completion.text) - self.holdback
        text = completion.text[progress.text_sent : visible] if visible > progress.text_sent else ""
        progress.text_sent += len(text)
        token_ids = completion.token_ids[progress.tokens_sent :]
        logprobs = None
        if completion.logprobs is not None:
            logprobs = completion.logprobs[progress.tokens_sent : len(completion.token_ids)]
        progress.tokens_sent = len(completion.token_ids)
        progress.finished = finished
        return Delta(
            index,
            text,
            token_ids,
            logprobs,
            completion.finish_reason if finished else None,
            completion.stop_reason if finished else None,
        )


def holdback_for(stop: list[str]) -> int:
    return max((len(s) for s in stop), default=1) - 1


# ---------------------------------------------------------------------- logprobs


def token_text(token_id: int, logprob: Logprob, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else (logprob.decoded_token or "")


def _clamp(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], num_top: int, as_ids: bool, offset: int
) -> tuple[dict[str, Any], int]:
    """The legacy completions `logprobs` object, and the text offset after these tokens."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    # A RequestOutput shares its logprobs list with a sequence that may have grown since: cut to its tokens.
    for token_id, entry in zip(token_ids, entries[: len(token_ids)], strict=True):
        chosen = token_text(token_id, entry[token_id], as_ids)
        tokens.append(chosen)
        token_logprobs.append(_clamp(entry[token_id].logprob))
        top = {token_text(t, lp, as_ids): _clamp(lp.logprob) for t, lp in list(entry.items())[:num_top]}
        top.setdefault(chosen, _clamp(entry[token_id].logprob))
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(chosen)
    body = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
    return body, offset


def _chat_entry(token_id: int, logprob: Logprob, as_ids: bool) -> dict[str, Any]:
    text = token_text(token_id, logprob, as_ids)
    return {"token": text, "logprob": _clamp(logprob.logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], num_top: int, as_ids: bool
) -> dict[str, Any]:
    """The chat `logprobs` object: per token its logprob and the `num_top` most likely tokens."""
    content = []
    for token_id, entry in zip(token_ids, entries[: len(token_ids)], strict=True):
        item = _chat_entry(token_id, entry[token_id], as_ids)
        # The engine lists the top tokens first, in rank order, then the sampled one if it is not among them.
        item["top_logprobs"] = [_chat_entry(t, lp, as_ids) for t, lp in list(entry.items())[:num_top]]
        content.append(item)
    return {"content": content, "refusal": None}


# ---------------------------------------------------------------------- bodies


@dataclass
class ResponseContext:
    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    include_usage: bool = False
    as_token_ids: bool = False
    num_top_logprobs: int | None = None  # None: no logprobs


def usage(outputs: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def completion_response(ctx: ResponseContext, outputs: list[RequestOutput], n: int) -> dict[str, Any]:
    choices = []
    for prompt_index, output in enumerate(outputs):
        for c in output.outputs:
            logprobs = None
            if ctx.num_top_logprobs is not None and c.logprobs is not None:
                logprobs, _ = completion_logprobs(
                    c.token_ids, c.logprobs, ctx.num_top_logprobs, ctx.as_token_ids, 0
                )
            choices.append(
                {
                    "index": prompt_index * n + c.index,
                    "text": c.text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
    return {
        "id": ctx.request_id,
        "object": "text_completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": choices,
        "usage": usage(outputs),
        "system_fingerprint": None,
    }


def chat_response(
    ctx: ResponseContext, output: RequestOutput, tools: ToolCalling | None = None
) -> dict[str, Any]:
    """The chat body; with `tools`, each reply is read for tool calls."""
    choices = []
    for c in output.outputs:
        logprobs = None
        if ctx.num_top_logprobs is not None and c.logprobs is not None:
            logprobs = chat_logprobs(c.token_ids, c.logprobs, ctx.num_top_logprobs, ctx.as_token_ids)
        message, finish_reason = {"role": "assistant", "content": c.text, "refusal": None}, c.finish_reason
        if tools is not None:
            message, finish_reason = tools.message(c.text, c.finish_reason)
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
                "stop_reason": c.stop_reason,
            }
        )
    return {
        "id": ctx.request_id,
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": choices,
        "usage": usage([output]),
        "system_fingerprint": None,
    }


# ---------------------------------------------------------------------- stream chunks


def _chunk(ctx: ResponseContext, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    chunk = {
        "id": ctx.request_id,
        "object": obj,
        "created": ctx.created,
        "model": ctx.model,
        "choices": choices,
    }
    if obj == "chat.completion.chunk":
        chunk["system_fingerprint"] = None
    if ctx.include_usage:
        chunk["usage"] = None  # OpenAI: every chunk but the last carries a null usage
    return chunk


class CompletionChunks:
    """`text_completion` chunks: text deltas, then one chunk per choice with its finish_reason."""

    def __init__(self, ctx: ResponseContext) -> None:
        self.ctx = ctx
        self.offsets: dict[int, int] = {}

    def delta(self, d: Delta) -> list[bytes]:
        chunks = []
        logprobs = None
        if self.ctx.num_top_logprobs is not None and d.logprobs:
            logprobs, self.offsets[d.index] = completion_logprobs(
                d.token_ids,
                d.logprobs,
                self.ctx.num_top_logprobs,
                self.ctx.as_token_ids,
                self.offsets.get(d.index, 0),
            )
        if d.text or logprobs:
            choice = {"index": d.index, "text": d.text, "logprobs": logprobs, "finish_reason": None}
            chunks.append(sse(_chunk(self.ctx, "text_completion", [choice])))
        if d.finish_reason is not None:
            choice = {
                "index": d.index,
                "text": "",
                "logprobs": None,
                "finish_reason": d.finish_reason,
                "stop_reason": d.stop_reason,
            }
            chunks.append(sse(_chunk(self.ctx, "text_completion", [choice])))
        return chunks

    def usage(self, outputs: list[RequestOutput]) -> bytes:
        chunk = _chunk(self.ctx, "text_completion", [])
        chunk["usage"] = usage(outputs)
        return sse(chunk)


class ChatChunks:
    """`chat.completion.chunk`s: a role chunk per choice, content deltas, then the finish chunk."""

    def __init__(self, ctx: ResponseContext, tools: ToolCalling | None = None) -> None:
        self.ctx = ctx
        self.tools = tools
        self._readers: dict[int, ToolReader] = {}  # per choice, with tools
        self._called: set[int] = set()  # choices that called a tool

    def role(self, index: int) -> bytes:
        choice = {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return sse(_chunk(self.ctx, "chat.completion.chunk", [choice]))

    def delta(self, d: Delta) -> list[bytes]:
        chunks = []
        logprobs = None
        if self.ctx.num_top_logprobs is not None and d.logprobs:
            logprobs = chat_logprobs(
                d.token_ids, d.logprobs, self.ctx.num_top_logprobs, self.ctx.as_token_ids
            )
        for delta in self._deltas(d):
            choice = {"index": d.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
            chunks.append(sse(_chunk(self.ctx, "chat.completion.chunk", [choice])))
            logprobs = None  # sent once, with the first delta of these tokens
        if logprobs:
            choice = {"index": d.index, "delta": {"content": ""}, "logprobs": logprobs, "finish_reason": None}
            chunks.append(sse(_chunk(self.ctx, "chat.completion.chunk", [choice])))
        if d.finish_reason is not None:
            finish_reason = d.finish_reason
            if self.tools is not None:
                finish_reason = self.tools.finish_reason(finish_reason, d.index in self._called)
            choice = {
                "index": d.index,
                "delta": {},
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": d.stop_reason,
            }
            chunks.append(sse(_chunk(self.ctx, "chat.completion.chunk", [choice])))
        return chunks

    def _deltas(self, d: Delta) -> list[dict[str, Any]]:
        """The `delta` objects of a choice's new text: content, or with tools, content and tool_calls."""
        if self.tools is None:
            return [{"content": d.text}] if d.text else []
        reader = self._readers.get(d.index)
        if reader is None:
            reader = self._readers[d.index] = self.tools.reader()
        events = reader.feed(d.text) + (reader.finish() if d.finish_reason is not None else [])
        deltas = []
        for event in events:
            if isinstance(event, CallDelta):
                self._called.add(d.index)
                deltas.append({"tool_calls": [event.as_dict()]})
            else:
                deltas.append({"content": event})
        return deltas

    def usage(self, outputs: list[RequestOutput]) -> bytes:
        chunk = _chunk(self.ctx, "chat.completion.chunk", [])
        chunk["usage"] = usage(outputs)
        return sse(chunk)


def error_event(status: int, message: str) -> bytes:
    error_type = "service_unavailable" if status == 503 else "internal_error"
    return sse({"error": {"message": message, "type": error_type, "param": None, "code": status}})
