"""Deployments the planner simulates and recommends: `colocated:N` or `disagg:PxD`."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PATTERN = re.compile(r"^(?:colocated:(?P<n>\d+)|disagg:(?P<p>\d+)x(?P<d>\d+))$")


@dataclass(frozen=True)
class Deployment:
    prefill: int = 0  # prefill workers (0: colocated)
    decode: int = 1  # decode workers, or colocated ones

    @classmethod
    def parse(cls, text: str) -> Deployment:
        match = _PATTERN.match(text.strip())
        if match is None:
            raise ValueError(f"bad deployment {text!r}: expected colocated:N or disagg:PxD (e.g. disagg:1x2)")
        if match["n"] is not None:
            deployment = cls(0, int(match["n"]))
        else:
            deployment = cls(int(match["p"]), int(match["d"]))
            if deployment.prefill < 1:
                raise ValueError(f"bad deployment {text!r}: disagg needs at least one prefill worker")
        if deployment.decode < 1:
            raise ValueError(f"bad deployment {text!r}: at least one decode (or colocated) worker")
        return deployment

    @property
    def disaggregated(self) -> bool:
        return self.prefill > 0

    @property
    def replicas(self) -> int:
        """Workers in all: what the deployment costs."""
        return self.prefill + self.decode

    def __str__(self) -> str:
        return f"disagg:{self.prefill}x{self.decode}" if self.disaggregated else f"colocated:{self.decode}"
