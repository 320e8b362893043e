"""Step traces: the engine writes the steps its scheduler planned; a profile is fitted from them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from duoserve.cli import main
from duoserve.config import EngineConfig
from duoserve.engine.core import EngineCore
from duoserve.models.loader import load_model
from duoserve.plan.profile import load_profile, write_profile
from duoserve.plan.step_model import StepModel, StepShape, step_shape, streamed_tokens
from duoserve.plan.trace import (
    TRACE_KIND,
    TRACE_VERSION,
    StepTraceObserver,
    profile_from_traces,
    read_trace,
    regime,
    slice_trace,
    step_mix,
)
from duoserve.sampling_params import SamplingParams
from tests.helpers import random_prompt

LIMITS = {
    "num_kv_blocks": 64,
    "block_size": 16,
    "max_model_len": 1024,
    "max_num_batched_tokens": 256,
    "max_num_seqs": 32,
    "enable_prefix_caching": True,
    "sliding_window": None,
    "quantized_max_rows": 32,
}


def test_the_trace_holds_the_steps_the_scheduler_planned(tiny_models, single_torch_thread, tmp_path):
    """Chunked prompts, a prefix hit and a preemption: every step's shape and batch, as planned."""
    _, path = tiny_models("llama_gqa")
    trace_path = tmp_path / "trace-{pid}.jsonl"
    config = EngineConfig(
        model=path,
        device="cpu",
        dtype="float32",
        attention_backend="torch",
        num_kv_blocks=14,
        block_size=8,
        max_num_batched_tokens=24,
        max_num_seqs=3,
        num_threads=1,
        step_trace=str(trace_path),
    )
    core = EngineCore(
        config, load_model(path, config.resolved_dtype()), None, StepTraceObserver(str(trace_path))
    )
    planned = []
    schedule = core.scheduler.schedule

    def recording_schedule():
        plan = schedule()
        if plan.scheduled:
            ids = frozenset(s.request.request_id for s in plan.scheduled)
            previous = (planned[-1][0].sampled, planned[-1][3]) if planned else None
            planned.append(
                (
                    step_shape(plan.scheduled, streamed=streamed_tokens(previous, ids)),
                    [[s.request.request_id, s.num_new_tokens] for s in plan.scheduled],
                    [r.request_id for r in plan.preempted],
                    ids,
                )
            )
        return plan

    core.scheduler.schedule = recording_schedule
    shared = random_prompt(24, seed=1)
    prompts = [
        shared + random_prompt(6, seed=2),
        random_prompt(45, seed=3),
        shared + random_prompt(9, seed=4),
    ]
    prompts += [random_prompt(38, seed=5), random_prompt(12, seed=6)]
    for i, prompt in enumerate(prompts):
        core.add_request(str(i), prompt, SamplingParams(max_tokens=12 + i, ignore_eos=True), [2])
    while core.has_unfinished():
        core.step()
    core.step()  # an idle turn: no line
    core.close()
    assert core.scheduler.num_preemptions > 0 and core.kv.prefix_cache_hits > 0

    (written,) = tmp_path.glob("trace-*.jsonl")
    trace = read_trace(str(written))
    assert trace.header["max_num_batched_tokens"] == 24 and trace.header["quantized_max_rows"] == 0
    assert trace.header["role"] == "both" and trace.header["engine_args"]["block_size"] == 8
    lines = [json.loads(line) for line in written.read_text().splitlines()[1:]]
    assert [s.shape for s in trace.steps] == [shape for shape, *_ in planned]
    # Back to back, a step streams what the one before sampled (the last chunk of a prompt, decodes).
    assert any(s.shape.streamed for s in trace.steps) and not trace.steps[0].shape.streamed
    # Every sampled row made one output token (a recomputation after a preemption samples only the next).
    assert sum(s.shape.sampled for s in trace.steps) == sum(12 + i for i in range(len(prompts)))
    assert [line["scheduled"] for line in lines] == [batch for _, batch, _, _ in planned]
    assert [line["preempted"] for line in lines] == [preempted for _, _, preempted, _ in planned]
    assert [s.index for s in trace.steps] == list(range(len(planned)))
    starts = [s.start for s in trace.steps]
    assert starts == sorted(starts) and all(s.seconds > 0 for s in trace.steps)
    # Back to back (a request runs on): the loop's gap is known; the last step has none.
    assert all(s.gap is not None for s in trace.steps[:-1]) and trace.steps[-1].gap is None
    # Prefill chunks with the context before them: a chunked prompt's second chunk starts past 0.
    assert any(chunk[1] > 0 for line in lines for chunk in line["chunks"])
    assert all(line["kernel_rows"] == line["prefill_tokens"] + line["decode_seqs"] for line in lines)


TRUE_MODEL = StepModel(0.004, 6e-3, 4e-3, 1e-6, 5e-5, 0.1)
LOOP_GAP = 0.002


def _synthetic_trace(path, model: StepModel = TRUE_MODEL, limits=LIMITS, role: str | None = None) -> None:
    """A trace as a served engine would write it, with step times from a known model (`role`: the
    worker's; None: a trace from before roles); a prefill worker's steps have no decodes, a decode
    worker's no prompt tokens."""
    header = {"kind": TRACE_KIND, "version": TRACE_VERSION, **limits, "engine_args": {"model": "m"}}
    lines = [header | ({"role": role} if role else {})]
    start = 0.0
    shapes = [
        StepShape(p, d, d * c, p * (c + p / 2) / 1000, tiled=int(p + d > 32))
        for p in {"decode": (0,), "prefill": (8, 16, 256, 512)}.get(role, (0, 16, 256))
        for d in ((0,) if role == "prefill" else (0, 1, 8, 32))
        for c in (64, 1024)
        if p or d
    ]
    for i, shape in enumerate(shapes * 2):
        seconds = model.seconds(shape)
        line = {"step": i, "start": start, "seconds": seconds, "gap": LOOP_GAP if i % 5 else None}
        lines.append(line | {name: getattr(shape, name) for name in LIMITS_FREE_SHAPE})
        start += seconds + LOOP_GAP
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


LIMITS_FREE_SHAPE = ("prefill_tokens", "decode_seqs", "decode_context", "prefill_attention", "tiled")


def test_fitting_a_trace_recovers_the_step_model(tmp_path):
    trace = tmp_path / "trace.jsonl"
    _synthetic_trace(trace)
    profile, _, _ = profile_from_traces([str(trace)], periods=False)
    for name, value in TRUE_MODEL.to_json().items():
        assert getattr(profile.step_model, name) == pytest.approx(value, rel=1e-6, abs=1e-12)
    assert profile.limits.quantized_max_rows == 32 and profile.limits.max_num_batched_tokens == 256
    # Periods: the engine loop's time between steps is a fixed cost per step (and steps followed by
    # idle time get the median one).
    profile, traced, _ = profile_from_traces([str(trace)], periods=True)
    assert traced.median_gap == pytest.approx(LOOP_GAP)
    assert profile.step_model.intercept == pytest.approx(TRUE_MODEL.intercept + LOOP_GAP, rel=1e-6)
    assert profile.step_model.tiled_rows == pytest.approx(TRUE_MODEL.tiled_rows, rel=1e-6)


def test_plan_profile_from_a_trace_writes_a_profile_and_its_residuals(tmp_path, capsys):
    trace, out = tmp_path / "trace.jsonl", tmp_path / "profile.json"
    _synthetic_trace(trace)
    assert main(["plan", "profile", "--from-trace", str(trace), "--fit-time", "step", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiled mixed" in text and "kernel decode" in text and "R^2 1.000" in text
    # Steps exactly on the model: every quantile of both regimes' spreads is 1.
    assert "kernel steps p50/p90/p99 1.00/1.00/1.00, tiled steps p50/p90/p99 1.00/1.00/1.00" in text
    profile = load_profile(str(out))
    assert profile.step_model.kernel_rows == pytest.approx(TRUE_MODEL.kernel_rows, rel=1e-6)
    assert profile.grid["from_traces"] == [str(trace)] and profile.engine_args == {"model": "m"}
    assert main(["plan", "simulate", "--profile", str(out), "--num-prompts", "3", "--random-input-len", "20",
                 "--random-output-len", "4"]) == 0  # fmt: skip


def test_regimes_name_kernel_tiled_and_full_steps():
    assert regime(StepShape(decode_seqs=4), 256) == "kernel decode"
    assert regime(StepShape(prefill_tokens=16, decode_seqs=4), 256) == "kernel mixed"
    assert regime(StepShape(prefill_tokens=240, decode_seqs=16, tiled=1), 256) == "tiled mixed at budget"


HEADER = json.dumps({"kind": TRACE_KIND, "version": TRACE_VERSION, **LIMITS})
STEP = {"step": 0, "start": 0.0, "seconds": 0.05, "gap": None}
SHAPE = {"prefill_tokens": 0, "decode_seqs": 1, "decode_context": 10, "prefill_attention": 0.0, "tiled": 0}


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("{not json\n", "line 1: not JSON"),
        (json.dumps({"kind": "duoserve-plan-profile"}) + "\n", "not a duoserve step trace"),
        (json.dumps({"kind": TRACE_KIND, "version": 9}) + "\n", "version 9"),
        (HEADER + "\n", "no steps"),
        (HEADER + "\n" + json.dumps(STEP | {"decode_seqs": 1}) + "\n", "line 2: missing or non-numeric"),
        (HEADER + "\n" + json.dumps(STEP | SHAPE | {"seconds": 0}) + "\n", "seconds must be > 0"),
        (HEADER + "\n" + json.dumps(STEP | SHAPE | {"decode_seqs": 0}) + "\n", "no rows"),
        (HEADER + "\n[1, 2]\n", "line 2: not a JSON object"),
    ],
)
def test_a_bad_trace_is_a_clear_error(tmp_path, capsys, content, message):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_trace(str(trace))
    assert main(["plan", "profile", "--from-trace", str(trace), "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "duoserve plan: error" in err and "Traceback" not in err


def test_traces_of_workers_with_other_limits_are_refused(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _synthetic_trace(first)
    _synthetic_trace(second, limits=LIMITS | {"max_num_batched_tokens": 512})
    with pytest.raises(ValueError, match="other limits"):
        profile_from_traces([str(first), str(second)])
    with pytest.raises(ValueError, match="cannot read step trace"):
        read_trace(str(tmp_path / "missing.jsonl"))


def test_a_slice_holds_the_steps_of_a_wall_clock_window(tmp_path):
    """planner_accuracy cuts each benchmark point's steps out of the server's trace by wall clock."""
    whole, part = tmp_path / "trace.jsonl", tmp_path / "part.jsonl"
    _synthetic_trace(whole)
    lines = whole.read_text().splitlines()
    whole.write_text(
        "\n".join([json.dumps(json.loads(lines[0]) | {"origin_unix": 1000.0}), *lines[1:]]) + "\n"
    )
    steps = read_trace(str(whole)).steps
    window = (1000.0 + steps[3].start, 1000.0 + steps[7].start)
    assert slice_trace(str(whole), *window, str(part)) == 4
    assert [s.index for s in read_trace(str(part)).steps] == [3, 4, 5, 6]
    no_origin = tmp_path / "no-origin.jsonl"
    _synthetic_trace(no_origin)
    with pytest.raises(ValueError, match="origin_unix"):
        slice_trace(str(no_origin), 0.0, 1.0, str(part))


def test_a_simulated_runs_steps_are_a_trace_that_refits_its_profile(fixed_profile, tmp_path, capsys):
    """`plan simulate --step-trace` writes the simulated steps in the served format: fitted back, they
    give the profile's own step model, and their batch mix reads as a served trace's does."""
    trace, refit = tmp_path / "sim.jsonl", tmp_path / "refit.json"
    profile_path = tmp_path / "profile.json"
    write_profile(str(profile_path), fixed_profile)
    workload = ["--num-prompts", "12", "--random-input-len", "300", "--random-output-len", "6"]
    workload += ["--request-rate", "20", "--random-range-ratio", "0.9"]
    assert (
        main(["plan", "simulate", "--profile", str(profile_path), *workload, "--step-trace", str(trace)]) == 0
    )
    steps = read_trace(str(trace)).steps
    assert sum(s.shape.prefill_tokens for s in steps) > 12 * 30 and any(
        s.shape.decode_seqs > 1 for s in steps
    )
    mix = step_mix(read_trace(str(trace)))
    assert mix["steps"] == len(steps) and 0 < mix["prefill_steps"] < len(steps)
    assert main(["plan", "profile", "--from-trace", str(trace), "--fit-time", "step", "-o", str(refit)]) == 0
    refitted = load_profile(str(refit)).step_model
    for name in ("intercept", "kernel_rows", "decode_context", "prefill_attention"):
        assert getattr(refitted, name) == pytest.approx(getattr(fixed_profile.step_model, name), rel=1e-4)


def test_a_prior_profile_settles_what_one_workloads_steps_cannot_tell_apart(fixed_profile, tmp_path):
    """One prompt length: a step's prefill attention is a fixed multiple of its prefill rows, so the
    trace alone cannot split them; a synthetic profile's grid (weighing 20%) does."""
    model = StepModel(0.004, 6e-3, 4e-3, 1e-6, 5e-5, 0.1)
    trace = tmp_path / "trace.jsonl"
    lines = [{"kind": TRACE_KIND, "version": TRACE_VERSION, **LIMITS}]
    for i, (prompts, decodes) in enumerate([(0, 1), (0, 3), (1, 0), (1, 2), (2, 5), (0, 8)] * 3):
        shape = StepShape(
            64 * prompts, decodes, 100 * decodes, 2.08 * prompts, int(64 * prompts + decodes > 32)
        )
        lines.append(
            {"step": i, "start": i, "seconds": model.seconds(shape), "gap": None} | dataclasses.asdict(shape)
        )
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    grid = [
        StepShape(p, d, d * c, p * (c + p / 2) / 1000, tiled=int(p + d > 32))
        for p in (0, 16, 256)
        for d in (0, 1, 8, 32)
        for c in (64, 1024)
        if p or d
    ]
    fixed_profile.samples = [[*s.values(), model.seconds(s)] for s in grid]
    fixed_profile.limits = dataclasses.replace(fixed_profile.limits, quantized_max_rows=32)
    profile, traced, _ = profile_from_traces([str(trace)], periods=False, prior=fixed_profile)
    for name, value in model.to_json().items():
        assert getattr(profile.step_model, name) == pytest.approx(value, rel=1e-6, abs=1e-12)
    assert profile.fit["prior_samples"] == len(grid) and len(traced.shapes) == 18
    assert profile.kv_transfer == fixed_profile.kv_transfer  # the prior's, a trace has none
    fixed_profile.limits = dataclasses.replace(fixed_profile.limits, quantized_max_rows=0)
    with pytest.raises(ValueError, match="quantized row threshold"):
        profile_from_traces([str(trace)], prior=fixed_profile)


PREFILL_MODEL = StepModel(0.02, 5e-3, 4e-3, 0.0, 8e-5, 0.2)  # each chunk's KV sent within the step
DECODE_MODEL = StepModel(0.008, 7e-3, 0.0, 2e-6, 0.0, 0.0)  # every request's token sent per step


def test_a_disaggregated_deployments_traces_fit_a_step_model_per_role(fixed_profile, tmp_path, capsys):
    """`duoserve up --step-trace` writes a trace per worker, its role in the header: each role's steps
    fit its own model with its own limits, which the simulator gives that role's workers."""
    prefill, decode, out = tmp_path / "t-prefill.jsonl", tmp_path / "t-decode.jsonl", tmp_path / "p.json"
    _synthetic_trace(prefill, PREFILL_MODEL, role="prefill")
    _synthetic_trace(decode, DECODE_MODEL, LIMITS | {"num_kv_blocks": 48}, role="decode")
    args = [
        "plan",
        "profile",
        "--from-trace",
        str(prefill),
        str(decode),
        "--fit-time",
        "step",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "prefill worker: " in text and "decode worker: " in text
    profile = load_profile(str(out))  # written and read back
    assert set(profile.roles) == {"prefill", "decode"}
    for role, model in (("prefill", PREFILL_MODEL), ("decode", DECODE_MODEL)):
        fitted, limits = profile.for_role(role)
        for name, value in model.to_json().items():
            assert getattr(fitted, name) == pytest.approx(value, rel=1e-6, abs=1e-12)
        assert profile.roles[role].fit["r2"] == pytest.approx(1.0)
    assert (
        profile.for_role("decode")[1].num_kv_blocks == 48
        and profile.for_role("prefill")[1].num_kv_blocks == 64
    )
    # No colocated trace: the profile's own model is fitted to every step, with the decode worker's limits.
    assert (
        profile.for_role("both") == (profile.step_model, profile.limits)
        and profile.limits.num_kv_blocks == 48
    )
    assert profile.grid["roles"] == {"prefill": [str(prefill)], "decode": [str(decode)]}

    # Simulated, each worker steps at its role's model; colocated ones at the profile's own. Each role's
    # model fits its steps exactly (no spread); the profile's own, fitted to both roles' steps, spreads
    # (test_a_trace_fits_how_its_steps_spread_and_the_simulator_draws_from_it): set aside here.
    from duoserve.plan.deployment import Deployment
    from duoserve.plan.simulate import simulate

    for role in ("prefill", "decode"):
        spread = profile.roles[role].spread
        assert spread.kernel == pytest.approx([1.0] * 21) and spread.tiled == pytest.approx([1.0] * 21)
    assert max(profile.spread.kernel[-1], profile.spread.tiled[-1]) > 1.01
    profile.spread = None

    workload = _workload(["--num-prompts", "4", "--random-input-len", "200", "--random-output-len", "4"])
    for deployment, expected in (
        ("disagg:1x1", {"prefill": PREFILL_MODEL, "decode": DECODE_MODEL}),
        ("colocated:1", {"both": profile.step_model}),
    ):
        _, _, sim = simulate(profile, Deployment.parse(deployment), workload, record_steps=True)
        assert {w.role for w in sim.workers.values()} == set(expected)
        for worker in sim.workers.values():
            assert worker.steps and all(
                step.seconds == pytest.approx(expected[worker.role].seconds(step.shape))
                for step in worker.steps
            )


def _workload(flags: list[str]):
    import argparse

    from duoserve.plan.workload import add_workload_args, workload_from_args

    parser = argparse.ArgumentParser()
    add_workload_args(parser)
    return workload_from_args(parser.parse_args(flags))


@pytest.mark.parametrize(
    "roles, message",
    [
        ({"colocated": {}}, "roles must be a mapping of prefill and/or decode"),
        ({"decode": {"limits": LIMITS}}, "decode role's step model lacks"),
        (
            {"decode": {"limits": LIMITS | {"block_size": 32}, "step_model": DECODE_MODEL.to_json()}},
            "block size",
        ),
    ],
)
def test_a_profile_with_bad_roles_is_a_clear_error(fixed_profile, tmp_path, roles, message):
    path = tmp_path / "profile.json"
    write_profile(str(path), fixed_profile)
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"roles": roles}))
    with pytest.raises(ValueError, match=message):
        load_profile(str(path))


def test_a_trace_fits_how_its_steps_spread_and_the_simulator_draws_from_it(tmp_path, fixed_profile):
    """Served steps of one shape take longer now and then, short ones more: a fitted profile keeps the
    ratios measured / predicted of its traced steps at 21 quantiles, for kernel and tiled steps apart, and
    the simulator multiplies each step's model time by a draw from its regime's, seeded by the workload's
    seed (the same command predicts the same)."""
    from duoserve.plan.deployment import Deployment
    from duoserve.plan.simulate import simulate

    trace = tmp_path / "trace.jsonl"
    _synthetic_trace(trace)
    lines = trace.read_text().splitlines()
    steps = [json.loads(line) for line in lines[1:]]
    kernel = [step for step in steps if not step["tiled"]]
    for i, step in enumerate(kernel):  # one kernel step in four ran 1.5x: noise to the fit, not the spread
        step["seconds"] *= 1.5 if i % 4 == 3 else 1.0
    trace.write_text("\n".join([lines[0], *(json.dumps(step) for step in steps)]) + "\n")
    profile, _, _ = profile_from_traces([str(trace)], periods=False)
    spread = profile.spread
    assert len(spread.kernel) == len(spread.tiled) == 21
    assert spread.kernel[0] == pytest.approx(1.0, rel=0.1) and spread.kernel[10] < 1.2
    assert spread.kernel[-1] == pytest.approx(1.5, rel=0.1)
    assert spread.tiled == pytest.approx([1.0] * 21, rel=0.05)  # the tiled steps ran as the model says
    path = tmp_path / "profile.json"
    write_profile(str(path), profile)
    assert load_profile(str(path)).spread == spread

    flags = ["--num-prompts", "6", "--random-input-len", "40", "--random-output-len", "8"]

    def run(seed: str):
        workload = _workload([*flags, "--seed", seed])
        _, _, sim = simulate(profile, Deployment.parse("colocated:1"), workload, record_steps=True)
        (worker,) = sim.workers.values()
        return [
            (step.shape.tiled, step.seconds / profile.step_model.seconds(step.shape)) for step in worker.steps
        ]

    ratios = run("1")
    assert {tiled for tiled, _ in ratios} == {0, 1}  # both regimes drawn from
    for tiled, ratio in ratios:
        own = spread.tiled if tiled else spread.kernel
        assert own[0] - 1e-9 <= ratio <= own[-1] + 1e-9
    assert len({r for _, r in ratios}) > 1 and run("1") == ratios and run("2") != ratios
    for bad in ([1.0, 0.5], {"kernel": [1.0] * 21}, {"kernel": [1.0] * 21, "tiled": [2.0] + [1.0] * 20}):
        path.write_text(json.dumps(json.loads(path.read_text()) | {"step_spread": bad}))
        with pytest.raises(ValueError, match="step_spread"):
            load_profile(str(path))
