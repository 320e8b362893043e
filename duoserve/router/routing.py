"""Which worker gets a request: the workers a router knows, and the policies that pick among them.

The pool changes while requests flow (discovery adds and removes workers: duoserve.router.discovery);
a worker is picked only when it is `ready`: its discovery source lists it as ready and its last health
check passed.

KV-aware (Dynamo's cost function): cost(worker) = blocks to prefill after the prefix it already holds
+ blocks of the requests it is running now; the cheapest wins. A block the worker's offload tier holds
(host RAM, disk: issue 14) counts between a device hit (0) and a miss (1): the share of computing it
that loading it costs, by the worker's measured speeds (KVIndex.prefill_cost). Round-robin and
least-loaded remain as options. Conditional disaggregation: a request is prefilled on a prefill worker
only when its uncached part (tier hits counted at their cost) is long enough to be worth a transfer and
the prefill workers are not backed up; otherwise the decode worker prefills it itself, in chunks between
its decode steps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from duoserve.disagg.kv_events import KVEvents, KVIndex, prompt_block_hashes
from duoserve.kv.block_pool import ROOT_HASH
from duoserve.router.discovery import parse_discover

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
    discover: list[str] = field(default_factory=list)  # k8s | dns:NAME[:PORT], besides the URLs
    discover_interval: float = 5.0  # seconds between DNS lookups
    k8s_namespace: str | None = None  # default: the pod's (its service account's)
    k8s_api_url: str | None = None  # default: the in-cluster API server

    def __post_init__(self) -> None:
        if not self.decode_urls and not self.discover:
            raise ValueError(
                "--decode or --discover: the router needs decode (or colocated) workers or a way to find them"
            )
        for spec in self.discover:
            parse_discover(spec)
        if self.discover_interval <= 0:
            raise ValueError("--discover-interval must be > 0")
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
    # "prefill" | "decode" (decode or colocated); None until its /internal/info says (a DNS-found worker).
    kind: str | None
    listed: bool = True  # its discovery source says it is ready (not starting, not terminating)
    healthy: bool = False  # its last health check passed: /internal/info answered 200
    info: dict[str, Any] = field(default_factory=dict)  # its /internal/info
    active_tokens: int = 0  # prompt + generated tokens of the requests in flight on it (decode load)
    queued_prefill_tokens: int = 0  # prompt tokens sent to it for prefill and not done yet
    num_requests: int = 0  # routed to it in all

    def __str__(self) -> str:
        return self.url

    @property
    def ready(self) -> bool:
        """New requests may go to it: both its source and its health check say so."""
        return self.listed and self.healthy

    @property
    def role(self) -> str | None:
        """prefill | decode | both, as the worker says (or as its source said, before it answered)."""
        return self.info.get("role") or self.kind


class RoutingPolicy:
    def __init__(self, config: RouterConfig, index: KVIndex) -> None:
        self.config = config
        self.index = index
        # url -> worker; written by the router as its discovery sources change (and at start, from the URLs).
        self.pool: dict[str, Worker] = {}
        for kind, urls in (("prefill", config.prefill_urls), ("decode", config.decode_urls)):
            for url in urls:
                self.pool[url] = Worker(url, kind)
        self._turn = itertools.count()

    @property
    def workers(self) -> list[Worker]:
        """All of them: prefill, then decode, then those whose role is not known yet."""
        return self.prefill + self.decode + [w for w in self.pool.values() if w.kind is None]

    def add(self, url: str, kind: str | None) -> Worker:
        worker = self.pool[url] = Worker(url, kind)
        return worker

    def remove(self, url: str) -> Worker | None:
        """Take a worker out of the pool; requests already on it keep their reference to it."""
        worker = self.pool.pop(url, None)
        if worker is not None:
            worker.listed = False
        return worker

    @property
    def prefill(self) -> list[Worker]:
        return [w for w in self.pool.values() if w.kind == "prefill"]

    @property
    def decode(self) -> list[Worker]:
        return [w for w in self.pool.values() if w.kind == "decode"]

    def pick(
        self, prompt: list[int], block_size: int, disaggregable: bool, root_hash: int = ROOT_HASH
    ) -> tuple[Worker | None, Worker | None]:
        """(decode worker or None if none is up, prefill worker or None for local prefill). `root_hash`:
        the root of the prompt's block chain, its LoRA adapter's (the base model's by default)."""
        hashes = prompt_block_hashes(prompt, block_size, root_hash)
        decode = self._choose([w for w in self.decode if w.ready], hashes, block_size, _decode_load)
        if decode is None:
            return None, None
        prefill = None
        uncached = len(prompt) - (len(hashes) - self.index.prefill_cost(decode.url, hashes)) * block_size
        prefills = [w for w in self.prefill if w.ready]
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
            return self.index.prefill_cost(worker.url, hashes) + load(
                worker
            ) / block_size, worker.num_requests

        return min(workers, key=cost)


def _decode_load(worker: Worker) -> int:
    return worker.active_tokens


def _prefill_load(worker: Worker) -> int:
    return worker.queued_prefill_tokens
