"""`duoserve plan recommend`: the cheapest deployment whose simulated run meets the SLO.

Each candidate is simulated on the whole workload (arrivals included), so queueing is in the answer:
a bursty workload queues where a Poisson one at the same mean rate does not, and needs more workers.
Candidates go by cost (workers in all), colocated before disaggregated at equal cost; disaggregated
ones are only tried up to the cheapest colocated one's cost, since beyond it they cannot pay.

`headroom` h asks that the SLO still hold with the arrival rate raised by the fraction h (the arrival
times are divided by 1 + h): room for the load to grow before the autoscaler reacts.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any

from duoserve.bench.metrics import summarize
from duoserve.plan.deployment import Deployment
from duoserve.plan.objectives import Objectives
from duoserve.plan.profile import Profile
from duoserve.plan.simulate import simulate
from duoserve.plan.workload import Workload


@dataclass
class Candidate:
    deployment: Deployment
    summary: dict[str, Any]
    missed: list[str]

    @property
    def meets(self) -> bool:
        return not self.missed


@dataclass
class Recommendation:
    best: Candidate | None
    colocated: Candidate | None  # the cheapest colocated deployment that meets the SLO
    disaggregated: Candidate | None  # the cheapest disaggregated one (None if none was cheaper to try)
    tried: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def desired_replicas(self) -> dict[str, int]:
        """Workers per role of the recommendation (all 0 roles included), for the autoscaler's gauge."""
        d = self.best.deployment if self.best else None
        if d is None:
            return {}
        if d.disaggregated:
            return {"prefill": d.prefill, "decode": d.decode, "colocated": 0}
        return {"prefill": 0, "decode": 0, "colocated": d.decode}


def with_headroom(workload: Workload, headroom: float) -> Workload:
    if headroom < 0:
        raise ValueError(f"--headroom must be >= 0, got {headroom}")
    if headroom == 0:
        return workload
    convs = [dataclasses.replace(c, arrival=c.arrival / (1 + headroom)) for c in workload.conversations]
    return dataclasses.replace(workload, conversations=convs)


def evaluate(
    profile: Profile,
    deployment: Deployment,
    workload: Workload,
    objectives: Objectives,
    percentile: int,
    router: dict[str, Any] | None = None,
) -> Candidate:
    records, duration, _ = simulate(profile, deployment, workload, router)
    summary = summarize(records, duration, objectives.goodput_slo())
    missed = objectives.violations(summary, percentile)
    if summary["failed"]:
        missed.append(f"{summary['failed']} requests do not fit the context")
    return Candidate(deployment, summary, missed)


def recommend(
    profile: Profile,
    workload: Workload,
    objectives: Objectives,
    percentile: int = 99,
    headroom: float = 0.0,
    max_replicas: int = 8,
    router: dict[str, Any] | None = None,
) -> Recommendation:
    """The cheapest deployment meeting the objectives; ValueError when no number of workers can."""
    if max_replicas < 1:
        raise ValueError("--max-replicas must be >= 1")
    _check_possible(profile, workload, objectives, percentile, router)
    loaded = with_headroom(workload, headroom)
    tried: list[Candidate] = []

    def run(deployment: Deployment) -> Candidate:
        candidate = evaluate(profile, deployment, loaded, objectives, percentile, router)
        tried.append(candidate)
        return candidate

    colocated = next(
        (c for n in range(1, max_replicas + 1) if (c := run(Deployment(0, n))).meets),
        None,
    )
    limit = colocated.deployment.replicas - 1 if colocated else max_replicas
    disaggregated = None
    for cost in range(2, limit + 1):
        for prefill in range(1, cost):
            candidate = run(Deployment(prefill, cost - prefill))
            if candidate.meets and (
                disaggregated is None or _slack(candidate, objectives) > _slack(disaggregated, objectives)
            ):
                disaggregated = candidate
        if disaggregated is not None:
            break
    best = disaggregated or colocated
    rec = Recommendation(best, colocated, disaggregated, tried)
    rec.notes = _notes(rec, workload, max_replicas, router)
    return rec


def _slack(candidate: Candidate, objectives: Objectives) -> float:
    """How far inside the objectives a run stays (the smallest bound / p99 ratio): ties between
    deployments of equal cost go to the one with the most room."""
    ratios = []
    for key, stem in (("ttft", "ttft"), ("itl", "itl"), ("tpot", "tpot"), ("e2e", "e2el")):
        bound, value = getattr(objectives, key), candidate.summary.get(f"p99_{stem}_ms")
        if bound is not None and value:
            ratios.append(bound * 1000 / value)
    return min(ratios, default=0.0)


def _check_possible(
    profile: Profile,
    workload: Workload,
    objectives: Objectives,
    percentile: int,
    router: dict[str, Any] | None,
) -> None:
    """A lone request (one at a time on one worker: no queueing, no batching) is as fast as the
    workload's requests get; if even that misses the SLO, no number of workers meets it."""
    alone = dataclasses.replace(workload, concurrency=1)
    floor = evaluate(profile, Deployment(0, 1), alone, objectives, percentile, router)
    if floor.missed:
        raise ValueError(
            "impossible SLO: even one request at a time on an idle worker misses it "
            f"({'; '.join(floor.missed)})"
        )


def _notes(
    rec: Recommendation, workload: Workload, max_replicas: int, router: dict[str, Any] | None
) -> list[str]:
    notes = []
    if rec.best is None:
        notes.append(f"no deployment of up to {max_replicas} workers meets this SLO")
        return notes
    if rec.disaggregated is None:
        reasons = []
        prompts = [len(c.system) + len(t.prompt) for c in workload.conversations for t in c.turns]
        threshold = (router or {}).get("remote_prefill_min_tokens", 64)
        if prompts and statistics.median(prompts) < threshold:
            reasons.append(
                f"prompts are short (median {statistics.median(prompts):.0f} tokens, under the router's "
                f"remote prefill threshold of {threshold}): decode workers prefill them themselves"
            )
        if rec.colocated is not None and rec.colocated.deployment.replicas == 1:
            reasons.append("the load fits one worker")
        why = f": {'; '.join(reasons)}" if reasons else ""
        notes.append(
            f"disaggregation does not pay here{why}; no prefill/decode split meets the SLO with fewer "
            f"workers than {rec.colocated.deployment}"
        )
    elif rec.colocated is None:
        notes.append(f"no colocated deployment of up to {max_replicas} workers meets this SLO")
    else:
        notes.append(
            f"disaggregation pays: {rec.disaggregated.deployment} meets the SLO with fewer workers "
            f"than {rec.colocated.deployment}"
        )
    return notes


def format_recommendation(rec: Recommendation, objectives: Objectives, percentile: int) -> str:
    p = percentile
    columns = ["deployment", "workers", "p50 TTFT ms", f"p{p} TTFT ms", "p50 ITL ms", f"p{p} ITL ms"]
    header = "| " + " | ".join([*columns, "goodput req/s", "meets"]) + " |"
    lines = [f"SLO {objectives} at p{p}", "", header, "|" + "---|" * 8]
    for c in rec.tried:
        s = c.summary
        cells = [
            str(c.deployment),
            str(c.deployment.replicas),
            *(_ms(s.get(k)) for k in ("p50_ttft_ms", f"p{p}_ttft_ms", "p50_itl_ms", f"p{p}_itl_ms")),
            f"{s.get('request_goodput') or 0:.2f}",
            "yes" if c.meets else "no: " + "; ".join(c.missed),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if rec.best is not None:
        lines.append(f"recommended: {rec.best.deployment} ({rec.best.deployment.replicas} workers)")
    lines += [f"note: {n}" for n in rec.notes]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
