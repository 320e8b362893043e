"""The token-budget scheduler: on its own with fake model steps (its own `update` applies them), then
through the engine for preemption and aborts. KV connectors are tested through it in
tests/engine/test_connector_scheduling.py."""

from __future__ import annotations

import pytest

from duoserve.engine.request import Request
from duoserve.engine.scheduler import Scheduler, SchedulerOutput
from duoserve.kv.kv_cache_manager import NULL_BLOCK, KVCacheManager
from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import EngineRecorder, random_prompt

pytestmark = pytest.mark.usefixtures("single_torch_thread")

BS = 4
MAX_MODEL_LEN = 10**6
_next_token = iter(range(10**9))


def request(rid: str, num_prompt: int, max_tokens: int = 4) -> Request:
    # Distinct token ids everywhere, so that nothing hits the prefix cache by accident.
    prompt = [next(_next_token) for _ in range(num_prompt)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, prompt, params, max_tokens=max_tokens, stop_token_ids=frozenset())


def make_scheduler(num_blocks=64, budget=512, max_num_seqs=128, prefix_caching=False) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, BS, prefix_caching), budget, max_num_seqs, MAX_MODEL_LEN)


def step(scheduler: Scheduler) -> SchedulerOutput:
    """Schedule, then the scheduler's own update with a fake token per sampling request."""
    plan = scheduler.schedule()
    plan.sampled = [s.samples for s in plan.scheduled]  # before the update changes the answer
    sampled = {s.request.request_id: ([next(_next_token)], []) for s in plan.scheduled if s.samples}
    plan.outputs = scheduler.update(plan, sampled, {})
    return plan


def chunks(plan: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled]


def run_to_completion(scheduler: Scheduler, limit: int = 1000) -> list[SchedulerOutput]:
    plans = []
    while scheduler.has_unfinished():
        plans.append(step(scheduler))
        assert len(plans) < limit
    return plans


def test_token_budget_is_respected_and_used():
    scheduler = make_scheduler(budget=8)
    lengths, max_tokens = [5, 11, 3, 20, 1], [3, 6, 2, 4, 5]
    requests = [request(str(i), n, m) for i, (n, m) in enumerate(zip(lengths, max_tokens, strict=True))]
    for r in requests:
        scheduler.add(r)
    plans = run_to_completion(scheduler)
    assert all(0 < p.num_tokens <= 8 for p in plans)
    # Every prompt token and every output token but the last was computed exactly once.
    assert sum(p.num_tokens for p in plans) == sum(lengths) + sum(max_tokens) - len(lengths)
    assert [len(r.output_token_ids) for r in requests] == max_tokens
    # While prompts were waiting, each step used the whole budget.
    for plan in plans[:5]:
        assert plan.num_tokens == 8
    assert scheduler.kv.pool.num_free_blocks == 64


def test_decodes_go_before_prefills():
    scheduler = make_scheduler(budget=10)
    a, b, c = request("a", 4, 20), request("b", 5, 20), request("c", 30, 3)
    scheduler.add(a)
    scheduler.add(b)
    assert chunks(step(scheduler)) == [("a", 4), ("b", 5)]
    scheduler.add(c)
    # The long prompt only gets what the running decodes leave of the budget, step after step.
    assert chunks(step(scheduler)) == [("a", 1), ("b", 1), ("c", 8)]
    assert chunks(step(scheduler)) == [("a", 1), ("b", 1), ("c", 8)]
    assert chunks(step(scheduler)) == [("a", 1), ("b", 1), ("c", 8)]
    assert chunks(step(scheduler)) == [("a", 1), ("b", 1), ("c", 6)]
    assert chunks(step(scheduler)) == [("a", 1), ("b", 1), ("c", 1)]


def test_several_prompts_share_a_step():
    """One step holds the last chunk of one prompt, a whole prompt and the first chunk of another.
    (As in vLLM v1, admission stops where the budget runs out, so after any step at most one prompt
    is left part-way; a prompt is only preempted part-way when the cache runs out.)"""
    scheduler = make_scheduler(budget=10)
    a, b, c, d = (request(x, 6, 5) for x in "abcd")
    for r in (a, b, c, d):
        scheduler.add(r)
    assert chunks(step(scheduler)) == [("a", 6), ("b", 4)]
    assert b.num_computed_tokens == 4 and not b.output_token_ids  # partly prefilled
    # b's last chunk, a new prompt and a partial one, next to a decode.
    plan = step(scheduler)
    assert chunks(plan) == [("a", 1), ("b", 2), ("c", 6), ("d", 1)]
    assert plan.sampled == [True, True, True, False]
    assert chunks(step(scheduler)) == [("a", 1), ("b", 1), ("c", 1), ("d", 5)]


def test_max_num_seqs_limits_running_requests():
    scheduler = make_scheduler(budget=100, max_num_seqs=2)
    requests = [request(str(i), 3, 4) for i in range(5)]
    for r in requests:
        scheduler.add(r)
    while scheduler.has_unfinished():
        step(scheduler)
        assert len(scheduler.running) <= 2
    assert all(len(r.output_token_ids) == 4 for r in requests)


def test_preemption_takes_the_newest_and_resumes_it_first():
    # 6 blocks of 4: three 8-token prompts fill the cache, and the first decode needs a block more.
    scheduler = make_scheduler(num_blocks=6)
    a, b, c = request("a", 8, 6), request("b", 8, 6), request("c", 8, 6)
    for r in (a, b, c):
        scheduler.add(r)
    assert chunks(step(scheduler)) == [("a", 8), ("b", 8), ("c", 8)]
    assert scheduler.kv.pool.num_free_blocks == 0
    plan = step(scheduler)
    assert plan.preempted == [c] and chunks(plan) == [("a", 1), ("b", 1)]
    assert scheduler.num_preemptions == 1 and c.num_preemptions == 1
    # c keeps its sampled token, loses its KV, and waits at the front of the queue.
    assert c.num_computed_tokens == 0 and len(c.output_token_ids) == 1
    assert list(scheduler.waiting) == [c] and c.request_id not in scheduler.kv.tables
    plans = run_to_completion(scheduler)
    # Resumed: the prompt and its first output token are computed again in one chunk.
    plan = next(p for p in plans if c in (s.request for s in p.scheduled))
    assert chunks(plan)[-1] == ("c", 9) and plan.sampled[-1]
    assert all(len(r.output_token_ids) == 6 for r in (a, b, c))
    assert scheduler.kv.pool.num_free_blocks == 6


def test_a_request_that_cannot_grow_preempts_itself_and_later_finishes():
    # One request alone: 3 blocks of 4 hold its whole 12-token context; a second one squeezes it.
    scheduler = make_scheduler(num_blocks=3)
    a, b = request("a", 4, 8), request("b", 4, 2)
    scheduler.add(a)
    scheduler.add(b)
    plans = run_to_completion(scheduler)
    assert scheduler.num_preemptions > 0
    assert any(a in p.preempted for p in plans) or any(b in p.preempted for p in plans)
    assert len(a.output_token_ids) == 8 and len(b.output_token_ids) == 2
    assert scheduler.kv.pool.num_free_blocks == 3


# ---------------------------------------------------------------------------------------------------
# Through the engine


def _outputs(llm: LLM, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("budget", [512, 6])
def test_preempted_requests_produce_the_same_outputs(tiny_models, budget):
    _, path = tiny_models("qwen2")
    prompts = [random_prompt(n, seed=80 + n) for n in (9, 14, 6)]
    params = [
        SamplingParams(temperature=0, max_tokens=18, ignore_eos=True, logprobs=3, prompt_logprobs=2),
        SamplingParams(temperature=0.9, seed=11, max_tokens=18, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=1.0, seed=12, top_k=40, max_tokens=18, ignore_eos=True, prompt_logprobs=1),
    ]
    args = dict(block_size=4, dtype="float32", device="cpu", max_num_batched_tokens=budget)
    roomy = LLM(model=path, num_kv_blocks=64, **args)
    tight = LLM(model=path, num_kv_blocks=10, **args)  # 40 tokens for 3 x ~30
    recorder = EngineRecorder(tight.engine.core)
    expected, got = _outputs(roomy, prompts, params), _outputs(tight, prompts, params)
    assert roomy.engine.core.scheduler.num_preemptions == 0
    assert tight.engine.core.scheduler.num_preemptions > 0
    assert any(step.num_preempted for step in recorder.steps)
    for e, g in zip(expected, got, strict=True):
        (ec,), (gc,) = e.outputs, g.outputs
        assert gc.token_ids == ec.token_ids and gc.text == ec.text
        if ec.logprobs is not None:
            for e_entry, g_entry in zip(ec.logprobs, gc.logprobs, strict=True):
                assert list(g_entry) == list(e_entry)
                assert all(abs(g_entry[t].logprob - e_entry[t].logprob) < 1e-4 for t in e_entry)
        if e.prompt_logprobs is not None:
            assert len(g.prompt_logprobs) == len(e.prompt_logprobs)
            for e_entry, g_entry in zip(e.prompt_logprobs[1:], g.prompt_logprobs[1:], strict=True):
                assert list(g_entry) == list(e_entry)
                assert all(abs(g_entry[t].logprob - e_entry[t].logprob) < 1e-4 for t in e_entry)
    pool = tight.engine.core.kv.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_aborted_requests_free_their_blocks(tiny_models):
    _, path = tiny_models("llama_gqa")
    llm = LLM(model=path, num_kv_blocks=32, block_size=4, dtype="float32", device="cpu", max_num_seqs=2)
    engine, core = llm.engine, llm.engine.core
    pool = core.kv.pool
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    engine.add_request("a", random_prompt(10, seed=1), params)
    engine.add_request("b", random_prompt(7, seed=2), SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    engine.add_request("c", random_prompt(5, seed=3), params)  # waits: max_num_seqs=2
    for _ in range(3):
        engine.step()
    assert set(core.kv.tables) == {"a", "b#0"} and [r.request_id for r in core.scheduler.waiting] == [
        "b#1",
        "c",
    ]
    held_by_a = len(core.kv.block_ids("a"))
    free_before = pool.num_free_blocks
    engine.abort("a")
    assert pool.num_free_blocks == free_before + held_by_a and "a" not in core.kv.tables
    engine.abort("c")  # still waiting: it just leaves the queue
    assert "c" not in core.scheduler.requests and all(r.request_id != "c" for r in core.scheduler.waiting)
    engine.step()  # b#1 is admitted in a's place
    assert set(core.kv.tables) == {"b#0", "b#1"}
    engine.abort("b")  # both of its sequences
    engine.abort("unknown")  # nothing to do
    assert not engine.has_unfinished() and not core.kv.tables
    assert pool.num_free_blocks == pool.num_blocks
    assert all(b.ref_count == 0 for b in pool.blocks)
    assert engine.step() == []


def test_a_request_waiting_for_blocks_is_counted_once_in_the_prefix_cache_queries():
    scheduler = make_scheduler(num_blocks=4, prefix_caching=True)
    first, second = request("a", 12, max_tokens=3), request("b", 12, max_tokens=3)
    scheduler.add(first)
    scheduler.add(second)
    step(scheduler)  # a takes 3 of the 4 blocks; b cannot be admitted until a is done
    step(scheduler)
    assert scheduler.kv.prefix_cache_queries == 12
    run_to_completion(scheduler)
    assert scheduler.kv.prefix_cache_queries == 24


def test_sliding_window_frees_the_blocks_out_of_every_running_requests_window():
    """All layers slide: running requests give back the blocks out of their window at each schedule (a
    P/D prefill worker's too: its connector sent each block the step that filled it, see
    tests/disagg/test_kv_transfer.py)."""
    kv = KVCacheManager(64, BS, sliding_window=4)
    scheduler = Scheduler(kv, 512, 128, MAX_MODEL_LEN)
    plain = request("plain", 20, max_tokens=10)
    scheduler.add(plain)
    for _ in range(5):  # a prefill of 20 tokens, then 4 decodes: 23 tokens computed at the last schedule
        step(scheduler)
    # Queries from position 23 on see positions > 19: blocks 0-4 are freed, block 5 holds 20-23.
    assert kv.block_ids("plain") == [NULL_BLOCK] * 5 + [kv.block_ids("plain")[5]]
    assert kv.num_held_blocks("plain") == 1


def test_update_reports_tokens_stops_and_first_token_times():
    """The update the engine core runs: outputs per request, the stop token ends one and frees it."""
    scheduler = make_scheduler(budget=100)
    a, b = request("a", 5, max_tokens=5), request("b", 3, max_tokens=5)
    b.stop_token_ids = frozenset({7})
    for r in (a, b):
        scheduler.add(r)
    plan = scheduler.schedule()
    outputs = scheduler.update(plan, {"a": ([3], []), "b": ([7], [])}, {})
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outputs] == [
        ("a", [3], None),
        ("b", [7], "stop"),
    ]
    assert all(o.queue_time >= 0 and o.prefill_time >= 0 for o in outputs)
    assert a.num_computed_tokens == 5 and a.output_token_ids == [3] and a.is_decoding
    assert "b" not in scheduler.requests and "b" not in scheduler.kv.tables
    assert b.stop_reason is None  # eos-like: not a user stop token
