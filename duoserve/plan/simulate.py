"""A discrete-event simulation of a deployment, on a virtual clock, with the engine's own parts.

Each simulated worker is the engine's own `Scheduler` over its own `KVCacheManager` (block pool,
prefix cache, chunked prefill, preemption, sliding-window freeing: nothing re-implemented), driven as
the engine loop drives them (duoserve/server/engine_process.py): each turn handles what arrived, then
runs one step. Only the model is replaced: a step takes the profile's step-model time for its shape
(times a draw from the profile's step spread where it has one: a profile fitted from served traces, whose
steps of one shape took longer now and then; seeded by the workload's seed, so a command predicts the same
every time), and every sampling request gets one token (a fixed id; requests run to their output length, as
`duoserve bench --ignore-eos` asks). The router's own `RoutingPolicy` (duoserve/router/routing.py)
picks workers from a `KVIndex` fed by the simulated pools' KV events, with the router's load counters
kept as the router keeps them. So the simulation cannot drift from the scheduler or the routing: it
runs them.

The scheduler's own `update` applies each step's results, and disaggregation goes through a KV
connector as in the engine (`SimPDConnector`: duoserve/disagg/pd_connector.py's timing without the
bytes), so no glue between the scheduler and the model is re-implemented here; the step sequence test
(tests/plan) checks the simulated steps against the real engine's.

Disaggregated requests go as in the router: the decode worker takes the request and allocates its
prompt's blocks when its scheduler admits it (the ticket), the prefill worker computes the prompt and
samples the first token (which goes to the client), the KV arrives at the decode worker the profile's
transfer time after each chunk, and once the last block is there the decode worker's next step takes it
in and the step after decodes (SimPDConnector).
Not modelled: HTTP and ZeroMQ hops between router, workers and client (sub-millisecond on an idle
loopback, not on a busy 2-core machine: served 1P+1D at low load, a request reached an idle prefill
worker 8-10 ms after it was sent (median), simulated 0-1 ms, and at load the KV of a prompt reached an
idle decode worker 5-10 ms after its prefill step (median), simulated 2 ms: the hops wait for cores the
workers are pinned to), the engine loop's own bookkeeping between steps (in the profiled step time only
as far as `EngineCore.step` includes it; a step model fitted from a served trace's periods has it),
speculative decoding, and requests refused for a full queue.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from duoserve.bench.metrics import summarize
from duoserve.bench.records import RequestRecord
from duoserve.bench.report import result_document
from duoserve.disagg.kv_events import KVEvents, KVIndex
from duoserve.engine.request import Request, RequestStatus
from duoserve.engine.scheduler import CoreOutput, ScheduledRequest, Scheduler, SchedulerOutput
from duoserve.kv.connector import ConnectorEvents, EvictedBlock, KVConnector
from duoserve.kv.kv_cache_manager import KVCacheManager
from duoserve.plan.deployment import Deployment
from duoserve.plan.objectives import Objectives
from duoserve.plan.profile import Profile
from duoserve.plan.step_model import StepShape, step_shape, streamed_tokens
from duoserve.plan.workload import SimConversation, Workload
from duoserve.router.routing import RouterConfig, RoutingPolicy, Worker
from duoserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from duoserve.kv.cache import KVCache

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
class SimTransfer:
    """A simulated request's kv_transfer_params (KVTransferParams without the transport)."""

    role: str  # 'receive' (decode worker) | 'send' (prefill worker)
    ticket: SimTicket | None = None  # for 'send'


def _role(request: Request) -> str | None:
    params = request.kv_transfer_params
    return params.role if isinstance(params, SimTransfer) else None


class SimPDConnector(KVConnector):
    """The P/D connectors (duoserve/disagg/pd_connector.py) on the virtual clock: the same decisions,
    when KV would land instead of its bytes.

    Decode side: a receive's whole prompt comes asynchronously; its ticket goes to the router before
    the step runs. Its KV and first token land on the worker's socket when the prefill worker's last
    chunk has arrived (`kv_arrived`, a message to this worker); as in the engine, the next step's
    `start_load_kv` takes them in and the step applies them after its forward pass, so the request
    decodes from the step after that one (EngineCore.step: schedule, load, forward, apply). Applied
    before the schedule instead (the first simulator), a request decoded one step early: served 1P+1D,
    the first decode step started 7-9 ms (median) after the prefill step ended, simulated 2-4 ms.
    Prefill side: a send stops at its first token; each chunk's KV leaves when its step ends and lands
    a transfer time later.
    """

    def __init__(self, worker: SimWorker) -> None:
        self.worker = worker
        self._receiving: set[str] = set()  # requests holding a ticket, until they end
        self._tickets: list[SimTicket] = []  # made by this schedule, not sent yet
        self._kv_ready: dict[str, float] = {}  # a sending request's KV lands on its decode worker then
        self._landed: list[str] = []  # receives whose KV is all on the socket, not taken in yet
        self._events = ConnectorEvents()

    def check_request(self, request: Request) -> int | None:
        return 1 if _role(request) == "send" else None

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        if _role(request) != "receive" or request.request_id in self._receiving:
            return 0, False
        return request.num_tokens - num_computed_tokens, True

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        if num_external_tokens:
            self._receiving.add(request.request_id)
            num_cached = request.num_computed_tokens - num_external_tokens
            self._tickets.append(SimTicket(self.worker, request.request_id, num_cached))

    def on_blocks_evicted(self, blocks: list[EvictedBlock]) -> None:
        pass

    def start_load_kv(self, kv_cache: KVCache | None) -> None:
        """The schedule's tickets go out; the KV that landed is taken in (applied when the step ends)."""
        tickets, self._tickets = self._tickets, []
        for ticket in tickets:
            self.worker.on_ticket(ticket)
        landed, self._landed = self._landed, []
        for request_id in landed:
            if request_id in self._receiving:  # unless the request ended meanwhile
                self._events.finished_loading[request_id] = [SAMPLED_TOKEN]

    def kv_arrived(self, request_id: str) -> None:
        """The prefill worker's KV and first token have landed on this worker's socket."""
        if request_id in self._receiving:
            self._landed.append(request_id)

    @property
    def has_landed(self) -> bool:
        """KV waits to be taken in: the engine loop, woken by its socket, steps even with nothing to
        schedule."""
        return bool(self._landed)

    def save_kv(self, kv_cache: KVCache | None, scheduled: list[ScheduledRequest]) -> None:
        """Called when the step ends: each sending chunk's KV lands a transfer time from now."""
        for s in scheduled:
            if _role(s.request) == "send":
                request_id = s.request.request_id
                ready = self.worker.clock.now + self.worker.profile.kv_transfer.seconds(s.num_new_tokens)
                self._kv_ready[request_id] = max(self._kv_ready.get(request_id, 0.0), ready)

    def request_finished(self, request: Request) -> bool:
        """A send that ended with its first token tells the decode worker when its KV is all there."""
        self._receiving.discard(request.request_id)
        ready = self._kv_ready.pop(request.request_id, None)
        if (
            _role(request) == "send"
            and request.status != RequestStatus.FINISHED_ABORTED
            and ready is not None
        ):
            self.worker.on_kv_done(request.kv_transfer_params.ticket, ready)
        return False

    def get_finished(self) -> ConnectorEvents:
        events, self._events = self._events, ConnectorEvents()
        return events

    def stats(self) -> dict[str, float]:
        return {}


@dataclass
class StepRecord:
    start: float
    seconds: float
    scheduled: list[tuple[str, int]]  # (request id, new tokens), in the scheduler's order
    preempted: list[str]
    shape: StepShape | None = None


@dataclass
class SimWorker:
    """One worker: the engine's scheduler and KV accounting, stepped on the virtual clock."""

    name: str
    profile: Profile
    clock: Clock
    on_tokens: Callable[[SimWorker, CoreOutput], None]  # what each step (or connector event) produced
    on_ticket: Callable[[SimTicket], None] = lambda ticket: None
    on_kv_done: Callable[[SimTicket, float], None] = lambda ticket, ready: None
    record_steps: bool = False
    role: str = "both"  # prefill | decode (disaggregated) | both: whose step model and limits it has
    seed: int = 0  # of its draws from the profile's step spread (the workload's: runs repeat exactly)
    steps: list[StepRecord] = field(default_factory=list)
    busy: bool = False

    def __post_init__(self) -> None:
        self.step_model, self.limits = self.profile.for_role(self.role)
        self.spread = self.profile.spread_for(self.role)
        self._rng = random.Random(f"{self.seed}/{self.name}")
        limits = self.limits
        self.kv = KVCacheManager(
            limits.num_kv_blocks, limits.block_size, limits.enable_prefix_caching, limits.sliding_window
        )
        self.kv.pool.events = []
        self.connector = SimPDConnector(self)
        self.scheduler = Scheduler(
            self.kv,
            limits.max_num_batched_tokens,
            limits.max_num_seqs,
            limits.max_model_len,
            self.clock,
            self.connector,
        )
        self.inbox: list[Callable[[], None]] = []
        self.kv_events: Callable[[KVEvents], None] = lambda events: None
        self._turn_queued = False
        # The last step's sampled rows and requests: what the front end streams during the next one.
        self._previous: tuple[int, frozenset[str]] | None = None

    # ---------------------------------------------------------------- messages (handled at the next turn)

    def post(self, message: Callable[[], None]) -> None:
        self.inbox.append(message)
        if not self.busy and not self._turn_queued:
            self._turn_queued = True
            self.clock.at(self.clock.now, self.turn)

    def add(self, request: Request) -> None:
        """EngineCore.add_request's last lines: the connector may limit what is generated here."""
        limit = self.connector.check_request(request)
        if limit is not None:
            request.max_tokens = min(request.max_tokens, limit)
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        request = self.scheduler.requests.get(request_id)
        if request is not None:
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)

    # ---------------------------------------------------------------- the engine loop's turn

    def turn(self) -> None:
        """EngineLoop.turn: the messages that arrived, then EngineCore.step (schedule, the connector's
        loads, the forward pass on the model's time, the connector's events, the scheduler's update)."""
        self._turn_queued = False
        if self.busy:
            return  # the step in flight runs the next turn when it ends
        inbox, self.inbox = self.inbox, []
        for message in inbox:
            message()
        if self.scheduler.has_schedulable() or self.connector.has_landed:
            plan = self.scheduler.schedule()
            self.connector.start_load_kv(None)
            if plan.scheduled:
                self._start_step(plan)
                return
            # A step with nothing scheduled (it takes no model time): what it took in applies at its end,
            # and the loop steps again at once for the requests it made runnable.
            self._previous = None
            events = self.connector.get_finished()
            self._emit(self.scheduler.apply_connector_events(events))
            if events.finished_loading and self.scheduler.has_schedulable():
                self._turn_queued = True
                self.clock.at(self.clock.now, self.turn)
        self._publish()

    def _start_step(self, plan: SchedulerOutput) -> None:
        """The step takes the step model's time; every sampling request gets SAMPLED_TOKEN."""
        ids = frozenset(s.request.request_id for s in plan.scheduled)
        streamed = streamed_tokens(self._previous, ids)
        shape = step_shape(plan.scheduled, self.limits.quantized_max_rows, streamed)
        self._previous = (shape.sampled, ids)
        seconds = self.step_model.seconds(shape)
        if self.spread is not None:  # a served step of this shape: the model's time times a draw
            seconds *= self.spread.ratio(shape, self._rng.random())
        if self.record_steps:
            self.steps.append(
                StepRecord(
                    self.clock.now,
                    seconds,
                    [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled],
                    [r.request_id for r in plan.preempted],
                    shape,
                )
            )
        sampled = {s.request.request_id: ([SAMPLED_TOKEN], []) for s in plan.scheduled if s.samples}
        self.busy = True
        self.clock.at(self.clock.now + seconds, lambda: self._step_done(plan, sampled))

    def _step_done(self, plan: SchedulerOutput, sampled: dict[str, tuple[list[int], list]]) -> None:
        self.busy = False
        self.connector.save_kv(None, plan.scheduled)
        self._emit(self.scheduler.apply_connector_events(self.connector.get_finished()))
        self._emit(self.scheduler.update(plan, sampled, {}))
        self._publish()
        self.turn()

    def _emit(self, outputs: list[CoreOutput]) -> None:
        for output in outputs:
            self.on_tokens(self, output)

    def _publish(self) -> None:
        events = self.kv.pool.events
        if events:
            self.kv_events(
                KVEvents(stored=[h for s, h in events if s], removed=[h for s, h in events if not s])
            )
            events.clear()


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
        seed: int = 0,
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
                role=worker.kind if deployment.disaggregated else "both",
                seed=seed,
            )
            sim.kv_events = lambda events, url=worker.url: self.index.apply(url, events)
            self.workers[worker.url] = sim
        self.flights: dict[str, _Flight] = {}
        self.records: list[RequestRecord] = []
        self._ids = itertools.count()
        self._slots: int | None = None
        self._queued: list[SimConversation] = []
        self.end = 0.0
        # A prompt and its output must fit every worker it may run on (the router refuses it otherwise).
        self.max_model_len = min(sim.limits.max_model_len for sim in self.workers.values())

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
        if len(prompt) + spec.output_len > self.max_model_len:
            record.error = (
                f"400: {len(prompt)} prompt + {spec.output_len} output tokens exceed the context "
                f"({self.max_model_len})"
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

    def _request(self, flight: _Flight, transfer: SimTransfer | None = None) -> Request:
        out = flight.record.max_tokens
        return Request(
            request_id=str(flight.record.request_id),
            prompt_token_ids=list(flight.prompt),
            params=SamplingParams(max_tokens=out, ignore_eos=True),
            max_tokens=out,
            stop_token_ids=frozenset(),
            arrival_time=self.clock.now,
            kv_transfer_params=transfer,
        )

    def _route(self, flight: _Flight) -> None:
        decode, prefill = self.policy.pick(flight.prompt, self.block_size, disaggregable=True)
        flight.decode, flight.num_tokens = decode, len(flight.prompt)
        decode.active_tokens += flight.num_tokens
        decode.num_requests += 1
        worker = self.workers[decode.url]
        if prefill is not None:
            flight.prefill = prefill
        request = self._request(flight, SimTransfer("receive") if prefill is not None else None)
        worker.post(lambda: worker.add(request))

    def _on_ticket(self, ticket: SimTicket) -> None:
        """The decode worker's ticket reached the router: send the prompt to the prefill worker."""
        flight = self.flights[ticket.request_id]
        flight.uncached = len(flight.prompt) - ticket.num_cached_tokens
        flight.prefill.queued_prefill_tokens += flight.uncached
        flight.prefill.num_requests += 1
        prefill = self.workers[flight.prefill.url]
        sending = self._request(flight, SimTransfer("send", ticket))
        prefill.post(lambda: prefill.add(sending))

    def _on_kv_done(self, ticket: SimTicket, ready: float) -> None:
        decode = ticket.decode
        self.clock.at(ready, lambda: decode.post(lambda: decode.connector.kv_arrived(ticket.request_id)))

    def _on_tokens(self, worker: SimWorker, out: CoreOutput) -> None:
        """A step's token for a request (or its end): to the client, and onto the router's counters."""
        flight = self.flights.get(out.request_id)
        if flight is None:
            return
        now, record = self.clock.now, flight.record
        finished = out.finished
        sending = flight.prefill is not None and worker.name == flight.prefill.url
        if sending:
            # The prefill leg's one token is the client's first; the leg ends (the router's `finally`).
            flight.prefill.queued_prefill_tokens -= flight.uncached
            finished = record.max_tokens <= 1
        # The decode worker's copy of a disaggregated request starts with the first token already sent.
        if out.new_token_ids:
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
            del self.flights[out.request_id]
            if sending:  # the first token ended it: closing the decode stream frees the decode side
                decode = self.workers[flight.decode.url]
                decode.post(lambda: decode.abort(out.request_id))
            self._turn_done(flight.conv, flight.turn, flight.prompt, record)


def simulate(
    profile: Profile,
    deployment: Deployment,
    workload: Workload,
    router: dict[str, Any] | None = None,
    record_steps: bool = False,
) -> tuple[list[RequestRecord], float, Simulation]:
    """Run the workload on the deployment: bench's request records, the run's duration, the simulation
    (its draws from the profile's step spread seeded by the workload's seed)."""
    seed = workload.config.get("seed", 0) if workload.config else 0
    sim = Simulation(profile, deployment, router, record_steps, seed=int(seed or 0))
    records = sim.run(workload)
    return records, sim.end, sim


def result(
    profile: Profile,
    deployment: Deployment,
    workload: Workload,
    objectives: Objectives | None = None,
    router: dict[str, Any] | None = None,
    step_trace: str | None = None,
) -> dict[str, Any]:
    """A `duoserve bench` result document of the simulated run (label 'predicted <deployment>');
    `step_trace`: also write each worker's simulated steps as a step trace (duoserve/plan/trace.py)."""
    records, duration, sim = simulate(profile, deployment, workload, router, record_steps=bool(step_trace))
    if step_trace:
        write_simulated_traces(sim, step_trace)
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


def write_simulated_traces(sim: Simulation, path: str) -> list[str]:
    """Each worker's simulated steps in the served engine's step-trace format, to set beside a real
    trace of the same arrivals: PATH for one worker, PATH.<worker index> for more."""
    from duoserve.plan.trace import write_trace

    paths = []
    for index, worker in enumerate(sim.workers.values()):
        out = path if len(sim.workers) == 1 else f"{path}.{index}"
        header = dataclasses.asdict(worker.limits) | {"simulated": worker.name, "role": worker.role}
        write_trace(out, header, worker.steps)
        paths.append(out)
    return paths
