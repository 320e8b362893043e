"""Async scheduling (duoserve/engine/core.py `step`): a step left in flight while the next is scheduled,
its tokens fed to the next step from the device. The outputs must be the synchronous engine's, whatever
the batching, chunking, caching, preemption, stops and aborts; steps whose requests need their tokens on
the host run synchronously."""

from __future__ import annotations

import logging

import pytest
import torch

from duoserve import LLM
from duoserve.config import EngineConfig, add_engine_args, engine_config_from_args, engine_flags
from duoserve.engine.request import Request, RequestStatus
from duoserve.engine.scheduler import Scheduler
from duoserve.kv.kv_cache_manager import KVCacheManager
from duoserve.sampling_params import SamplingParams
from tests.helpers import random_prompt


def _engine(path: str, async_scheduling: bool, **kwargs) -> LLM:
    args = dict(model=path, device="cpu", dtype="float32", block_size=4, num_kv_blocks=256)
    return LLM(**(args | kwargs), async_scheduling=async_scheduling)


def _count_overlapped(llm: LLM) -> list[bool]:
    """Record, per engine step, whether it was left in flight."""
    core, steps = llm.engine.core, []
    step = core.step

    def recording_step():
        outputs = step()
        steps.append(core.last_step.overlapped)
        return outputs

    core.step = recording_step
    return steps


def _run(llm: LLM, prompts, params) -> list[tuple[list[int], str]]:
    return [
        (o.outputs[0].token_ids, o.outputs[0].finish_reason)
        for o in llm.generate(prompts, params, use_tqdm=False)
    ]


def _assert_pool_is_whole(llm: LLM) -> None:
    core = llm.engine.core
    assert not core.scheduler.requests and core._in_flight is None
    assert not core.kv.tables and core.kv.pool.num_free_blocks == core.kv.num_blocks


PROMPTS = [random_prompt(n, seed=n) for n in (5, 13, 3, 21, 9, 2)]
GREEDY = [SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]


@pytest.mark.parametrize(
    "limits",
    [
        {},  # everything fits: one prefill step, then decodes
        {"max_num_batched_tokens": 7},  # chunked prefills beside decodes
        {"num_kv_blocks": 14, "max_num_batched_tokens": 9},  # preemption too
        {"max_num_seqs": 2},  # requests admitted as others end
    ],
    ids=["fits", "chunked", "preempting", "two-seats"],
)
def test_async_scheduling_gives_the_synchronous_outputs(tiny_models, single_torch_thread, limits):
    path = tiny_models("llama_gqa")[1]
    expected = _run(_engine(path, False, **limits), PROMPTS, GREEDY)
    llm = _engine(path, True, **limits)
    overlapped = _count_overlapped(llm)
    assert _run(llm, PROMPTS, GREEDY) == expected
    assert sum(overlapped) > len(overlapped) // 2, "most steps should have been left in flight"
    if "num_kv_blocks" in limits:
        assert llm.engine.core.scheduler.num_preemptions > 0
    _assert_pool_is_whole(llm)


PENALISED = [
    SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, repetition_penalty=1.6),
    SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, presence_penalty=1.2, frequency_penalty=0.7
    ),
    SamplingParams(temperature=0.9, max_tokens=16, ignore_eos=True, frequency_penalty=1.5, seed=5),
    SamplingParams(temperature=1.0, top_k=8, max_tokens=10, ignore_eos=True, repetition_penalty=0.7, seed=9),
    SamplingParams(temperature=0, max_tokens=15, ignore_eos=True),
]


@pytest.mark.parametrize("limits", [{}, {"max_num_batched_tokens": 7}], ids=["fits", "chunked"])
def test_penalised_requests_overlap_steps_with_the_synchronous_outputs(
    tiny_models, single_torch_thread, limits
):
    """Repetition, presence and frequency penalties (greedy, and seeded sampling) with async scheduling:
    steps are left in flight, the penalties count each request's newest token where it still is on the
    device (sampler.InFlight), and the outputs equal the synchronous engine's."""
    path = tiny_models("llama_gqa")[1]
    prompts = PROMPTS[: len(PENALISED)]
    expected = _run(_engine(path, False, **limits), prompts, PENALISED)
    llm = _engine(path, True, **limits)
    overlapped = _count_overlapped(llm)
    assert _run(llm, prompts, PENALISED) == expected
    assert sum(overlapped) > len(overlapped) // 2, "most steps should have been left in flight"
    _assert_pool_is_whole(llm)


def test_stop_tokens_seen_a_step_late_end_the_request_where_they_would(tiny_models, single_torch_thread):
    """A request whose token in flight ends it (a stop token, max_tokens, the context) was scheduled once
    more or skipped; its output stops at the same token either way."""
    path = tiny_models("llama_gqa")[1]
    free = _run(_engine(path, False), PROMPTS, GREEDY)
    # Half the requests stop at the 2nd or 3rd token they generate when free to run; the others run to the
    # context's end or to max_tokens.
    params = [
        SamplingParams(temperature=0, max_tokens=None, stop_token_ids=[tokens[1 + i % 4]])
        if i % 2 == 0
        else SamplingParams(temperature=0, max_tokens=None if i % 4 == 1 else 5, ignore_eos=True)
        for i, (tokens, _) in enumerate(free)
    ]
    expected = _run(_engine(path, False, max_model_len=28), PROMPTS, params)
    assert {reason for _, reason in expected} == {"stop", "length"}
    llm = _engine(path, True, max_model_len=28)
    overlapped = _count_overlapped(llm)
    assert _run(llm, PROMPTS, params) == expected
    assert any(overlapped)
    _assert_pool_is_whole(llm)


def test_prefix_cache_holds_the_same_blocks(tiny_models, single_torch_thread):
    """A returning turn (prompt + the output so far) hits as many cached blocks as with synchronous steps:
    blocks that a token seen a step late completes are registered all the same."""
    path = tiny_models("llama_gqa")[1]
    hits = {}
    for async_scheduling in (False, True):
        llm = _engine(path, async_scheduling)
        first = _run(llm, PROMPTS[3:4], [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)])
        turn = PROMPTS[3] + first[0][0] + [5, 6]
        again = _run(llm, [turn], [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)])
        hits[async_scheduling] = (llm.engine.core.kv.prefix_cache_hits, again)
    assert hits[True] == hits[False]
    # 21 + 12 tokens, the last never computed: 8 full blocks of 4, the last one filled by the token the
    # final step fed (seen a step late with async scheduling).
    assert hits[True][0] == 32


def test_steps_with_requests_that_need_their_tokens_run_synchronously(tiny_models, single_torch_thread):
    """Logprobs, penalties, min_tokens and seeded sampling beside plain greedy requests: equal outputs
    (logprobs too); steps are left in flight only when no scheduled request needs its last token on the
    host (penalties do not: they count it on the device)."""
    path = tiny_models("llama_gqa")[1]
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, max_tokens=9, ignore_eos=True, repetition_penalty=1.3, seed=3),
        SamplingParams(temperature=0, max_tokens=12, min_tokens=4, stop_token_ids=[1, 2, 3]),
        SamplingParams(temperature=1.0, top_k=5, max_tokens=16, ignore_eos=True, seed=11),
    ]
    prompts = PROMPTS[: len(params)]
    results = {}
    for async_scheduling in (False, True):
        llm = _engine(path, async_scheduling)
        overlapped = _count_overlapped(llm)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results[async_scheduling] = [
            (o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].logprobs) for o in outputs
        ]
        _assert_pool_is_whole(llm)
    assert results[True] == results[False]
    # The last steps hold only the plain and top-k requests (the longest): left in flight.
    assert overlapped[-3:-1] == [True, True] and not any(overlapped[:6])


def test_an_abort_while_the_step_is_in_flight(tiny_models, single_torch_thread):
    path = tiny_models("llama_gqa")[1]
    llm = _engine(path, True)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("a", PROMPTS[0], params)
    engine.add_request("b", PROMPTS[1], params)
    for _ in range(3):
        engine.step()
    assert engine.core._in_flight is not None
    engine.abort("a")
    finished = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    assert list(finished) == ["b"] and len(finished["b"]) == 30
    expected = _run(_engine(path, False), PROMPTS[1:2], [params])[0][0]
    assert finished["b"] == expected
    _assert_pool_is_whole(llm)


def test_the_scheduler_counts_tokens_in_flight():
    """`advance` before `apply_sampled`: the next schedule feeds the pending token, skips a request whose
    token in flight reaches max_tokens, and admits no preempted request before its token lands."""
    kv = KVCacheManager(64, 4, True)
    scheduler = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    request = Request("r", [1, 2, 3], params, max_tokens=2, stop_token_ids=frozenset())
    scheduler.add(request)
    prefill = scheduler.schedule()
    scheduler.advance(prefill)
    assert (request.num_computed_tokens, request.num_pending_tokens) == (3, 1)
    decode = scheduler.schedule()  # the prefill's token is still in flight
    assert [(s.request, s.num_new_tokens, s.samples) for s in decode.scheduled] == [(request, 1, True)]
    scheduler.advance(decode)
    assert (request.num_computed_tokens, request.num_pending_tokens) == (4, 2)
    assert not scheduler.schedule().scheduled  # 2 tokens in flight = max_tokens: nothing more to compute
    (output,) = scheduler.apply_sampled(prefill, {"r": ([7], [])}, {})
    assert output.new_token_ids == [7] and not output.finished
    (output,) = scheduler.apply_sampled(decode, {"r": ([8], [])}, {})
    assert output.finished and request.output_token_ids == [7, 8]
    assert request.status is RequestStatus.FINISHED_LENGTH and not kv.tables

    other = Request("o", [4, 5, 6], params, max_tokens=2, stop_token_ids=frozenset())
    scheduler.add(other)
    prefill = scheduler.schedule()
    scheduler.advance(prefill)
    scheduler._preempt(scheduler.running.pop())  # as a schedule that needs its blocks would
    assert other.num_pending_tokens == 1 and not scheduler.schedule().scheduled
    scheduler.apply_sampled(prefill, {"o": ([9], [])}, {})
    (again,) = scheduler.schedule().scheduled
    assert again.request is other and again.num_new_tokens == 4  # prompt + the landed token, recomputed


def test_config_and_flags():
    assert EngineConfig(device="cpu").resolved_async_scheduling() is False
    assert EngineConfig(device="cpu", async_scheduling=True).resolved_async_scheduling() is True
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args([])).async_scheduling is None
    assert engine_config_from_args(parser.parse_args(["--async-scheduling"])).async_scheduling is True
    assert engine_config_from_args(parser.parse_args(["--no-async-scheduling"])).async_scheduling is False
    # What `duoserve up` passes its workers: only a choice that differs from the default.
    assert engine_flags(EngineConfig(async_scheduling=False)) == ["--no-async-scheduling"]
    assert engine_flags(EngineConfig()) == []


def test_speculative_decoding_keeps_steps_synchronous(tiny_models, single_torch_thread, caplog):
    caplog.set_level(logging.WARNING, logger="duoserve.engine.core")
    llm = _engine(tiny_models("llama_gqa")[1], True, speculative="ngram")
    assert llm.engine.core.async_scheduling is False
    messages = [r.getMessage() for r in caplog.records]
    assert any("steps run synchronously beside speculative decoding" in m for m in messages)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_overlapped_decode_steps_never_wait_for_the_gpu(tiny_models):
    """On CUDA a decode step left in flight launches without one host synchronisation (the previous step's
    tokens come down through an event, outside the checked region): greedy, sampled, and penalised (the
    penalties count the in-flight tokens on the device)."""
    pytest.importorskip("triton")
    llm = LLM(model=tiny_models("llama_gqa")[1], device="cuda", num_kv_blocks=64, async_scheduling=True)
    engine = llm.engine
    engine.add_request("a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.add_request("b", PROMPTS[1], SamplingParams(temperature=0.7, max_tokens=40, ignore_eos=True))
    penalties = dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3)
    engine.add_request(
        "c", PROMPTS[2], SamplingParams(temperature=0.7, max_tokens=40, ignore_eos=True, **penalties)
    )
    for _ in range(4):  # prefill, then decodes: graphs captured, Triton compiled
        engine.step()
    core = engine.core
    plan = core.scheduler.schedule()
    torch.cuda.set_sync_debug_mode("error")
    try:
        launched = core._launch(plan, core._prepare(plan), overlap=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert launched.pending is not None
