"""OffloadConnector driven through its KVConnector hooks in the engine's order, with a real KVCache and
real block data: evicted blocks come back bit-exact into the requests' blocks, bad files fail loads
(never served), aborts leak nothing, and the cost model can decline a load. Loads are asynchronous
unless a test asks for the brief wait that supplies a landed load at once (sync_load_seconds)."""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest
import torch

from duoserve.config import EngineConfig
from duoserve.engine.request import Request
from duoserve.kv.block_pool import ROOT_HASH, BlockPool
from duoserve.kv.cache import KVCache
from duoserve.kv.connector import ConnectorEvents, EvictedBlock
from duoserve.kv.offload.connector import OffloadConnector
from duoserve.kv.offload.disk_tier import DiskTier
from duoserve.kv.offload.host_tier import HostTier
from duoserve.kv.offload.io_worker import IOWorker
from duoserve.kv.offload.record import HEADER_BYTES, TOKEN_BYTES
from duoserve.kv.offload.store import TieredStore
from duoserve.sampling_params import SamplingParams
from tests.kv.offload.conftest import FINGERPRINT, LAYOUT, SPEC, WAIT_S, chain

NUM_BLOCKS = 16
PROMPT = list(range(40, 53))  # 13 tokens: 3 full blocks of 4, and a last token to compute
OTHER = list(range(70, 79))  # 2 full blocks and a last token


def make_request(request_id: str, tokens: list[int], **params) -> Request:
    return Request(request_id, list(tokens), SamplingParams(max_tokens=4, **params), 4, frozenset())


@pytest.fixture
def cache() -> KVCache:
    kv = KVCache(SPEC, NUM_BLOCKS, torch.device("cpu"))
    kv.data.normal_(generator=torch.Generator().manual_seed(3))
    return kv


@pytest.fixture(params=["disk", "cpu+disk"])
def make_connector(request, tmp_path, cache):
    """Connectors over tmp_path/kv, closed at the end (a second one over the same directory is a restart).

    Computing a block is made to cost 4 s (1 token/s), so that loading always wins whatever this shared
    machine's timing: the choice itself is tested with speeds set on purpose."""
    made = []

    def make(ram_blocks: int = 2, sync_load_seconds: float = 0.0) -> OffloadConnector:
        io = IOWorker()
        tiers = [HostTier(ram_blocks * LAYOUT.nbytes(1), LAYOUT)] if request.param == "cpu+disk" else []
        tiers.append(DiskTier(str(tmp_path / "kv"), FINGERPRINT, LAYOUT, io))
        store = TieredStore(tiers, io)
        connector = OffloadConnector(store, SPEC, cache, 1.0, sync_load_seconds=sync_load_seconds)
        made.append(connector)
        return connector

    yield make
    for connector in made:
        assert all(tier.num_pinned() == 0 for tier in connector.store.tiers)  # none left pinned, any tier
        connector.close()


def evict(
    connector: OffloadConnector, cache: KVCache, tokens: list[int], block_ids: list[int]
) -> torch.Tensor:
    """The pool hands these blocks (holding tokens' prefix) out again: the connector copies them out before
    the forward pass overwrites them. Returns what they held."""
    held = cache.data[:, :, block_ids].clone()
    keys = chain(tokens)
    evicted = [
        EvictedBlock(b, k.block_hash, k.parent_hash, k.token_ids)
        for b, k in zip(block_ids, keys, strict=False)
    ]
    connector.on_blocks_evicted(evicted)
    connector.start_load_kv(cache)
    cache.data[:, :, block_ids] = -1.0  # the new owners' KV
    assert connector.store.wait(WAIT_S)
    return held


def next_events(connector: OffloadConnector) -> ConnectorEvents:
    """get_finished() once it reports something (a load in flight lands within the deadline)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        assert connector.store.wait(WAIT_S)
        events = connector.get_finished()
        if events.finished_loading or events.load_failed or time.monotonic() > deadline:
            return events


def test_evicted_blocks_load_back_into_the_requests_blocks(make_connector, cache):
    connector = make_connector()
    held = evict(connector, cache, PROMPT, [0, 1, 2])
    request = make_request("b", PROMPT)
    assert connector.get_num_new_matched_tokens(request, 0) == (12, True)
    last = cache.data[:, :, 10].clone()
    connector.update_state_after_alloc(request, [7, 8, 9, 10], 12)
    connector.start_load_kv(cache)  # the step the request waits in
    events = next_events(connector)
    assert events.finished_loading == {"b": []} and not events.load_failed
    assert torch.equal(cache.data[:, :, [7, 8, 9]], held)
    assert torch.equal(cache.data[:, :, 10], last)  # the last block is the request's to compute
    stats = connector.stats()
    tiers = {t.name for t in connector.store.tiers}
    assert sum(stats[f"kv_offload_hits:{t}"] for t in tiers) == 3
    assert stats["kv_offload_stores:disk"] >= 1
    assert sum(stats[f"kv_offload_load_seconds_bucket:{t}:inf"] for t in tiers) == 1
    assert connector.get_finished() == ConnectorEvents()  # reported once


def test_after_a_device_hit_only_the_rest_is_loaded(make_connector, cache):
    connector = make_connector()
    held = evict(connector, cache, PROMPT, [3, 4, 5])
    request = make_request("b", PROMPT)
    # The device still holds block 0 of the prompt (in block 11): the tiers supply blocks 1 and 2.
    assert connector.get_num_new_matched_tokens(request, 4) == (8, True)
    connector.update_state_after_alloc(request, [11, 12, 13, 14], 8)
    assert next_events(connector).finished_loading == {"b": []}
    assert torch.equal(cache.data[:, :, [12, 13]], held[:, :, 1:])
    # Nothing after the device hit is held, or the hit already covers every loadable block.
    assert connector.get_num_new_matched_tokens(make_request("c", list(range(90, 103))), 0) == (0, False)
    assert connector.get_num_new_matched_tokens(request, 12) == (0, False)


def test_blocks_of_another_chain_root_never_match(make_connector, cache):
    """A LoRA adapter's blocks chain from its own root (Request.block_root): the base model's offloaded
    blocks of the same tokens are not its KV, and never load into its blocks."""
    connector = make_connector()
    evict(connector, cache, PROMPT, [0, 1, 2])
    adapted = make_request("a", PROMPT)
    adapted.block_root = 12345
    assert connector.get_num_new_matched_tokens(adapted, 0) == (0, False)
    base = make_request("b", PROMPT)
    assert connector.get_num_new_matched_tokens(base, 0) == (12, True)
    connector.request_finished(base)  # its read, started when matched, is dropped


def test_a_load_that_lands_within_the_wait_is_supplied_at_once(make_connector, cache):
    """Waited for in the scheduler (it lands long before WAIT_S), it is written in before the step's
    forward, so the request computes the rest in the step that admitted it: it never waits for a
    finished_loading event (an asynchronous load costs its request the whole step it lands in)."""
    connector = make_connector(sync_load_seconds=WAIT_S)
    held = evict(connector, cache, PROMPT, [0, 1, 2])
    request = make_request("b", PROMPT)
    assert connector.get_num_new_matched_tokens(request, 0) == (12, False)
    connector.update_state_after_alloc(request, [7, 8, 9, 10], 12)
    connector.start_load_kv(cache)  # before this step's forward: no waiting, no polling
    assert torch.equal(cache.data[:, :, [7, 8, 9]], held)
    assert connector.get_finished() == ConnectorEvents()  # the scheduler has nothing to apply
    stats = connector.stats()
    tiers = {t.name for t in connector.store.tiers}
    assert stats["kv_offload_loads"] == 1 and sum(stats[f"kv_offload_hits:{t}"] for t in tiers) == 3


def test_a_load_expected_to_take_longer_than_the_wait_is_not_waited_for(make_connector, cache):
    connector = make_connector(sync_load_seconds=0.5)
    held = evict(connector, cache, PROMPT, [0, 1, 2])
    for tier in connector.store.tiers:  # 1 s a block: 3 s, worth it against 4 s a block computed
        connector.cost.bytes_per_second[tier.name] = float(LAYOUT.nbytes(1))
    request = make_request("b", PROMPT)
    waited = []
    connector.store.wait_for = lambda load, timeout: waited.append(timeout)  # a spy: never to be called
    assert connector.get_num_new_matched_tokens(request, 0) == (12, True) and not waited
    connector.update_state_after_alloc(request, [7, 8, 9, 10], 12)
    assert next_events(connector).finished_loading == {"b": []}
    assert torch.equal(cache.data[:, :, [7, 8, 9]], held)


def test_a_request_waiting_for_room_keeps_its_read_and_drops_it_when_it_ends(make_connector, cache):
    connector = make_connector(sync_load_seconds=WAIT_S)
    evict(connector, cache, PROMPT, [0, 1, 2])
    request = make_request("b", PROMPT)
    reads = []
    start_load = connector.store.start_load
    connector.store.start_load = lambda keys, tiers: reads.append(keys) or start_load(keys, tiers)
    for _ in range(3):  # asked at every step while the pool has no room for it
        assert connector.get_num_new_matched_tokens(request, 0) == (12, False)
    assert len(reads) == 1
    assert sum(t.num_pinned() for t in connector.store.tiers) == 3
    connector.request_finished(request)  # it ends before it is admitted: unpinned (checked by the fixture)
    assert connector.get_finished() == ConnectorEvents()


def test_a_corrupt_file_read_before_admission_is_never_served(make_connector, cache):
    connector = make_connector(ram_blocks=1, sync_load_seconds=WAIT_S)  # with a RAM tier, blocks 0, 1 on disk
    held = evict(connector, cache, PROMPT, [0, 1, 2])
    path = connector.store.tiers[-1].path(chain(PROMPT)[1].block_hash)
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\xff\xfe\xfd")
    request = make_request("b", PROMPT)
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)  # it computes them all
    connector.update_state_after_alloc(request, [7, 8, 9, 10], 0)
    connector.start_load_kv(cache)
    assert (cache.data[:, :, [7, 8, 9]] != held).any()
    assert connector.get_finished() == ConnectorEvents()
    stats = connector.stats()
    assert stats["kv_offload_dropped:disk:corrupt"] == 1 and stats["kv_offload_load_failures"] == 1
    assert stats["kv_offload_loads"] == 0


def test_the_prompts_last_token_is_always_computed(make_connector, cache):
    connector = make_connector()
    evict(connector, cache, PROMPT, [0, 1, 2])
    exact = make_request("b", PROMPT[:12])  # 3 full blocks: the third holds the token sampled from
    assert connector.get_num_new_matched_tokens(exact, 0) == (8, True)
    connector.request_finished(exact)
    with_logprobs = make_request("c", PROMPT, prompt_logprobs=1)  # computes every position itself
    assert connector.get_num_new_matched_tokens(with_logprobs, 0) == (0, False)


def test_blocks_evicted_in_the_step_a_load_writes_them_are_copied_out_first(make_connector, cache):
    connector = make_connector(ram_blocks=4)
    held = evict(connector, cache, PROMPT, [0, 1, 2])
    other = list(range(60, 73))
    request = make_request("b", PROMPT)
    assert connector.get_num_new_matched_tokens(request, 0) == (12, True)
    # The same schedule() gives the request blocks 4..7, evicting `other`'s prefix cached in 4..6.
    other_held = cache.data[:, :, [4, 5, 6]].clone()
    connector.update_state_after_alloc(request, [4, 5, 6, 7], 12)
    keys = chain(other)
    connector.on_blocks_evicted(
        [
            EvictedBlock(b, k.block_hash, k.parent_hash, k.token_ids)
            for b, k in zip([4, 5, 6], keys, strict=True)
        ]
    )
    connector.start_load_kv(cache)
    assert next_events(connector).finished_loading == {"b": []}
    assert torch.equal(cache.data[:, :, [4, 5, 6]], held)
    second = make_request("c", other)
    assert connector.get_num_new_matched_tokens(second, 0) == (12, True)
    connector.update_state_after_alloc(second, [12, 13, 14, 15], 12)
    assert next_events(connector).finished_loading == {"c": []}
    assert torch.equal(cache.data[:, :, [12, 13, 14]], other_held)


def test_a_corrupt_file_fails_the_load_and_is_never_served(make_connector, cache):
    connector = make_connector(ram_blocks=1)  # with a RAM tier, blocks 0 and 1 spill to disk
    held = evict(connector, cache, PROMPT, [0, 1, 2])
    disk = connector.store.tiers[-1]
    path = disk.path(chain(PROMPT)[1].block_hash)
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\xff\xfe\xfd")
    request = make_request("b", PROMPT)
    assert connector.get_num_new_matched_tokens(request, 0) == (12, True)
    connector.update_state_after_alloc(request, [7, 8, 9, 10], 12)
    events = next_events(connector)
    assert events.load_failed == {"b"} and not events.finished_loading
    assert (cache.data[:, :, [7, 8, 9]] != held).any()  # nothing was written into the request's blocks
    stats = connector.stats()
    assert stats["kv_offload_dropped:disk:corrupt"] == 1 and stats["kv_offload_load_failures"] == 1
    # Computed again, as the scheduler does on load_failed: the chain now stops before the bad block.
    assert connector.get_num_new_matched_tokens(request, 0) == (4, True)
    connector.request_finished(request)


def test_an_aborted_load_writes_nothing_and_leaks_nothing(make_connector, cache):
    connector = make_connector()
    evict(connector, cache, PROMPT, [0, 1, 2])
    request = make_request("b", PROMPT)
    assert connector.get_num_new_matched_tokens(request, 0) == (12, True)
    connector.update_state_after_alloc(request, [7, 8, 9, 10], 12)
    before = cache.data[:, :, [7, 8, 9]].clone()
    assert connector.request_finished(request) is False  # its blocks may be freed at once
    assert connector.store.wait(WAIT_S)
    connector.start_load_kv(cache)
    assert connector.get_finished() == ConnectorEvents()
    assert torch.equal(cache.data[:, :, [7, 8, 9]], before)
    # (the fixture checks that no block is left pinned on any tier)


def test_a_load_slower_than_computing_is_declined(make_connector, cache):
    connector = make_connector(ram_blocks=1)
    evict(connector, cache, PROMPT, [0, 1, 2])
    for tier in connector.store.tiers:
        connector.cost.observe_load(tier.name, 1, 1.0)  # one byte a second
    request = make_request("b", PROMPT)
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)
    assert connector.get_num_new_matched_tokens(request, 0) == (
        0,
        False,
    )  # asked again: not enough blocks yet
    connector.update_state_after_alloc(request, [7, 8, 9, 10], 0)  # admitted, computing them all
    assert connector.stats()["kv_offload_loads_declined"] == 3


def test_blocks_already_held_are_not_stored_again(make_connector, cache):
    connector = make_connector()
    evict(connector, cache, PROMPT, [0, 1, 2])
    stores = {k: v for k, v in connector.stats().items() if k.startswith("kv_offload_stores:")}
    evict(connector, cache, PROMPT, [5, 6, 7])
    assert {k: v for k, v in connector.stats().items() if k.startswith("kv_offload_stores:")} == stores


def test_a_restarted_worker_loads_what_the_last_one_kept(make_connector, cache):
    first = make_connector(ram_blocks=8)  # with a RAM tier, the evicted blocks are in RAM until shutdown
    held = evict(first, cache, PROMPT, [0, 1, 2])
    # Two blocks of another prompt are still cached on the device at shutdown (never evicted).
    pool = BlockPool(NUM_BLOCKS)
    device_ids = pool.allocate(6)[4:]
    parent = ROOT_HASH
    for i, block_id in enumerate(device_ids):
        parent = pool.cache(block_id, parent, OTHER[4 * i : 4 * i + 4])
    device_held = cache.data[:, :, device_ids].clone()
    first.close(pool)  # what the engine does at a graceful shutdown
    restarted = make_connector()
    for request_id, tokens, expected in (("b", PROMPT, held), ("c", OTHER, device_held)):
        request = make_request(request_id, tokens)
        num_tokens, _ = restarted.get_num_new_matched_tokens(request, 0)
        assert num_tokens == expected.shape[2] * SPEC.block_size
        targets = list(range(12, 12 + expected.shape[2]))
        restarted.update_state_after_alloc(request, [*targets, 15], num_tokens)
        assert next_events(restarted).finished_loading == {request_id: []}
        assert torch.equal(cache.data[:, :, targets], expected)


def test_a_disk_failing_at_run_time_turns_the_tier_off_and_requests_compute(make_connector, cache, caplog):
    connector = make_connector(ram_blocks=1)
    disk = connector.store.tiers[-1]
    shutil.rmtree(disk.directory)
    with caplog.at_level(logging.WARNING):
        evict(connector, cache, PROMPT, [0, 1, 2])
    assert "turned off" in caplog.text and connector.stats()["kv_offload_enabled:disk"] == 0.0
    request = make_request("b", PROMPT)
    # The chain's first block was on disk (spilled from RAM, or stored there): nothing to load, no error.
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)


def test_from_config(tmp_path, cache):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    assert OffloadConnector.from_config(EngineConfig(device="cpu"), SPEC, cache, str(model)) is None
    config = EngineConfig(
        device="cpu", dtype="float32", kv_offload_dir=str(tmp_path / "kv"), kv_offload_max_bytes=10**6
    )
    connector = OffloadConnector.from_config(config, SPEC, cache, str(model))
    try:
        (disk,) = connector.store.tiers
        assert disk.name == "disk" and disk.max_bytes == 10**6
        assert os.path.dirname(disk.directory) == str(tmp_path / "kv")
    finally:
        connector.close()
    with pytest.raises(ValueError, match="not a writable directory"):
        OffloadConnector.from_config(
            EngineConfig(device="cpu", dtype="float32", kv_offload_dir=str(model)), SPEC, cache, str(model)
        )
    both = EngineConfig(
        device="cpu", dtype="float32", kv_offload_dir=str(tmp_path / "kv"), kv_offload_cpu_bytes=10**6
    )
    connector = OffloadConnector.from_config(both, SPEC, cache, str(model))
    assert [t.name for t in connector.store.tiers] == ["cpu", "disk"]
    connector.close()


def test_disk_hits_are_promoted_to_the_ram_tier(make_connector, cache, request):
    if request.node.callspec.params["make_connector"] != "cpu+disk":
        pytest.skip("promotion needs a RAM tier")
    connector = make_connector(ram_blocks=4)
    held = evict(connector, cache, PROMPT, [0, 1, 2])
    ram, disk = connector.store.tiers
    evict(connector, cache, OTHER, [3, 4])  # RAM holds 4: two of PROMPT's blocks spill to disk
    keys = chain(PROMPT)
    on_disk = [k for k in keys if not ram.holds(k)]
    assert on_disk and all(disk.holds(k) for k in on_disk)
    request = make_request("b", PROMPT)
    assert connector.get_num_new_matched_tokens(request, 0) == (12, True)
    connector.update_state_after_alloc(request, [7, 8, 9, 10], 12)
    assert next_events(connector).finished_loading == {"b": []}
    assert torch.equal(cache.data[:, :, [7, 8, 9]], held)
    assert all(ram.holds(k) for k in keys)  # the next load reads them from RAM
    read = []
    ram.read([keys[0]], lambda result: read.extend(result[0]))
    assert torch.equal(read[0], held[:, :, 0])


def test_tier_events_say_which_tier_gains_and_drops_each_block(make_connector, cache, request, tmp_path):
    connector = make_connector(ram_blocks=2)
    connector.start_kv_events()
    evict(connector, cache, PROMPT, [0, 1, 2])
    events, costs = connector.take_kv_events()
    keys = [k.block_hash for k in chain(PROMPT)]
    stored = {tier: {h for s, h in e if s} for tier, e in events.items()}
    if request.node.callspec.params["make_connector"] == "cpu+disk":
        # RAM holds two: the first block spills to disk (RAM drops it, disk gains it).
        assert stored == {"cpu": set(keys), "disk": {keys[0]}}
        assert [h for s, h in events["cpu"] if not s] == [keys[0]]
    else:
        assert stored == {"disk": set(keys)}
    assert connector.take_kv_events() == ({}, {})  # drained
    assert set(costs) == {t.name for t in connector.store.tiers} and all(0 < c <= 1 for c in costs.values())
    # A restarted worker announces what its disk tier holds when it starts recording.
    connector.close()
    restarted = make_connector(ram_blocks=2)
    restarted.start_kv_events()
    assert {h for s, h in restarted.take_kv_events()[0]["disk"] if s} >= stored["disk"]


def test_a_full_disk_tier_reports_the_blocks_it_drops(tmp_path, cache):
    io = IOWorker()
    file_bytes = HEADER_BYTES + TOKEN_BYTES * SPEC.block_size + LAYOUT.nbytes(1)
    disk = DiskTier(str(tmp_path / "kv"), FINGERPRINT, LAYOUT, io, max_bytes=2 * file_bytes)
    connector = OffloadConnector(TieredStore([disk], io), SPEC, cache, prefill_tokens_per_second=1.0)
    try:
        connector.start_kv_events()
        evict(connector, cache, PROMPT, [0, 1, 2])  # room for two files: the first block goes
        events = connector.take_kv_events()[0]["disk"]
        keys = [k.block_hash for k in chain(PROMPT)]
        assert [h for s, h in events if s] == keys and [h for s, h in events if not s] == [keys[0]]
    finally:
        connector.close()
