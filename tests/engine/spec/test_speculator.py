"""The batch-level rate back-off: drafting stops at a batch size where it measured slower."""

from __future__ import annotations

from duoserve.engine.spec.speculator import _RECHECK_EVERY, _BatchRate


def test_unmeasured_batch_size_tries_drafting_then_measures_plain():
    rate = _BatchRate()
    assert rate.drafting_pays()
    rate.observe(speculated=True, rate=100.0)
    assert not rate.drafting_pays()  # one plain step to compare with
    rate.observe(speculated=False, rate=80.0)
    assert rate.drafting_pays()


def test_slower_drafting_stops_and_is_rechecked():
    rate = _BatchRate()
    rate.observe(speculated=True, rate=100.0)
    rate.observe(speculated=False, rate=200.0)
    decisions = [rate.drafting_pays() for _ in range(2 * _RECHECK_EVERY)]
    assert decisions.count(True) == 2 and decisions[_RECHECK_EVERY - 1] and decisions[-1]
    for _ in range(10):  # the re-checks find drafting faster now
        rate.observe(speculated=True, rate=400.0)
    assert rate.drafting_pays()


def test_rates_are_moving_averages():
    rate = _BatchRate()
    rate.observe(speculated=False, rate=100.0)
    rate.observe(speculated=False, rate=200.0)
    assert 100.0 < rate.plain < 200.0 and rate.speculative is None
