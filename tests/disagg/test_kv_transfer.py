"""KV transfer between two engine cores in this process, over real ZeroMQ TCP sockets.

A prefill core computes the prompt and pushes its blocks into the blocks a decode core allocated; the
decode core continues from the prefill core's first token. Greedy outputs must equal one colocated
core's, the decode core must never compute the first token again, and no block may leak.
"""

from __future__ import annotations

import time

import pytest
import torch
import zmq

from duoserve.config import EngineConfig
from duoserve.disagg.kv_transfer import KVBlocks, KVReceiver, KVSender, KVTransferParams
from duoserve.engine.core import EngineCore
from duoserve.models.loader import load_model
from duoserve.sampling_params import SamplingParams
from tests.helpers import random_prompt

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ARGS = dict(num_kv_blocks=64, block_size=4, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def model_path(tiny_models) -> str:
    return tiny_models("llama_gqa")[1]


def make_core(path: str, **overrides) -> EngineCore:
    config = EngineConfig(model=path, **{**ARGS, **overrides})
    return EngineCore(config, load_model(path, torch.float32))


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
    """A prefill core and a decode core joined by a KV sender/receiver pair."""

    def __init__(
        self,
        path: str,
        context: zmq.Context,
        prefill_overrides=None,
        decode_overrides=None,
        secret: str | None = None,
    ) -> None:
        self.prefill = make_core(path, **(prefill_overrides or {}))
        self.decode = make_core(path, **(decode_overrides or {}))
        self.sender = KVSender(context, secret)
        max_blocks = self.decode.kv.num_blocks
        self.receiver = KVReceiver(context, "127.0.0.1", self.decode.kv_layout, max_blocks, secret)
        self.prefill.kv_sender = self.sender
        self.decode_tokens_computed = 0

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()

    def start(self, prompt: list[int], max_tokens: int):
        """Leg 1 and 2: the decode side takes the request and hands out a ticket; the prefill side
        takes it with that ticket."""
        self.decode.add_request("r", prompt, greedy(max_tokens), [], KVTransferParams("receive"))
        (ticket,) = self.decode.issue_tickets(self.receiver.address)
        self.prefill.add_request("r", prompt, greedy(max_tokens), [], KVTransferParams("send", ticket))
        return ticket

    def run(self, prompt: list[int], max_tokens: int) -> list[int]:
        self.start(prompt, max_tokens)
        tokens = []
        while self.prefill.has_unfinished():
            for out in self.prefill.step():
                tokens += out.new_token_ids
        tokens += self.pump()
        while self.decode.has_unfinished():
            outputs = self.decode.step()
            self.decode_tokens_computed += self.decode.last_step.num_scheduled_tokens
            for out in outputs:
                tokens += out.new_token_ids
        return tokens

    def pump(self, timeout: float = 5.0) -> list[int]:
        """Deliver what the prefill side sent until the decode side starts decoding (or gives up)."""
        deadline = time.monotonic() + timeout
        tokens = []
        while self.decode.awaiting_kv and time.monotonic() < deadline:
            for message, payload in self.receiver.receive(self.decode.expects_kv):
                out = self.decode.receive_kv(message, payload)
                if out is not None:
                    tokens += out.new_token_ids
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
    """Mistral with a 7-token window: the prefill side keeps (and sends) every prompt block although most
    slid out of the window during its chunked prefill; the decode side frees them as it decodes."""
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
        assert len(prefill_tables) == 6 and not any(NULL_BLOCK in t for t in prefill_tables)
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
        pair2 = Pair(model_path, zmq_context)
        pair2.decode = pair.decode
        assert pair2.run(prompt, max_tokens=6) == expected
        # Only the last, partial block moved the second time.
        assert pair.decode.stats()["kv_transfer_bytes"] - first_bytes == first_bytes / 6
        pair2.close()
    finally:
        pair.close()


def test_mismatched_layout_is_refused_by_the_prefill_side(model_path, zmq_context):
    pair = Pair(model_path, zmq_context, decode_overrides={"block_size": 8})
    try:
        with pytest.raises(ValueError, match="layout"):
            pair.start(random_prompt(10, seed=1), 4)
    finally:
        pair.close()


def test_corrupt_frame_aborts_the_request_and_frees_its_blocks(model_path, zmq_context):
    pair = Pair(model_path, zmq_context)
    try:
        ticket = pair.start(random_prompt(10, seed=2), 4)
        bad = KVBlocks(ticket.request_id, ticket.block_ids[:1], ticket.layout, nbytes=12)
        out = pair.decode.receive_kv(bad, memoryview(b"x" * 12))
        assert out is not None and out.finish_reason == "abort"
        assert pair.decode.kv.usage() == 0.0 and not pair.decode.has_unfinished()
        # Blocks for a request the decode side no longer waits for are dropped.
        while pair.prefill.has_unfinished():
            pair.prefill.step()
        assert pair.pump(timeout=0.2) == []
        assert pair.prefill.kv.usage() == 0.0
    finally:
        pair.close()


def test_kv_wait_times_out(model_path):
    core = make_core(model_path)
    core.add_request("r", random_prompt(9, seed=4), greedy(4), [], KVTransferParams("receive"))
    core.issue_tickets("tcp://127.0.0.1:1")
    assert core.kv.usage() > 0
    (out,) = core.expire_kv_waits(timeout=-1.0)
    assert out.finish_reason == "abort" and core.kv.usage() == 0.0


def test_unreachable_decode_worker_aborts_the_prefill(model_path, zmq_context, monkeypatch):
    monkeypatch.setattr("duoserve.disagg.kv_transfer.SEND_TIMEOUT_MS", 100)
    pair = Pair(model_path, zmq_context)
    try:
        ticket = pair.start(random_prompt(10, seed=5), 4)
        pair.receiver.close()
        pair.prefill.abort("r")
        gone = KVTransferParams(
            "send", ticket.__class__(**{**_fields(ticket), "address": "tcp://127.0.0.1:9"})
        )
        pair.prefill.add_request("r", random_prompt(10, seed=5), greedy(4), [], gone)
        outputs = []
        while pair.prefill.has_unfinished():
            outputs += pair.prefill.step()
        assert outputs[-1].finish_reason == "abort"
        assert pair.prefill.kv.usage() == 0.0
    finally:
        pair.sender.close()


def _fields(struct) -> dict:
    return {name: getattr(struct, name) for name in struct.__struct_fields__}
