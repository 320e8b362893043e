"""KV connectors through the scheduler's real admission and update: async loads wait in the scheduler
while others step, failed loads recompute, connector aborts and every other ending reach the
connector, blocks it still reads stay held, evicted cached blocks are reported, and a MultiConnector
stacks several."""

from __future__ import annotations

from duoserve.engine.request import Request, RequestStatus
from duoserve.engine.scheduler import CoreOutput, Scheduler, SchedulerOutput
from duoserve.kv.block_pool import ROOT_HASH, hash_block
from duoserve.kv.connector import ConnectorEvents, EvictedBlock, KVConnector, MultiConnector
from duoserve.kv.kv_cache_manager import KVCacheManager
from duoserve.sampling_params import SamplingParams

BS = 4
_next_token = iter(range(10**6, 10**9))


class ScriptedConnector(KVConnector):
    """A connector whose loads the test completes: it supplies `supply[request id]` tokens."""

    def __init__(self, supply: dict[str, int] | None = None, load_async: bool = True, hold: bool = False):
        self.supply = supply or {}
        self.load_async = load_async
        self.hold = hold  # request_finished's answer: whether it still reads the request's blocks
        self.allocated: dict[str, tuple[list[int], int]] = {}
        self.evicted: list[EvictedBlock] = []
        self.finished: list[tuple[str, RequestStatus]] = []
        self.events = ConnectorEvents()

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        num_tokens = self.supply.get(request.request_id, 0)
        return num_tokens, self.load_async and num_tokens > 0

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        self.allocated[request.request_id] = (block_ids, num_external_tokens)

    def on_blocks_evicted(self, blocks: list[EvictedBlock]) -> None:
        self.evicted.extend(blocks)

    def request_finished(self, request: Request) -> bool:
        self.finished.append((request.request_id, request.status))
        return self.hold

    def start_load_kv(self, kv_cache) -> None:
        pass

    def save_kv(self, kv_cache, scheduled) -> None:
        pass

    def get_finished(self) -> ConnectorEvents:
        events, self.events = self.events, ConnectorEvents()
        return events

    def stats(self) -> dict[str, float]:
        return {"loads": 1.0}


def request(rid: str, prompt: list[int] | int, max_tokens: int = 3) -> Request:
    tokens = prompt if isinstance(prompt, list) else [next(_next_token) for _ in range(prompt)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, tokens, params, max_tokens=max_tokens, stop_token_ids=frozenset())


def make(connector: KVConnector, num_blocks: int = 64, prefix_caching: bool = False) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, BS, prefix_caching), 512, 16, 10**6, connector=connector)


def step(scheduler: Scheduler) -> tuple[SchedulerOutput, list[CoreOutput]]:
    """What EngineCore.step does around a (fake) forward pass: schedule, then the connector's events
    and the step's results applied by the scheduler."""
    plan = scheduler.schedule()
    sampled = {s.request.request_id: ([next(_next_token)], []) for s in plan.scheduled if s.samples}
    outputs = scheduler.apply_connector_events(scheduler.connector.get_finished())
    return plan, outputs + scheduler.update(plan, sampled, {})


def chunks(plan: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled]


def test_an_async_load_waits_in_the_scheduler_holding_its_blocks_while_others_step():
    connector = ScriptedConnector({"a": 8})
    scheduler = make(connector)
    a, b = request("a", 13), request("b", 5)
    scheduler.add(a)
    scheduler.add(b)
    plan, _ = step(scheduler)
    assert chunks(plan) == [("b", 5)]
    assert a.status == RequestStatus.WAITING_FOR_KV and list(scheduler.loading) == ["a"]
    # Its blocks for the 8 loaded tokens, out of the prefix cache, are the connector's to fill.
    assert a.num_computed_tokens == 8 and connector.allocated["a"] == (scheduler.kv.block_ids("a"), 8)
    # Blocks for its whole context (13 tokens) are taken at once: once loaded, it can run.
    assert len(scheduler.kv.block_ids("a")) == 4 and connector.allocated["b"][1] == 0
    assert chunks(step(scheduler)[0]) == [("b", 1)]  # a still waits
    connector.events.finished_loading["a"] = []
    plan, outputs = step(scheduler)
    assert chunks(plan) == [("b", 1)] and a.status == RequestStatus.RUNNING
    assert [o.request_id for o in outputs] == ["b"]
    plan, _ = step(scheduler)
    assert ("a", 5) in chunks(plan)  # the 5 tokens after the loaded ones, computed here
    while scheduler.has_unfinished():
        step(scheduler)
    assert len(a.output_token_ids) == len(b.output_token_ids) == 3
    assert sorted(connector.finished) == [
        ("a", RequestStatus.FINISHED_LENGTH),
        ("b", RequestStatus.FINISHED_LENGTH),
    ]
    assert scheduler.kv.pool.num_free_blocks == 64 and not scheduler.loading


def test_tokens_that_come_with_a_load_are_appended_not_emitted():
    """A P/D decode-side receive: the whole prompt and the first token come from the prefill worker."""
    connector = ScriptedConnector({"a": 9, "b": 9})
    scheduler = make(connector)
    a, b = request("a", 9, max_tokens=4), request("b", 9, max_tokens=1)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    connector.events.finished_loading.update({"a": [42], "b": [43]})
    plan, outputs = step(scheduler)
    # b's one token was all it was to generate: it ends without emitting it again.
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outputs] == [("b", [], "length")]
    assert a.output_token_ids == [42] and a.is_decoding and a.first_token_time is not None
    plan, outputs = step(scheduler)
    assert chunks(plan) == [("a", 1)] and outputs[0].new_token_ids == a.output_token_ids[1:]
    assert "b" not in scheduler.kv.tables


def test_a_failed_load_is_computed_from_the_device_prefix_hit():
    connector = ScriptedConnector()
    scheduler = make(connector, prefix_caching=True)
    prompt = [next(_next_token) for _ in range(12)]
    scheduler.add(request("x", prompt, max_tokens=1))
    while scheduler.has_unfinished():
        step(scheduler)
    y = request("y", prompt + [next(_next_token) for _ in range(8)])
    connector.supply["y"] = 4
    scheduler.add(y)
    step(scheduler)
    assert y.num_cached_tokens == 12 and y.num_computed_tokens == 16  # 3 blocks hit, 1 loading
    connector.events.load_failed.add("y")
    step(scheduler)
    assert y.num_computed_tokens == 12 and y.status == RequestStatus.RUNNING
    plan, _ = step(scheduler)
    assert chunks(plan) == [("y", 8)]


def test_every_ending_reaches_the_connector_and_a_connector_abort_frees_the_blocks():
    connector = ScriptedConnector({"loading": 4})
    scheduler = make(connector, num_blocks=8)
    for r in (request("loading", 9), request("waiting", 30), request("running", 6)):
        scheduler.add(r)
    step(scheduler)  # "waiting" does not fit the pool while "loading" holds its blocks; "running" queues
    assert [r.request_id for r in scheduler.waiting] == ["waiting", "running"]
    connector.events.aborted.add("loading")
    _, outputs = step(scheduler)
    assert [(o.request_id, o.finish_reason) for o in outputs if o.finished] == [("loading", "abort")]
    assert "loading" not in scheduler.kv.tables and not scheduler.loading
    scheduler.finish(scheduler.requests["waiting"], RequestStatus.FINISHED_ABORTED)
    while scheduler.has_unfinished():
        step(scheduler)
    assert connector.finished == [
        ("loading", RequestStatus.FINISHED_ABORTED),
        ("waiting", RequestStatus.FINISHED_ABORTED),
        ("running", RequestStatus.FINISHED_LENGTH),
    ]
    assert scheduler.kv.pool.num_free_blocks == 8


def test_blocks_the_connector_still_reads_are_freed_when_it_is_done():
    connector = ScriptedConnector(hold=True)
    scheduler = make(connector)
    scheduler.add(request("a", 6, max_tokens=1))
    step(scheduler)
    assert (
        not scheduler.has_unfinished() and "a" in scheduler.kv.tables and scheduler.held_by_connector == {"a"}
    )
    connector.events.finished_sending.add("a")
    step(scheduler)
    assert not scheduler.kv.tables and not scheduler.held_by_connector
    assert scheduler.kv.pool.num_free_blocks == 64


def test_evicted_cached_blocks_are_reported_with_their_chain():
    connector = ScriptedConnector()
    scheduler = make(connector, num_blocks=3, prefix_caching=True)
    x = request("x", 9, max_tokens=1)
    scheduler.add(x)
    step(scheduler)  # x's two full blocks stay cached, free
    assert connector.evicted == []
    scheduler.add(request("y", 12, max_tokens=1))
    step(scheduler)  # y needs all three blocks: both cached ones are handed out again
    first = hash_block(ROOT_HASH, x.prompt_token_ids[:4])
    second = hash_block(first, x.prompt_token_ids[4:8])
    assert sorted((b.block_hash, b.parent_hash, b.token_ids) for b in connector.evicted) == sorted(
        [(first, ROOT_HASH, tuple(x.prompt_token_ids[:4])), (second, first, tuple(x.prompt_token_ids[4:8]))]
    )


def test_a_multi_connector_takes_the_first_match_and_merges_the_rest():
    none, some = ScriptedConnector(), ScriptedConnector({"a": 4})
    scheduler = make(MultiConnector([none, some]))
    scheduler.add(request("a", 9))
    step(scheduler)
    # Each hears of the allocation; only the one that matched fills tokens.
    assert none.allocated["a"][1] == 0 and some.allocated["a"][1] == 4
    none.events.aborted.add("a")
    some.events.finished_loading["a"] = []
    _, outputs = step(scheduler)  # aborts apply first
    assert [o.finish_reason for o in outputs] == ["abort"]
    assert none.finished == some.finished == [("a", RequestStatus.FINISHED_ABORTED)]
    assert scheduler.connector.stats() == {"loads": 2.0}
    assert not scheduler.connector._supplier  # nothing outlives the request


def test_a_load_waits_until_the_pool_holds_its_context_beside_the_running_requests_next_step():
    connector = ScriptedConnector({"a": 8})
    scheduler = make(connector, num_blocks=8)
    r = request("r", 16, max_tokens=3)  # 4 blocks, and a 5th for its first decode
    scheduler.add(r)
    step(scheduler)
    a = request("a", 13)  # 4 blocks: 4 free, but r's next token needs one of them
    scheduler.add(a)
    plan, _ = step(scheduler)
    assert chunks(plan) == [("r", 1)]
    # It waits in the queue taking nothing: no blocks, no load started.
    assert (
        list(scheduler.waiting) == [a] and "a" not in scheduler.kv.tables and "a" not in connector.allocated
    )
    while "a" not in connector.allocated:
        step(scheduler)
        assert scheduler.has_unfinished()
    assert r.status == RequestStatus.FINISHED_LENGTH  # admitted once r's blocks came back
    assert (
        connector.allocated["a"] == (scheduler.kv.block_ids("a"), 8) and len(connector.allocated["a"][0]) == 4
    )


def test_a_load_supplied_at_once_is_computed_in_the_step_that_admits_it():
    """An offload load that landed when the scheduler asked: written in before this step's forward, so
    the rest of the prompt is computed, and its first token sampled, in the same step."""
    connector = ScriptedConnector({"a": 8}, load_async=False)
    scheduler = make(connector)
    a = request("a", 13)
    scheduler.add(a)
    plan, outputs = step(scheduler)
    assert chunks(plan) == [("a", 5)] and not scheduler.loading
    assert connector.allocated["a"] == (scheduler.kv.block_ids("a"), 8)
    assert [o.request_id for o in outputs] == ["a"] and len(a.output_token_ids) == 1


def test_a_load_supplied_at_once_waits_for_room_like_an_async_one():
    """Admitted with only the chunk it computes now, it would be the newest running request when r's
    next token needs a block: preempted, it would load again. It waits until its context fits."""
    connector = ScriptedConnector({"a": 8}, load_async=False)
    scheduler = make(connector, num_blocks=8)
    r = request("r", 15, max_tokens=3)  # 4 blocks; the token after its next one needs a 5th
    scheduler.add(r)
    step(scheduler)
    a = request("a", 13)  # 4 blocks: 4 free, but r's token after this step's needs one of them
    scheduler.add(a)
    plan, _ = step(scheduler)
    assert chunks(plan) == [("r", 1)] and list(scheduler.waiting) == [a] and "a" not in connector.allocated
    while "a" not in connector.allocated:
        plan, _ = step(scheduler)
        assert scheduler.has_unfinished()
    assert r.status == RequestStatus.FINISHED_LENGTH and ("a", 5) in chunks(plan)
    while scheduler.has_unfinished():
        step(scheduler)
    assert a.num_preemptions == 0 and len(a.output_token_ids) == 3


def test_a_landed_load_runs_before_the_requests_admitted_while_it_loaded():
    connector = ScriptedConnector({"a": 8})
    scheduler = make(connector)
    a, b = request("a", 13), request("b", 5)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    assert scheduler.running == [b]
    connector.events.finished_loading["a"] = []
    step(scheduler)
    # Admitted first, it runs first; preemption takes the last admitted (b), not the one that just loaded.
    assert scheduler.running == [a, b]


def test_loaded_blocks_join_the_prefix_cache_when_they_land_and_outlive_a_preemption():
    connector = ScriptedConnector({"a": 8})
    # 7 blocks: r grows to 4, a to 5; a, admitted last, is preempted when both cannot fit.
    scheduler = make(connector, num_blocks=7, prefix_caching=True)
    r, a = request("r", 4, max_tokens=12), request("a", 13, max_tokens=8)
    scheduler.add(r)
    scheduler.add(a)
    step(scheduler)
    loaded = scheduler.kv.block_ids("a")[:2]
    assert a.status == RequestStatus.WAITING_FOR_KV
    assert scheduler.kv.find_cached_prefix(a.all_token_ids) == []  # not before its KV is there
    connector.events.finished_loading["a"] = []
    connector.supply.clear()  # from now on the device holds a's prefix: nothing is to be loaded again
    step(scheduler)
    assert scheduler.kv.find_cached_prefix(a.all_token_ids)[:2] == loaded
    while a.num_preemptions == 0:
        step(scheduler)
        assert scheduler.has_unfinished()
    assert r.num_preemptions == 0
    while "a" not in scheduler.kv.tables:  # re-admitted: its loaded prefix is found on the device
        step(scheduler)
    assert scheduler.kv.block_ids("a")[:2] == loaded and a.num_computed_tokens >= 8
    assert connector.allocated["a"][1] == 0
    while scheduler.has_unfinished():
        step(scheduler)
    assert len(a.output_token_ids) == 8 and len(r.output_token_ids) == 12
    assert scheduler.kv.pool.num_free_blocks == 7


def test_kv_events_of_nested_multi_connectors_are_gathered():
    """The engine's connector is a MultiConnector over the P/D one (itself a MultiConnector) and offload."""
    inner = MultiConnector([ScriptedConnector()])
    assert MultiConnector([inner, ScriptedConnector()]).take_kv_events() == ({}, {})
