"""A discrete-event simulation of a deployment, on a virtual clock, with the engine's own parts.

Each simulated worker is the engine's own `Scheduler` over its own `KVCacheManager` (block pool,
prefix cache, chunked prefill, preemption, sliding-window freeing: nothing re-implemented), driven as
the engine loop drives them (duoserve/server/engine_process.py): each turn handles what arrived, then
runs one step. Only the model is replaced: a step takes the profile's step-model time for its shape,
and every sampling request gets one token (a fixed id; requests run to their output length, as
`duoserve bench --ignore-eos` asks). The router's own `RoutingPolicy` (duoserve/disagg/routing.py)
picks workers from a `KVIndex` fed by the simulated pools' KV events, with the router's load counters
kept as the router keeps them. So the simulation cannot drift from the scheduler or the routing: it
runs them.

The few lines of glue between the scheduler and the model (`EngineCore._update`, `issue_tickets`,
`_start_decoding`) are mirrored in `SimWorker`; the step sequence test (tests/plan) checks them
against the real engine.

Disaggregated requests go as in the router: the decode worker takes the request and allocates its
prompt's blocks at its next turn (the ticket), the prefill worker computes the prompt and samples the
first token (which goes to the client), the KV arrives at the decode worker the profile's transfer
time after each chunk, and the decode worker starts decoding at its next turn after the last block.
Not modelled: HTTP and ZeroMQ hops between router, workers and client (sub-millisecond on loopback),
the engine loop's own bookkeeping between steps (in the profiled step time only as far as
`EngineCore.step` includes it), speculative decoding, and requests refused for a full queue.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from duoserve.bench.metrics import summarize
from duoserve.bench.records import RequestRecord
from duoserve.bench.report import result_document
from duoserve.disagg.kv_events import KVEvents, KVIndex
from duoserve.disagg.routing import RouterConfig, RoutingPolicy, Worker
from duoserve.engine.request import Request, RequestStatus
from duoserve.engine.scheduler import ScheduledRequest, Scheduler
from duoserve.kv.kv_cache_manager import KVCacheManager
from duoserve.plan.deployment import Deployment
from duoserve.plan.objectives import Objectives
from duoserve.plan.profile import Profile
from duoserve.plan.step_model import step_shape
from duoserve.plan.workload import SimConversation, Workload
from duoserve.sampling_params import SamplingParams

# The token every simulated step samples: not an end-of-sequence id of common vocabularies (requests
# ignore eos anyway; a fixed id keeps the prefix cache's hashes of generated blocks deterministic).
SAMPLED_TOKEN = 1000


class Clock:
    """The virtual clock and its event queue (time, order of scheduling, callback)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    def at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(when, self.now), next(self._order), callback))

    def run(self) -> None:
        while self._queue:
            self.now, _, callback = heapq.heappop(self._queue)
            callback()


@dataclass
class SimTicket:
    """What the decode worker's ticket tells the prefill worker (KVTicket without the transport)."""

    decode: SimWorker
    request_id: str
    num_cached_tokens: int


@dataclass
class StepRecord:
    start: float
    seconds: float
    scheduled: list[tuple[str, int]]  # (request id, new tokens), in the scheduler's order
    preempted: list[str]


@dataclass
class SimWorker:
    """One worker: the engine's scheduler and KV accounting, stepped on the virtual clock."""

    name: str
    profile: Profile
    clock: Clock
    on_tokens: Callable[[SimWorker, Request, bool], None]  # (worker, request, finished) per sampled token
    on_ticket: Callable[[SimWorker, Request], None] = lambda worker, request: None
    on_kv_done: Callable[[SimTicket, float], None] = lambda ticket, ready: None
    record_steps: bool = False
    steps: list[StepRecord] = field(default_factory=list)
    busy: bool = False

    def __post_init__(self) -> None:
        limits = self.profile.limits
        self.kv = KVCacheManager(
            limits.num_kv_blocks, limits.block_size, limits.enable_prefix_caching, limits.sliding_window
        )
        self.kv.pool.events = []
        self.scheduler = Scheduler(self.kv, limits.max_num_batched_tokens, limits.max_num_seqs, self.clock)
        self.max_model_len = limits.max_model_len
        self.inbox: list[Callable[[], None]] = []
        self.awaiting_kv: dict[str, Request] = {}
        self.kv_events: Callable[[KVEvents], None] = lambda events: None
        self._turn_queued = False
        self._kv_ready: dict[str, float] = {}  # a sending request's KV lands on its decode worker then

    # ---------------------------------------------------------------- messages (handled at the next turn)

    def post(self, message: Callable[[], None]) -> None:
        self.inbox.append(message)
        if not self.busy and not self._turn_queued:
            self._turn_queued = True
            self.clock.at(self.clock.now, self.turn)

    def add(self, request: Request) -> None:
        self.scheduler.add(request)

    def add_awaiting_kv(self, request: Request) -> None:
        self.scheduler.add_awaiting_kv(request)
        self.awaiting_kv[request.request_id] = request

    def add_sending(self, request: Request, ticket: SimTicket) -> None:
        request.kv_destination = ticket  # read by the scheduler only as "a prefill worker's request"
        request.kv_next_block = ticket.num_cached_tokens // self.kv.block_size
        request.max_tokens = 1
        self.scheduler.add(request)

    # ---------------------------------------------------------------- the engine loop's turn

    def turn(self) -> None:
        self._turn_queued = False
        if self.busy:
            return  # the step in flight runs the next turn when it ends
        inbox, self.inbox = self.inbox, []
        for message in inbox:
            message()
        self._issue_tickets()
        if self.scheduler.has_schedulable():
            plan = self.scheduler.schedule()
            if plan.scheduled:
                shape = step_shape(plan.scheduled, self.profile.limits.quantized_max_rows)
                seconds = self.profile.step_model.seconds(shape)
                if self.record_steps:
                    self.steps.append(
                        StepRecord(
                            self.clock.now,
                            seconds,
                            [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled],
                            [r.request_id for r in plan.preempted],
                        )
                    )
                sampled = self._update(plan.scheduled, self.clock.now + seconds)
                self.busy = True
                self.clock.at(self.clock.now + seconds, lambda: self._step_done(sampled))
                return
        self._publish()

    def _step_done(self, sampled: list[tuple[Request, bool]]) -> None:
        self.busy = False
        for request, finished in sampled:
            self.on_tokens(self, request, finished)
        self._publish()
        self.turn()

    def _publish(self) -> None:
        events = self.kv.pool.events
        if events:
            self.kv_events(
                KVEvents(stored=[h for s, h in events if s], removed=[h for s, h in events if not s])
            )
            events.clear()

    # ---------------------------------------------------------------- mirrors of EngineCore's glue

    def _update(self, scheduled: list[ScheduledRequest], end: float) -> list[tuple[Request, bool]]:
        """EngineCore._update without a model: every sampling request gets SAMPLED_TOKEN."""
        sampled = []
        for s in scheduled:
            request = s.request
            samples = s.samples
            request.num_computed_tokens += s.num_new_tokens
            ticket = request.kv_destination
            if ticket is not None:
                self._send_kv(request, ticket, s.num_new_tokens, end, done=samples)
            if not samples:
                continue
            request.append_token(SAMPLED_TOKEN)
            request.check_stop(self.max_model_len)
            if request.first_token_time is None:
                request.first_token_time = end
            finished = request.status.finished
            if finished:
                self.scheduler.finish(request, request.status)
            sampled.append((request, finished))
        return sampled

    def _send_kv(self, request: Request, ticket: SimTicket, num_tokens: int, end: float, done: bool) -> None:
        """The chunk's KV leaves when the step ends and lands a transfer time later; with the first
        token, the decode worker is told the whole prompt has arrived."""
        ready = end + self.profile.kv_transfer.seconds(num_tokens)
        ready = self._kv_ready[request.request_id] = max(self._kv_ready.get(request.request_id, 0.0), ready)
        if done:
            self.on_kv_done(ticket, self._kv_ready.pop(request.request_id))

    def _issue_tickets(self) -> None:
        """EngineCore.issue_tickets: allocate the prompt's blocks of requests awaiting KV (in order)."""
        for request in self.awaiting_kv.values():
            if request.kv_ticket is not None:
                continue
            num_cached = self.kv.allocate_for_import(request.request_id, request.prompt_token_ids)
            if num_cached is None:
                break
            request.num_cached_tokens = num_cached
            request.first_scheduled_time = self.clock.now
            request.kv_ticket = SimTicket(self, request.request_id, num_cached)
            self.on_ticket(self, request)

    def drop_awaiting(self, request_id: str) -> None:
        """The router closed the decode stream of a request waiting for KV: abort it here."""
        request = self.awaiting_kv.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)

    def start_decoding(self, request_id: str) -> None:
        """EngineCore._start_decoding: the prompt's KV and first token are here; decode the rest."""
        request = self.awaiting_kv.pop(request_id, None)
        if request is None:
            return
        request.num_computed_tokens = request.num_prompt_tokens
        request.append_token(SAMPLED_TOKEN)
        request.first_token_time = self.clock.now
        request.check_stop(self.max_model_len)
        if request.status.finished:
            self.scheduler.finish(request, request.status)
            self.on_tokens(self, request, True)
            return
        self.scheduler.resume_with_kv(request)


@dataclass
class _Flight:
    """A request in flight, as the client and the router see it."""

    record: RequestRecord
    conv: SimConversation
    turn: int
    prompt: list[int]
    decode: Worker | None = None  # the router's view of its decode worker
    prefill: Worker | None = None
    num_tokens: int = 0  # the router's count on its decode worker's load
    uncached: int = 0  # prompt tokens queued on its prefill worker


class Simulation:
    """Clients (bench's arrivals and concurrency cap), a router (the real policy) and workers."""

    def __init__(
        self,
        profile: Profile,
        deployment: Deployment,
        router: dict[str, Any] | None = None,
        record_steps: bool = False,
    ) -> None:
        self.profile = profile
        self.deployment = deployment
        self.clock = Clock()
        self.block_size = profile.limits.block_size
        self.workers: dict[str, SimWorker] = {}
        decode_urls = [f"sim://decode-{i}" for i in range(deployment.decode)]
        prefill_urls = [f"sim://prefill-{i}" for i in range(deployment.prefill)]
        # The router's own config and checks, with the simulated workers' names.
        config = RouterConfig(prefill_urls=prefill_urls, decode_urls=decode_urls, **(router or {}))
        self.index = KVIndex()
        self.policy = RoutingPolicy(config, self.index)
        for worker in self.policy.workers:
            worker.healthy = True
            sim = SimWorker(
                worker.url,
                profile,
                self.clock,
                self._on_tokens,
                self._on_ticket,
                self._on_kv_done,
                record_steps,
            )
            sim.kv_events = lambda events, url=worker.url: self.index.apply(url, events)
            self.workers[worker.url] = sim
        self.flights: dict[str, _Flight] = {}
        self.records: list[RequestRecord] = []
        self._ids = itertools.count()
        self._slots: int | None = None
        self._queued: list[SimConversation] = []
        self.end = 0.0

    # ---------------------------------------------------------------- clients

    def run(self, workload: Workload) -> list[RequestRecord]:
        self._slots = workload.concurrency
        for conv in sorted(workload.conversations, key=lambda c: c.arrival):
            self.clock.at(conv.arrival, lambda c=conv: self._arrive(c))
        self.clock.run()
        self.records.sort(key=lambda r: r.request_id)
        return self.records

    def _arrive(self, conv: SimConversation) -> None:
        if self._slots is not None:
            if self._slots == 0:
                self._queued.append(conv)
                return
            self._slots -= 1
        self._start_turn(conv, 0, [])

    def _release_slot(self) -> None:
        if self._slots is None:
            return
        if self._queued:
            conv = self._queued.pop(0)
            self._start_turn(conv, 0, [])
        else:
            self._slots += 1

    def _start_turn(self, conv: SimConversation, turn: int, history: list[int]) -> None:
        """bench's runner: each turn's prompt carries the system prefix, earlier turns and replies."""
        spec = conv.turns[turn]
        prompt = [*(history or conv.system), *spec.prompt]
        request_id = next(self._ids)
        record = RequestRecord(request_id, conv.conv_id, turn, len(prompt), spec.output_len)
        record.send_time = self.clock.now
        record.prompt_tokens, record.usage_reported = len(prompt), True
        self.records.append(record)
        if len(prompt) + spec.output_len > self.profile.limits.max_model_len:
            record.error = (
                f"400: {len(prompt)} prompt + {spec.output_len} output tokens exceed the context "
                f"({self.profile.limits.max_model_len})"
            )
            record.end_time = self.clock.now
            self._turn_done(conv, turn, prompt, record)
            return
        flight = _Flight(record, conv, turn, prompt)
        self.flights[str(request_id)] = flight
        self._route(flight)

    def _turn_done(self, conv: SimConversation, turn: int, prompt: list[int], record: RequestRecord) -> None:
        self.end = max(self.end, self.clock.now)
        if record.success and turn + 1 < len(conv.turns):
            generated = [SAMPLED_TOKEN] * record.output_tokens
            self._start_turn(conv, turn + 1, [*prompt, *generated])
        else:
            self._release_slot()

    # ---------------------------------------------------------------- the router

    def _request(self, flight: _Flight) -> Request:
        out = flight.record.max_tokens
        return Request(
            request_id=str(flight.record.request_id),
            prompt_token_ids=list(flight.prompt),
            params=SamplingParams(max_tokens=out, ignore_eos=True),
            max_tokens=out,
            stop_token_ids=frozenset(),
            arrival_time=self.clock.now,
        )

    def _route(self, flight: _Flight) -> None:
        decode, prefill = self.policy.pick(flight.prompt, self.block_size, disaggregable=True)
        flight.decode, flight.num_tokens = decode, len(flight.prompt)
        decode.active_tokens += flight.num_tokens
        decode.num_requests += 1
        worker = self.workers[decode.url]
        request = self._request(flight)
        if prefill is None:
            worker.post(lambda: worker.add(request))
        else:
            flight.prefill = prefill
            worker.post(lambda: worker.add_awaiting_kv(request))

    def _on_ticket(self, decode: SimWorker, request: Request) -> None:
        """The decode worker's ticket reached the router: send the prompt to the prefill worker."""
        flight = self.flights[request.request_id]
        ticket = request.kv_ticket
        flight.uncached = request.num_prompt_tokens - ticket.num_cached_tokens
        flight.prefill.queued_prefill_tokens += flight.uncached
        flight.prefill.num_requests += 1
        prefill = self.workers[flight.prefill.url]
        sending = self._request(flight)
        prefill.post(lambda: prefill.add_sending(sending, ticket))

    def _on_kv_done(self, ticket: SimTicket, ready: float) -> None:
        decode = ticket.decode
        self.clock.at(ready, lambda: decode.post(lambda: decode.start_decoding(ticket.request_id)))

    def _on_tokens(self, worker: SimWorker, request: Request, finished: bool) -> None:
        """A step's token for a request (or its end): to the client, and onto the router's counters."""
        flight = self.flights.get(request.request_id)
        if flight is None:
            return
        now, record = self.clock.now, flight.record
        sending = request.kv_destination is not None
        if sending:
            # The prefill leg's one token is the client's first; the leg ends (the router's `finally`).
            flight.prefill.queued_prefill_tokens -= flight.uncached
            finished = record.max_tokens <= 1
        # The decode worker's copy of a disaggregated request starts with the first token already sent.
        if len(request.output_token_ids) > record.output_tokens:
            if record.ttft is None:
                record.ttft = now - record.send_time
            record.chunk_times.append(now)
            record.chunk_tokens.append(1)
            record.output_tokens += 1
            flight.num_tokens += 1
            flight.decode.active_tokens += 1
        if finished:
            record.end_time = now
            flight.decode.active_tokens -= flight.num_tokens
            del self.flights[request.request_id]
            if sending:  # the first token ended it: closing the decode stream frees the decode side
                decode = self.workers[flight.decode.url]
                decode.post(lambda: decode.drop_awaiting(request.request_id))
            self._turn_done(flight.conv, flight.turn, flight.prompt, record)


def simulate(
    profile: Profile,
    deployment: Deployment,
    workload: Workload,
    router: dict[str, Any] | None = None,
    record_steps: bool = False,
) -> tuple[list[RequestRecord], float, Simulation]:
    """Run the workload on the deployment: bench's request records, the run's duration, the simulation."""
    sim = Simulation(profile, deployment, router, record_steps)
    records = sim.run(workload)
    return records, sim.end, sim


def result(
    profile: Profile,
    deployment: Deployment,
    workload: Workload,
    objectives: Objectives | None = None,
    router: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `duoserve bench` result document of the simulated run (label 'predicted <deployment>')."""
    records, duration, _ = simulate(profile, deployment, workload, router)
    slo = objectives.goodput_slo() if objectives else None
    summary: dict[str, Any] = summarize(records, duration, slo)
    summary["not_started"] = 0
    config = dict(workload.config)
    config.update(
        {
            "label": f"predicted {deployment}",
            "predicted": True,
            "deployment": str(deployment),
            "slo": str(objectives) if objectives else None,
            "profile_host": profile.host.get("cpu"),
        }
    )
    if config.get("request_rate") == math.inf:
        config["request_rate"] = "inf"
    return result_document(config, summary, records)
