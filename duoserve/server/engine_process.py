"""The engine core process: loads the model, then runs one busy loop.

Each turn drains the requests that arrived (without waiting when there is work, blocking on a poll
when idle), runs one `EngineCore.step()` and sends what it produced. The API process never waits
on a model step: it only ever exchanges messages with this loop.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import msgspec
import zmq

from duoserve.config import EngineConfig
from duoserve.disagg.auth import DropCounts
from duoserve.disagg.endpoints import LOOPBACK, KVEndpoints
from duoserve.disagg.kv_events import KVEventPublisher
from duoserve.disagg.kv_transfer import KVLayout, KVReceiver, KVReceiveTransport, KVSender, KVTicket
from duoserve.disagg.pd_connector import pd_connectors
from duoserve.engine.core import CoreOutput, EngineCore
from duoserve.engine.step_observer import MakeStepObserver
from duoserve.kv.connector import KVConnector
from duoserve.models.loader import load_model
from duoserve.server.engine_messages import (
    Abort,
    AddRequest,
    EngineFailed,
    EngineOutputs,
    EngineRequest,
    LoadLoRA,
    Ready,
    RequestError,
    SeqStart,
    Shutdown,
    UnloadLoRA,
    message_encoder,
    request_decoder,
)

logger = logging.getLogger(__name__)

# How long an idle engine blocks waiting for a message before it checks that its parent is alive.
IDLE_POLL_MS = 500
# Pending outgoing messages are dropped this long after the API process went away, so exit never hangs.
LINGER_MS = 1000
# With requests waiting for KV and nothing to step, wake at least this often: to check their timeout, and
# to take in an offload tier's loads, which nothing else wakes the loop for (a 40-block float32 load of
# SmolLM2-135M reads in ~30-60 ms on the I/O thread: a 100 ms tick made its request wait for the tick). A
# step that schedules nothing costs about a millisecond at most (schedule() averaged 1.2 ms a step, the
# offload hooks 50 us, under cProfile with real work).
KV_WAIT_POLL_MS = 10


def run_engine_process(
    config: EngineConfig,
    input_address: str,
    output_address: str,
    max_queued_requests: int | None,
    log_level: str = "INFO",
    kv: KVEndpoints = LOOPBACK,
    cluster_secret: str | None = None,
    make_step_observer: MakeStepObserver | None = None,
) -> None:
    """Entry point of the spawned process: load the model, say Ready (or why not), run the loop.

    Besides the two sockets to the API process, it binds two TCP sockets as `kv` says: a KV receiver
    (prefill workers push prompt KV to it) and a KV event publisher (routers index its prefix cache).
    What goes over them is authenticated with `cluster_secret` when there is one. `make_step_observer`:
    the core's step observer (--step-trace), as the server's caller built it.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C and SIGTERM reach the whole process group; the API process decides when the engine stops,
    # after draining in-flight requests, and tells it with a Shutdown message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    outbox = context.socket(zmq.PUSH)
    for sock in (inbox, outbox):
        sock.setsockopt(zmq.LINGER, LINGER_MS)
    inbox.connect(input_address)
    outbox.connect(output_address)
    exit_code = 0
    receivers: list[KVReceiver] = []  # made with the core, whose layout and pool size it
    sender = KVSender(context, cluster_secret)
    publisher = KVEventPublisher(context, kv.bind_host, cluster_secret, kv.events_port, kv.advertise_host)
    loop: EngineLoop | None = None

    def make_connector(core: EngineCore) -> KVConnector:
        receivers.append(
            KVReceiver(
                context,
                kv.bind_host,
                KVLayout.of(core.kv_cache.spec),
                max_kv_blocks(core),
                cluster_secret,
                kv.kv_port,
                kv.advertise_host,
            )
        )
        # Tickets are only made by steps, which the loop runs: it exists by then.
        return pd_connectors(core, receivers[0], sender, lambda tickets: loop.send_tickets(tickets))

    try:
        loaded = load_model(config.model, config.resolved_dtype())
        core = EngineCore(config, loaded, make_connector, make_step_observer)
        core.kv.pool.events = []
        core.connector.start_kv_events()  # offload tiers too: a router counts their hits
        outbox.send(message_encoder.encode(_ready(core, receivers[0].address, publisher.address)))
        loop = EngineLoop(core, inbox, outbox, max_queued_requests, receivers[0], publisher)
        loop.run()
        core.close()  # drained: the offload tier keeps what the cache holds for the next start
    except Exception as err:  # a load failure or a dead loop: the API process learns why, then exits too
        logger.exception("engine failed")
        outbox.send(message_encoder.encode(EngineFailed(f"{type(err).__name__}: {err}")))
        exit_code = 1
    finally:
        for sock in (inbox, outbox):
            sock.close()
        for endpoint in (*receivers, sender, publisher):
            endpoint.close()
        context.term()
    # Skip the interpreter's teardown (about a second with torch loaded): nothing is left to flush but logs.
    logging.shutdown()
    os._exit(exit_code)


def max_kv_blocks(core: EngineCore) -> int:
    """The most blocks one KV message can carry: a whole prompt of max_model_len tokens."""
    return min(core.kv.num_blocks, -(-core.max_model_len // core.config.block_size))


def _ready(core: EngineCore, kv_address: str, events_address: str) -> Ready:
    return Ready(
        max_model_len=core.max_model_len,
        vocab_size=core.model_config.vocab_size,
        eos_token_ids=list(core.model_config.eos_token_ids),
        num_kv_blocks=core.kv.num_blocks,
        block_size=core.config.block_size,
        kv_address=kv_address,
        events_address=events_address,
        lora_modules=core.config.lora_requests() if core.lora is not None else [],
    )


class EngineLoop:
    def __init__(
        self,
        core: EngineCore,
        inbox: zmq.Socket,
        outbox: zmq.Socket,
        max_queued_requests: int | None,
        receiver: KVReceiveTransport | None = None,
        publisher: KVEventPublisher | None = None,
    ) -> None:
        self.core = core
        self.inbox = inbox
        self.outbox = outbox
        self.max_queued_requests = max_queued_requests
        self.receiver = receiver
        self.publisher = publisher
        self.poller = zmq.Poller()
        self.poller.register(inbox, zmq.POLLIN)
        if receiver is not None:
            self.poller.register(receiver.socket, zmq.POLLIN)
        self.parent_pid = os.getppid()
        # Inbox messages dropped because they did not decode ("malformed": not msgpack; "invalid":
        # msgpack, but no message of ours). Zero from the start, so each series exists at 0.
        self.drops = DropCounts("engine_ipc")
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            if os.getppid() != self.parent_pid:
                # Orphaned (the API process was killed): nobody reads the outputs; a full socket would block.
                logger.warning("the API process is gone; engine exiting")
                break
            self.turn()

    def turn(self) -> None:
        """One turn: handle what arrived (waiting for it when idle), then step once.

        The step runs with nothing to schedule too: the KV connector takes in arrived KV and times out
        waits in it (a step with nothing to do costs next to nothing).
        """
        batch = EngineOutputs(timestamp=0.0)
        handled = self._drain(batch, timeout_ms=self._poll_timeout())
        if self.stopping:
            return
        if handled:
            # Acks go out before the step, so a request's HTTP status never waits on a model step.
            self._send(batch)
        self._step()
        if self.publisher is not None:
            self.publisher.publish(self.core.kv.pool.events, *self.core.connector.take_kv_events())
            self.core.kv.pool.events.clear()

    def _poll_timeout(self) -> int:
        """0 while a step has work. Requests waiting for room in the pool with nothing running (the last
        step scheduled nothing) are admitted only once a load lands, a request ends or one arrives:
        stepping again at once would spin on their admission, taking the core and the GIL from the I/O
        thread that reads those loads (a 40-block load: 22-34 ms with the engine loop asleep, 62-72 ms
        with it spinning in Python; busy 2-core machine)."""
        stalled = not self.core.last_step.num_scheduled_tokens and not self.core.scheduler.running
        if self.core.has_schedulable() and not stalled:
            return 0
        return KV_WAIT_POLL_MS if self.core.has_unfinished() else IDLE_POLL_MS

    # ---------------------------------------------------------------- inbound

    def _drain(self, batch: EngineOutputs, timeout_ms: int) -> bool:
        """Handle every message that is waiting (waiting up to timeout_ms for the first one)."""
        handled = False
        while self.poller.poll(timeout_ms):
            timeout_ms = 0
            try:
                raw = self.inbox.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            message = self._decode(raw.buffer)
            if message is not None:
                self._handle(message, batch)
            handled = True  # a dropped message too: the batch's stats carry the count at once
        return handled

    def _decode(self, data: memoryview) -> EngineRequest | None:
        """The inbox message, or None (dropped and counted) when it is not one: whatever reaches the
        socket must never end the loop."""
        try:
            return request_decoder.decode(data)
        except msgspec.DecodeError as err:  # ValidationError is a DecodeError too
            reason = "invalid" if isinstance(err, msgspec.ValidationError) else "malformed"
            self.drops.drop(reason, f"from the API process ({len(data)} bytes): {err}")
            return None

    def _handle(self, message: EngineRequest, batch: EngineOutputs) -> None:
        if isinstance(message, AddRequest):
            error = self._add(message)
            if error is None:
                batch.accepted.append(message.request_id)
            else:
                batch.errors.append(error)
        elif isinstance(message, Abort):
            for seq_id in message.seq_ids:
                self.core.abort(seq_id)
        elif isinstance(message, (LoadLoRA, UnloadLoRA)):
            error = self._update_loras(message)
            if error is None:
                batch.accepted.append(message.request_id)
            else:
                batch.errors.append(error)
        elif isinstance(message, Shutdown):
            self.stopping = True

    def _add(self, message: AddRequest) -> RequestError | None:
        if self._queue_full(len(message.seq_ids)):
            return RequestError(
                message.request_id,
                429,
                f"the server's request queue is full ({self.max_queued_requests} queued); retry later",
            )
        added: list[str] = []
        try:
            for seq_id, params in zip(message.seq_ids, message.params, strict=True):
                self.core.add_request(
                    seq_id,
                    message.prompt_token_ids,
                    params,
                    message.eos_token_ids,
                    message.kv_transfer,
                    message.lora_request,
                )
                added.append(seq_id)
        except Exception as err:  # one bad request must never take the engine down
            for seq_id in added:
                self.core.abort(seq_id)
            if isinstance(err, ValueError):
                return RequestError(message.request_id, 400, str(err))
            logger.exception("adding request %s failed", message.request_id)
            return RequestError(message.request_id, 500, f"the engine could not add the request: {err}")
        return None

    def _update_loras(self, message: LoadLoRA | UnloadLoRA) -> RequestError | None:
        """Load or unload an adapter: 400 when it cannot be loaded, 404 when there is none to unload."""
        try:
            if isinstance(message, LoadLoRA):
                self.core.load_lora(message.lora_request)
            elif not self.core.unload_lora(message.lora_name):
                return RequestError(
                    message.request_id, 404, f"the LoRA adapter {message.lora_name!r} is not loaded"
                )
        except ValueError as err:
            return RequestError(message.request_id, 400, str(err))
        return None

    def _queue_full(self, num_new: int) -> bool:
        """Whether admitting num_new sequences would queue more than max_queued_requests of them.

        A new request only waits if the running batch has no seat for it, so free seats
        (max_num_seqs - running) are not counted as queue. A request finding the queue empty is always
        admitted, so one whose n alone exceeds the bound is not refused forever.
        """
        if self.max_queued_requests is None:
            return False
        stats = self.core.stats()
        waiting = int(stats["num_requests_waiting"])
        free_seats = max(0, self.core.config.max_num_seqs - int(stats["num_requests_running"]))
        return waiting > 0 and waiting + num_new - free_seats > self.max_queued_requests

    # ---------------------------------------------------------------- step and outbound

    def _step(self) -> None:
        drops = self._num_kv_drops()
        outputs = self.core.step()
        # A dropped KV message is sent as stats at once, so /metrics counts it even on an idle worker.
        if not outputs and not self.core.last_step.num_scheduled_tokens and self._num_kv_drops() == drops:
            return
        # Sent even without outputs (a prefill chunk): the step's token count and stats still count.
        batch = EngineOutputs(
            timestamp=0.0,
            outputs=outputs,
            starts=_starts(outputs),
            step_tokens=self.core.last_step.num_scheduled_tokens,
        )
        self._send(batch)

    def send_tickets(self, tickets: list[KVTicket]) -> None:
        """The receive connector's new tickets, sent before the step's forward pass: the router hands
        them to prefill workers, which need not wait for this worker's step."""
        self._send(EngineOutputs(timestamp=0.0, tickets=tickets))

    def _num_kv_drops(self) -> int:
        return sum(self.receiver.drops.counts.values()) if self.receiver is not None else 0

    def _send(self, batch: EngineOutputs) -> None:
        batch.timestamp = time.monotonic()
        batch.stats = self.core.stats() | self.drops.stats()
        if self.receiver is not None:
            batch.stats.update(self.receiver.drops.stats())
        self.outbox.send(message_encoder.encode(batch), copy=False)


def _starts(outputs: list[CoreOutput]) -> list[SeqStart]:
    """The queue and prefill times of the sequences whose first token is in this step's outputs."""
    return [
        SeqStart(out.request_id, queue_time=out.queue_time, prefill_time=out.prefill_time)
        for out in outputs
        if out.queue_time is not None and out.prefill_time is not None
    ]
