"""Turning one response stream, line by line with arrival times, into a RequestRecord.

Kept apart from the HTTP client so the bookkeeping (TTFT, per-chunk token counts, usage) can be driven
and tested with recorded streams and exact timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from duoserve.bench.metrics import reconcile_chunk_tokens
from duoserve.bench.records import RequestRecord
from duoserve.bench.sse import parse_event, sse_data


@dataclass
class StreamRecorder:
    record: RequestRecord
    chat: bool
    times: list[float] = field(default_factory=list)
    counts: list[int | None] = field(default_factory=list)  # None: the chunk did not say (no logprobs)
    texts: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None

    def feed_line(self, line: str, now: float) -> bool:
        """Take one line received at `now`; False once the stream is over ([DONE] or an error event)."""
        payload = sse_data(line)
        if payload is None:
            return True
        event = parse_event(payload, self.chat)
        if event.error is not None:
            self.record.error = event.error
            return False
        if event.done:
            return False
        if event.usage is not None:
            self.usage = event.usage  # some servers repeat running totals; the last one is final
        if event.has_tokens:
            self.times.append(now)
            self.counts.append(event.n_tokens)
            self.texts.append(event.text)
        return True

    def finish(self, end_time: float) -> None:
        """Fill in the record: per-chunk token counts made consistent with usage, TTFT, totals."""
        r = self.record
        r.end_time = end_time
        usage = self.usage or {}
        completion_tokens = usage.get("completion_tokens")
        exact = bool(self.counts) and all(c is not None for c in self.counts)
        counts = [1 if c is None else c for c in self.counts]
        r.chunk_times = list(self.times)
        r.chunk_tokens = reconcile_chunk_tokens(counts, exact, completion_tokens)
        r.usage_reported = isinstance(completion_tokens, int)
        r.output_tokens = sum(r.chunk_tokens) if counts else int(completion_tokens or 0)
        prompt_tokens = usage.get("prompt_tokens")
        r.prompt_tokens = prompt_tokens if isinstance(prompt_tokens, int) else None
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        r.cached_tokens = cached if isinstance(cached, int) else None
        r.ttft = self.times[0] - r.send_time if self.times else None
        r.generated_text = "".join(self.texts)
        if r.error is None and not self.times:
            r.error = "stream ended without any token (does the server stream?)"
