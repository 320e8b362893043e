"""What one benchmark request observed, in the form written to the result JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Keeps result files small without losing anything a network timer can resolve.
_TIME_DECIMALS = 6


@dataclass
class RequestRecord:
    """One request. Times are seconds since the benchmark started (one clock for every request)."""

    request_id: int
    conv_id: int
    turn: int
    prompt_len: int  # input tokens we meant to send (an estimate unless --tokenizer was given)
    max_tokens: int
    send_time: float = 0.0
    end_time: float = 0.0
    ttft: float | None = None  # first token-bearing chunk minus send_time
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    chunk_tokens: list[int] = field(default_factory=list)  # tokens carried by each content chunk
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from the server's usage, when it reports one
    usage_reported: bool = False
    # usage.prompt_tokens_details.cached_tokens, where the server reports it (vLLM, duoserve): prompt
    # tokens its prefix cache served, so a multi-turn run can tell turns whose history was evicted.
    cached_tokens: int | None = None
    error: str | None = None
    # Needed by multi-turn (the next turn quotes it); left out of result files to keep them small.
    generated_text: str = field(default="", repr=False)

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        return self.end_time - self.send_time

    @property
    def input_tokens(self) -> int:
        """Prefer the server's count: chat templates add tokens our prompt estimate cannot see."""
        return self.prompt_tokens if self.prompt_tokens is not None else self.prompt_len

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["generated_text"]
        for key in ("send_time", "end_time", "ttft"):
            if data[key] is not None:
                data[key] = round(data[key], _TIME_DECIMALS)
        data["chunk_times"] = [round(t, _TIME_DECIMALS) for t in self.chunk_times]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
