"""The offload tier inside the engine: under eviction pressure (histories that outgrow the KV pool),
outputs are identical with and without it (float32), returning prompts load their evicted prefix from
disk, a restarted engine starts warm, and no block is left held or pinned.

Runs once the scheduler calls KV connectors and the engine builds the offload connector from
--kv-offload-dir (issue 14's two halves merged); skipped before."""

from __future__ import annotations

import inspect

import pytest

from duoserve.engine.scheduler import Scheduler
from duoserve.kv.offload.connector import OffloadConnector
from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import random_prompt

pytest.importorskip("transformers")
if "connector" not in inspect.signature(Scheduler.__init__).parameters:
    pytest.skip("the scheduler does not call KV connectors yet (issue 14, part 1)", allow_module_level=True)
pytestmark = pytest.mark.usefixtures("single_torch_thread")

BLOCK_SIZE = 4
NUM_BLOCKS = 24  # 96 tokens: two of the conversations below at most
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def make_llm(path: str, **engine_args) -> LLM:
    # The torch attention backend: no C++ kernel to build (minutes on a busy 2-core machine).
    args = dict(
        num_kv_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        dtype="float32",
        device="cpu",
        attention_backend="torch",
    )
    return LLM(model=path, **{**args, **engine_args})


def offload_of(llm: LLM) -> OffloadConnector:
    connector = llm.engine.core.connector
    found = [c for c in getattr(connector, "connectors", [connector]) if isinstance(c, OffloadConnector)]
    assert len(found) == 1, "the engine did not build the offload connector from kv_offload_dir"
    return found[0]


def conversations(num: int, turns: int) -> list[list[int]]:
    """Each turn's prompt: the previous one, 13 more tokens (the history grows turn by turn)."""
    prompts = []
    for c in range(num):
        history = []
        for t in range(turns):
            history = history + random_prompt(13, seed=100 * c + t)
            prompts.append(history)
    return prompts


def run(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """One prompt at a time (as a returning user would), the greedy tokens of each."""
    return [llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


def assert_nothing_held(llm: LLM, connector: OffloadConnector) -> None:
    core = llm.engine.core
    assert not core.has_unfinished() and not core.kv.tables
    assert core.kv.pool.num_free_blocks == core.kv.num_blocks
    assert all(tier.num_pinned() == 0 for tier in connector.store.tiers)


def test_outputs_identical_under_eviction_pressure_and_after_a_restart(tiny_models, tmp_path):
    _, path = tiny_models("llama_gqa")
    # Three conversations of 3 turns, interleaved by turn: each round evicts the others' histories.
    prompts = conversations(3, 3)
    order = [prompts[c * 3 + t] for t in range(3) for c in range(3)]
    order += [prompts[c * 3 + 2] for c in range(3)]  # every last turn again: the whole history returns
    expected = run(make_llm(path), order)

    llm = make_llm(path, kv_offload_dir=str(tmp_path / "kv"))
    connector = offload_of(llm)
    assert run(llm, order) == expected
    stats = llm.engine.core.stats()
    assert stats["kv_offload_stores:disk"] > 0 and stats["kv_offload_hits:disk"] > 0
    assert stats.get("kv_offload_dropped:disk:corrupt", 0) == 0
    assert_nothing_held(llm, connector)
    llm.close()  # a graceful shutdown: what the device caches is kept too

    restarted = make_llm(path, kv_offload_dir=str(tmp_path / "kv"))
    connector = offload_of(restarted)
    assert run(restarted, order[-3:]) == expected[-3:]
    # Warm from the first run's files: every returning prompt's whole history, device hits being none.
    stats = restarted.engine.core.stats()
    assert stats["kv_offload_hits:disk"] + stats["kv_offload_loads_declined"] == 3 * ((39 - 1) // BLOCK_SIZE)
    assert_nothing_held(restarted, connector)
    restarted.close()


def count_loads(connector: OffloadConnector) -> dict[str, int]:
    """Loads started, per request id: a spy around the connector's real hook (it still runs)."""
    loads: dict[str, int] = {}
    admitted = connector.update_state_after_alloc

    def spy(request, block_ids, num_external_tokens):
        if num_external_tokens:
            loads[request.request_id] = loads.get(request.request_id, 0) + 1
        admitted(request, block_ids, num_external_tokens)

    connector.update_state_after_alloc = spy
    return loads


def always_load(connector: OffloadConnector) -> None:
    """Computing a block is made to cost far more than loading it, whatever this shared machine's timing."""
    connector.cost.prefill_given = True
    connector.cost.prefill_tokens_per_second = 1.0


def test_concurrent_returning_turns_load_their_history_once_under_pressure(tiny_models, tmp_path):
    """Four conversations at once whose histories need ~2.5x the pool: every returning turn is admitted
    with its load only when it can run, so none loads twice (the thrash: loaded, preempted as the newest,
    loaded again), and the greedy outputs are those of the engine without a tier."""
    _, path = tiny_models("llama_gqa")
    prompts = conversations(4, 3)
    rounds = [[prompts[c * 3 + t] for c in range(4)] for t in range(3)]

    def run_rounds(llm: LLM) -> list[list[int]]:
        outputs = []
        for prompts_of_round in rounds:
            outputs += llm.generate(prompts_of_round, GREEDY, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outputs]

    expected = run_rounds(make_llm(path))
    llm = make_llm(path, kv_offload_dir=str(tmp_path / "kv"))
    connector = offload_of(llm)
    always_load(connector)
    loads = count_loads(connector)
    assert run_rounds(llm) == expected
    assert loads and max(loads.values()) == 1, loads
    stats = llm.engine.core.stats()
    assert stats["kv_offload_loads"] == sum(loads.values()) and stats["kv_offload_hits:disk"] > 0
    assert_nothing_held(llm, connector)
    llm.close()


@pytest.mark.parametrize("sync_load_seconds", [0.0, 30.0])
def test_a_returning_prompt_whose_load_lands_in_time_gets_its_first_token_in_its_first_step(
    tiny_models, tmp_path, sync_load_seconds
):
    """Waited for in the scheduler (30 s: it always lands), the load is written in before the forward
    and the rest of the prompt computed in the same step; asynchronous (0), the request waits for the
    step its load lands in to end: a whole step of the others' work (issue 14's evicted/tier TTFT)."""
    _, path = tiny_models("llama_gqa")
    prompts = conversations(3, 3)
    llm = make_llm(path, kv_offload_dir=str(tmp_path / "kv"))
    connector = offload_of(llm)
    always_load(connector)
    connector.sync_load_seconds = sync_load_seconds
    run(llm, prompts[:3])  # conversation 0
    run(llm, [random_prompt(80, seed=7), random_prompt(80, seed=8)])  # twice the pool: all of it evicted
    assert connector.store.wait(30.0)
    core = llm.engine.core
    core.add_request("back", prompts[2], GREEDY, [])  # its last turn again: 9 blocks on disk, 3 tokens new
    steps = 1
    while not any(out.request_id == "back" and out.new_token_ids for out in core.step()):
        assert connector.store.wait(30.0)  # the load lands before the next step, however slow the disk
        steps += 1
    assert connector.num_loads == 1 and core.stats()["kv_offload_hits:disk"] == 9
    assert steps == 1 if sync_load_seconds else steps >= 2
    while core.has_unfinished():
        core.step()
    assert_nothing_held(llm, connector)
    llm.close()


def test_aborts_while_loading_leak_no_block_on_either_tier(tiny_models, tmp_path):
    _, path = tiny_models("llama_gqa")
    prompts = conversations(3, 3)
    probe = make_llm(path)
    block_bytes = probe.engine.core.kv_cache.spec.bytes_per_block
    probe.close()
    # RAM for 4 blocks: the rest spills to disk, so loads read both tiers (disk reads on the I/O thread).
    llm = make_llm(path, kv_offload_dir=str(tmp_path / "kv"), kv_offload_cpu_bytes=4 * block_bytes)
    connector = offload_of(llm)
    always_load(connector)
    assert [t.name for t in connector.store.tiers] == ["cpu", "disk"]
    run(llm, [prompts[c * 3 + t] for t in range(3) for c in range(3)])  # each round evicts the others'
    core = llm.engine.core
    for c in range(3):  # every last turn again, at once: their histories come back from the tiers
        core.add_request(f"r{c}", prompts[c * 3 + 2], GREEDY, [])
    while connector.num_loads == 0 and core.has_unfinished():
        core.step()
    assert connector.num_loads > 0  # aborted loading (a disk read in flight) or just after its KV landed
    for c in range(3):
        core.abort(f"r{c}")
    assert connector.store.wait(30.0)
    core.step()  # the reads that land for aborted requests are dropped
    assert_nothing_held(llm, connector)
    llm.close()


def test_when_everything_fits_the_tier_writes_and_reads_nothing_until_shutdown(tiny_models, tmp_path):
    """Blocks go to the tier only when the pool evicts them: with room for every history, the tier's
    I/O thread has no work while the engine serves (its cost is its per-step hooks alone), and the cached
    prefixes reach the disk at a graceful shutdown."""
    _, path = tiny_models("llama_gqa")
    prompts = conversations(3, 3)
    directory = tmp_path / "kv"
    llm = make_llm(path, kv_offload_dir=str(directory), num_kv_blocks=64)  # 3 histories need ~36
    connector = offload_of(llm)
    run(llm, [prompts[c * 3 + t] for t in range(3) for c in range(3)])
    stats = llm.engine.core.stats()
    assert stats["kv_offload_stores:disk"] == 0 and stats["kv_offload_hits:disk"] == 0
    assert stats["kv_offload_loads"] == 0 and connector.store.io.num_pending == 0
    assert not list(directory.rglob("*.kvblock"))
    assert_nothing_held(llm, connector)
    llm.close()
    assert list(directory.rglob("*.kvblock"))  # what the device cached is kept for a restart
