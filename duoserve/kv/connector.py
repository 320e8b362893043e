"""The KV connector interface: what the scheduler and the engine core call at fixed points (vLLM v1's).

KV that does not come from this worker's own forward passes, or that outlives its blocks, goes
through a connector: prefill/decode transfer (duoserve/disagg/pd_connector.py) is one, an offload
tier another, and `MultiConnector` stacks several. The scheduler asks a connector at admission how
many tokens it can supply and tells it which blocks it got, reports evicted prefix blocks and every
request's end; the engine core calls it around the forward pass. So neither knows any transport, and
this module imports none.

The scheduler is the only writer of a request's state: a connector reports what happened
(`ConnectorEvents`) and the scheduler applies it (`Scheduler.apply_connector_events`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from duoserve.engine.request import Request
    from duoserve.engine.scheduler import ScheduledRequest
    from duoserve.kv.block_pool import BlockPool
    from duoserve.kv.cache import KVCache


@dataclass
class EvictedBlock:
    """A prefix-cache block the pool handed out again during this schedule(): its KV is still intact
    until the step's forward pass writes the new owner's tokens into it."""

    block_id: int
    block_hash: int
    parent_hash: int
    token_ids: tuple[int, ...]


@dataclass
class ConnectorEvents:
    """What a connector reports back once per step (EngineCore polls it after save_kv, so that a
    failed send ends its request in the same step, before its token goes out; the scheduler applies
    it before the next schedule())."""

    # request id -> tokens to append once its external KV is in place ([] for an offload load;
    # [first_token] for a P/D decode-side receive, sampled by the prefill worker). They are not
    # emitted again: whoever sampled them already did.
    finished_loading: dict[str, list[int]] = field(default_factory=dict)
    # request ids whose load failed and must be recomputed (offload: corrupt/missing file)
    load_failed: set[str] = field(default_factory=set)
    # request ids that must end (P/D: bad transfer, timeout) -> the scheduler aborts them
    aborted: set[str] = field(default_factory=set)
    # request ids whose blocks the connector no longer reads (after request_finished returned True)
    finished_sending: set[str] = field(default_factory=set)

    def merge(self, other: ConnectorEvents) -> None:
        self.finished_loading.update(other.finished_loading)
        self.load_failed |= other.load_failed
        self.aborted |= other.aborted
        self.finished_sending |= other.finished_sending


class KVConnector(Protocol):
    """A connector implements every method; `check_request` is optional (subclass this Protocol to
    inherit its default, or define it)."""

    # ---- scheduler side: called by Scheduler
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens after the device prefix hit (`num_computed_tokens`) this connector can supply, and
        whether they arrive asynchronously (the request then waits in the scheduler with status
        WAITING_FOR_KV, holding its blocks, while other requests keep stepping). A load must leave
        the prompt's last token to compute unless the connector also supplies tokens to append."""
        ...

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        """Blocks for the request are allocated (`block_ids` = its whole table); the last
        `num_external_tokens` computed positions are this connector's to fill (issue a P/D ticket,
        queue a tier load)."""
        ...

    def on_blocks_evicted(self, blocks: list[EvictedBlock]) -> None:
        """Cached blocks evicted by this schedule(); copy them out before the forward pass (offload)."""
        ...

    def request_finished(self, request: Request) -> bool:
        """The request ended (any reason; request.status says which). True: the connector still reads
        its blocks; the scheduler frees them when `finished_sending` names the request."""
        ...

    # ---- worker side: called by EngineCore around the forward pass
    def start_load_kv(self, kv_cache: KVCache) -> None:
        """Before the forward: copy evicted blocks out, write finished loads into the cache."""
        ...

    def save_kv(self, kv_cache: KVCache, scheduled: list[ScheduledRequest]) -> None:
        """After the forward: push/store what this step computed (P/D send streams finished blocks)."""
        ...

    def get_finished(self) -> ConnectorEvents: ...

    def stats(self) -> dict[str, float]:
        """Counters for /metrics (merged into EngineCore.stats())."""
        ...

    # ---- optional
    def check_request(self, request: Request) -> int | None:
        """Called by EngineCore.add_request before the request is queued: raise ValueError (naming what
        is wrong) for `request.kv_transfer_params` this connector cannot serve. Returns the most tokens
        the request may generate on this worker, or None for no limit of this connector's (a P/D
        prefill worker stops at the first token: the decode worker generates the rest)."""
        return None


class MultiConnector:
    """Several connectors as one: the first that matches tokens supplies them, every hook is forwarded
    to each (in order), events are merged and counters of the same name add up. With none, it is the
    engine's connector when nothing is configured: every hook does nothing."""

    def __init__(self, connectors: Sequence[KVConnector] = ()) -> None:
        self.connectors = list(connectors)
        # Admitting requests' supplier (index into connectors), from the match to the allocation.
        self._supplier: dict[str, int] = {}

    def check_request(self, request: Request) -> int | None:
        limits = [limit for c in self.connectors if (limit := _check(c, request)) is not None]
        return min(limits, default=None)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        self._supplier.pop(request.request_id, None)
        for index, connector in enumerate(self.connectors):
            num_tokens, load_async = connector.get_num_new_matched_tokens(request, num_computed_tokens)
            if num_tokens > 0:
                self._supplier[request.request_id] = index
                return num_tokens, load_async
        return 0, False

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        supplier = self._supplier.pop(request.request_id, None)
        for index, connector in enumerate(self.connectors):
            num_tokens = num_external_tokens if index == supplier else 0
            connector.update_state_after_alloc(request, block_ids, num_tokens)

    def on_blocks_evicted(self, blocks: list[EvictedBlock]) -> None:
        for connector in self.connectors:
            connector.on_blocks_evicted(blocks)

    def request_finished(self, request: Request) -> bool:
        self._supplier.pop(request.request_id, None)
        # Every connector hears of it (a list, not any(): any() would stop at the first True).
        return any([connector.request_finished(request) for connector in self.connectors])

    def start_load_kv(self, kv_cache: KVCache) -> None:
        for connector in self.connectors:
            connector.start_load_kv(kv_cache)

    def save_kv(self, kv_cache: KVCache, scheduled: list[ScheduledRequest]) -> None:
        for connector in self.connectors:
            connector.save_kv(kv_cache, scheduled)

    def get_finished(self) -> ConnectorEvents:
        events = ConnectorEvents()
        for connector in self.connectors:
            events.merge(connector.get_finished())
        return events

    def close(self, pool: BlockPool) -> None:
        """At shutdown, each connector that keeps KV (`close(pool)`, optional) saves what it must."""
        for connector in self.connectors:
            close = getattr(connector, "close", None)
            if close is not None:
                close(pool)

    def start_kv_events(self) -> None:
        """Connectors that keep KV out of the pool (offload tiers, optional `start_kv_events()`) record
        which blocks they gain and lose from now on, for a router's index."""
        for connector in self.connectors:
            start = getattr(connector, "start_kv_events", None)
            if start is not None:
                start()

    def take_kv_events(self) -> tuple[dict[str, list[tuple[bool, int]]], dict[str, float]]:
        """Their events since the last call, by tier name, and each tier's load cost relative to computing
        (optional `take_kv_events()`, of the same signature)."""
        events: dict[str, list[tuple[bool, int]]] = {}
        costs: dict[str, float] = {}
        for connector in self.connectors:
            take = getattr(connector, "take_kv_events", None)
            if take is not None:
                taken, tier_costs = take()
                for tier, tier_events in taken.items():
                    events.setdefault(tier, []).extend(tier_events)
                costs |= tier_costs
        return events, costs

    def stats(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for connector in self.connectors:
            for name, value in connector.stats().items():
                merged[name] = merged.get(name, 0) + value
        return merged


def _check(connector: KVConnector, request: Request) -> int | None:
    """A connector's check_request, which is optional."""
    check = getattr(connector, "check_request", None)
    return None if check is None else check(request)
