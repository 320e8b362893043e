"""Arrival schedules for --request-rate and --burstiness."""

from __future__ import annotations

import math

import numpy as np
import pytest

from duoserve.bench.arrivals import arrival_offsets


def _gaps(offsets: list[float]) -> np.ndarray:
    return np.diff(np.asarray(offsets))


def test_poisson_mean_rate_and_exponential_gaps() -> None:
    offsets = arrival_offsets(20000, request_rate=10.0, seed=0)
    assert offsets[0] == 0.0 and all(b >= a for a, b in zip(offsets, offsets[1:], strict=False))
    gaps = _gaps(offsets)
    assert (len(offsets) - 1) / offsets[-1] == pytest.approx(10.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_rate_and_sets_variability(burstiness: float) -> None:
    gaps = _gaps(arrival_offsets(20000, request_rate=5.0, burstiness=burstiness, seed=1))
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_seeded_infinite_and_invalid() -> None:
    assert arrival_offsets(50, 3.0, seed=7) == arrival_offsets(50, 3.0, seed=7)
    assert arrival_offsets(50, 3.0, seed=7) != arrival_offsets(50, 3.0, seed=8)
    assert arrival_offsets(4, math.inf) == [0.0] * 4
    assert arrival_offsets(0, 1.0) == []
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)
    with pytest.raises(ValueError):
        arrival_offsets(3, 1.0, burstiness=0.0)
