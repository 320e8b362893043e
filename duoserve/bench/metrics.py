"""Latency and throughput metrics, as pure functions of request records.

Definitions follow vLLM's benchmark_serving so numbers are comparable across tools, with one deliberate
difference: when a stream chunk carries several tokens, the gap before it is split evenly over those
tokens (vLLM records one ITL per chunk), so the ITL list has one entry per generated token after the
first, sums to (last token time - TTFT), and its mean matches TPOT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from duoserve.bench.records import RequestRecord

PERCENTILES = (50, 90, 95, 99)
# Summary key stems, shared with vLLM's result JSON (e.g. "p99_ttft_ms") so plot.py can read both.
METRICS = ("ttft", "tpot", "itl", "e2el")


def tpot(latency: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first; undefined (None) for outputs of fewer than 2 tokens."""
    if output_tokens < 2:
        return None
    return (latency - ttft) / (output_tokens - 1)


def request_tpot(record: RequestRecord) -> float | None:
    if record.ttft is None:
        return None
    return tpot(record.latency, record.ttft, record.output_tokens)


def even_split(total: int, parts: int) -> list[int]:
    """`total` as `parts` integers differing by at most 1, the larger ones spread evenly, not bunched."""
    return [(j + 1) * total // parts - j * total // parts for j in range(parts)]


def reconcile_chunk_tokens(counts: Sequence[int], exact: bool, usage_total: int | None) -> list[int]:
    """Tokens per content chunk, made consistent with the server's usage total.

    Without per-chunk counts (logprobs) we assume one token per chunk; if usage says otherwise, the first
    chunk keeps one token (it ends the prefill) and the rest are spread evenly over the later chunks,
    since we cannot tell which of them carried more.
    """
    counts = list(counts)
    if exact or usage_total is None or usage_total < 1 or usage_total == sum(counts) or not counts:
        return counts
    if len(counts) == 1:
        return [usage_total]
    return [1, *even_split(usage_total - 1, len(counts) - 1)]


def itl(chunk_times: Sequence[float], chunk_tokens: Sequence[int]) -> list[float]:
    """Inter-token latencies: each chunk's gap since the previous token-bearing chunk, split over its tokens.

    Extra tokens in the first chunk arrived together with the first token, so they get zero gaps; chunks
    with no tokens are skipped and their time is counted in the next token's gap.
    """
    gaps: list[float] = []
    last: float | None = None
    for t, n in zip(chunk_times, chunk_tokens, strict=True):
        if n <= 0:
            continue
        if last is None:
            gaps.extend([0.0] * (n - 1))
        else:
            gaps.extend([(t - last) / n] * n)
        last = t
    return gaps


def percentile(values: Sequence[float], q: float) -> float | None:
    """numpy's default (linear interpolation) percentile; None for no data."""
    return float(np.percentile(values, q)) if len(values) else None


def describe(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {"mean": None, "median": None, "std": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=float)
    stats: dict[str, float | None] = {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "std": float(arr.std()),
    }
    stats.update({f"p{p}": percentile(arr, p) for p in PERCENTILES})
    return stats


@dataclass(frozen=True)
class SLO:
    """Per-request service-level objectives in seconds; None means no objective on that metric."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    @classmethod
    def parse(cls, text: str) -> SLO:
        """`ttft=0.5,tpot=0.05,e2e=10` (seconds)."""
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in ("ttft", "tpot", "e2e"):
                raise ValueError(f"bad SLO {item!r}: expected ttft=S, tpot=S or e2e=S (seconds)")
            values[key] = float(value)
            if values[key] <= 0:
                raise ValueError(f"SLO {key} must be positive")
        return cls(**values)

    def met_by(self, record: RequestRecord) -> bool:
        """A failed request never meets it; an undefined TPOT (1-token output) cannot violate it."""
        if not record.success or record.ttft is None:
            return False
        if self.ttft is not None and record.ttft > self.ttft:
            return False
        per_token = request_tpot(record)
        if self.tpot is not None and per_token is not None and per_token > self.tpot:
            return False
        return self.e2e is None or record.latency <= self.e2e


def _ms(stats: dict[str, float | None], name: str) -> dict[str, float | None]:
    return {f"{k}_{name}_ms": (v * 1000 if v is not None else None) for k, v in stats.items()}


def summarize(
    records: Sequence[RequestRecord], duration: float, slo: SLO | None = None
) -> dict[str, float | None]:
    """Run-level numbers over successful requests; throughputs are per second of benchmark wall time."""
    ok = [r for r in records if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    per_request = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [v for v in map(request_tpot, ok) if v is not None],
        "itl": [g for r in ok for g in itl(r.chunk_times, r.chunk_tokens)],
        "e2el": [r.latency for r in ok],
    }

    def rate(count: float) -> float:
        return count / duration if duration > 0 else 0.0

    summary: dict[str, float | None] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": rate(len(ok)),
        "request_goodput": rate(sum(slo.met_by(r) for r in ok)) if slo else None,
        "output_throughput": rate(out_tokens),
        "total_token_throughput": rate(in_tokens + out_tokens),
        # Little's law: average requests in flight, for plotting request-rate runs against concurrency.
        "mean_concurrency": rate(sum(per_request["e2el"])),
    }
    for name in METRICS:
        summary.update(_ms(describe(per_request[name]), name))
    return summary
