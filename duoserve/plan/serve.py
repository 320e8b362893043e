"""`duoserve plan serve`: desired replicas from observed traffic, as a Prometheus gauge for an autoscaler.

Every `interval` seconds it scrapes a router's (or a worker's) `/metrics`, estimates the traffic of
the last `window` seconds from duoserve's own series, and re-runs `recommend` on a workload shaped like
it; it exports

    duoserve:planner_desired_replicas{role="prefill"|"decode"|"colocated"}

(and the traffic it saw) on its own `/metrics`. A KEDA ScaledObject or an HPA on an external metric
scales each role's Deployment to its value.

What the traffic estimate reads:
- the request rate: the increase of `duoserve:request_success_total` (all finish reasons) per second;
- prompt and output lengths: the increase of each bucket of `duoserve:request_prompt_tokens` and
  `duoserve:request_generation_tokens` (lengths are drawn uniformly within each bucket);
- burstiness: the dispersion (variance / mean) of the requests counted per scrape interval. For a
  renewal process counted over intervals much longer than its gaps, that index is the squared
  coefficient of variation of the gaps, so the gamma shape bench calls --burstiness is 1 / dispersion
  (Poisson: 1). Clamped to [0.05, 20]; with fewer than 4 intervals seen, Poisson is assumed.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from duoserve.bench.arrivals import arrival_offsets
from duoserve.bench.tokens import WordEstimator
from duoserve.plan.objectives import Objectives
from duoserve.plan.profile import Profile
from duoserve.plan.recommend import recommend
from duoserve.plan.workload import SimConversation, SimTurn, Workload

logger = logging.getLogger("duoserve.planner")

ROLES = ("prefill", "decode", "colocated")
_SUCCESS = "duoserve:request_success"
_PROMPT = "duoserve:request_prompt_tokens"
_OUTPUT = "duoserve:request_generation_tokens"


@dataclass
class Scrape:
    """The cumulative series the planner reads, at one time."""

    time: float
    requests: float
    prompt_buckets: dict[float, float]  # upper bound -> cumulative count (Prometheus `le`)
    output_buckets: dict[float, float]


def parse_metrics(text: str, now: float) -> Scrape:
    """duoserve's series from Prometheus text; ValueError if they are not there (not a duoserve server)."""
    requests = None
    buckets: dict[str, dict[float, float]] = {_PROMPT: {}, _OUTPUT: {}}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as err:
        raise ValueError(f"not Prometheus text: {err}") from err
    for family in families:
        for sample in family.samples:
            if family.name == _SUCCESS and sample.name.endswith("_total"):
                requests = (requests or 0.0) + sample.value
            elif family.name in buckets and sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                series = buckets[family.name]
                series[bound] = series.get(bound, 0.0) + sample.value
    if requests is None or not buckets[_PROMPT] or not buckets[_OUTPUT]:
        raise ValueError(f"no {_SUCCESS}_total / {_PROMPT} / {_OUTPUT} series: is this a duoserve /metrics?")
    return Scrape(now, requests, buckets[_PROMPT], buckets[_OUTPUT])


@dataclass
class Traffic:
    rate: float  # requests per second
    burstiness: float  # gamma shape of the arrival gaps (1: Poisson)
    prompt_hist: list[tuple[float, float, float]]  # (low, high, count) of prompt lengths
    output_hist: list[tuple[float, float, float]]


def _bucket_delta(new: dict[float, float], old: dict[float, float]) -> list[tuple[float, float, float]]:
    """Per-bucket counts of what finished between two scrapes, as (low, high, count)."""
    bounds = sorted(b for b in new if math.isfinite(b))
    out, low, below = [], 0.0, 0.0
    for bound in bounds:
        cumulative = new[bound] - old.get(bound, 0.0)
        count = cumulative - below
        if count > 0:
            out.append((low, bound, count))
        low, below = bound, cumulative
    return out


def estimate_traffic(scrapes: list[Scrape]) -> Traffic | None:
    """The traffic between the first and last scrape; None before two scrapes or without requests."""
    if len(scrapes) < 2:
        return None
    first, last = scrapes[0], scrapes[-1]
    span = last.time - first.time
    finished = last.requests - first.requests
    if span <= 0 or finished <= 0:
        return None
    counts = [b.requests - a.requests for a, b in zip(scrapes, scrapes[1:], strict=False)]
    burstiness = 1.0
    if len(counts) >= 4 and statistics.mean(counts) > 0:
        dispersion = statistics.pvariance(counts) / statistics.mean(counts)
        burstiness = min(20.0, max(0.05, 1.0 / dispersion)) if dispersion > 0 else 20.0
    return Traffic(
        finished / span,
        burstiness,
        _bucket_delta(last.prompt_buckets, first.prompt_buckets),
        _bucket_delta(last.output_buckets, first.output_buckets),
    )


def _draw(hist: list[tuple[float, float, float]], n: int, rng: np.random.Generator, cap: int) -> list[int]:
    counts = np.array([c for _, _, c in hist], dtype=float)
    picks = rng.choice(len(hist), size=n, p=counts / counts.sum())
    return [int(min(cap, max(1, rng.uniform(hist[i][0], hist[i][1]) + 1))) for i in picks.tolist()]


def traffic_workload(traffic: Traffic, num_requests: int, max_len: int, seed: int = 0) -> Workload:
    """Requests shaped like the observed traffic: its rate, burstiness and length distributions."""
    rng = np.random.default_rng(seed)
    outputs = _draw(traffic.output_hist, num_requests, rng, max_len // 2)
    prompts = _draw(traffic.prompt_hist, num_requests, rng, max_len // 2)
    offsets = arrival_offsets(num_requests, traffic.rate, traffic.burstiness, seed)
    counter = WordEstimator()
    convs = [
        SimConversation(i, t, [SimTurn(counter.random_ids(p, rng), o)])
        for i, (t, p, o) in enumerate(zip(offsets, prompts, outputs, strict=True))
    ]
    return Workload(convs, None, {"request_rate": traffic.rate, "burstiness": traffic.burstiness})


@dataclass
class Planner:
    """Scrapes in, desired replicas out (one `observe` per interval)."""

    profile: Profile
    objectives: Objectives
    percentile: int = 99
    headroom: float = 0.2
    max_replicas: int = 8
    window: float = 120.0
    num_requests: int = 200  # simulated per decision: enough for a p99, few enough to decide in seconds
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.scrapes: deque[Scrape] = deque()
        self.desired = Gauge(
            "duoserve:planner_desired_replicas",
            "Workers of each role the planner recommends for the observed traffic and the SLO.",
            ["role"],
            registry=self.registry,
        )
        self.rate = Gauge(
            "duoserve:planner_observed_request_rate", "Requests per second seen.", registry=self.registry
        )
        self.burstiness = Gauge(
            "duoserve:planner_observed_burstiness",
            "Gamma shape of the arrival gaps seen (1 = Poisson, lower = burstier).",
            registry=self.registry,
        )
        self.meets = Gauge(
            "duoserve:planner_slo_attainable",
            "1 when some deployment of up to --max-replicas workers meets the SLO for the traffic seen.",
            registry=self.registry,
        )
        for role in ROLES:
            self.desired.labels(role)

    def observe(self, scrape: Scrape) -> dict[str, int] | None:
        """Add a scrape; re-plan on the window's traffic. Returns the desired replicas (None: no traffic)."""
        self.scrapes.append(scrape)
        while len(self.scrapes) > 2 and scrape.time - self.scrapes[1].time >= self.window:
            self.scrapes.popleft()
        traffic = estimate_traffic(list(self.scrapes))
        if traffic is None:
            return None
        self.rate.set(traffic.rate)
        self.burstiness.set(traffic.burstiness)
        workload = traffic_workload(traffic, self.num_requests, self.profile.limits.max_model_len)
        try:
            rec = recommend(
                self.profile, workload, self.objectives, self.percentile, self.headroom, self.max_replicas
            )
        except ValueError as err:  # an SLO no deployment can meet for this traffic: keep the last answer
            logger.warning("planner: %s", err)
            self.meets.set(0)
            return None
        self.meets.set(1 if rec.best else 0)
        if rec.best is None:
            # Nothing up to max_replicas meets it: ask for the most, as colocated workers.
            desired = {"prefill": 0, "decode": 0, "colocated": self.max_replicas}
        else:
            desired = rec.desired_replicas()
        for role, count in desired.items():
            self.desired.labels(role).set(count)
        logger.info("traffic %.2f req/s (burstiness %.2f): %s", traffic.rate, traffic.burstiness, desired)
        return desired


def serve_planner(planner: Planner, metrics_url: str, host: str, port: int, interval: float) -> int:
    """Scrape, plan and export until interrupted."""
    import httpx
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=planner.registry)
    logger.warning("planner: exporting on http://%s:%d/metrics, scraping %s", host, port, metrics_url)
    try:
        with httpx.Client(timeout=10.0) as client:
            while True:
                started = time.monotonic()
                try:
                    response = client.get(metrics_url)
                    response.raise_for_status()
                    planner.observe(parse_metrics(response.text, started))
                except (httpx.HTTPError, ValueError) as err:
                    logger.warning("planner: scraping %s failed: %s", metrics_url, err)
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 130
    finally:
        server.shutdown()
        thread.join()
