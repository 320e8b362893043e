"""Metric math on hand-computed examples."""

from __future__ import annotations

import pytest

from duoserve.bench.metrics import (
    SLO,
    describe,
    even_split,
    itl,
    percentile,
    reconcile_chunk_tokens,
    summarize,
    tpot,
)
from duoserve.bench.records import RequestRecord


def rec(
    ttft: float | None,
    latency: float,
    output_tokens: int,
    *,
    error: str | None = None,
    prompt_len: int = 10,
    prompt_tokens: int | None = None,
    chunks: tuple[list[float], list[int]] = ([], []),
) -> RequestRecord:
    r = RequestRecord(0, 0, 0, prompt_len, output_tokens, send_time=1.0, end_time=1.0 + latency)
    r.ttft, r.output_tokens, r.error, r.prompt_tokens = ttft, output_tokens, error, prompt_tokens
    r.chunk_times, r.chunk_tokens = chunks
    return r


def test_percentiles_interpolate_linearly_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    # Rank q/100 * (n-1) on the sorted values: p50 -> 1.5 -> 2.5, p90 -> 2.7 -> 3.7, p99 -> 2.97 -> 3.97.
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 95) == pytest.approx(3.85)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([], 50) is None
    stats = describe(values)
    assert stats["mean"] == pytest.approx(2.5)
    assert stats["median"] == pytest.approx(2.5)
    assert stats["p99"] == pytest.approx(3.97)
    assert describe([])["p50"] is None


def test_tpot_excludes_first_token_and_single_token_outputs() -> None:
    assert tpot(latency=1.0, ttft=0.1, output_tokens=10) == pytest.approx(0.1)
    assert tpot(latency=0.3, ttft=0.3, output_tokens=1) is None
    assert tpot(latency=0.3, ttft=0.3, output_tokens=0) is None


def test_itl_one_entry_per_token_and_multi_token_chunks_split_their_gap() -> None:
    # Chunks at 0.1 (1 token), 0.2 (1 token), 0.5 (3 tokens): the 0.3 s gap is shared by 3 tokens.
    assert itl([0.1, 0.2, 0.5], [1, 1, 3]) == pytest.approx([0.1, 0.1, 0.1, 0.1])
    # Tokens that arrive with the first token have no gap of their own.
    assert itl([0.1, 0.3], [2, 2]) == pytest.approx([0.0, 0.1, 0.1])
    # A chunk carrying no token does not reset the clock: its time goes to the next token.
    assert itl([0.1, 0.2, 0.4], [1, 0, 2]) == pytest.approx([0.15, 0.15])
    assert itl([], []) == []


def test_itl_mean_matches_tpot() -> None:
    times, tokens = [0.2, 0.25, 0.45, 0.5, 0.8], [1, 1, 4, 1, 2]
    gaps = itl(times, tokens)
    n = sum(tokens)
    assert len(gaps) == n - 1
    latency = 0.8  # ends with the last chunk
    assert sum(gaps) / len(gaps) == pytest.approx(tpot(latency, 0.2, n))


def test_even_split_and_reconcile_with_usage() -> None:
    assert even_split(6, 4) == [1, 2, 1, 2]
    assert even_split(3, 3) == [1, 1, 1]
    assert even_split(2, 4) == [0, 1, 0, 1]
    # 5 chunks, usage says 9 tokens: the first chunk keeps 1, the other 8 spread over 4 chunks.
    assert reconcile_chunk_tokens([1] * 5, exact=False, usage_total=9) == [1, 2, 2, 2, 2]
    assert reconcile_chunk_tokens([1] * 5, exact=False, usage_total=7) == [1, 1, 2, 1, 2]
    # Fewer tokens than chunks: some later chunks carried none.
    assert reconcile_chunk_tokens([1] * 4, exact=False, usage_total=3) == [1, 0, 1, 1]
    assert reconcile_chunk_tokens([1], exact=False, usage_total=5) == [5]
    # Logprob counts are exact and win; no usage leaves the chunk counts alone.
    assert reconcile_chunk_tokens([2, 3], exact=True, usage_total=9) == [2, 3]
    assert reconcile_chunk_tokens([1, 1, 1], exact=False, usage_total=None) == [1, 1, 1]


def test_slo_parse() -> None:
    slo = SLO.parse("ttft=0.5, tpot=0.05,e2e=10")
    assert (slo.ttft, slo.tpot, slo.e2e) == (0.5, 0.05, 10.0)
    assert SLO.parse("ttft=1").tpot is None
    for bad in ("ttfb=1", "ttft", "ttft=-1", "ttft=x"):
        with pytest.raises(ValueError):
            SLO.parse(bad)


def test_goodput_counts_requests_meeting_every_slo() -> None:
    slo = SLO.parse("ttft=0.5,tpot=0.05,e2e=10")
    records = [
        rec(0.2, 1.0, 21),  # tpot 0.04: good
        rec(0.3, 0.3, 1),  # one token: tpot undefined, cannot violate: good
        rec(0.6, 1.0, 21),  # ttft too slow
        rec(0.2, 2.2, 21),  # tpot 0.1 too slow
        rec(0.2, 11.0, 1000),  # tpot 0.0108 fine but e2e too slow
        rec(0.1, 1.0, 21, error="HTTP 500"),  # failed never counts
    ]
    assert [slo.met_by(r) for r in records] == [True, True, False, False, False, False]
    summary = summarize(records, duration=4.0, slo=slo)
    assert summary["request_goodput"] == pytest.approx(2 / 4.0)
    assert summarize(records, duration=4.0)["request_goodput"] is None


def test_summarize_throughputs_and_latency_stats() -> None:
    records = [
        rec(0.1, 1.0, 10, prompt_len=100, chunks=([1.1, 2.0], [1, 9])),
        rec(0.3, 2.0, 20, prompt_len=50, prompt_tokens=60),  # server usage beats the estimate
        rec(None, 0.5, 0, error="boom", prompt_len=999),
    ]
    s = summarize(records, duration=2.0)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["total_input_tokens"] == 160
    assert s["total_output_tokens"] == 30
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(15.0)
    assert s["total_token_throughput"] == pytest.approx(95.0)
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["p50_e2el_ms"] == pytest.approx(1500.0)
    # tpot: (1.0-0.1)/9 = 0.1 and (2.0-0.3)/19.
    assert s["mean_tpot_ms"] == pytest.approx(1000 * (0.1 + 1.7 / 19) / 2)
    assert s["mean_itl_ms"] == pytest.approx(100.0)  # 0.9 s spread over 9 tokens
    assert s["mean_concurrency"] == pytest.approx(1.5)
