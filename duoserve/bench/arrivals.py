"""Request arrival times for open-loop load (--request-rate, --burstiness)."""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start at which each of `n` requests arrives; the first arrives at 0.

    Gaps are gamma-distributed with mean 1/rate and shape `burstiness`, as in vLLM: burstiness 1 is a
    Poisson process (exponential gaps), below 1 burstier, above 1 more regular (coefficient of variation
    1/sqrt(burstiness)). An infinite rate sends everything at once.
    """
    if n <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * n
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
