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
