"""`duoserve plan serve`: traffic read from a real duoserve /metrics text, desired replicas exported."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from duoserve.plan.objectives import Objectives
from duoserve.plan.serve import Planner, estimate_traffic, parse_metrics
from duoserve.server.metrics import ServerMetrics


def _serve_requests(metrics: ServerMetrics, count: int, prompt: int, output: int) -> None:
    """What the server's engine client records per finished request."""
    for _ in range(count):
        metrics.request_finished("length")
        metrics.request_prompt_tokens.observe(prompt)
        metrics.request_generation_tokens.observe(output)


def test_traffic_is_read_from_the_servers_own_series():
    metrics = ServerMetrics("m")
    scrapes = [parse_metrics(metrics.render().decode(), 0.0)]
    for t, count in enumerate((10, 0, 30, 0, 20), start=1):  # bursty: dispersion well above 1
        _serve_requests(metrics, count, prompt=300, output=40)
        scrapes.append(parse_metrics(metrics.render().decode(), 10.0 * t))
    traffic = estimate_traffic(scrapes)
    assert traffic.rate == pytest.approx(60 / 50)
    assert traffic.burstiness < 1
    assert [(low, high) for low, high, _ in traffic.prompt_hist] == [(200, 500)]  # the 1-2-5 bucket of 300
    assert sum(c for *_, c in traffic.output_hist) == 60


def test_the_planner_exports_desired_replicas(fixed_profile):
    metrics = ServerMetrics("m")
    planner = Planner(fixed_profile, Objectives.parse("ttft=1"), percentile=90, num_requests=60)
    assert planner.observe(parse_metrics(metrics.render().decode(), 0.0)) is None  # no traffic yet
    _serve_requests(metrics, 40, prompt=300, output=40)
    desired = planner.observe(parse_metrics(metrics.render().decode(), 20.0))
    assert desired == {"prefill": 0, "decode": 0, "colocated": 1}
    text = generate_latest(planner.registry).decode()
    assert 'duoserve:planner_desired_replicas{role="colocated"} 1.0' in text
    assert 'duoserve:planner_desired_replicas{role="prefill"} 0.0' in text
    assert "duoserve:planner_observed_request_rate 2.0" in text


def test_metrics_of_something_else_are_refused():
    with pytest.raises(ValueError, match="is this a duoserve /metrics"):
        parse_metrics("# TYPE up gauge\nup 1\n", 0.0)
