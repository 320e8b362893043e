"""The result file (config, per-request records, summary) and the summary table printed after a run."""

from __future__ import annotations

import collections
import json
import math
from datetime import datetime, timezone
from typing import Any

from duoserve.bench.metrics import METRICS, PERCENTILES
from duoserve.bench.records import RequestRecord

RESULT_VERSION = 1
_WIDTH = 72
_METRIC_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def result_document(
    config: dict[str, Any], summary: dict[str, Any], records: list[RequestRecord]
) -> dict[str, Any]:
    return {
        "version": RESULT_VERSION,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "summary": summary,
        "requests": [r.to_json() for r in records],
    }


def write_result(path: str, document: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)
        f.write("\n")


def load_result(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def top_errors(records: list[RequestRecord], limit: int = 3) -> list[tuple[str, int]]:
    """The most frequent error messages, so a run that failed says why without opening the JSON."""
    counts = collections.Counter(r.error for r in records if r.error is not None)
    return counts.most_common(limit)


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _load_line(config: dict[str, Any]) -> str:
    rate = config.get("request_rate")
    # Stored as "inf" (as vLLM does) because JSON has no infinity.
    rate_text = f"{rate:g}/s" if isinstance(rate, (int, float)) and math.isfinite(rate) else "inf"
    burst = f", burstiness {config.get('burstiness', 1.0):g}" if rate_text != "inf" else ""
    conc = config.get("concurrency")
    active = config.get("max_active_conversations")
    turns = f", {active} conversations active (slot per turn)" if active else ""
    return f"concurrency {conc if conc else 'unbounded'}{turns}, request rate {rate_text}{burst}"


def _workload_line(config: dict[str, Any]) -> str:
    dataset, n = config.get("dataset"), config.get("num_prompts")
    if dataset == "multi-turn":
        return f"{dataset}, {n} conversations x {config.get('multi_turn_turns')} turns"
    return f"{dataset}, {n} prompts"


def _latency_table(summary: dict[str, Any]) -> list[str]:
    cols = ["mean", *(f"p{p}" for p in PERCENTILES)]
    lines = [f"{'latency (ms)':<14}" + "".join(f"{c:>11}" for c in cols)]
    for name in METRICS:
        cells = "".join(f"{_num(summary.get(f'{c}_{name}_ms')):>11}" for c in cols)
        lines.append(f"{_METRIC_NAMES[name]:<14}{cells}")
    return lines


def format_summary(
    config: dict[str, Any], summary: dict[str, Any], errors: list[tuple[str, int]], notes: list[str]
) -> str:
    s, c = summary, config
    title = f" duoserve bench: {c.get('label', '')} "
    lines = [
        title.center(_WIDTH, "="),
        f"{'target':<14}{c.get('base_url', '')}{c.get('endpoint', '')}  model={c.get('model')}",
        f"{'workload':<14}{_workload_line(c)}",
        f"{'load':<14}{_load_line(c)}",
        f"{'requests':<14}{s['completed']} ok, {s['failed']} failed, {s.get('not_started', 0)} not sent"
        f" in {s['duration']:.2f} s",
        f"{'tokens':<14}{s['total_input_tokens']} in, {s['total_output_tokens']} out",
        f"{'throughput':<14}{s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s,"
        f" {s['total_token_throughput']:.1f} total tok/s",
    ]
    if s.get("request_goodput") is not None:
        lines.append(f"{'goodput':<14}{s['request_goodput']:.2f} req/s within SLO {config.get('slo')}")
    lines += ["-" * _WIDTH, *_latency_table(s), "=" * _WIDTH]
    lines += [f"error ({n}x): {message[:200]}" for message, n in errors]
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)
