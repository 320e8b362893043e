"""Which worker gets a request: the workers a router knows, and the policies that pick among them.

KV-aware (Dynamo's cost function): cost(worker) = blocks to prefill after the prefix it already holds
+ blocks of the requests it is running now; the cheapest wins. Round-robin and least-loaded remain
as options. Conditional disaggregation: a request is prefilled on a prefill worker only when its
uncached part is long enough to be worth a transfer and the prefill workers are not backed up;
otherwise the decode worker prefills it itself, in chunks between its decode steps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from duoserve.disagg.kv_events import KVEvents, KVIndex, prompt_block_hashes

POLICIES = ("kv", "round_robin", "least_loaded")


@dataclass
class RouterConfig:
    prefill_urls: list[str] = field(default_factory=list)
    decode_urls: list[str] = field(default_factory=list)  # decode or colocated (role both) workers
    policy: str = "kv"
    # A prompt whose uncached part is shorter than this is prefilled on its decode worker.
    remote_prefill_min_tokens: int = 64
    # Past this many prompt tokens queued on the prefill workers, new prompts prefill locally.
    max_prefill_queue_tokens: int = 8192
    health_interval: float = 1.0
    health_timeout: float = 2.0

    def __post_init__(self) -> None:
        if not self.decode_urls:
            raise ValueError("--decode: the router needs at least one decode (or colocated) worker")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("remote_prefill_min_tokens", "max_prefill_queue_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if self.health_interval <= 0 or self.health_timeout <= 0:
            raise ValueError("--health-interval and --health-timeout must be > 0")
        self.prefill_urls = [u.rstrip("/") for u in self.prefill_urls]
        self.decode_urls = [u.rstrip("/") for u in self.decode_urls]


@dataclass
class Worker:
    url: str
    kind: str  # "prefill" | "decode"
    healthy: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # its /internal/info
    active_tokens: int = 0  # prompt + generated tokens of the requests in flight on it (decode load)
    queued_prefill_tokens: int = 0  # prompt tokens sent to it for prefill and not done yet
    num_requests: int = 0  # routed to it in all

    def __str__(self) -> str:
        return self.url


class RoutingPolicy:
    def __init__(self, config: RouterConfig, index: KVIndex) -> None:
        self.config = config
        self.index = index
        self.prefill = [Worker(url, "prefill") for url in config.prefill_urls]
        self.decode = [Worker(url, "decode") for url in config.decode_urls]
        self._turn = itertools.count()

    @property
    def workers(self) -> list[Worker]:
        return self.prefill + self.decode

    def pick(
        self, prompt: list[int], block_size: int, disaggregable: bool
    ) -> tuple[Worker | None, Worker | None]:
        """(decode worker or None if none is up, prefill worker or None for local prefill)."""
        hashes = prompt_block_hashes(prompt, block_size)
        decode = self._choose([w for w in self.decode if w.healthy], hashes, block_size, _decode_load)
        if decode is None:
            return None, None
        prefill = None
        uncached = len(prompt) - self.index.overlap(decode.url, hashes) * block_size
        prefills = [w for w in self.prefill if w.healthy]
        if disaggregable and prefills and uncached >= self.config.remote_prefill_min_tokens:
            prefill = self._choose(prefills, hashes, block_size, _prefill_load)
            if prefill.queued_prefill_tokens > self.config.max_prefill_queue_tokens:
                prefill = None
        # The chosen workers will hold the prompt's blocks: count them now (events confirm them later),
        # so the next request with this prefix finds them even before the first one ran.
        for worker in (decode, prefill):
            if worker is not None:
                self.index.apply(worker.url, KVEvents(stored=hashes))
        return decode, prefill

    def _choose(self, workers: list[Worker], hashes: list[int], block_size: int, load) -> Worker | None:
        if not workers:
            return None
        policy = self.config.policy
        if policy == "round_robin":
            return workers[next(self._turn) % len(workers)]
        if policy == "least_loaded":
            return min(workers, key=lambda w: (load(w), w.num_requests))

        def cost(worker: Worker) -> tuple[float, int]:
            prefill_blocks = len(hashes) - self.index.overlap(worker.url, hashes)
            return prefill_blocks + load(worker) / block_size, worker.num_requests

        return min(workers, key=cost)


def _decode_load(worker: Worker) -> int:
    return worker.active_tokens


def _prefill_load(worker: Worker) -> int:
    return worker.queued_prefill_tokens
