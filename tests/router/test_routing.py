"""The router's index of worker KV (from KV events) and its policies, without processes."""

from __future__ import annotations

import pytest

from duoserve.disagg.kv_events import KVEvents, KVIndex, prompt_block_hashes
from duoserve.kv.kv_cache_manager import KVCacheManager
from duoserve.router.routing import RouterConfig, RoutingPolicy


def test_prompt_hashes_are_the_worker_prefix_cache_hashes():
    manager = KVCacheManager(num_blocks=16, block_size=4)
    manager.pool.events = []
    tokens = list(range(100, 118))  # 4 full blocks and 2 tokens
    assert manager.allocate_slots("r", tokens, 0, len(tokens))
    stored = [h for is_stored, h in manager.pool.events if is_stored]
    assert stored == prompt_block_hashes(tokens, 4)
    # Evicting a block for a new request publishes its removal.
    manager.free("r")
    manager.pool.events.clear()
    assert manager.allocate_slots("s", list(range(64)), 0, 64)
    assert {h for is_stored, h in manager.pool.events if not is_stored} == set(stored)


def test_index_overlap_counts_leading_blocks_only():
    index = KVIndex()
    hashes = prompt_block_hashes(list(range(40)), 4)
    index.apply("a", KVEvents(stored=hashes[:3] + hashes[4:6]))
    assert index.overlap("a", hashes) == 3
    index.apply("a", KVEvents(removed=[hashes[1]]))
    assert index.overlap("a", hashes) == 1
    assert index.overlap("b", hashes) == 0
    index.drop("a")
    assert index.overlap("a", hashes) == 0 and index.num_blocks("a") == 0


def policy_with(policy: str = "kv", prefill: int = 0, decode: int = 2, **config) -> RoutingPolicy:
    cfg = RouterConfig(
        prefill_urls=[f"http://p{i}" for i in range(prefill)],
        decode_urls=[f"http://d{i}" for i in range(decode)],
        policy=policy,
        **config,
    )
    routing = RoutingPolicy(cfg, KVIndex())
    for worker in routing.workers:
        worker.healthy = True
    return routing


def test_kv_policy_prefers_the_prefix_holder_unless_it_is_much_busier():
    routing = policy_with()
    prompt = list(range(64))  # 16 blocks of 4
    routing.index.apply("http://d1", KVEvents(stored=prompt_block_hashes(prompt, 4)))
    decode, _ = routing.pick(prompt + [7], 4, disaggregable=False)
    assert decode.url == "http://d1"
    # 16 blocks saved on d1 against 100 blocks more of running requests: d0 is cheaper.
    routing.decode[1].active_tokens = 400
    decode, _ = routing.pick(list(range(1000, 1064)) + prompt, 4, disaggregable=False)
    assert decode.url == "http://d0"


def test_round_robin_and_least_loaded():
    routing = policy_with("round_robin", decode=3)
    picked = [routing.pick([1, 2, 3], 4, False)[0].url for _ in range(6)]
    assert picked == ["http://d0", "http://d1", "http://d2"] * 2
    routing = policy_with("least_loaded", decode=3)
    routing.decode[0].active_tokens, routing.decode[1].active_tokens = 50, 10
    routing.decode[2].active_tokens = 30
    assert routing.pick([1, 2, 3], 4, False)[0].url == "http://d1"


def test_conditional_disaggregation():
    routing = policy_with(prefill=1, decode=1, remote_prefill_min_tokens=32, max_prefill_queue_tokens=100)
    assert routing.pick(list(range(20)), 4, True)[1] is None  # short: prefilled locally
    assert routing.pick(list(range(200, 240)), 4, True)[1].url == "http://p0"
    assert routing.pick(list(range(300, 340)), 4, False)[1] is None  # n > 1 or prompt logprobs
    routing.prefill[0].queued_prefill_tokens = 101  # the prefill worker is backed up
    assert routing.pick(list(range(400, 440)), 4, True)[1] is None
    routing.prefill[0].queued_prefill_tokens = 0
    routing.prefill[0].healthy = False  # a lost prefill worker: local prefill
    assert routing.pick(list(range(500, 540)), 4, True)[1] is None
    # The decode worker already holds most of this prompt: only 8 tokens are left to prefill.
    prompt = list(range(600, 640))
    routing.prefill[0].healthy = True
    routing.index.apply("http://d0", KVEvents(stored=prompt_block_hashes(prompt, 4)[:8]))
    assert routing.pick(prompt, 4, True)[1] is None


def test_no_healthy_decode_worker():
    routing = policy_with()
    for worker in routing.decode:
        worker.healthy = False
    assert routing.pick([1, 2], 4, True) == (None, None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(decode_urls=[]), "--decode"),
        (dict(decode_urls=["x"], policy="random"), "--policy"),
        (dict(decode_urls=["x"], remote_prefill_min_tokens=-1), "--remote-prefill-min-tokens"),
    ],
)
def test_bad_router_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**kwargs)


def test_adapter_blocks_are_hashed_on_the_adapter_chain_by_workers_and_router():
    """A worker's KV events for a LoRA request's blocks are its adapter's chain; the router hashes the
    prompt on the same chain, and never counts the base model's (or another adapter's) blocks as hits."""
    from duoserve.kv.block_pool import ROOT_HASH
    from duoserve.lora.request import LoRARequest, prefix_root_hash

    root = prefix_root_hash(LoRARequest("a", 1, "/adapters/a"), ROOT_HASH)
    manager = KVCacheManager(num_blocks=16, block_size=4)
    manager.pool.events = []
    prompt = list(range(100, 117))
    assert manager.allocate_slots("r", prompt, 0, len(prompt), root_hash=root)
    stored = [h for is_stored, h in manager.pool.events if is_stored]
    assert stored == prompt_block_hashes(prompt, 4, root)
    assert not set(stored) & set(prompt_block_hashes(prompt, 4))
    routing = policy_with()
    routing.index.apply("http://d1", KVEvents(stored=stored))
    assert routing.pick(prompt, 4, disaggregable=False, root_hash=root)[0].url == "http://d1"
    routing = policy_with()
    routing.index.apply("http://d1", KVEvents(stored=stored))
    assert routing.index.overlap("http://d1", prompt_block_hashes(prompt, 4)) == 0


def test_a_tier_hit_costs_between_a_device_hit_and_a_miss():
    routing = policy_with(decode=3)
    prompt = list(range(64))  # 16 blocks of 4
    hashes = prompt_block_hashes(prompt, 4)
    index = routing.index
    index.apply("http://d1", KVEvents(tier_stored={"disk": hashes}))  # its own cost not said yet: 0.5
    index.apply("http://d2", KVEvents(stored=hashes[:4], tier_stored={"cpu": hashes[4:]}))
    assert index.prefill_cost("http://d0", hashes) == 16
    assert index.prefill_cost("http://d1", hashes) == 16 * 0.5
    assert index.prefill_cost("http://d2", hashes) == 12 * 0.5
    assert routing.pick(prompt + [7], 4, disaggregable=False)[0].url == "http://d2"
    # d2's device blocks are evicted into its RAM tier (a tier event, not a loss), and its RAM is slow;
    # d1 says its disk loads a block for a tenth of computing it.
    routing = policy_with(decode=3)
    index = routing.index
    index.apply("http://d1", KVEvents(tier_stored={"disk": hashes}, tier_costs={"disk": 0.1}))
    index.apply("http://d2", KVEvents(tier_stored={"cpu": hashes}, tier_costs={"cpu": 0.9}))
    assert index.prefill_cost("http://d1", hashes) == pytest.approx(1.6)
    # A tier that dropped the blocks: a miss again; a worker gone: forgotten.
    index.apply("http://d1", KVEvents(tier_removed={"disk": hashes[8:]}))
    assert index.prefill_cost("http://d1", hashes) == pytest.approx(0.8 + 8)
    assert index.prefill_cost("http://d2", hashes) == pytest.approx(16 * 0.9)
    assert routing.pick(prompt + [7], 4, disaggregable=False)[0].url == "http://d1"
    index.drop("http://d1")
    assert index.prefill_cost("http://d1", hashes) == 16 and index.num_tier_blocks("http://d1") == 0


def test_tier_events_travel_in_the_kv_events_message():
    from duoserve.disagg.kv_events import _encoder, events_decoder

    message = KVEvents.of([(True, 1), (False, 2)], {"disk": [(True, 2), (False, 3)]}, {"disk": 0.25})
    decoded = events_decoder.decode(_encoder.encode(message))
    assert decoded == message
    assert decoded.tier_stored == {"disk": [2]} and decoded.tier_removed == {"disk": [3]}
    # A worker without tiers sends what it always did; a router reads it as before.
    assert events_decoder.decode(_encoder.encode(KVEvents(stored=[5]))).tier_stored == {}


def test_a_block_evicted_into_the_disk_tier_stays_a_cheap_hit_for_the_router(tmp_path):
    """The worker's real pool and offload connector: eviction publishes the device removal and the disk
    tier's store of the same block, which the router's index counts as a tier hit."""
    import torch

    from duoserve.kv.cache import KVCache
    from duoserve.kv.offload.connector import OffloadConnector
    from duoserve.kv.offload.disk_tier import DiskTier
    from duoserve.kv.offload.io_worker import IOWorker
    from duoserve.kv.offload.store import TieredStore
    from tests.kv.offload.conftest import FINGERPRINT, LAYOUT, SPEC, WAIT_S

    manager = KVCacheManager(num_blocks=4, block_size=SPEC.block_size)
    manager.pool.events = []
    cache = KVCache(SPEC, 4, torch.device("cpu"))
    io = IOWorker()
    disk = DiskTier(str(tmp_path / "kv"), FINGERPRINT, LAYOUT, io)
    connector = OffloadConnector(TieredStore([disk], io), SPEC, cache)
    connector.start_kv_events()
    try:
        tokens = list(range(100, 113))  # 3 full blocks
        hashes = prompt_block_hashes(tokens, 4)
        assert manager.allocate_slots("r", tokens, 0, len(tokens))
        manager.free("r")
        assert manager.allocate_slots("s", list(range(16)), 0, 16)  # evicts r's three blocks
        connector.on_blocks_evicted(manager.pool.take_evicted())
        connector.start_load_kv(cache)
        assert connector.store.wait(WAIT_S)
        message = KVEvents.of(manager.pool.events, *connector.take_kv_events())
        assert set(message.removed) == set(hashes) and set(message.tier_stored["disk"]) == set(hashes)
        index = KVIndex()
        index.apply("w", message)
        assert index.overlap("w", hashes) == 0 and 0 < index.prefill_cost("w", hashes) < len(hashes)
    finally:
        connector.close()
