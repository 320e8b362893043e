"""OffloadConnector: prefix blocks evicted from the KV cache go to the tiers, and come back from them.

The KVConnector hooks (duoserve/kv/connector.py), in the order one engine step calls them:

    get_finished()                 loads whose blocks are in the cache now -> their requests may run
    schedule():
      get_num_new_matched_tokens   consecutive blocks after the device's prefix hit that a tier holds,
                                   cut to what is cheaper to load than to compute (cost.py); pin them
                                   and start reading them into host buffers, waiting briefly (below)
      update_state_after_alloc     the request has its blocks: the read will be written into them
      on_blocks_evicted            cached blocks the pool handed out again: remember them
    start_load_kv(kv_cache)        copy the evicted blocks out (before the forward overwrites them) and
                                   store them; write finished loads into their requests' blocks
    forward
    save_kv(kv_cache, scheduled)   time the forward pass: the prefill speed the cost model compares with

A load is read on the I/O thread (disk) or at once (host RAM). When it has landed by the time the
scheduler asks, it is supplied at once (written in before this step's forward, so the request computes
the rest in the step that admitted it); the scheduler waits up to `sync_load_seconds` for a load the cost
model expects to read within that. Otherwise it arrives asynchronously: the request waits in the
scheduler, holding its blocks, while the others keep stepping, and runs in the step after the one its
load landed in. Why the brief wait: an asynchronous load, however fast, costs its request a whole step of
the others (issue 14's evicted/tier, SmolLM2-135M, 2 vCPUs, engine timeline: a 27-block disk read took
2-9 ms on the I/O thread, yet its request computed one step later, ~40 ms on (the other request's
decode step), ~300 ms when that step was another request's prefill; supplied at once, it waited 3 ms).
A read that fails (a corrupt, torn or vanished file) before its request is admitted makes the request
compute the blocks; once admitted asynchronously, it is reported in `load_failed` and its request
computes them. A request that ends while loading just drops the load (its reads land in host buffers,
never in its blocks, so the scheduler may free them at once: request_finished always returns False).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from duoserve.kv.block_pool import ROOT_HASH, BlockPool, hash_block
from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.kv.connector import ConnectorEvents, EvictedBlock
from duoserve.kv.layout import KVLayout
from duoserve.kv.offload.cost import LoadCostModel
from duoserve.kv.offload.disk_tier import DiskTier
from duoserve.kv.offload.fingerprint import KVFingerprint
from duoserve.kv.offload.host_tier import HostTier
from duoserve.kv.offload.io_worker import IOWorker
from duoserve.kv.offload.record import BlockKey
from duoserve.kv.offload.store import PendingLoad, TieredStore
from duoserve.kv.offload.tier import Tier

if TYPE_CHECKING:
    from duoserve.config import EngineConfig
    from duoserve.engine.request import Request
    from duoserve.engine.scheduler import ScheduledRequest

logger = logging.getLogger(__name__)

# Blocks copied off the device at a time at shutdown (a whole GPU cache at once could need as much again).
PERSIST_CHUNK_BLOCKS = 256
# The longest the scheduler waits for a load to land so that its request computes in this step (only for
# loads the cost model expects to read within it): the stall every running request pays once, against
# the whole step the loading request waits otherwise (SmolLM2-135M, 2 vCPUs: a 27-block disk load waited
# 3 ms, median; a decode step of two requests took ~35 ms, a step with a 134-token prefill ~300 ms).
SYNC_LOAD_SECONDS = 0.02
# Buckets of kv_offload_load_seconds (a load's read started, to its KV in place).
LOAD_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class _Match:
    """What get_num_new_matched_tokens found for a request, used when its blocks are allocated."""

    first_block: int  # index in the request of the first block to load (after the device's hit)
    keys: list[BlockKey]
    tiers: list[Tier]
    pending: PendingLoad  # the read, started when matched (kept while the request waits for room)
    at_once: bool = False  # supplied at once (landed when matched): its request does not wait


@dataclass
class _Load:
    pending: PendingLoad
    block_ids: list[int]  # the request's blocks the load writes
    waiting: bool = True  # its request waits in the scheduler (finished_loading tells it to run)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bucket
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value


class OffloadConnector:
    def __init__(
        self,
        store: TieredStore,
        spec: KVCacheSpec,
        kv_cache: KVCache | None = None,
        prefill_tokens_per_second: float | None = None,
        sync_load_seconds: float = SYNC_LOAD_SECONDS,
    ) -> None:
        """`kv_cache`: the engine's; with it, loads the I/O thread finished are written in at
        get_finished(), so their requests run one step sooner than at the next start_load_kv.
        `sync_load_seconds`: the longest wait for a load in the scheduler (0: every load is asynchronous)."""
        self.store = store
        self.sync_load_seconds = sync_load_seconds
        self.block_size = spec.block_size
        self.kv_cache = kv_cache
        self.cost = LoadCostModel(spec.block_size, spec.bytes_per_block, prefill_tokens_per_second)
        self._matches: dict[str, _Match] = {}
        self._declined: dict[str, int] = {}  # request -> held blocks it computes instead, until admitted
        self._loads: dict[str, _Load] = {}
        self._evicted: list[EvictedBlock] = []
        self._events = ConnectorEvents()
        self._forward_start: float | None = None
        self._load_seconds = {tier.name: _Histogram(LOAD_SECONDS_BUCKETS) for tier in store.tiers}
        self.num_loads = 0  # requests admitted with a load
        self.num_loads_declined = 0  # blocks a tier held that were computed instead (cheaper)
        self.num_loads_failed = 0

    @classmethod
    def from_config(
        cls, config: EngineConfig, spec: KVCacheSpec, kv_cache: KVCache, model_source: str
    ) -> OffloadConnector | None:
        """The connector the engine's flags ask for (None without --kv-offload-dir/--kv-offload-cpu-bytes).

        ValueError (at start) for a directory that cannot be written or is in use."""
        if not config.kv_offload_dir and not config.kv_offload_cpu_bytes:
            return None
        layout = KVLayout.of(spec)
        tiers: list[Tier] = []
        if config.kv_offload_cpu_bytes:
            pin = kv_cache.data.device.type == "cuda"
            tiers.append(HostTier(config.kv_offload_cpu_bytes, layout, pin_memory=pin))
        io = None
        if config.kv_offload_dir:
            numerics = f"{config.resolved_dtype()} quantization={config.quantization}"
            fingerprint = KVFingerprint.of(model_source, layout, numerics)
            io = IOWorker()
            try:
                tiers.append(
                    DiskTier(config.kv_offload_dir, fingerprint, layout, io, config.kv_offload_max_bytes)
                )
            except ValueError:
                io.close(0.0)
                raise
        return cls(TieredStore(tiers, io), spec, kv_cache)

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        request_id = request.request_id
        self._declined.pop(request_id, None)
        keys, tiers = self._held_run(request, num_computed_tokens)
        count = self.cost.blocks_worth_loading([t.name for t in tiers]) if keys else 0
        self._declined[request_id] = len(keys) - count  # counted once admitted (asked each retry)
        if count == 0:
            self._drop_match(request_id)
            return 0, False
        match = self._match(request_id, num_computed_tokens // self.block_size, keys[:count], tiers[:count])
        if match.pending.error is not None:  # read before admission: the request computes the blocks
            self._drop_match(request_id)
            self._count_failure(request_id, match.pending.error)
            return 0, False
        match.at_once = self.sync_load_seconds > 0 and match.pending.done
        return count * self.block_size, not match.at_once

    def _held_run(self, request: Request, num_computed_tokens: int) -> tuple[list[BlockKey], list[Tier]]:
        """The consecutive blocks after the device's prefix hit that a tier holds, and their tiers."""
        bs = self.block_size
        num_full = (request.num_tokens - 1) // bs  # the last token is always computed: it is sampled from
        first = num_computed_tokens // bs
        if request.wants_prompt_logprobs or num_computed_tokens % bs or first >= num_full or self.store.empty:
            return [], []
        keys, tiers = [], []
        for index, key in enumerate(_chain(request.all_token_ids, bs, num_full, request.block_root)):
            if index < first:
                continue  # on the device: hashed only to reach the next link of the chain
            tier = self.store.holder(key)
            if tier is None:
                break
            keys.append(key)
            tiers.append(tier)
        return keys, tiers

    def _match(self, request_id: str, first: int, keys: list[BlockKey], tiers: list[Tier]) -> _Match:
        """The request's read of these blocks: the one started at an earlier ask (a request waiting for
        room is asked every step), or a new one, waited for up to sync_load_seconds when the cost model
        expects it to land within that."""
        match = self._matches.get(request_id)
        if match is not None and match.first_block == first and match.keys == keys:
            return match
        self._drop_match(request_id)
        match = _Match(first, keys, tiers, self.store.start_load(keys, tiers))
        self._matches[request_id] = match
        expected = self.cost.load_seconds([t.name for t in tiers])
        if self.sync_load_seconds > 0 and expected <= self.sync_load_seconds:
            self.store.wait_for(match.pending, self.sync_load_seconds)
        return match

    def _drop_match(self, request_id: str) -> None:
        match = self._matches.pop(request_id, None)
        if match is not None:
            self.store.release(match.pending)  # reads in flight land in their own buffers, then dropped

    def _count_failure(self, request_id: str, reason: str) -> None:
        logger.warning("KV offload: request %s computes its prefix again (%s)", request_id, reason)
        self.num_loads_failed += 1

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        match = self._matches.pop(request.request_id, None)
        self.num_loads_declined += self._declined.pop(request.request_id, 0)
        if match is None:
            return
        count = num_external_tokens // self.block_size
        if count != len(match.keys):  # 0: another connector supplied the request (or none did)
            self.store.release(match.pending)
            return
        targets = list(block_ids[match.first_block : match.first_block + count])
        # Landed already: written in at the next start_load_kv, before the forward that computes the rest.
        self._loads[request.request_id] = _Load(match.pending, targets, waiting=not match.at_once)
        self.num_loads += 1

    def on_blocks_evicted(self, blocks: list[EvictedBlock]) -> None:
        self._evicted.extend(blocks)

    def request_finished(self, request: Request) -> bool:
        self._drop_match(request.request_id)
        self._declined.pop(request.request_id, None)
        load = self._loads.pop(request.request_id, None)
        if load is not None:
            self.store.release(load.pending)  # reads in flight land in their own buffers, then are dropped
        self._events.finished_loading.pop(request.request_id, None)
        self._events.load_failed.discard(request.request_id)
        return False

    # ------------------------------------------------------------------ worker side

    def start_load_kv(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache
        self._sync(kv_cache)
        self._forward_start = time.perf_counter()

    def save_kv(self, kv_cache: KVCache, scheduled: list[ScheduledRequest]) -> None:
        if self._forward_start is not None:
            seconds = time.perf_counter() - self._forward_start
            self.cost.observe_step(sum(s.num_new_tokens for s in scheduled), seconds)
            self._forward_start = None

    def get_finished(self) -> ConnectorEvents:
        if self.kv_cache is not None:
            self._sync(self.kv_cache)
        events, self._events = self._events, ConnectorEvents()
        return events

    def _sync(self, kv_cache: KVCache) -> None:
        """Finish the I/O thread's work, copy evicted blocks out (before any load writes into a block
        evicted meanwhile), write landed loads in. Most steps have none of it: then nothing is called."""
        if self.store.busy:
            self.store.poll()
        if self._evicted:
            self._save_evicted(kv_cache)
        if self._loads:
            self._apply_loads(kv_cache)

    def _save_evicted(self, kv_cache: KVCache) -> None:
        """Copy the evicted blocks that no tier holds yet out of the cache, into the tiers."""
        fresh: dict[int, tuple[int, BlockKey]] = {}
        for block in self._evicted:
            key = BlockKey(block.block_hash, block.parent_hash, tuple(block.token_ids))
            holder = self.store.holder(key)
            if holder is not None:
                holder.touch(key)
            else:
                fresh[block.block_hash] = (block.block_id, key)
        self._evicted.clear()
        if not fresh:
            return
        block_ids = [block_id for block_id, _ in fresh.values()]
        # One gather copy; [layers, 2, n, ...] seen as [n, layers, 2, ...]: each block a view, whose
        # pieces (a layer's K or V) the disk tier writes as they are (no second copy on the engine loop).
        blocks = kv_cache.export_blocks(block_ids).permute(2, 0, 1, 3, 4, 5)
        self.store.store([key for _, key in fresh.values()], blocks)

    def _apply_loads(self, kv_cache: KVCache) -> None:
        for request_id, load in list(self._loads.items()):
            if not load.pending.done:
                continue
            del self._loads[request_id]
            self._finish_load(request_id, load, kv_cache)

    def _finish_load(self, request_id: str, load: _Load, kv_cache: KVCache) -> None:
        pending = load.pending
        try:
            if pending.error is not None:  # only a request waiting for it: an at-once load had landed
                self._count_failure(request_id, pending.error)
                self._events.load_failed.add(request_id)
                return
            start = time.perf_counter()
            device = kv_cache.data.device  # to the device first: from pinned RAM, asynchronously
            if pending.batch is not None:  # read as one tensor (the disk tier): one copy into the cache
                batch = pending.batch.to(device, non_blocking=True)
            else:
                batch = torch.stack([block.to(device, non_blocking=True) for block in pending.blocks])
            # [n, layers, 2, ...] seen as [layers, 2, n, ...]: one strided copy. Measured on 64 float32
            # blocks of SmolLM2-135M (47 MB, 2 shared cores): 22 ms, where torch.stack(dim=2) into a
            # contiguous batch first took 50 ms with 1 torch thread and 800 ms with 2 on a busy machine.
            kv_cache.import_blocks(load.block_ids, batch.permute(1, 2, 0, 3, 4, 5))
            seconds = pending.read_seconds + time.perf_counter() - start
            self.store.promote(pending.keys, pending.blocks, pending.tiers)
        finally:
            self.store.release(pending)
        block_bytes = pending.nbytes // len(pending.keys)
        for tier in pending.tiers:
            tier.counters.hits += 1
            tier.counters.load_bytes += block_bytes
        self.cost.observe_load(pending.tier.name, pending.nbytes, seconds)
        self._load_seconds[pending.tier.name].observe(time.perf_counter() - pending.started)
        if load.waiting:
            self._events.finished_loading[request_id] = []

    # ------------------------------------------------------------------ KV events (for a router)

    def start_kv_events(self) -> None:
        """Record which blocks each tier gains and loses from now on (what it holds already included)."""
        for tier in self.store.tiers:
            tier.start_events()

    def take_kv_events(self) -> tuple[dict[str, list[tuple[bool, int]]], dict[str, float]]:
        """Per tier name, its events since the last call (True: now held | False: dropped, block hash), and
        with any, the tiers' costs (tier_costs: the router keeps the last ones it got)."""
        taken = {}
        for tier in self.store.tiers:
            if tier.events:
                taken[tier.name], tier.events = tier.events, []
        return taken, (self.tier_costs() if taken else {})

    def tier_costs(self) -> dict[str, float]:
        """Per tier, loading one of its blocks as a share of computing it, by this worker's speeds (what a
        router weighs a tier hit with: 0 a device hit, 1 a miss; a tier dearer than computing is a miss)."""
        return {tier.name: min(1.0, self.cost.relative_load_cost(tier.name)) for tier in self.store.tiers}

    # ------------------------------------------------------------------ metrics

    def stats(self) -> dict[str, float]:
        """Per tier (the `tier` label): see duoserve/server/metrics.py for the Prometheus names."""
        stats: dict[str, float] = {
            "kv_offload_loads": self.num_loads,
            "kv_offload_loads_declined": self.num_loads_declined,
            "kv_offload_load_failures": self.num_loads_failed,
            "kv_offload_prefill_tokens_per_second": self.cost.prefill_tokens_per_second,
        }
        for tier in self.store.tiers:
            c, name = tier.counters, tier.name
            stats |= {
                f"kv_offload_stores:{name}": c.stores,
                f"kv_offload_store_bytes:{name}": c.store_bytes,
                f"kv_offload_stores_skipped:{name}": c.stores_skipped,
                f"kv_offload_hits:{name}": c.hits,
                f"kv_offload_load_bytes:{name}": c.load_bytes,
                f"kv_offload_used_bytes:{name}": tier.used_bytes,
                f"kv_offload_max_bytes:{name}": tier.max_bytes,
                f"kv_offload_enabled:{name}": float(tier.enabled),
                f"kv_offload_read_bytes_per_second:{name}": self.cost.bytes_per_second[name],
            }
            stats |= {f"kv_offload_dropped:{name}:{reason}": n for reason, n in c.dropped.items()}
            histogram = self._load_seconds[name]
            cumulative = 0
            for bound, count in zip((*histogram.buckets, float("inf")), histogram.counts, strict=True):
                cumulative += count
                stats[f"kv_offload_load_seconds_bucket:{name}:{bound}"] = cumulative
            stats[f"kv_offload_load_seconds_sum:{name}"] = histogram.sum
        return stats

    def close(self, pool: BlockPool | None = None) -> None:
        """At shutdown. With the engine's `pool`, the blocks it still caches (never evicted: often the
        most used prefixes) and those in host RAM are written to disk first, so that a restart finds
        them; then the queued writes finish (up to CLOSE_TIMEOUT_S each wait) and the directory is
        released. A crash skips this: a restart then finds what was evicted before it."""
        if pool is not None and self.kv_cache is not None:
            self.store.poll()
            self._save_evicted(self.kv_cache)
            cached = [b for b in pool.blocks if b.block_hash is not None]
            for start in range(0, len(cached), PERSIST_CHUNK_BLOCKS):
                chunk = cached[start : start + PERSIST_CHUNK_BLOCKS]
                keys = [BlockKey(b.block_hash, b.parent_hash, tuple(b.token_ids)) for b in chunk]
                blocks = self.kv_cache.export_blocks([b.block_id for b in chunk]).permute(2, 0, 1, 3, 4, 5)
                self.store.persist(keys, blocks)
        if pool is not None:
            self.store.persist_held()
        self.store.close()


def _chain(
    token_ids: list[int], block_size: int, num_blocks: int, root: int = ROOT_HASH
) -> Iterator[BlockKey]:
    """The keys of the first `num_blocks` full blocks, lazily (a lookup stops at the first block no tier
    holds): the pool's chained hashes (block_pool.hash_block), from the request's root (a LoRA adapter's
    own, so no adapter ever loads another's KV)."""
    parent = root
    for i in range(num_blocks):
        tokens = tuple(token_ids[i * block_size : (i + 1) * block_size])
        block_hash = hash_block(parent, tokens)
        yield BlockKey(block_hash, parent, tokens)
        parent = block_hash
