"""The engine loop with a real core over real ZeroMQ sockets (inproc): untrusted inbox messages are
dropped and counted, and no per-request state outlives its request, however the request ends."""

from __future__ import annotations

import msgspec
import pytest
import torch
import zmq

from duoserve.config import EngineConfig
from duoserve.disagg.kv_transfer import KVLayout, KVReceiver, KVSender, KVTicket, KVTransferParams
from duoserve.disagg.pd_connector import pd_connectors
from duoserve.engine.core import EngineCore
from duoserve.kv.connector import MultiConnector
from duoserve.models.loader import load_model
from duoserve.sampling_params import SamplingParams
from duoserve.server.engine_messages import (
    Abort,
    AddRequest,
    EngineOutputs,
    message_decoder,
    request_encoder,
)
from duoserve.server.engine_process import KV_WAIT_POLL_MS, EngineLoop
from tests.helpers import random_prompt
from tests.server.harness import ENGINE_ARGS

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MAX_TURNS = 500  # a bound on loop turns, not on time: every test here needs far fewer


@pytest.fixture(scope="module")
def model_path(tiny_models) -> str:
    return tiny_models("llama_gqa")[1]


class Harness:
    """An EngineLoop on a real core; the test plays the API process on the other end of its sockets."""

    def __init__(self, path: str, context: zmq.Context, kv: bool = False, **overrides) -> None:
        """`kv`: the worker's P/D connectors over a real KV receiver and sender, as the engine process
        builds them."""
        # The torch attention backend: the CPU kernel is not what these tests are about.
        args = {**{k: v for k, v in ENGINE_ARGS.items() if k != "num_threads"}, "attention_backend": "torch"}
        config = EngineConfig(model=path, **{**args, **overrides})
        self.receiver: KVReceiver | None = None
        self.sender: KVSender | None = None

        def make_connector(core: EngineCore) -> MultiConnector:
            layout = KVLayout.of(core.kv_cache.spec)
            self.receiver = KVReceiver(context, "127.0.0.1", layout, core.kv.num_blocks)
            self.sender = KVSender(context)
            return pd_connectors(
                core, self.receiver, self.sender, lambda tickets: self.loop.send_tickets(tickets)
            )

        self.core = EngineCore(config, load_model(path, torch.float32), make_connector if kv else None)
        self.to_engine = context.socket(zmq.PUSH)
        self.from_engine = context.socket(zmq.PULL)
        inbox, outbox = context.socket(zmq.PULL), context.socket(zmq.PUSH)
        name = f"inproc://engine-{id(self)}"
        self.to_engine.bind(name + "-in")
        self.from_engine.bind(name + "-out")
        inbox.connect(name + "-in")
        outbox.connect(name + "-out")
        self.sockets = [self.to_engine, self.from_engine, inbox, outbox]
        if self.receiver is not None:  # closed with the harness
            self.sockets.append(self.receiver.socket)
        self.loop = EngineLoop(self.core, inbox, outbox, max_queued_requests=None, receiver=self.receiver)
        self.batches: list[EngineOutputs] = []

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        if self.sender is not None:
            self.sender.close()

    def send(self, message) -> None:
        self.to_engine.send(request_encoder.encode(message))

    def turn(self) -> None:
        self.loop.turn()
        while self.from_engine.poll(0):
            self.batches.append(message_decoder.decode(self.from_engine.recv()))

    def run_until(self, condition) -> None:
        for _ in range(MAX_TURNS):
            if condition():
                return
            self.turn()
        pytest.fail(f"not reached in {MAX_TURNS} engine loop turns")

    def finished(self, seq_id: str) -> str | None:
        """The finish reason the engine reported for seq_id, None while it has not finished."""
        for batch in self.batches:
            for out in batch.outputs:
                if out.request_id == seq_id and out.finished:
                    return out.finish_reason
        return None

    def tables(self) -> dict[str, int]:
        """Every per-request table of the loop and its core that is not empty, with its size.

        Besides the known ones, any container the loop or a KV connector holds counts (but the loop's
        drop counters), and any event a connector has not reported yet: a side table added there later
        is caught too.
        """
        core = self.core
        known = {
            "scheduler.requests": core.scheduler.requests,
            "scheduler.waiting": core.scheduler.waiting,
            "scheduler.running": core.scheduler.running,
            "scheduler.loading": core.scheduler.loading,
            "scheduler.held_by_connector": core.scheduler.held_by_connector,
            "kv.tables": core.kv.tables,
        }
        for connector in _connectors(core.connector):
            for name, value in vars(connector).items():
                if isinstance(value, dict | list | set) and name != "connectors":
                    known[f"{type(connector).__name__}.{name}"] = value
                elif name == "_events":
                    known[f"{type(connector).__name__}.{name}"] = [e for e in vars(value).values() if e]
        if core.speculator is not None:
            known["speculator._backoff"] = core.speculator._backoff
            known["proposer._seqs"] = getattr(core.speculator.proposer, "_seqs", {})
        for name, value in vars(self.loop).items():
            if isinstance(value, dict | list | set) and name != "drops":
                known[f"loop.{name}"] = value
        sizes = {name: len(table) for name, table in known.items() if len(table)}
        if core.kv.pool.num_free_blocks != core.kv.num_blocks:
            sizes["kv blocks in use"] = core.kv.num_blocks - core.kv.pool.num_free_blocks
        return sizes


def _connectors(connector) -> list:
    """The connector and every one it stacks."""
    stacked = getattr(connector, "connectors", [])
    return [connector, *(c for inner in stacked for c in _connectors(inner))]


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def harness(model_path, context):
    made: list[Harness] = []

    def make(**overrides) -> Harness:
        made.append(Harness(model_path, context, **overrides))
        return made[-1]

    yield make
    for h in made:
        h.close()


def add(seq_id: str, prompt_len: int = 9, max_tokens: int = 6, n: int = 1, **kv) -> AddRequest:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    seq_ids = [seq_id] if n == 1 else [f"{seq_id}#{i}" for i in range(n)]
    return AddRequest(seq_id, seq_ids, random_prompt(prompt_len, seed=len(seq_id)), [params] * n, [], **kv)


# ------------------------------------------------------------------------------------ untrusted input


def test_garbage_on_the_inbox_is_dropped_counted_and_the_engine_still_serves(harness):
    h = harness()
    h.to_engine.send(b"\xc1 not msgpack")
    h.to_engine.send(b"")
    h.to_engine.send(msgspec.msgpack.encode(42))  # msgpack, but no message
    h.to_engine.send(msgspec.msgpack.encode({"type": "AddRequest", "request_id": 1}))
    h.turn()
    # The drops are reported at once, in the stats of a batch of their own.
    stats = h.batches[-1].stats
    assert stats["untrusted_messages_dropped:engine_ipc:malformed"] == 2
    assert stats["untrusted_messages_dropped:engine_ipc:invalid"] == 2
    h.send(add("r", max_tokens=4))
    h.run_until(lambda: h.finished("r"))
    assert h.finished("r") == "length" and h.tables() == {}


# ------------------------------------------------------------------------------------ every ending


def starts_of(h: Harness, seq_id: str) -> list:
    return [s for batch in h.batches for s in batch.starts if s.seq_id == seq_id]


@pytest.mark.parametrize("speculative", [None, "draft"])
def test_a_finished_request_leaves_nothing_behind_and_reports_its_start_once(harness, speculative):
    h = harness(speculative=speculative, num_speculative_tokens=2)
    h.send(add("r", max_tokens=8))
    h.run_until(lambda: h.finished("r"))
    assert h.finished("r") == "length" and h.tables() == {}
    (start,) = starts_of(h, "r")
    assert start.queue_time >= 0 and start.prefill_time >= 0
    # It came in the batch of the first token.
    first = next(b for b in h.batches if any(o.request_id == "r" and o.new_token_ids for o in b.outputs))
    assert start in first.starts


@pytest.mark.parametrize("speculative", [None, "draft"])
def test_an_aborted_request_leaves_nothing_behind(harness, speculative):
    h = harness(speculative=speculative, num_speculative_tokens=2)
    h.send(add("r", max_tokens=200))
    h.run_until(lambda: sum(len(o.new_token_ids) for b in h.batches for o in b.outputs) >= 4)
    assert h.tables()  # it runs (and, with a draft, speculates)
    h.send(Abort(["r"]))
    h.run_until(lambda: not h.core.has_unfinished())
    assert h.tables() == {}


def test_a_request_aborted_before_its_first_token_leaves_nothing_behind(harness):
    h = harness(max_num_batched_tokens=4)  # a 9-token prompt takes three steps
    h.send(add("r", max_tokens=4))
    h.run_until(lambda: h.core.last_step.num_scheduled_tokens > 0)
    h.send(Abort(["r"]))
    h.run_until(lambda: not h.core.has_unfinished())
    assert h.tables() == {} and starts_of(h, "r") == []


def test_a_refused_request_leaves_nothing_behind(harness):
    h = harness()
    bad = add("r", n=2)
    bad.params = [bad.params[0], SamplingParams(max_tokens=10_000)]  # the second does not fit the context
    h.send(bad)
    h.send(AddRequest("q", ["q"], [10**6], [SamplingParams()], []))  # a token out of the vocabulary
    h.run_until(lambda: len([e for b in h.batches for e in b.errors]) == 2)
    assert {e.request_id: e.status for b in h.batches for e in b.errors} == {"r": 400, "q": 400}
    assert h.tables() == {}


def test_requests_waiting_for_room_with_nothing_running_do_not_spin_the_loop(harness):
    """With nothing running and the waiting request not admissible (the pool held, as by loads in flight),
    the loop waits for a message or a short tick instead of stepping at once (which would spin on the
    admission, taking the core and the GIL from the offload tier's I/O thread); it steps at once again
    when there is work."""
    h = harness()
    kv = h.core.kv
    bs = h.core.config.block_size
    assert kv.allocate_slots("holder", list(range(kv.num_blocks * bs)), 0, kv.num_blocks * bs)
    h.send(add("r"))
    h.turn()  # takes the request in; the step admits nothing: no free block
    assert h.core.scheduler.waiting and not h.core.scheduler.running
    assert h.core.last_step.num_scheduled_tokens == 0
    assert h.loop._poll_timeout() == KV_WAIT_POLL_MS
    kv.free("holder")
    h.run_until(lambda: h.core.scheduler.running)
    assert h.loop._poll_timeout() == 0
    h.run_until(lambda: h.finished("r"))
    assert h.tables() == {}


def test_an_expired_kv_wait_leaves_nothing_behind(harness):
    h = harness(kv=True)
    h.send(add("r", **{"kv_transfer": KVTransferParams("receive")}))
    h.run_until(lambda: any(b.tickets for b in h.batches))  # its blocks are allocated
    assert h.tables()
    (receive, _) = h.core.connector.connectors[0].connectors
    receive.timeout = 0.0  # no KV will ever come
    h.run_until(lambda: h.finished("r"))
    assert h.finished("r") == "abort" and h.tables() == {}


def test_a_failed_kv_send_leaves_nothing_behind(harness, monkeypatch):
    monkeypatch.setattr("duoserve.disagg.kv_transfer.SEND_TIMEOUT_MS", 50)
    h = harness(kv=True, max_num_batched_tokens=4)  # the send of the first chunk fails, before any token
    bs = h.core.config.block_size
    layout = KVLayout.of(h.core.kv_cache.spec)
    ticket = KVTicket("r", "tcp://127.0.0.1:9", list(range(3)), 0, layout)  # nobody there
    h.send(add("r", prompt_len=3 * bs - 1, **{"kv_transfer": KVTransferParams("send", ticket)}))
    h.run_until(lambda: h.finished("r"))
    assert h.finished("r") == "abort" and h.tables() == {}
    assert starts_of(h, "r") == []


def test_a_finished_kv_receive_leaves_nothing_behind(harness):
    """The decode half of a disaggregated request, its KV sent by hand as a prefill worker would: it
    decodes from the sent first token, and nothing of it stays in the loop, the core or a connector."""
    h = harness(kv=True)
    h.send(add("r", max_tokens=3, **{"kv_transfer": KVTransferParams("receive")}))
    h.run_until(lambda: any(b.tickets for b in h.batches))
    (ticket,) = [t for b in h.batches for t in b.tickets]
    source = h.core.kv_cache.export_blocks(ticket.block_ids)  # any bytes of the right layout
    h.sender.send_blocks(ticket, ticket.block_ids, source)
    h.sender.send_done(ticket, first_token=5, num_blocks=len(ticket.block_ids))
    h.run_until(lambda: h.finished("r"))
    assert h.finished("r") == "length" and h.tables() == {}
    tokens = [t for b in h.batches for o in b.outputs if o.request_id == "r" for t in o.new_token_ids]
    assert len(tokens) == 2  # the first token was the prefill worker's to send
