"""The load-or-compute choice, from speeds given or measured (never from this machine's timing)."""

from __future__ import annotations

import pytest

from duoserve.kv.offload.cost import MIN_PREFILL_SAMPLE_TOKENS, PROBE_EVERY, LoadCostModel

BLOCK_TOKENS, BLOCK_BYTES = 16, 1_000_000


def test_priors_load_small_blocks_and_measurements_replace_them():
    cost = LoadCostModel(BLOCK_TOKENS, BLOCK_BYTES)
    # Priors: disk 1 GB/s -> 1 ms a block; prefill 4000 tokens/s -> 4 ms a block: load.
    assert cost.blocks_worth_loading(["disk"] * 3) == 3
    cost.observe_load("disk", BLOCK_BYTES, 0.01)  # 100 MB/s measured: 10 ms a block
    assert cost.blocks_worth_loading(["disk"] * 3) == 0
    cost.observe_step(1600, 0.1)  # 16000 tokens/s: a block computes in 1 ms
    assert cost.blocks_worth_loading(["cpu", "cpu", "disk"]) == 2  # host RAM (8 GB/s) still pays
    assert cost.blocks_worth_loading([]) == 0


def test_the_prefix_kept_is_the_one_saving_most():
    cost = LoadCostModel(BLOCK_TOKENS, BLOCK_BYTES, prefill_tokens_per_second=8000)  # 2 ms a block
    cost.observe_load("cpu", BLOCK_BYTES, 0.001)  # 1 ms: saves 1 ms a block
    cost.observe_load("disk", BLOCK_BYTES, 0.0025)  # 2.5 ms: costs 0.5 ms a block
    assert cost.blocks_worth_loading(["cpu", "disk", "cpu", "cpu"]) == 4  # +1 -0.5 +1 +1
    assert cost.blocks_worth_loading(["cpu", "disk", "disk", "disk"]) == 1


def test_small_steps_and_a_given_speed_are_not_measured():
    cost = LoadCostModel(BLOCK_TOKENS, BLOCK_BYTES)
    prior = cost.prefill_tokens_per_second
    cost.observe_step(MIN_PREFILL_SAMPLE_TOKENS - 1, 10.0)  # a decode step: its tokens cost far more
    assert cost.prefill_tokens_per_second == prior
    cost.observe_step(100, 0.1)
    cost.observe_step(100, 0.05)
    assert 1000 < cost.prefill_tokens_per_second < 2000  # averaged, the first one replacing the prior
    given = LoadCostModel(BLOCK_TOKENS, BLOCK_BYTES, prefill_tokens_per_second=50.0)
    given.observe_step(1000, 0.001)
    assert given.prefill_tokens_per_second == 50.0
    with pytest.raises(ValueError, match="prefill_tokens_per_second"):
        LoadCostModel(BLOCK_TOKENS, BLOCK_BYTES, prefill_tokens_per_second=0)


def test_a_declined_tier_is_probed_now_and_then():
    cost = LoadCostModel(BLOCK_TOKENS, BLOCK_BYTES, prefill_tokens_per_second=16000)
    cost.observe_load("disk", BLOCK_BYTES, 1.0)  # measured on a bad moment: 1 MB/s
    decisions = [cost.blocks_worth_loading(["disk", "disk"]) for _ in range(2 * PROBE_EVERY)]
    assert decisions.count(2) == 2 and decisions[PROBE_EVERY - 1] == 2 and set(decisions) == {0, 2}
    cost.observe_load("disk", BLOCK_BYTES, 0.0001)  # the probe measures 10 GB/s: loads pay again
    cost.observe_load("disk", BLOCK_BYTES, 0.0001)
    cost.observe_load("disk", BLOCK_BYTES, 0.0001)
    assert cost.blocks_worth_loading(["disk"]) == 1
