"""The router: an OpenAI front (the server's own routes, streaming, errors, metrics) with no weights.

It is an `EngineClient` whose engine is a set of remote workers. The front tokenizes once and does
text, stop strings and metrics; each request, as token ids, goes to the worker(s) the routing policy
picks, over `/internal/generate`, and their engine outputs are fed back into the front as if a local
engine had produced them. A disaggregated request runs in two legs:

1. the decode worker gets it with `kv_transfer=receive`: it accepts it (the client's 200), allocates
   the prompt's blocks and answers with a `KVTicket`;
2. the prefill worker gets it with `kv_transfer=send` and the ticket: it computes the prompt, pushes
   the KV to the decode worker as it goes, and returns the first token, which goes to the client at
   once;
3. the decode worker, given the KV and the first token, decodes the rest, streamed from leg 1.

Its workers come from discovery sources (duoserve.router.discovery: static URLs, DNS, the Kubernetes
API), composed in, each yielding the current set of workers; the router adds those that appear and
forgets those that go (requests already on them run on). A worker gets new requests only while it is
ready: its source lists it as ready and its last health check passed. The router is itself ready
(/health, /v1/models 200) once it has a ready decode (or colocated) worker: prefill workers are
optional, since without one a decode worker prefills the prompt itself.

Health checks (`/internal/info`, every second, answered 200 exactly when the worker's /health is)
keep each worker's state, load and KV event subscription. A worker that answers 503 (loading, or
draining after SIGTERM) gets no new request, and its requests run on; a request it refused so is
sent to another worker. A worker that is lost (its stream breaks, or a health check cannot reach it)
is taken out at once, and every request on it is cut: one whose client has its 200 ends with a
terminal error event, one not yet accepted is sent to another worker, and one whose prefill worker
was lost before its first token is prefilled on its decode worker. Cutting a request closes its streams to the
surviving workers, which abort it there and free its KV blocks.
With a cluster secret, every `/internal/*` request carries a tag that authenticates it (the secret
itself is never sent), and KV events that do not authenticate are dropped (`duoserve.disagg.auth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import msgspec
import zmq
import zmq.asyncio

from duoserve.config import EngineConfig
from duoserve.disagg.auth import DROPPED_STAT, HTTP_PURPOSE, DropCounts, Signer, http_auth_header
from duoserve.disagg.kv_events import AUTH_PURPOSE as EVENTS_SOCKET
from duoserve.disagg.kv_events import KVEventSubscriber, KVIndex
from duoserve.disagg.kv_transfer import KVTransferParams
from duoserve.kv.block_pool import ROOT_HASH
from duoserve.lora.request import LoRARequest, prefix_root_hash
from duoserve.router.discovery import DiscoverySource, Endpoint, StaticSource, parse_discover
from duoserve.router.dns_discovery import DnsSource
from duoserve.router.k8s_discovery import K8sSource, k8s_config
from duoserve.router.metrics import RouterCollector
from duoserve.router.routing import RouterConfig, RoutingPolicy, Worker
from duoserve.server.engine_client import EngineClient, EngineUnavailable, RequestRejected
from duoserve.server.engine_messages import (
    Abort,
    AddRequest,
    EngineOutputs,
    EngineRequest,
    Ready,
    RequestError,
    request_encoder,
)
from duoserve.server.worker_protocol import AbortSequences, FrameReader, WorkerError, encode
from duoserve.tokenizer import load_tokenizer

logger = logging.getLogger("duoserve.router")
# One line per health check per worker per second would drown the request log.
logging.getLogger("httpx").setLevel(logging.WARNING)

_SUMMED_STATS = (
    "num_requests_running",
    "num_requests_waiting",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "num_preemptions",
    "kv_transfer_bytes",
    "kv_transfer_seconds",
    "kv_transfer_requests",
    "kv_transfer_busy_seconds",
)


# Suffix of the ids of a request retried on its decode worker after its prefill worker failed.
_RETRY = "~local"
# A request that no worker accepted yet is tried on this many decode workers before its client gets a 503:
# a worker that died a moment ago refuses connections until the router has noticed it.
_MAX_ATTEMPTS = 3


class WorkerFailed(Exception):
    def __init__(
        self, worker: Worker, status: int, message: str, lost: bool = False, unready: bool = False
    ) -> None:
        super().__init__(f"worker {worker.url}: {message}")
        self.worker = worker
        self.status = status
        self.lost = lost  # the worker is gone (unreachable), rather than refusing this request
        self.unready = unready  # it refused with 503 (loading, draining): another worker may take it

    @property
    def retryable(self) -> bool:
        return self.lost or self.unready


@dataclass
class _Route:
    """A request in flight through the router."""

    add: AddRequest
    task: asyncio.Task | None = None
    accepted: bool = False
    workers: list[Worker] = field(default_factory=list)  # [prefill worker while its leg runs,] decode
    num_tokens: int = 0  # prompt + generated, counted on its decode worker's load
    prefill_leg: asyncio.Task | None = None  # the prefill worker's half, while it runs
    lost: WorkerFailed | None = None  # set when the router cuts the request: a worker it was on is lost
    aborted: set[str] = field(default_factory=set)  # sequences the router asked its decode worker to abort


class RouterClient(EngineClient):
    def __init__(
        self,
        model: str | None,
        config: RouterConfig,
        served_model_name: str | None = None,
        api_key: str | None = None,
        log_level: str = "INFO",
        cluster_secret: str | None = None,
        sources: list[DiscoverySource] | None = None,
    ) -> None:
        """`sources`: where workers come from (default: the config's URLs and --discover specs)."""
        super().__init__(EngineConfig(model=model), served_model_name, log_level=log_level)
        self.router_config = config
        self.index = KVIndex()
        self.policy = RoutingPolicy(config, self.index)
        self.sources = sources if sources is not None else build_sources(config)
        self._listings: dict[int, dict[str, Endpoint]] = {}  # source index -> its last snapshot, by url
        self._watches: dict[str, asyncio.Task] = {}  # worker url -> its health-check task
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.cluster_secret = cluster_secret
        self._signer = Signer(cluster_secret, HTTP_PURPOSE)
        self.event_drops = DropCounts(EVENTS_SOCKET)  # KV events refused, over all subscriptions
        self._http: httpx.AsyncClient | None = None
        self._zmq: zmq.asyncio.Context | None = None
        self._subscriptions: dict[str, tuple[str, asyncio.Task]] = {}  # worker url -> (address, task)
        self._routes: dict[str, _Route] = {}
        self._seq_routes: dict[str, _Route] = {}
        self.num_remote_prefills = 0
        self.num_local_prefills = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await super().start()
        labels = {"model_name": self.served_model_name, "engine": "0"}
        self.metrics.registry.register(RouterCollector(self.policy, labels))
        # The publish loop began before the metrics existed (in _start_engine): publish now, so that the
        # first scrape already has every family (the drop counters at zero) instead of a second later.
        self._publish_stats()

    async def _start_engine(self) -> Ready:
        """Load the tokenizer and wait (retrying, never failing) until a decode worker is ready."""
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=self.router_config.health_timeout))
        self._zmq = zmq.asyncio.Context()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._publish_loop(), name="router-stats")]
        self._tasks += [
            loop.create_task(self._follow(i, source), name=f"router-discovery-{i}")
            for i, source in enumerate(self.sources)
        ]
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model_path)
        while not any(w.ready for w in self.policy.decode):
            await asyncio.sleep(0.2)
        info = next(w for w in self.policy.decode if w.ready).info
        return Ready(
            max_model_len=info["max_model_len"],
            vocab_size=info["vocab_size"],
            eos_token_ids=info["eos_token_ids"],
            num_kv_blocks=info["num_kv_blocks"],
            block_size=info["block_size"],
        )

    async def _stop_engine(self) -> None:
        for route in list(self._routes.values()):
            if route.task is not None:
                route.task.cancel()
        for _, task in self._subscriptions.values():
            task.cancel()
        for task in [*self._tasks, *self._watches.values()]:
            task.cancel()
        pending = [r.task for r in self._routes.values() if r.task] + [
            t for _, t in self._subscriptions.values()
        ]
        await asyncio.gather(*pending, *self._tasks, *self._watches.values(), return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
        if self._zmq is not None:
            self._zmq.term()

    def check_available(self) -> None:
        """Available once a decode (or colocated) worker is ready. Prefill workers are not needed: without
        a ready one, decode workers prefill prompts themselves (slower for long prompts, never refused)."""
        stopping = self.dead is not None or self.draining or self._closing  # the base class says why
        if not stopping and not any(w.ready for w in self.policy.decode):
            raise EngineUnavailable("no decode (or colocated) worker is ready")
        super().check_available()

    # ---------------------------------------------------------------- LoRA adapters

    def lora_adapters(self) -> dict[str, LoRARequest]:
        """The adapters the ready decode workers serve (from their /internal/info): a request naming one
        is routed with it, and its KV blocks are hashed on that adapter's chain."""
        adapters: dict[str, LoRARequest] = {}
        for worker in self.policy.decode:
            if worker.ready:
                for entry in worker.info.get("lora_modules") or []:
                    try:
                        lora = msgspec.convert(entry, LoRARequest)
                    except msgspec.ValidationError:
                        continue
                    adapters.setdefault(lora.lora_name, lora)
        return adapters

    async def load_lora(self, name: str, path: str) -> LoRARequest:
        raise RequestRejected(400, "a router loads no adapters: load them on its workers")

    async def unload_lora(self, name: str) -> None:
        raise RequestRejected(400, "a router unloads no adapters: unload them on its workers")

    # ---------------------------------------------------------------- requests

    def _send(self, message: EngineRequest) -> None:
        if isinstance(message, AddRequest):
            request_encoder.encode(message)  # an OverflowError surfaces now, as for a local engine
            route = _Route(message)
            self._routes[message.request_id] = route
            self._seq_routes.update(dict.fromkeys(message.seq_ids, route))
            route.task = asyncio.get_running_loop().create_task(self._run(route))
            # A callback, not a `finally` in _run: a task cancelled before it starts never runs its body.
            route.task.add_done_callback(lambda _: self._finish_route(route))
        elif isinstance(message, Abort):
            self._abort(message.seq_ids)

    def _abort(self, seq_ids: list[str]) -> None:
        routes: dict[str, list[str]] = {}
        for seq_id in seq_ids:
            route = self._seq_routes.get(seq_id)
            if route is not None:
                routes.setdefault(route.add.request_id, []).append(seq_id)
        for request_id, seqs in routes.items():
            route = self._routes[request_id]
            if set(seqs) >= set(route.add.seq_ids):
                # Closing the worker streams aborts the request there and frees its blocks. From the
                # route's own task too (a stop string found in a batch it forwards): the cancellation
                # lands at its next await, so the worker stops rather than running to max_tokens.
                if route.task is not None:
                    route.task.cancel()
            elif route.workers:  # some of n sequences (a stop string ended them): tell the decode worker
                route.aborted.update(seqs)
                worker = route.workers[-1]
                body = encode(AbortSequences(request_id, seqs))
                asyncio.get_running_loop().create_task(self._post_abort(worker, body))

    def _internal_headers(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        return {**self._headers, **http_auth_header(self._signer, method, path, body)}

    async def _post_abort(self, worker: Worker, body: bytes) -> None:
        headers = self._internal_headers("POST", "/internal/abort", body)
        with contextlib.suppress(httpx.HTTPError):
            await self._http.post(f"{worker.url}/internal/abort", content=body, headers=headers)

    async def _run(self, route: _Route) -> None:
        add = route.add
        try:
            for attempt in range(1, _MAX_ATTEMPTS + 1):
                try:
                    await self._attempt_unless_cut(route)
                    return
                except WorkerFailed as err:
                    if route.accepted or not err.retryable or attempt == _MAX_ATTEMPTS:
                        raise
                    # Nothing reached the client yet: the next healthy decode worker takes it.
                    logger.warning("request %s: %s; routing it again", add.request_id, err)
                    self._release(route)
        except asyncio.CancelledError:
            if route.lost is not None:  # cut by the router (a lost worker), not by its client
                self._fail(route, route.lost)
        except Exception as err:  # a worker failed or refused: the client learns at once
            self._fail(route, err)

    async def _attempt_unless_cut(self, route: _Route) -> None:
        """One attempt; a cut (its worker found lost by another task, `_cut`) before the worker accepted
        the request is a lost worker like any other, so the request is routed again rather than failed:
        nothing reached the client yet. A cut after acceptance, or a client's cancel, stays a cancel."""
        try:
            await self._attempt(route)
        except asyncio.CancelledError:
            lost = route.lost
            if lost is None or route.accepted or not route.workers or lost.worker is not route.workers[-1]:
                raise
            route.lost = None
            asyncio.current_task().uncancel()  # the router's own cancel, handled here
            raise lost from None

    async def _attempt(self, route: _Route) -> None:
        add = route.add
        disaggregable = len(add.seq_ids) == 1 and add.params[0].prompt_logprobs is None
        root = prefix_root_hash(add.lora_request, ROOT_HASH)  # the chain its adapter's blocks are hashed on
        decode, prefill = self.policy.pick(add.prompt_token_ids, self.info.block_size, disaggregable, root)
        if decode is None:
            raise EngineUnavailable("no decode worker is ready")
        route.num_tokens = len(add.prompt_token_ids)
        decode.active_tokens += route.num_tokens
        decode.num_requests += 1
        route.workers.append(decode)
        if prefill is None:
            self.num_local_prefills += 1
            async for batch in self._stream(decode, add):
                self._forward(route, batch)
        else:
            self.num_remote_prefills += 1
            await self._run_disaggregated(route, decode, prefill)

    async def _run_disaggregated(self, route: _Route, decode: Worker, prefill: Worker) -> None:
        add = route.add
        receive = msgspec.structs.replace(add, kv_transfer=KVTransferParams("receive"))
        decode_stream = self._stream(decode, receive)
        try:
            ticket = None
            while ticket is None:
                batch = await anext(decode_stream, None)
                if batch is None:
                    raise WorkerFailed(decode, 503, "the request ended before its KV blocks were allocated")
                if batch.tickets:
                    ticket = batch.tickets[0]
                self._forward(route, batch)  # its acceptance (the client's 200), or its refusal
                if batch.errors or batch.outputs:  # refused, or aborted while waiting
                    return
            send = msgspec.structs.replace(add, kv_transfer=KVTransferParams("send", ticket))
            uncached = len(add.prompt_token_ids) - ticket.num_cached_tokens
            prefill.queued_prefill_tokens += uncached
            prefill.num_requests += 1
            route.workers.insert(0, prefill)
            # Its own task, so that losing the prefill worker cuts this leg alone (see `_cut`).
            leg = asyncio.get_running_loop().create_task(self._prefill_leg(route, prefill, send))
            route.prefill_leg = leg
            try:
                finished = await leg
            except (WorkerFailed, asyncio.CancelledError) as err:
                if isinstance(err, asyncio.CancelledError):
                    if route.lost is None or route.lost.worker is not prefill:
                        raise  # the client left, or the decode worker was lost
                    err, route.lost = route.lost, None
                if route.num_tokens > len(add.prompt_token_ids):
                    raise err  # the client has its first token: too late to start over
                # No token yet: prefill on the decode worker instead (its KV-waiting half is dropped).
                logger.warning("request %s: %s; prefilling on %s instead", add.request_id, err, decode.url)
                await decode_stream.aclose()
                # New ids: the decode worker may not have dropped the first half under the old ones yet.
                retry = msgspec.structs.replace(
                    add, request_id=add.request_id + _RETRY, seq_ids=[s + _RETRY for s in add.seq_ids]
                )
                async for batch in self._stream(decode, retry):
                    self._forward(route, _strip_retry_ids(batch))
                return
            finally:
                prefill.queued_prefill_tokens -= uncached
                route.workers.remove(prefill)
                route.prefill_leg = None
            if finished:
                return  # the first token ended it: closing the decode stream frees the decode side
            async for batch in decode_stream:
                batch.starts = []  # the prefill worker's timings were the request's
                self._forward(route, batch)
        finally:
            await decode_stream.aclose()

    async def _prefill_leg(self, route: _Route, prefill: Worker, send: AddRequest) -> bool:
        """Run the prefill worker's half; True if its first token already finished the request."""
        params = route.add.params[0]
        room = self.info.max_model_len - len(route.add.prompt_token_ids)
        finished = False
        async for batch in self._stream(prefill, send):
            if batch.errors:
                error = batch.errors[0]
                raise WorkerFailed(prefill, error.status, f"refused the prefill: {error.message}")
            batch.accepted = []
            for out in batch.outputs:
                if out.finished and out.finish_reason == "abort":
                    raise WorkerFailed(prefill, 503, "the prefill worker aborted the request")
                # It stops after one token by design; only a real end (a stop token, max_tokens=1, a
                # full context) ends the request.
                if out.finish_reason == "length" and (params.max_tokens or room) > 1 and room > 1:
                    out.finished, out.finish_reason = False, None
                finished = finished or out.finished
            self._forward(route, batch)
        return finished

    async def _stream(self, worker: Worker, add: AddRequest) -> AsyncIterator[EngineOutputs]:
        """The worker's batches for this request, until it is done there."""
        url = f"{worker.url}/internal/generate"
        body = encode(add)
        headers = self._internal_headers("POST", "/internal/generate", body)
        try:
            async with self._http.stream("POST", url, content=body, headers=headers) as response:
                if response.status_code == 503:  # loading or draining: routed before a health check saw it
                    message = _error_message(await response.aread())
                    self._mark_unready(worker, message)
                    raise WorkerFailed(worker, 503, message, unready=True)
                if response.status_code != 200:
                    raise WorkerFailed(worker, response.status_code, _error_message(await response.aread()))
                reader = FrameReader()
                async for chunk in response.aiter_raw():
                    for frame in reader.feed(chunk):
                        if isinstance(frame, WorkerError):
                            raise WorkerFailed(worker, frame.status, frame.message)
                        yield frame
        except httpx.HTTPError as err:
            self._mark_down(worker, f"{type(err).__name__}: {err}")
            raise WorkerFailed(worker, 503, f"worker lost ({type(err).__name__})", lost=True) from err

    def _forward(self, route: _Route, batch: EngineOutputs) -> None:
        """Feed a worker's batch to the front, as if a local engine had produced it.

        A sequence the worker aborted without being asked (its KV wait expired, its transfer failed) is
        a failure, which the client learns as a terminal error, not a stream that ends early.
        """
        for out in batch.outputs:
            if out.finished and out.finish_reason == "abort" and out.request_id not in route.aborted:
                raise WorkerFailed(route.workers[-1], 503, "the worker aborted the request")
        batch.stats = {}
        batch.tickets = []
        if batch.accepted:
            route.accepted = True
        added = sum(len(out.new_token_ids) for out in batch.outputs)
        route.num_tokens += added
        route.workers[-1].active_tokens += added
        self._on_outputs(batch)

    def _fail(self, route: _Route, err: Exception) -> None:
        request_id = route.add.request_id
        status = err.status if isinstance(err, WorkerFailed) else 503
        message = str(err)
        logger.warning("request %s failed: %s", request_id, message)
        if not route.accepted:
            failed = RequestError(request_id, status if status in (400, 429) else 503, message)
            self._on_outputs(EngineOutputs(timestamp=time.monotonic(), errors=[failed]))
        else:
            self._end_stream(request_id, EngineUnavailable(message))

    def _finish_route(self, route: _Route) -> None:
        """Forget a request however it ended (its task's done callback)."""
        self._routes.pop(route.add.request_id, None)
        for seq_id in route.add.seq_ids:
            self._seq_routes.pop(seq_id, None)
        self._release(route)

    def _release(self, route: _Route) -> None:
        """Take the request off its decode worker's load (once: a retry or its end)."""
        if route.workers:
            route.workers[-1].active_tokens -= route.num_tokens
        route.workers.clear()
        route.num_tokens = 0

    # ---------------------------------------------------------------- workers

    async def _follow(self, index: int, source: DiscoverySource) -> None:
        """Keep the pool in step with one discovery source's snapshots (a source that ends, as the static
        one does, keeps its last one; one that fails is started again, its workers kept meanwhile)."""
        while True:
            try:
                async for endpoints in source.watch():
                    self._listings[index] = {e.url: e for e in endpoints}
                    self._reconcile()
                return
            except Exception:
                logger.exception("discovery source %d failed; starting it again", index)
            await asyncio.sleep(self.router_config.discover_interval)

    def _reconcile(self) -> None:
        """Add the listed workers that are new, update whether each is listed ready, and forget the
        workers no source lists any more (once every source has said what it lists)."""
        listed: dict[str, Endpoint] = {}
        for listing in self._listings.values():
            for url, endpoint in listing.items():
                if url not in listed or endpoint.ready:  # listed by two sources: ready if either says so
                    listed[url] = endpoint
        for url, endpoint in listed.items():
            worker = self.policy.pool.get(url)
            if worker is None:
                worker = self.policy.add(url, _KINDS.get(endpoint.role))
                logger.info("worker %s (%s) discovered", url, endpoint.role or "role to be learned")
            if worker.listed != endpoint.ready:
                logger.info("worker %s is listed as %s", url, "ready" if endpoint.ready else "not ready")
                worker.listed = endpoint.ready
            if url not in self._watches:
                self._watches[url] = asyncio.get_running_loop().create_task(self._watch(worker))
        if len(self._listings) < len(self.sources):
            return
        for url in [u for u in self.policy.pool if u not in listed]:
            self._forget_worker(url)

    def _forget_worker(self, url: str) -> None:
        """A worker no source lists any more: no new request; those on it run on (cut if it is lost)."""
        self.policy.remove(url)
        logger.info("worker %s is gone from discovery", url)
        watch = self._watches.pop(url, None)
        if watch is not None:
            watch.cancel()
        subscription = self._subscriptions.pop(url, None)
        if subscription is not None:
            subscription[1].cancel()
        self.index.drop(url)

    async def _watch(self, worker: Worker) -> None:
        # Each worker on its own clock: one that hangs (until the check's timeout) delays no other's check.
        while True:
            await self._check(worker)
            await asyncio.sleep(self.router_config.health_interval)

    async def _publish_loop(self) -> None:
        while True:
            self._publish_stats()
            await asyncio.sleep(self.router_config.health_interval)

    async def _check(self, worker: Worker) -> None:
        try:
            response = await self._http.get(
                f"{worker.url}/internal/info",
                headers=self._internal_headers("GET", "/internal/info"),
                timeout=self.router_config.health_timeout,
            )
            response.raise_for_status()
            info = response.json()
        except (httpx.HTTPError, ValueError) as err:
            reason = f"{type(err).__name__}: {err}"
            if isinstance(err, httpx.HTTPStatusError) and err.response.status_code == 503:
                self._mark_unready(worker, _error_message(err.response.content))  # loading or draining
                return
            if isinstance(err, httpx.HTTPStatusError) and err.response.status_code == 401:
                reason = "it refused the router's credentials (401): same --cluster-secret and --api-key?"
            self._mark_down(worker, reason)
            return
        if self.policy.pool.get(worker.url) is not worker:
            return  # discovery forgot it while it was being checked
        if worker.kind is None:  # found by DNS: its role is what it says
            worker.kind = _KINDS.get(info.get("role"), "decode")
        if (
            worker.kind == "prefill"
            and info.get("role") == "decode"
            or (worker.kind == "decode" and info.get("role") == "prefill")
        ):
            self._mark_down(worker, f"it is a {info.get('role')} worker, named as {worker.kind}")
            return
        worker.info = info
        if not worker.healthy:
            logger.info("worker %s (%s) is up", worker.url, info.get("role"))
            worker.healthy = True
        self._subscribe(worker, info.get("events_address", ""))

    def _mark_unready(self, worker: Worker, reason: str) -> None:
        """It answers, but serves nothing new (loading, draining): no new requests; those on it run on."""
        if worker.healthy:
            logger.warning("worker %s is not ready: %s", worker.url, reason)
        worker.healthy = False

    def _mark_down(self, worker: Worker, reason: str) -> None:
        if worker.healthy:
            logger.warning("worker %s is down: %s", worker.url, reason)
        worker.healthy = False
        if self.policy.pool.get(worker.url) is worker:  # not one that discovery already forgot
            subscription = self._subscriptions.pop(worker.url, None)
            if subscription is not None:
                subscription[1].cancel()
            self.index.drop(worker.url)
        lost = WorkerFailed(worker, 503, f"worker lost ({reason})", lost=True)
        for route in list(self._routes.values()):
            self._cut(route, lost)

    def _cut(self, route: _Route, lost: WorkerFailed) -> None:
        """End the part of a request that runs on a lost worker, without waiting for its stream to break.

        A killed worker's connections reset at once, but a request whose decode worker only waits for
        KV (its prefill leg runs elsewhere) reads nothing from it, and a hung worker resets nothing.
        The request's own task is left alone: it is the one that found the loss, and is handling it.
        """
        current = asyncio.current_task()
        leg = route.prefill_leg
        if leg is not None and route.workers[0] is lost.worker and not leg.done() and leg is not current:
            route.lost = lost
            leg.cancel()  # its decode worker prefills it instead, if no token went out yet
        elif route.workers and route.workers[-1] is lost.worker and route.task not in (None, current):
            route.lost = lost
            route.task.cancel()

    def _subscribe(self, worker: Worker, address: str) -> None:
        current = self._subscriptions.get(worker.url)
        if not address or (current is not None and current[0] == address):
            return
        if current is not None:  # the worker restarted: its cache starts empty
            current[1].cancel()
            self.index.drop(worker.url)
        task = asyncio.get_running_loop().create_task(self._listen(worker.url, address))
        self._subscriptions[worker.url] = (address, task)

    async def _listen(self, worker_url: str, address: str) -> None:
        subscriber = KVEventSubscriber(self._zmq, address, self.event_drops, self.cluster_secret)
        try:
            while True:
                self.index.apply(worker_url, await subscriber.receive())
        finally:
            subscriber.close()

    def _publish_stats(self) -> None:
        if self.metrics is None:
            return
        stats = [w.info.get("stats", {}) for w in self.policy.workers if w.healthy]
        total = {key: sum(s.get(key, 0.0) for s in stats) for key in _SUMMED_STATS}
        usages = [s.get("kv_cache_usage_perc", 0.0) for s in stats]
        total["kv_cache_usage_perc"] = sum(usages) / len(usages) if usages else 0.0
        # Messages the workers' KV receivers dropped, summed, and the KV events this router dropped.
        dropped = {key for s in stats for key in s if key.startswith(DROPPED_STAT + ":")}
        total.update({key: sum(s.get(key, 0.0) for s in stats) for key in dropped})
        total.update(self.event_drops.stats())
        self.metrics.set_engine_stats(total)

    def workers_status(self) -> list[dict]:
        return [
            {
                "url": w.url,
                "kind": w.kind,
                "role": w.role,
                "ready": w.ready,
                "listed": w.listed,
                "healthy": w.healthy,
                "active_tokens": w.active_tokens,
                "queued_prefill_tokens": w.queued_prefill_tokens,
                "num_requests": w.num_requests,
                "cached_blocks": self.index.num_blocks(w.url),
            }
            for w in self.policy.workers
        ]


# A worker's role -> the pool it serves in: a colocated worker takes decode requests (and prefills them).
_KINDS = {"prefill": "prefill", "decode": "decode", "both": "decode"}


def build_sources(config: RouterConfig) -> list[DiscoverySource]:
    """The config's static URLs, and a source per --discover spec."""
    sources: list[DiscoverySource] = []
    if config.prefill_urls or config.decode_urls:
        sources.append(StaticSource(config.prefill_urls, config.decode_urls))
    for spec in config.discover:
        kind, name, port = parse_discover(spec)
        if kind == "dns":
            sources.append(DnsSource(name, port, config.discover_interval))
        else:
            sources.append(K8sSource(k8s_config(config.k8s_namespace, config.k8s_api_url)))
    return sources


def _strip_retry_ids(batch: EngineOutputs) -> EngineOutputs:
    batch.accepted = [r.removesuffix(_RETRY) for r in batch.accepted]
    for error in batch.errors:
        error.request_id = error.request_id.removesuffix(_RETRY)
    for out in batch.outputs:
        out.request_id = out.request_id.removesuffix(_RETRY)
    for start in batch.starts:
        start.seq_id = start.seq_id.removesuffix(_RETRY)
    return batch


def _error_message(body: bytes) -> str:
    try:
        return msgspec.json.decode(body)["error"]["message"]
    except (msgspec.DecodeError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]
