"""recommend: queueing decides (bursty needs more than Poisson), disaggregation only when it pays."""

from __future__ import annotations

import argparse

import pytest

from duoserve.plan.objectives import Objectives
from duoserve.plan.recommend import recommend
from duoserve.plan.workload import add_workload_args, workload_from_args


def _workload(*flags: str):
    parser = argparse.ArgumentParser()
    add_workload_args(parser)
    return workload_from_args(parser.parse_args(list(flags)))


def test_a_bursty_workload_needs_more_workers_than_a_poisson_one_at_the_same_rate(fixed_profile):
    common = ("--num-prompts", "150", "--request-rate", "4", "--random-input-len", "512")
    common += ("--random-output-len", "32")
    slo = Objectives.parse("ttft=0.6")
    poisson = recommend(fixed_profile, _workload(*common), slo, percentile=90)
    bursty = recommend(fixed_profile, _workload(*common, "--burstiness", str(1 / 9)), slo, percentile=90)
    assert poisson.best is not None and bursty.best is not None
    assert bursty.best.deployment.replicas > poisson.best.deployment.replicas
    # Same mean rate: the arrivals differ only in their gaps' spread (gamma CV 3 against 1).
    assert poisson.best.summary["completed"] == bursty.best.summary["completed"] == 150


def test_headroom_asks_for_more(fixed_profile):
    workload = _workload(
        "--num-prompts", "60", "--request-rate", "3", "--random-input-len", "512", "--random-output-len", "16"
    )
    slo = Objectives.parse("ttft=0.5")
    plain = recommend(fixed_profile, workload, slo, percentile=90)
    roomy = recommend(fixed_profile, workload, slo, percentile=90, headroom=1.5)
    assert roomy.best.deployment.replicas > plain.best.deployment.replicas


def test_short_prompts_at_a_small_load_stay_colocated(fixed_profile):
    workload = _workload("--num-prompts", "40", "--request-rate", "1", "--random-input-len", "32")
    rec = recommend(fixed_profile, workload, Objectives.parse("ttft=0.5,itl=0.1"))
    assert str(rec.best.deployment) == "colocated:1"
    (note,) = rec.notes
    assert "disaggregation does not pay" in note and "prompts are short" in note and "one worker" in note
    assert rec.desired_replicas() == {"prefill": 0, "decode": 0, "colocated": 1}


def test_disaggregation_wins_when_prefill_stalls_decodes(fixed_profile):
    """Long prompts stall every colocated decode for a whole prefill step: a tight ITL bound is met
    only once prefills run elsewhere."""
    workload = _workload(
        "--num-prompts",
        "60",
        "--request-rate",
        "2",
        "--random-input-len",
        "1500",
        "--random-output-len",
        "64",
    )
    rec = recommend(fixed_profile, workload, Objectives.parse("ttft=2,itl=0.06"), max_replicas=4)
    assert rec.best is not None and rec.best.deployment.disaggregated
    assert rec.desired_replicas()["colocated"] == 0


def test_an_impossible_slo_is_an_error_and_an_unreachable_one_says_so(fixed_profile):
    workload = _workload("--num-prompts", "30", "--request-rate", "50", "--random-input-len", "512")
    with pytest.raises(ValueError, match="impossible SLO"):
        recommend(fixed_profile, workload, Objectives.parse("ttft=0.01"))
    rec = recommend(fixed_profile, workload, Objectives.parse("ttft=0.2"), percentile=99, max_replicas=1)
    assert rec.best is None and rec.notes == ["no deployment of up to 1 workers meets this SLO"]
