"""Service-level objectives of a plan: `--slo ttft=0.5,itl=0.05` (seconds).

`ttft`, `itl`, `tpot` and `e2e` bound a percentile of each metric (`--percentile`, p99 by default) for
`recommend`. Goodput, as `duoserve bench` counts it, is per request: a request meets `itl` when its
mean gap between tokens (its TPOT) does, as vLLM's goodput takes its per-token objective.
"""

from __future__ import annotations

from dataclasses import dataclass

from duoserve.bench.metrics import SLO

_KEYS = ("ttft", "itl", "tpot", "e2e")
# Summary key stem of each objective (bench's names).
_STEMS = {"ttft": "ttft", "itl": "itl", "tpot": "tpot", "e2e": "e2el"}


@dataclass(frozen=True)
class Objectives:
    ttft: float | None = None
    itl: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    @classmethod
    def parse(cls, text: str) -> Objectives:
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in _KEYS:
                raise ValueError(f"bad SLO {item!r}: expected ttft=S, itl=S, tpot=S or e2e=S (seconds)")
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"bad SLO {item!r}: {value!r} is not a number of seconds") from None
            if not values[key] > 0:
                raise ValueError(f"SLO {key} must be positive, got {value}")
        if not values:
            raise ValueError("the SLO names no objective: e.g. --slo ttft=0.5,itl=0.05")
        return cls(**values)

    def goodput_slo(self) -> SLO:
        return SLO(ttft=self.ttft, tpot=self.tpot if self.tpot is not None else self.itl, e2e=self.e2e)

    def violations(self, summary: dict, percentile: int) -> list[str]:
        """The objectives a result summary misses at that percentile ('p99_ttft_ms 812 > 500')."""
        missed = []
        for key in _KEYS:
            bound = getattr(self, key)
            if bound is None:
                continue
            name = f"p{percentile}_{_STEMS[key]}_ms"
            value = summary.get(name)
            if value is None:
                # no data: e.g. no request produced two tokens for itl; a failed run has no ttft
                if key == "ttft" or summary.get("completed", 0) == 0:
                    missed.append(f"{name} undefined")
                continue
            if value > bound * 1000:
                missed.append(f"{name} {value:.0f} > {bound * 1000:.0f}")
        return missed

    def __str__(self) -> str:
        return ",".join(f"{k}={getattr(self, k):g}" for k in _KEYS if getattr(self, k) is not None)
