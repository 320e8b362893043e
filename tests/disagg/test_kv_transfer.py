"""KV transfer between two engine cores in this process, over real ZeroMQ TCP sockets.

Each core runs the P/D connectors (duoserve/disagg/pd_connector.py) as a worker does. A prefill core
computes the prompt and pushes its blocks into the blocks a decode core allocated; the decode core
continues from the prefill core's first token. Greedy outputs must equal one colocated core's, the
decode core must never compute the first token again, and no block may leak.
"""

from __future__ import annotations

import time

import msgspec
import pytest
import torch
import zmq

from duoserve.config import EngineConfig
from duoserve.disagg.kv_transfer import (
    KVBlocks,
    KVLayout,
    KVReceiver,
    KVSender,
    KVTicket,
    KVTransferError,
    KVTransferParams,
    decode_blocks,
)
from duoserve.disagg.pd_connector import KVReceiveConnector, pd_connectors
from duoserve.engine.core import EngineCore
from duoserve.models.loader import load_model
from duoserve.sampling_params import SamplingParams
from tests.helpers import random_prompt, wait_for

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ARGS = dict(num_kv_blocks=64, block_size=4, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def model_path(tiny_models) -> str:
    return tiny_models("llama_gqa")[1]


def make_core(path: str, make_connector=None, **overrides) -> EngineCore:
    config = EngineConfig(model=path, **{**ARGS, **overrides})
    return EngineCore(config, load_model(path, torch.float32), make_connector)


class Worker:
    """A core with a worker's P/D connectors over real sockets; the tickets it hands out are kept."""

    def __init__(self, path: str, context: zmq.Context, secret: str | None = None, **overrides) -> None:
        self.sender = KVSender(context, secret)
        self.tickets: list[KVTicket] = []

        def make_connector(core: EngineCore):
            layout = KVLayout.of(core.kv_cache.spec)
            self.receiver = KVReceiver(context, "127.0.0.1", layout, core.kv.num_blocks, secret)
            connectors = pd_connectors(core, self.receiver, self.sender, self.tickets.extend)
            self.receive: KVReceiveConnector = connectors.connectors[0]
            return connectors

        self.core = make_core(path, make_connector, **overrides)

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def run_colocated(path: str, prompt: list[int], max_tokens: int) -> list[int]:
    core = make_core(path)
    core.add_request("r", prompt, greedy(max_tokens), [])
    tokens = []
    while core.has_unfinished():
        for out in core.step():
            tokens += out.new_token_ids
    return tokens


class Pair:
    """A prefill worker and a decode worker."""

    def __init__(
        self,
        path: str,
        context: zmq.Context,
        prefill_overrides=None,
        decode_overrides=None,
        secret: str | None = None,
    ) -> None:
        self.prefill_worker = Worker(path, context, secret, **(prefill_overrides or {}))
        self.decode_worker = Worker(path, context, secret, **(decode_overrides or {}))
        self.prefill, self.decode = self.prefill_worker.core, self.decode_worker.core
        self.sender, self.receiver = self.prefill_worker.sender, self.decode_worker.receiver
        self.receive = self.decode_worker.receive  # the decode side's receive connector
        self.decode_tokens_computed = 0

    def close(self) -> None:
        self.prefill_worker.close()
        self.decode_worker.close()

    def start(self, prompt: list[int], max_tokens: int, request_id: str = "r") -> KVTicket:
        """Leg 1 and 2: the decode side takes the request and, at its next step, hands out a ticket;
        the prefill side takes it with that ticket."""
        self.decode.add_request(request_id, prompt, greedy(max_tokens), [], KVTransferParams("receive"))
        assert self.decode.step() == []  # admitted: its blocks allocated, nothing computed
        (ticket,) = self.decode_worker.tickets
        self.decode_worker.tickets.clear()
        self.prefill.add_request(request_id, prompt, greedy(max_tokens), [], KVTransferParams("send", ticket))
        return ticket

    def run(self, prompt: list[int], max_tokens: int) -> list[int]:
        self.start(prompt, max_tokens)
        tokens = []
        while self.prefill.has_unfinished():
            for out in self.prefill.step():
                tokens += out.new_token_ids
        tokens += self.pump()
        while self.decode.has_unfinished():
            tokens += self.step_decode()
        return tokens

    def step_decode(self) -> list[int]:
        outputs = self.decode.step()
        self.decode_tokens_computed += self.decode.last_step.num_scheduled_tokens
        return [t for out in outputs for t in out.new_token_ids]

    def pump(self, timeout: float = 5.0) -> list[int]:
        """Step the decode side until what the prefill side sent has arrived (or it gives up)."""
        deadline = time.monotonic() + timeout
        tokens = []
        while self.decode.scheduler.loading and time.monotonic() < deadline:
            tokens += self.step_decode()
            time.sleep(0.001)
        return tokens


@pytest.mark.parametrize("prompt_len", [5, 8, 23])
@pytest.mark.parametrize("chunk", [4, 64])
def test_disaggregated_greedy_matches_colocated(model_path, zmq_context, prompt_len, chunk):
    prompt = random_prompt(prompt_len, seed=prompt_len)
    expected = run_colocated(model_path, prompt, max_tokens=10)
    pair = Pair(model_path, zmq_context, prefill_overrides={"max_num_batched_tokens": chunk})
    try:
        assert pair.run(prompt, max_tokens=10) == expected
        # The first token came from the prefill side: the decode side computed tokens 1..9 only.
        assert pair.decode_tokens_computed == 9
        assert pair.decode.stats()["kv_transfer_requests"] == 1
        assert pair.decode.stats()["kv_transfer_bytes"] > 0
        for core in (pair.prefill, pair.decode):
            assert core.kv.usage() == 0.0  # nothing leaked on either side
    finally:
        pair.close()


def test_sliding_window_model_transfers_every_prompt_block(zmq_context, tmp_path):
    """Mistral with a 7-token window: the prefill side frees the blocks that slide out of the window during
    its chunked prefill, yet every prompt block arrives (each was sent the step that filled it, before
    any schedule could free it); the decode side frees them as it decodes."""
    from duoserve.kv.kv_cache_manager import NULL_BLOCK
    from tests.engine.test_sliding_window import tiny_mistral
    from tests.helpers import EngineRecorder, hf_greedy, save_tiny_model

    hf = tiny_mistral()
    path = save_tiny_model(hf, tmp_path)
    prompt = random_prompt(23, seed=23)
    pair = Pair(path, zmq_context, prefill_overrides={"max_num_batched_tokens": 4})
    recorders = [EngineRecorder(pair.prefill), EngineRecorder(pair.decode)]
    try:
        assert pair.prefill.kv.sliding_window == 7
        assert pair.run(prompt, max_tokens=10) == hf_greedy(hf, prompt, 10)
        assert pair.decode.stats()["kv_transfer_bytes"] == 6 * pair.prefill.kv_cache.spec.bytes_per_block
        prefill_tables, decode_tables = ([t for s in r.steps for t in s.tables.values()] for r in recorders)
        assert len(prefill_tables) == 6 and NULL_BLOCK in prefill_tables[-1]
        assert decode_tables[-1][:5] == [NULL_BLOCK] * 5
        for core in (pair.prefill, pair.decode):
            assert core.kv.usage() == 0.0
    finally:
        pair.close()


def test_decode_worker_speculates_on_transferred_kv(model_path, zmq_context):
    prompt = random_prompt(13, seed=4)
    expected = run_colocated(model_path, prompt, max_tokens=12)
    # The decode side's draft (the target's weights) computes the prompt itself; the target does not.
    pair = Pair(
        model_path, zmq_context, decode_overrides={"speculative": "draft", "num_speculative_tokens": 3}
    )
    try:
        assert pair.run(prompt, max_tokens=12) == expected
        stats = pair.decode.stats()
        assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"] > 0
        # Tokens 1..11 computed once each (the first not again, every draft accepted), in fewer steps.
        assert pair.decode_tokens_computed == 11
        assert stats["spec_decode_num_drafts"] < 11
        assert pair.decode.kv.usage() == 0.0
    finally:
        pair.close()


def test_decode_side_prefix_hit_is_not_transferred(model_path, zmq_context):
    prompt = random_prompt(21, seed=3)
    expected = run_colocated(model_path, prompt, max_tokens=6)
    pair = Pair(model_path, zmq_context)
    try:
        assert pair.run(prompt, max_tokens=6) == expected
        first_bytes = pair.decode.stats()["kv_transfer_bytes"]
        # Same prompt again: the decode side holds the first 5 full blocks (20 tokens) itself.
        ticket = pair.start(prompt, max_tokens=6)
        assert ticket.num_cached_tokens == 20
        pair.prefill.abort("r")
        pair.decode.abort("r")
        # A fresh prefill worker (no prefix cache of its own) computes the whole prompt again.
        fresh = Worker(model_path, zmq_context)
        pair.prefill_worker.close()
        pair.prefill_worker, pair.prefill, pair.sender = fresh, fresh.core, fresh.sender
        assert pair.run(prompt, max_tokens=6) == expected
        # Only the last, partial block moved the second time.
        assert pair.decode.stats()["kv_transfer_bytes"] - first_bytes == first_bytes / 6
    finally:
        pair.close()


def test_mismatched_layout_is_refused_by_the_prefill_side(model_path, zmq_context):
    pair = Pair(model_path, zmq_context, decode_overrides={"block_size": 8})
    try:
        with pytest.raises(ValueError, match="layout"):
            pair.start(random_prompt(10, seed=1), 4)
    finally:
        pair.close()


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
def test_quantized_kv_transfers_with_its_scales(model_path, zmq_context, kv_cache_dtype):
    """The quantized blocks cross as they are, each row with its float16 scale (one byte a value plus two
    a row), and greedy output is a colocated quantized engine's."""
    quantized = {"kv_cache_dtype": kv_cache_dtype}
    prompt = random_prompt(23, seed=3)
    core = make_core(model_path, **quantized)
    core.add_request("r", prompt, greedy(10), [])
    expected = []
    while core.has_unfinished():
        expected += [t for out in core.step() for t in out.new_token_ids]
    pair = Pair(model_path, zmq_context, quantized, {**quantized, "max_num_batched_tokens": 8})
    try:
        assert pair.run(prompt, max_tokens=10) == expected
        # 6 blocks of 4 tokens x 2 layers x (K, V) x 3 KV heads x (8 dims, one byte each, + a 2-byte scale).
        assert pair.decode.stats()["kv_transfer_bytes"] == 6 * 4 * 2 * 2 * 3 * (8 + 2)
    finally:
        pair.close()


def test_kv_of_another_scale_mode_is_refused(model_path, zmq_context):
    """A decode worker whose blocks carry another scale mode (here an older duoserve's static per-head
    scales, whose digest the layout named) names another layout: the prefill side refuses its ticket, as
    any layout mismatch, and the receiver refuses such blocks."""
    int8 = {"kv_cache_dtype": "int8"}
    pair = Pair(model_path, zmq_context, int8, int8)
    ours = pair.receive.layout
    assert ours.kv_scales == "token:float16"
    pair.receive.layout = msgspec.structs.replace(ours, kv_scales="0123456789abcdef")
    try:
        with pytest.raises(
            ValueError, match="kv_scales='0123456789abcdef'.* is not ours .*kv_scales='token:float16'"
        ):
            pair.start(random_prompt(10, seed=1), 4)
        blocks = pair.prefill.kv_cache.export_blocks([0])
        header = KVBlocks("r", [0], pair.receive.layout, blocks.numel())
        with pytest.raises(KVTransferError, match="does not match"):
            decode_blocks(header, memoryview(blocks.view(torch.uint8).numpy()), ours)
    finally:
        pair.close()
    unquantized = Pair(model_path, zmq_context, decode_overrides={"kv_cache_dtype": "int8"})
    try:
        with pytest.raises(ValueError, match="dtype='int8'.* is not ours .*dtype='float32'"):
            unquantized.start(random_prompt(10, seed=1), 4)
    finally:
        unquantized.close()


def test_blocks_for_another_requests_blocks_abort_the_request_and_free_its_blocks(model_path, zmq_context):
    """A well-formed, authenticated frame that writes outside the ticket's blocks is a bad transfer."""
    pair = Pair(model_path, zmq_context)
    try:
        ticket = pair.start(random_prompt(10, seed=2), 4)
        elsewhere = [b for b in range(pair.decode.kv.num_blocks) if b not in ticket.block_ids][:1]
        pool = pair.decode.kv_cache.data.clone()
        pair.sender.send_blocks(ticket, elsewhere, pair.prefill.kv_cache.export_blocks([0]))
        outputs = []
        wait_for(lambda: outputs.extend(pair.decode.step()) or outputs, what="the bad frame to arrive")
        assert [(o.request_id, o.finish_reason) for o in outputs] == [("r", "abort")]
        assert torch.equal(pair.decode.kv_cache.data, pool)  # not written
        assert pair.decode.kv.usage() == 0.0 and not pair.decode.has_unfinished()
        # Blocks for a request the decode side no longer waits for are dropped.
        while pair.prefill.has_unfinished():
            pair.prefill.step()
        assert pair.pump(timeout=0.2) == []
        assert pair.prefill.kv.usage() == 0.0
    finally:
        pair.close()


def test_kv_wait_times_out(model_path, zmq_context):
    worker = Worker(model_path, zmq_context)
    try:
        core = worker.core
        core.add_request("r", random_prompt(9, seed=4), greedy(4), [], KVTransferParams("receive"))
        core.step()
        assert worker.tickets and core.kv.usage() > 0
        worker.receive.timeout = -1.0
        (out,) = core.step()
        assert out.finish_reason == "abort" and core.kv.usage() == 0.0 and not core.has_unfinished()
    finally:
        worker.close()


def test_unreachable_decode_worker_aborts_the_prefill(model_path, zmq_context, monkeypatch):
    monkeypatch.setattr("duoserve.disagg.kv_transfer.SEND_TIMEOUT_MS", 100)
    pair = Pair(model_path, zmq_context)
    try:
        ticket = pair.start(random_prompt(10, seed=5), 4)
        pair.prefill.abort("r")
        gone = KVTransferParams(
            "send", ticket.__class__(**{**_fields(ticket), "address": "tcp://127.0.0.1:9"})
        )
        pair.prefill.add_request("r", random_prompt(10, seed=5), greedy(4), [], gone)
        outputs = []
        while pair.prefill.has_unfinished():
            outputs += pair.prefill.step()
        assert outputs[-1].finish_reason == "abort"
        assert all(not out.new_token_ids for out in outputs)  # the first token never went out
        assert pair.prefill.kv.usage() == 0.0
    finally:
        pair.close()


def _fields(struct) -> dict:
    return {name: getattr(struct, name) for name in struct.__struct_fields__}
