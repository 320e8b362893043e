"""Every socket between workers treats its input as untrusted.

Garbage, forged and replayed messages sent to a decode worker's KV receiver and to a router's KV
event subscriber (the real socket classes, and a real `duoserve serve --role decode` process) are
dropped and counted by reason; they never kill the process, never write into the KV pool or the
router's index, and the worker still serves afterwards. `/internal/*` refuses requests without the
cluster secret's tag.
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import msgspec
import pytest
import torch
import zmq
import zmq.asyncio

from duoserve.disagg.auth import HTTP_PURPOSE, DropCounts, Signer, http_auth_header
from duoserve.disagg.kv_events import AUTH_PURPOSE as EVENTS_PURPOSE
from duoserve.disagg.kv_events import KVEventPublisher, KVEvents, KVEventSubscriber, KVIndex
from duoserve.disagg.kv_transfer import AUTH_PURPOSE as KV_PURPOSE
from duoserve.disagg.kv_transfer import KVBlocks, KVDone, KVTicket, KVTransferParams
from duoserve.server.engine_messages import AddRequest
from duoserve.server.worker_protocol import FrameReader, encode
from tests.disagg.test_kv_transfer import Pair, greedy, run_colocated
from tests.helpers import random_prompt, wait_for
from tests.server.harness import ServerProcess, engine_flags

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SECRET = "test-cluster-secret"
_msgpack = msgspec.msgpack.Encoder()


@pytest.fixture(scope="module")
def model_path(tiny_models) -> str:
    return tiny_models("llama_gqa")[1]


def signed(frames: list[bytes], address: str, secret: str | None = SECRET, purpose: str = KV_PURPOSE):
    """A message as a sender with this secret would send it to `address`."""
    return [Signer(secret, purpose).sign(address, frames), *frames]


def forged_kv_messages(ticket: KVTicket, max_blocks: int) -> dict[str, list[list[bytes]]]:
    """Messages that must all be dropped, by the reason they are dropped for."""
    address, layout, rid = ticket.address, ticket.layout, ticket.request_id
    ids = ticket.block_ids[:2]
    nbytes = layout.nbytes(len(ids))
    payload = torch.full((nbytes,), 7, dtype=torch.uint8).numpy().tobytes()
    header = _msgpack.encode(KVBlocks(rid, ids, layout, nbytes))
    other = msgspec.structs.replace(layout, block_size=layout.block_size * 2)
    other_bytes = other.nbytes(len(ids))
    return {
        "unauthenticated": [
            signed([header, payload], address, secret=None),  # no MAC
            signed([header, payload], address, secret="a guess"),
            signed([header, payload], "tcp://10.1.2.3:4444"),  # meant for another worker
            signed([header, payload], address, purpose=EVENTS_PURPOSE),  # a KV event's tag
        ],
        "malformed": [
            [b"garbage"],  # wrong frame counts
            [b"a", b"b", b"c", b"d"],
            [b"\xc1 not msgpack", header, payload],  # a tag that is not msgpack
            signed([b"\xc1 not msgpack", payload], address),
            signed([header[:-3], payload], address),  # truncated
            signed([_msgpack.encode(["valid", "msgpack", 1]), payload], address),  # of the wrong type
            signed([header, payload[:-1]], address),  # payload size != header's
            signed([_msgpack.encode(KVBlocks(rid, ids, layout, nbytes - 1)), payload[:-1]], address),
            signed([header], address),  # blocks without their bytes
            signed([_msgpack.encode(KVDone(rid, 1, 2)), payload], address),  # done with bytes
        ],
        "oversized": [
            signed([_msgpack.encode(KVBlocks(rid, list(range(max_blocks + 1)), layout, 1)), b"x"], address),
            signed([b"\x00" * (1024 + 9 * max_blocks + 1), payload], address),
            [b"\x00" * 1000, header, payload],  # a tag far larger than any
        ],
        "foreign": [
            signed([_msgpack.encode(KVBlocks("someone-else", ids, layout, nbytes)), payload], address),
            signed([_msgpack.encode(KVBlocks(rid, ids, other, other_bytes)), b"\x07" * other_bytes], address),
            signed([_msgpack.encode(KVDone("someone-else", 1, 2))], address),
        ],
    }


def test_forged_kv_frames_are_dropped_counted_and_never_written(model_path, zmq_context):
    prompt = random_prompt(23, seed=5)
    expected = run_colocated(model_path, prompt, max_tokens=8)
    pair = Pair(model_path, zmq_context, secret=SECRET)
    rogue = zmq_context.socket(zmq.PUSH)
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        ticket = pair.start(prompt, max_tokens=8)
        rogue.connect(ticket.address)
        pool = pair.decode.kv_cache.data.clone()
        forged = forged_kv_messages(ticket, pair.receiver.max_blocks)
        for messages in forged.values():
            for frames in messages:
                rogue.send_multipart(frames)
        total = sum(len(m) for m in forged.values())
        accepted = []

        def all_dropped() -> bool:
            accepted.extend(pair.receiver.receive(pair.receive.expects))
            return sum(pair.receiver.drops.counts.values()) >= total

        wait_for(all_dropped, what="every forged message to be dropped")
        assert accepted == []
        assert pair.receiver.drops.counts == {
            **{r: len(m) for r, m in forged.items()},
            "replayed": 0,
            "invalid": 0,
        }
        assert torch.equal(pair.decode.kv_cache.data, pool)  # not a byte written
        assert pair.receive.expects(ticket.request_id)  # the request still waits for its real KV

        # The real transfer, every message of it delivered twice: the copies are dropped as replays.
        while pair.prefill.has_unfinished():
            pair.prefill.step()
        real = []
        while not real or len(real[-1]) != 2:  # up to the KVDone (tag + header)
            if pair.receiver.socket.poll(10_000):
                real.append(pair.receiver.socket.recv_multipart())
        for frames in real:
            rogue.send_multipart(frames)
            rogue.send_multipart(frames)
        tokens: list[int] = []
        wait_for(lambda: _deliver(pair, tokens, len(real)), what="the replayed transfer to be delivered")
        while pair.decode.has_unfinished():
            for out in pair.decode.step():
                tokens += out.new_token_ids
        assert [expected[0], *tokens] == expected  # the first token came from the prefill side
        assert pair.decode.kv.usage() == 0.0
    finally:
        rogue.close()
        pair.close()


def _deliver(pair: Pair, tokens: list[int], num_replays: int) -> bool:
    """Step the decode core (its connector takes in what arrived); True once it has every message
    (and every replay)."""
    tokens += pair.step_decode()
    return not pair.decode.scheduler.loading and pair.receiver.drops.counts["replayed"] == num_replays


def test_forged_kv_events_never_reach_the_index():
    async def run() -> tuple[DropCounts, KVIndex]:
        context, async_context = zmq.Context(), zmq.asyncio.Context()
        publisher = KVEventPublisher(context, "127.0.0.1", SECRET)
        rogue = context.socket(zmq.XPUB)  # an XPUB tells when the subscriber has joined
        rogue.setsockopt(zmq.LINGER, 0)
        rogue_port = rogue.bind_to_random_port("tcp://127.0.0.1")
        drops, index = DropCounts(EVENTS_PURPOSE), KVIndex()
        subscriber = KVEventSubscriber(async_context, publisher.address, drops, SECRET)
        subscriber.socket.connect(f"tcp://127.0.0.1:{rogue_port}")  # the forger reaches the same socket

        async def listen() -> None:
            while True:
                index.apply("worker", await subscriber.receive())

        listener = asyncio.create_task(listen())
        try:
            assert rogue.poll(10_000) and rogue.recv() == b"\x01"  # subscribed
            events = _msgpack.encode(KVEvents(stored=[666]))
            address = publisher.address
            forged = {
                "malformed": [
                    [events],
                    [b"a", b"b", b"c"],
                    signed([b"\xc1"], address, purpose=EVENTS_PURPOSE),
                    signed([_msgpack.encode({"stored": "all"})], address, purpose=EVENTS_PURPOSE),
                ],
                "unauthenticated": [
                    signed([events], address, secret=None, purpose=EVENTS_PURPOSE),
                    signed([events], address, secret="a guess", purpose=EVENTS_PURPOSE),
                    signed([events], f"tcp://127.0.0.1:{rogue_port}", purpose=EVENTS_PURPOSE),
                    signed([events], address),  # a KV transfer's tag
                ],
            }
            # A valid message (as the worker would sign it), then the same again: a replay.
            valid = _msgpack.encode(KVEvents(stored=[777]))
            message = [publisher.signer.sign(address, [valid]), valid]
            forged["replayed"] = [message]
            for frames in [m for ms in forged.values() for m in ms] + [message]:
                rogue.send_multipart(frames)
            total = sum(len(m) for m in forged.values())
            while sum(drops.counts.values()) < total:
                await asyncio.sleep(0.01)
            # The real publisher still gets through (publish until the subscription has reached it).
            while index.overlap("worker", [888]) == 0:
                publisher.publish([(True, 888)])
                await asyncio.sleep(0.01)
            expected = {r: len(forged.get(r, [])) for r in drops.counts}
            assert drops.counts == expected
            return index
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            subscriber.close()
            rogue.close()
            publisher.close()
            context.term()
            async_context.term()

    index = asyncio.run(asyncio.wait_for(run(), 30))
    assert index.overlap("worker", [777]) == 1 and index.overlap("worker", [888]) == 1
    assert index.overlap("worker", [666]) == 0  # no forged event was applied


# ---------------------------------------------------------------------- a real worker process


@pytest.fixture(scope="module")
def worker(model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("worker-log") / "worker.log"
    args = [*engine_flags(), "--role", "decode", "--cluster-secret", SECRET]
    server = ServerProcess(model_dir, log_path, args).start()
    yield server
    server.stop()


def internal(worker: ServerProcess, method: str, path: str, body: bytes = b"", secret: str | None = SECRET):
    headers = http_auth_header(Signer(secret, HTTP_PURPOSE), method, path, body)
    return httpx.request(method, f"{worker.base_url}{path}", content=body, headers=headers, timeout=10)


def dropped(worker: ServerProcess, socket_name: str, reason: str) -> float:
    key = f'duoserve:untrusted_messages_dropped_total{{reason="{reason}",socket="{socket_name}"}}'
    return worker.metrics()[key]


def test_internal_routes_need_the_secret(worker):
    assert internal(worker, "GET", "/internal/info").status_code == 200
    for response in (
        httpx.get(f"{worker.base_url}/internal/info", timeout=10),
        httpx.post(f"{worker.base_url}/internal/generate", content=b"\xc1 garbage", timeout=10),
        httpx.post(f"{worker.base_url}/internal/abort", content=b"{}", timeout=10),
        internal(worker, "GET", "/internal/info", secret="a guess"),
        internal(worker, "POST", "/internal/abort", encode(AddRequest("x", [], [], [], [])), secret=None),
    ):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    # A captured request cannot be sent again.
    headers = http_auth_header(Signer(SECRET, HTTP_PURPOSE), "GET", "/internal/info", b"")
    assert httpx.get(f"{worker.base_url}/internal/info", headers=headers, timeout=10).status_code == 200
    assert httpx.get(f"{worker.base_url}/internal/info", headers=headers, timeout=10).status_code == 401


def complete(worker: ServerProcess, prompt: list[int]) -> list[int]:
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    body["return_tokens_as_token_ids"], body["logprobs"] = True, 0
    response = httpx.post(f"{worker.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return [int(t.removeprefix("token_id:")) for t in response.json()["choices"][0]["logprobs"]["tokens"]]


def test_garbage_on_every_port_and_the_worker_still_serves(worker, zmq_context):
    prompt = random_prompt(11, seed=42)
    before = complete(worker, prompt)
    info = internal(worker, "GET", "/internal/info").json()
    kv_port = int(info["kv_address"].rsplit(":", 1)[1])
    events_port = int(info["events_address"].rsplit(":", 1)[1])
    # Not even ZeroMQ: raw bytes on both TCP ports.
    for port in (kv_port, events_port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"\xff" * 64 + b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 40)
    malformed_before = dropped(worker, "kv_transfer", "malformed")
    garbage = [
        [b"\xc1 not msgpack"],
        [b"\xc1", b"\xc1", b"\xc1"],
        [b"", b""],
        [b"a"] * 7,
        signed([_msgpack.encode(["valid", "msgpack"]), b"x"], info["kv_address"]),
        signed([b"\x82\xa3typ"], info["kv_address"]),  # truncated msgpack
    ]
    push = zmq_context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(info["kv_address"])
    for frames in garbage:
        push.send_multipart(frames)
    push.send(b"\x00" * (64 * 2**20))  # past MAXMSGSIZE: ZeroMQ drops the connection, nothing is read
    # A subscriber may only send subscriptions (which a PUB socket ignores unless they are one): garbage,
    # and a subscription past the publisher's MAXMSGSIZE (it drops that subscriber).
    sub = zmq_context.socket(zmq.XSUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(info["events_address"])
    sub.send(b"\xc1 not a subscription")
    sub.send(b"\x01" + b"\x00" * 4096)
    wait_for(
        lambda: dropped(worker, "kv_transfer", "malformed") - malformed_before == len(garbage),
        what="the KV receiver to count the garbage",
    )
    push.close()
    sub.close()
    assert complete(worker, prompt) == before
    assert worker.process.poll() is None


def test_forged_kv_for_a_pending_request_is_dropped(worker, zmq_context):
    """Acting as a router: the worker waits for a request's KV; forged frames for it are dropped."""
    prompt = random_prompt(14, seed=9)
    add = AddRequest("pending", ["pending"], prompt, [greedy(4)], [], kv_transfer=KVTransferParams("receive"))
    body = encode(add)
    headers = http_auth_header(Signer(SECRET, HTTP_PURPOSE), "POST", "/internal/generate", body)
    before = {r: dropped(worker, "kv_transfer", r) for r in ("unauthenticated", "malformed", "foreign")}
    with httpx.stream(
        "POST", f"{worker.base_url}/internal/generate", content=body, headers=headers, timeout=30
    ) as response:
        assert response.status_code == 200
        reader, ticket = FrameReader(), None
        chunks = response.iter_raw()
        while ticket is None:
            for frame in reader.feed(next(chunks)):
                ticket = frame.tickets[0] if frame.tickets else ticket
        usage = worker.metrics()["duoserve:kv_cache_usage_perc"]
        assert usage > 0
        forged = forged_kv_messages(ticket, max_blocks=64)
        push = zmq_context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(ticket.address)
        for reason in before:
            for frames in forged[reason]:
                push.send_multipart(frames)
        wait_for(
            lambda: all(dropped(worker, "kv_transfer", r) - before[r] == len(forged[r]) for r in before),
            what="every forged frame to be counted",
        )
        push.close()
        # Still waiting, its blocks untouched by any of it (the metric is the engine's).
        assert worker.metrics()["duoserve:kv_cache_usage_perc"] == usage
    # Closing the stream aborts the request and frees its blocks.
    wait_for(lambda: worker.metrics()["duoserve:kv_cache_usage_perc"] == 0, what="the blocks to be freed")
