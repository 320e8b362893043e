"""The runner's multi-turn scheduling: slots held across turns (default) or per turn with
--max-active-conversations, against the real streaming test server. Orders, not timings, are checked."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("httpx")

from duoserve.bench.client import BenchClient, ClientConfig  # noqa: E402
from duoserve.bench.datasets import Conversation, Turn  # noqa: E402
from duoserve.bench.payload import RequestOptions  # noqa: E402
from duoserve.bench.runner import LoadConfig, RunOutcome, run_load  # noqa: E402
from tests.bench.fake_server import MODEL, FakeServer  # noqa: E402

CHAT = "/v1/chat/completions"


def conversations(n: int, turns: int, output_len: int = 2) -> list[Conversation]:
    return [Conversation(i, [Turn(f"c{i} t{k}", 2, output_len) for k in range(turns)]) for i in range(n)]


def run(server: FakeServer, convs: list[Conversation], **load: Any) -> RunOutcome:
    async def go() -> RunOutcome:
        cfg = ClientConfig(server.base_url, CHAT, max_connections=load.get("concurrency"))
        async with BenchClient(cfg) as client:
            return await run_load(
                convs, client, RequestOptions(MODEL, CHAT), LoadConfig(progress=False, **load)
            )

    return asyncio.run(go())


def sent_order(out: RunOutcome, server: FakeServer) -> list[tuple[int, int]]:
    """(conversation, turn) in the order the requests were sent, checked against the server's order."""
    assert all(r.success for r in out.records)
    order = [(r.conv_id, r.turn) for r in sorted(out.records, key=lambda r: r.send_time)]
    received = [body["messages"][-1]["content"] for body in server.bodies]
    assert received == [f"c{c} t{k}" for c, k in order]
    return order


def test_without_the_flag_a_conversation_holds_its_slot_across_its_turns(server: FakeServer) -> None:
    server.ttft, server.gap = 0.0, 0.0
    out = run(server, conversations(3, turns=3), concurrency=1)
    assert sent_order(out, server) == [(c, k) for c in range(3) for k in range(3)]


def test_active_conversations_take_turns_round_robin(server: FakeServer) -> None:
    server.ttft, server.gap = 0.0, 0.0
    out = run(server, conversations(4, turns=3), concurrency=1, max_active_conversations=4)
    assert sent_order(out, server) == [(c, k) for k in range(3) for c in range(4)]
    assert server.max_in_flight == 1


def test_max_active_conversations_bounds_the_rotation(server: FakeServer) -> None:
    server.ttft, server.gap = 0.0, 0.0
    out = run(server, conversations(4, turns=2), concurrency=1, max_active_conversations=2)
    # 0 and 1 alternate; 2 enters when 0 ends (behind 1's last turn), 3 when 1 ends.
    assert sent_order(out, server) == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]


def test_turns_share_the_request_slots(server: FakeServer) -> None:
    server.ttft, server.gap = 0.01, 0.005
    out = run(server, conversations(6, turns=3), concurrency=2, max_active_conversations=6)
    assert len(out.records) == 18 and out.not_started == 0
    assert server.max_in_flight == 2
    for c in range(6):  # each conversation's turns still one after another
        recs = sorted((r for r in out.records if r.conv_id == c), key=lambda r: r.turn)
        assert [r.turn for r in recs] == [0, 1, 2]
        assert all(
            later.send_time >= earlier.end_time for earlier, later in zip(recs, recs[1:], strict=False)
        )


def test_turns_waiting_for_a_slot_at_the_timeout_were_not_sent(server: FakeServer) -> None:
    server.ttft, server.gap = 0.0, 0.1
    convs = conversations(3, turns=1, output_len=50)
    out = run(server, convs, concurrency=1, max_active_conversations=3, timeout=0.3)
    assert len(out.records) == 1 and out.not_started == 2
    assert out.records[0].error == "cancelled: benchmark timeout"


def test_max_active_conversations_must_be_positive(server: FakeServer) -> None:
    with pytest.raises(ValueError, match="--max-active-conversations must be >= 1"):
        run(server, conversations(1, turns=1), max_active_conversations=0)
