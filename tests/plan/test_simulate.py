"""The simulator against the real engine: the same steps, with the same batches, under one step model."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest

from duoserve.config import EngineConfig
from duoserve.engine.core import EngineCore
from duoserve.models.loader import load_model
from duoserve.plan.deployment import Deployment
from duoserve.plan.profile import KVTransferModel, Profile, WorkerLimits
from duoserve.plan.simulate import simulate
from duoserve.plan.step_model import StepModel, step_shape
from duoserve.plan.workload import SimConversation, SimTurn, Workload, add_workload_args, workload_from_args
from duoserve.sampling_params import SamplingParams
from tests.helpers import random_prompt

STEP_MODEL = StepModel(intercept=0.01, kernel_rows=4e-4, decode_context=1e-6)


def _workload() -> Workload:
    """Chunked prompts, a shared prefix (a prefix hit), more KV than the cache holds (preemption)."""
    shared = random_prompt(24, seed=1)
    prompts = [
        (0.0, shared + random_prompt(6, seed=2), 12),
        (0.0113, random_prompt(45, seed=3), 16),
        (0.0237, shared + random_prompt(9, seed=4), 10),
        (0.0519, random_prompt(38, seed=5), 20),
        (0.0931, random_prompt(12, seed=6), 8),
        (0.2017, random_prompt(40, seed=7), 14),
        (0.9001, shared + random_prompt(3, seed=8), 5),  # after an idle gap
    ]
    return Workload(
        [SimConversation(i, t, [SimTurn(p, out)]) for i, (t, p, out) in enumerate(prompts)], None, {}
    )


def _real_steps(core: EngineCore, workload: Workload) -> list[tuple[float, list[tuple[str, int]]]]:
    """The real engine core on the same virtual clock: requests are added when their arrival time has
    come at the start of a step, and each step advances the clock by the step model's time for it."""
    captured = {}
    schedule = core.scheduler.schedule

    def recording_schedule():
        plan = schedule()
        captured["shape"] = step_shape(plan.scheduled)
        captured["chunks"] = [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled]
        return plan

    core.scheduler.schedule = recording_schedule
    pending = sorted(workload.conversations, key=lambda c: c.arrival)
    now, steps, ids = 0.0, [], 0
    while pending or core.has_unfinished():
        while pending and pending[0].arrival <= now:
            turn = pending.pop(0).turns[0]
            params = SamplingParams(max_tokens=turn.output_len, ignore_eos=True)
            core.add_request(str(ids), turn.prompt, params, eos_token_ids=[2])
            ids += 1
        if not core.has_schedulable():
            now = pending[0].arrival
            continue
        captured.clear()
        core.step()
        if captured.get("chunks"):
            steps.append((now, captured["chunks"]))
            now += STEP_MODEL.seconds(captured["shape"])
    return steps


def test_the_simulator_takes_the_real_schedulers_steps(tiny_models, single_torch_thread):
    _, path = tiny_models("llama_gqa")
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
    )
    core = EngineCore(config, load_model(path, config.resolved_dtype()))
    workload = _workload()
    real = _real_steps(core, workload)
    assert core.scheduler.num_preemptions > 0 and core.kv.prefix_cache_hits > 0

    limits = WorkerLimits(14, 8, core.max_model_len, 24, 3)
    profile = Profile(STEP_MODEL, limits, KVTransferModel())
    records, _, sim = simulate(profile, Deployment(0, 1), workload, record_steps=True)
    (worker,) = sim.workers.values()
    simulated = [(step.start, step.scheduled) for step in worker.steps]
    assert [chunks for _, chunks in simulated] == [chunks for _, chunks in real]
    assert [t for t, _ in simulated] == pytest.approx([t for t, _ in real])
    assert worker.scheduler.num_preemptions == core.scheduler.num_preemptions
    assert worker.kv.prefix_cache_hits == core.kv.prefix_cache_hits
    # Chunked prefill happened: some prompt took more than one step.
    prefill_steps = Counter(rid for _, chunks in real for rid, n in chunks if n > 1)
    assert max(prefill_steps.values()) > 1
    assert all(r.success and r.output_tokens == r.max_tokens for r in records)
    assert worker.kv.pool.num_free_blocks == worker.kv.pool.num_blocks


def test_disaggregated_requests_prefill_remotely_unless_short(fixed_profile):
    """The router's own threshold: prompts of 64+ uncached tokens are prefilled on the prefill worker,
    whose first token is the client's; shorter ones on their decode worker. Every block comes back."""
    long_prompt, short_prompt = random_prompt(300, seed=1), random_prompt(20, seed=2)
    workload = Workload(
        [
            SimConversation(0, 0.0, [SimTurn(long_prompt, 6)]),
            SimConversation(1, 0.001, [SimTurn(short_prompt, 6)]),
            SimConversation(2, 0.002, [SimTurn(long_prompt[:200] + random_prompt(100, seed=3), 1)]),
        ]
    )
    records, _, sim = simulate(fixed_profile, Deployment(1, 1), workload, record_steps=True)
    prefill, decode = sim.workers["sim://prefill-0"], sim.workers["sim://decode-0"]
    prefilled = {rid for step in prefill.steps for rid, _ in step.scheduled}
    assert prefilled == {"0", "2"}
    decode_chunks = [(rid, n) for step in decode.steps for rid, n in step.scheduled]
    assert ("1", 20) in decode_chunks and all(n == 1 for rid, n in decode_chunks if rid != "1")
    assert all(r.success for r in records) and [r.output_tokens for r in records] == [6, 6, 1]
    # The first token came from the prefill worker's step, before any decode step of that request.
    first_decode = min(s.start + s.seconds for s in decode.steps if any(rid == "0" for rid, _ in s.scheduled))
    assert records[0].ttft + records[0].send_time < first_decode
    # The third prompt shares 12 blocks with the first, which the prefill worker still caches.
    assert prefill.kv.prefix_cache_hits == 192
    for worker in (prefill, decode):
        assert worker.kv.pool.num_free_blocks == worker.kv.pool.num_blocks
        assert not worker.scheduler.requests


def test_the_routers_kv_aware_policy_keeps_shared_prefixes_together(fixed_profile):
    """With the router's own policy in the loop, KV-aware routing sends each system prompt back to the
    worker that holds it (its KVIndex fed by the simulated pools' events) while the load is light;
    round-robin scatters them."""
    parser = argparse.ArgumentParser()
    add_workload_args(parser)
    flags = ["--dataset", "shared-prefix", "--num-prompts", "24", "--prefix-repetition-num-prefixes", "2"]
    flags += ["--prefix-repetition-output-len", "4", "--request-rate", "1"]
    workload = workload_from_args(parser.parse_args(flags))

    def hits(policy: str) -> int:
        _, _, sim = simulate(fixed_profile, Deployment(0, 2), workload, router={"policy": policy})
        return sum(w.kv.prefix_cache_hits for w in sim.workers.values())

    assert hits("kv") > hits("round_robin")


def test_landed_kv_is_taken_in_by_the_next_step_and_decoded_from_the_one_after(fixed_profile):
    """EngineCore.step schedules, then its connector takes in the KV that landed, and applies it after
    the forward pass: a request whose KV lands while the decode worker is busy decodes from the second
    step after (the first simulator put it in the first); landing on an idle worker, an empty step takes
    it in and the request decodes at once."""
    workload = Workload(
        [
            SimConversation(0, 0.0, [SimTurn(random_prompt(20, seed=2), 60)]),  # local: keeps decode busy
            SimConversation(1, 0.0, [SimTurn(random_prompt(300, seed=1), 4)]),  # prefilled remotely
            SimConversation(2, 5.0, [SimTurn(random_prompt(300, seed=3), 4)]),  # lands on an idle worker
        ]
    )
    records, _, sim = simulate(fixed_profile, Deployment(1, 1), workload, record_steps=True)
    prefill, decode = sim.workers["sim://prefill-0"], sim.workers["sim://decode-0"]
    transfer = fixed_profile.kv_transfer

    def landed(rid: str) -> float:
        chunks = [(s, n) for s in prefill.steps for r, n in s.scheduled if r == rid]
        return max(s.start + s.seconds + transfer.seconds(n) for s, n in chunks)

    def first_decode(rid: str) -> int:
        return next(i for i, s in enumerate(decode.steps) if any(r == rid for r, _ in s.scheduled))

    ready = landed("1")
    in_flight = next(i for i, s in enumerate(decode.steps) if s.start <= ready < s.start + s.seconds)
    assert first_decode("1") == in_flight + 2
    ready = landed("2")
    assert all(s.start + s.seconds <= ready for s in decode.steps[: first_decode("2")])
    assert decode.steps[first_decode("2")].start == pytest.approx(ready)
    assert all(r.success and r.output_tokens == r.max_tokens for r in records)
