"""The KV connector interface (issue 14): what the scheduler and the engine core call at fixed points.

A copy of exactly the shared spec's definitions (/work/kv-connector-spec.md), so that the offload
connector can be built against them; the `kvconn` branch's version of this file replaces it at merge.
It imports no transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from duoserve.engine.request import Request
    from duoserve.engine.scheduler import ScheduledRequest
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
    """What a connector reports back once per step (EngineCore polls it before schedule())."""

    # request id -> tokens to append once its external KV is in place ([] for an offload load;
    # [first_token] for a P/D decode-side receive, sampled by the prefill worker)
    finished_loading: dict[str, list[int]] = field(default_factory=dict)
    # request ids whose load failed and must be recomputed (offload: corrupt/missing file)
    load_failed: set[str] = field(default_factory=set)
    # request ids that must end (P/D: bad transfer, timeout) -> the scheduler aborts them
    aborted: set[str] = field(default_factory=set)
    # request ids whose blocks the connector no longer reads (after request_finished returned True)
    finished_sending: set[str] = field(default_factory=set)


class KVConnector(Protocol):
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
