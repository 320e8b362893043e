"""Parsing realistic OpenAI-format streams, line by line with timestamps, into request records."""

from __future__ import annotations

import json

import pytest

from duoserve.bench.metrics import itl
from duoserve.bench.records import RequestRecord
from duoserve.bench.sse import parse_event, sse_data
from duoserve.bench.stream import StreamRecorder


def data(obj: object) -> str:
    return f"data: {json.dumps(obj)}"


def completion_chunk(text: str, finish: str | None = None, logprob_tokens: list[str] | None = None) -> str:
    logprobs = {"tokens": logprob_tokens} if logprob_tokens is not None else None
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return data({"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [choice]})


def chat_chunk(delta: dict, finish: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return data({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": [choice]})


USAGE = data(
    {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
)


def replay(lines: list[tuple[float, str]], chat: bool, end: float) -> RequestRecord:
    """Feed (time, line) pairs as the client would, with the request sent at t=1.0."""
    record = RequestRecord(0, 0, 0, prompt_len=5, max_tokens=16, send_time=1.0)
    recorder = StreamRecorder(record, chat)
    for t, line in lines:
        if not recorder.feed_line(line, t):
            break
    recorder.finish(end)
    return record


def test_sse_data_lines() -> None:
    assert sse_data('data: {"a": 1}') == '{"a": 1}'
    assert sse_data('data:{"a": 1}\r') == '{"a": 1}'
    assert sse_data("data: [DONE]") == "[DONE]"
    assert sse_data("") is None
    assert sse_data(": keep-alive") is None
    assert sse_data("event: message") is None


def test_completions_stream_with_usage_and_done() -> None:
    lines = [
        (1.2, completion_chunk("Hello")),
        (1.25, ""),
        (1.3, completion_chunk(" world")),
        (1.4, completion_chunk("!", finish="length")),
        (1.41, USAGE),
        (1.42, "data: [DONE]"),
        (9.0, completion_chunk("after done is ignored")),
    ]
    r = replay(lines, chat=False, end=1.43)
    assert r.error is None
    assert r.ttft == pytest.approx(0.2)
    assert r.chunk_times == [1.2, 1.3, 1.4]
    assert r.chunk_tokens == [1, 1, 1]
    assert (r.output_tokens, r.prompt_tokens, r.usage_reported, r.cached_tokens) == (3, 7, True, None)
    assert r.generated_text == "Hello world!"
    assert r.latency == pytest.approx(0.43)


def test_chat_role_only_chunk_is_not_a_token() -> None:
    lines = [
        (1.01, chat_chunk({"role": "assistant", "content": ""})),
        (1.02, chat_chunk({"role": "assistant"})),
        (1.5, chat_chunk({"content": "Hi"})),
        (1.6, chat_chunk({"content": " there"})),
        (1.7, chat_chunk({"content": "."}, finish="stop")),
        (1.7, USAGE),
        (1.7, "data: [DONE]"),
    ]
    r = replay(lines, chat=True, end=1.7)
    assert r.ttft == pytest.approx(0.5)
    assert r.chunk_times == [1.5, 1.6, 1.7]
    assert r.output_tokens == 3
    assert r.generated_text == "Hi there."


def test_chat_reasoning_and_null_content_chunks() -> None:
    lines = [
        (1.0, chat_chunk({"role": "assistant", "content": None})),  # llama-server's first chunk
        (1.1, chat_chunk({"reasoning_content": "think"})),  # reasoning tokens are generated tokens
        (1.2, chat_chunk({"content": "ok"}, finish="stop")),
        (1.3, "data: [DONE]"),
    ]
    r = replay(lines, chat=True, end=1.3)
    assert r.ttft == pytest.approx(0.1)
    assert r.output_tokens == 2
    assert not r.usage_reported  # no usage: tokens are counted chunks
    assert r.generated_text == "thinkok"


def test_usage_larger_than_chunk_count_spreads_tokens_over_later_chunks() -> None:
    details = {"cached_tokens": 2}  # the prefix cache's share of the prompt (vLLM, duoserve)
    counts = {"prompt_tokens": 4, "completion_tokens": 7, "prompt_tokens_details": details}
    usage = data({"choices": [], "usage": counts})
    lines = [
        (1.1, completion_chunk("a")),
        (1.3, completion_chunk("bcd")),
        (1.6, completion_chunk("efg")),
        (1.6, usage),
        (1.6, "data: [DONE]"),
    ]
    r = replay(lines, chat=False, end=1.6)
    assert (r.prompt_tokens, r.cached_tokens) == (4, 2)
    assert r.chunk_tokens == [1, 3, 3]
    assert r.output_tokens == 7
    assert itl(r.chunk_times, r.chunk_tokens) == pytest.approx([0.2 / 3] * 3 + [0.1] * 3)


def test_logprob_token_counts_are_exact() -> None:
    lines = [
        (1.1, completion_chunk("ab", logprob_tokens=["a", "b"])),
        (1.2, completion_chunk("c", logprob_tokens=["c"])),
        (1.3, "data: [DONE]"),
    ]
    r = replay(lines, chat=False, end=1.3)
    assert r.chunk_tokens == [2, 1]
    assert r.output_tokens == 3
    assert parse_event(chat_chunk({"content": "x"})[6:], chat=True).n_tokens is None


def test_error_event_and_malformed_chunk_and_empty_stream() -> None:
    err = data({"error": {"message": "out of memory", "code": 500}})
    r = replay([(1.1, completion_chunk("a")), (1.2, err)], chat=False, end=1.2)
    assert r.error == "out of memory"
    r = replay([(1.1, "data: {not json")], chat=False, end=1.2)
    assert r.error is not None and "malformed" in r.error
    r = replay([(1.1, "data: [DONE]")], chat=False, end=1.2)
    assert r.error is not None and "without any token" in r.error
    assert r.ttft is None
