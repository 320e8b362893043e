"""The tier chain: host RAM spills to disk, lookups ask in order, loads read from both and pin both."""

from __future__ import annotations

import torch

from duoserve.kv.offload.host_tier import HostTier
from duoserve.kv.offload.store import TieredStore
from tests.kv.offload.conftest import LAYOUT, WAIT_S, chain, random_blocks

KEYS = chain(list(range(300, 320)))  # 5 blocks
BLOCKS = random_blocks(5, seed=2)


def test_ram_evictions_spill_to_disk_and_loads_read_both(make_disk, io):
    host = HostTier(2 * LAYOUT.nbytes(1), LAYOUT)
    disk = make_disk()
    store = TieredStore([host, disk], io)
    store.store(KEYS[:4], BLOCKS[:4])
    assert store.wait(WAIT_S)
    assert [store.holder(k) for k in KEYS] == [disk, disk, host, host, None]
    assert host.counters.stores == 4 and disk.counters.stores == 2
    store.store(KEYS[2:3], BLOCKS[2:3])  # held already: only marked recently used
    assert host.counters.stores == 4

    load = store.start_load(KEYS[:4], [disk, disk, host, host])
    assert load.tier is disk
    assert host.num_pinned() == 2 and disk.num_pinned() == 2
    store.store(KEYS[4:], BLOCKS[4:])  # host full of pinned blocks: it goes on to disk
    assert store.holder(KEYS[4]) is disk and host.counters.stores_skipped == 1
    assert store.wait(WAIT_S) and load.done and load.error is None
    assert all(torch.equal(a, b) for a, b in zip(load.blocks, BLOCKS[:4], strict=True))
    store.release(load)
    assert host.num_pinned() == 0 and disk.num_pinned() == 0
    store.close(WAIT_S)


def test_persist_writes_to_disk_what_would_not_outlive_the_process(make_disk, io):
    host = HostTier(3 * LAYOUT.nbytes(1), LAYOUT)
    disk = make_disk(max_bytes=10**6)
    disk.max_pending_bytes = 2 * disk.payload_bytes  # writes back up at once: persist waits for them
    store = TieredStore([host, disk], io)
    store.store(KEYS[:3], BLOCKS[:3])  # all in RAM
    store.persist(KEYS[3:], BLOCKS[3:])  # as if still on the device
    store.persist_held()
    assert store.wait(WAIT_S)
    assert (
        all(disk.holds(k) for k in KEYS) and disk.counters.stores == 5 and disk.counters.stores_skipped == 0
    )
    load = store.start_load(KEYS, [disk] * 5)
    assert store.wait(WAIT_S) and all(torch.equal(a, b) for a, b in zip(load.blocks, BLOCKS, strict=True))
    store.release(load)
