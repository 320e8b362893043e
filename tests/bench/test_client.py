"""The client and runner end to end, against a real streaming HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("httpx")

from duoserve.bench.client import BenchClient, ClientConfig  # noqa: E402
from duoserve.bench.datasets import Conversation, DatasetConfig, Turn, load_dataset  # noqa: E402
from duoserve.bench.metrics import itl  # noqa: E402
from duoserve.bench.payload import RequestOptions  # noqa: E402
from duoserve.bench.runner import LoadConfig, RunOutcome, run_load  # noqa: E402
from duoserve.bench.tokens import WordEstimator  # noqa: E402
from tests.bench.fake_server import MODEL, FakeServer  # noqa: E402

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def convs(n: int, output_len: int, prompt: str = "say something nice") -> list[Conversation]:
    return [Conversation(i, [Turn(f"{prompt} {i}", 4, output_len)]) for i in range(n)]


def run(
    server: FakeServer, conversations: list[Conversation], endpoint: str = COMPLETIONS, **load: Any
) -> RunOutcome:
    async def go() -> RunOutcome:
        cfg = ClientConfig(server.base_url, endpoint, max_connections=load.get("concurrency"))
        async with BenchClient(cfg) as client:
            return await run_load(
                conversations, client, RequestOptions(MODEL, endpoint), LoadConfig(progress=False, **load)
            )

    return asyncio.run(go())


def test_completions_timings_usage_and_concurrency_cap(server: FakeServer) -> None:
    server.ttft, server.gap = 0.05, 0.02
    out = run(server, convs(4, output_len=5), concurrency=2)
    assert out.not_started == 0 and len(out.records) == 4
    assert server.max_in_flight <= 2
    for r in out.records:
        assert r.error is None
        assert 0.05 <= r.ttft < 0.5
        assert (r.output_tokens, r.usage_reported, r.chunk_tokens) == (5, True, [1] * 5)
        assert r.prompt_tokens == 4  # the server's count of "say something nice N"
        gaps = itl(r.chunk_times, r.chunk_tokens)
        assert len(gaps) == 4 and 0.015 <= sum(gaps) / 4 < 0.2
        assert r.generated_text == "w0 w1 w2 w3 w4 "
    body = server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == MODEL and body["max_tokens"] == 5 and "ignore_eos" not in body


def test_chat_role_chunk_ignored_and_multi_token_chunks_spread(server: FakeServer) -> None:
    server.ttft, server.gap, server.tokens_per_chunk = 0.08, 0.03, 2
    (r,) = run(server, convs(1, output_len=5), endpoint=CHAT).records
    assert r.error is None
    assert r.ttft >= 0.08  # the role chunk came at once and does not count
    assert len(r.chunk_times) == 3  # 2 + 2 + 1 tokens
    assert r.output_tokens == 5 and sum(r.chunk_tokens) == 5
    gaps = itl(r.chunk_times, r.chunk_tokens)
    assert len(gaps) == 4 and sum(gaps) == pytest.approx(r.chunk_times[-1] - r.chunk_times[0])
    assert server.bodies[0]["messages"] == [{"role": "user", "content": "say something nice 0"}]


def test_without_usage_tokens_are_counted_chunks(server: FakeServer) -> None:
    server.ttft, server.gap, server.send_usage = 0.0, 0.0, False
    (r,) = run(server, convs(1, output_len=3)).records
    assert (r.error, r.usage_reported, r.output_tokens, r.prompt_tokens) == (None, False, 3, None)


def test_http_and_stream_errors_are_recorded(server: FakeServer) -> None:
    server.fail_status = 503
    (r,) = run(server, convs(1, output_len=3)).records
    assert r.error is not None and r.error.startswith("HTTP 503") and "boom" in r.error
    server.fail_status, server.error_after_chunks, server.ttft = None, 1, 0.0
    (r,) = run(server, convs(1, output_len=3)).records
    assert r.error == "engine died" and r.chunk_tokens == [1]


def test_multi_turn_sends_turns_in_order_with_actual_answers(server: FakeServer) -> None:
    server.ttft, server.gap = 0.01, 0.005
    cfg = DatasetConfig(
        "multi-turn", num_prompts=2, multi_turn_turns=3, random_input_len=5, random_output_len=3
    )
    conversations = load_dataset(cfg, WordEstimator())
    out = run(server, conversations, endpoint=CHAT)
    assert len(out.records) == 6 and all(r.success for r in out.records)
    for conv in conversations:
        recs = sorted((r for r in out.records if r.conv_id == conv.conv_id), key=lambda r: r.turn)
        assert all(
            later.send_time >= earlier.end_time for earlier, later in zip(recs, recs[1:], strict=False)
        )
        last = next(b for b in server.bodies if b["messages"][-1]["content"] == conv.turns[2].prompt)
        assert [m["role"] for m in last["messages"]] == ["user", "assistant"] * 2 + ["user"]
        assert last["messages"][1]["content"] == "w0 w1 w2 "  # the reply the server actually sent
        assert recs[2].prompt_len == sum(t.prompt_len for t in conv.turns) + 2 * 3


def test_failed_turn_ends_its_conversation(server: FakeServer) -> None:
    server.fail_status = 500
    conv = Conversation(0, [Turn("a", 1, 2), Turn("b", 1, 2)])
    out = run(server, [conv], endpoint=CHAT)
    assert len(out.records) == 1 and out.not_started == 1


def test_overall_timeout_cancels_and_reports(server: FakeServer) -> None:
    server.ttft, server.gap = 0.0, 0.1
    out = run(server, convs(3, output_len=50), concurrency=1, timeout=0.3)
    assert out.duration < 50 * server.gap  # cut before the first stream could end by itself
    assert len(out.records) == 1 and out.not_started == 2
    (r,) = out.records
    assert r.error == "cancelled: benchmark timeout" and 1 <= len(r.chunk_times) < 50


def test_request_rate_spreads_arrivals(server: FakeServer) -> None:
    server.ttft, server.gap = 0.0, 0.0
    out = run(server, convs(5, output_len=1), request_rate=20.0, seed=3)
    sends = sorted(r.send_time for r in out.records)
    assert all(r.success for r in out.records)
    assert sends[-1] > 0.05  # Poisson arrivals at 20/s: 4 gaps, not all at t=0


def test_first_model_from_v1_models(server: FakeServer) -> None:
    async def go() -> str:
        async with BenchClient(ClientConfig(server.base_url)) as client:
            return await client.first_model()

    assert asyncio.run(go()) == MODEL
