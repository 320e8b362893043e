"""The API process's side of the engine: spawns the engine core process and talks to it over ZeroMQ.

It owns the tokenizer and the OutputProcessor (text, stop strings, n > 1 fan-in), so the engine only
ever sees token ids. One background task receives the engine's output batches and routes each
request's outputs to its own asyncio queue; another sends requests and aborts in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from duoserve.config import EngineConfig
from duoserve.disagg.endpoints import LOOPBACK, KVEndpoints
from duoserve.engine.core import CoreOutput
from duoserve.engine.engine_env import engine_environment
from duoserve.engine.llm_engine import child_params
from duoserve.engine.output_processor import OutputProcessor
from duoserve.engine.step_observer import MakeStepObserver
from duoserve.lora.request import LoRARequest
from duoserve.models.loader import default_model_path
from duoserve.outputs import RequestOutput
from duoserve.sampling_params import SamplingParams
from duoserve.server.engine_messages import (
    Abort,
    AddRequest,
    EngineFailed,
    EngineOutputs,
    EngineRequest,
    LoadLoRA,
    Ready,
    Shutdown,
    UnloadLoRA,
    message_decoder,
    request_encoder,
)
from duoserve.server.engine_process import run_engine_process
from duoserve.server.metrics import ServerMetrics
from duoserve.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger("duoserve.server")

_ENGINE_STOP_SECONDS = 10.0


def _env_note(added: dict[str, str]) -> str:
    return " with " + " ".join(f"{k}={v}" for k, v in added.items()) if added else ""


class EngineUnavailable(Exception):
    """No request can be served now: the model is loading, the server is draining, or the engine died."""


class RequestRejected(Exception):
    """The engine refused a request: 400 (invalid for this engine) or 429 (queue full)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _SeqTiming:
    """What the metrics need of one sequence, as its outputs arrive."""

    first_token_time: float | None = None  # API clock
    last_token_time: float | None = None
    first_engine_time: float | None = None  # engine clock (batch timestamps)
    last_engine_time: float | None = None
    prefill_time: float | None = None
    num_tokens: int = 0
    finished: bool = False


@dataclass
class RequestStream:
    request_id: str
    seq_ids: list[str]
    num_prompt_tokens: int
    arrival_time: float
    accepted: asyncio.Future
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    timings: list[_SeqTiming] = field(default_factory=list)
    admitted: bool = False  # the engine accepted it
    finished: bool = False


@dataclass
class RawStream:
    """A router's request: its queue gets EngineOutputs (its share of each batch), then None at the
    end, or an exception if the engine went away."""

    request_id: str
    unfinished: set[str]  # its sequence ids not finished yet
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.seq_ids = list(self.unfinished)


@dataclass
class ModelInfo:
    """What the engine process told us about the loaded model."""

    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int


class EngineClient:
    def __init__(
        self,
        config: EngineConfig,
        served_model_name: str | None = None,
        max_queued_requests: int | None = None,
        log_level: str = "INFO",
        kv: KVEndpoints = LOOPBACK,
        cluster_secret: str | None = None,
        make_step_observer: MakeStepObserver | None = None,
    ) -> None:
        """`make_step_observer`: what the engine process's core calls each step (--step-trace's writer,
        built by the caller: the server imports no planner); it is pickled to the engine process."""
        self.config = config
        self.make_step_observer = make_step_observer
        self.kv = kv  # where the engine binds its KV receiver and KV event sockets, and their address
        self.cluster_secret = cluster_secret  # authenticates what goes over those sockets
        try:
            self.model_path = config.model or default_model_path()
        except FileNotFoundError as err:
            raise ValueError(f"no model given and the default one is not installed: {err}") from err
        self.served_model_name = served_model_name or config.model or os.path.basename(self.model_path)
        self.max_queued_requests = max_queued_requests
        self.log_level = log_level
        self.tokenizer: Tokenizer | None = None
        self.processor: OutputProcessor | None = None
        self.metrics: ServerMetrics | None = None
        self.info: ModelInfo | None = None
        self.engine_info: Ready | None = None
        self.eos_token_ids: list[int] = []
        self.streams: dict[str, RequestStream] = {}
        # LoRA adapters by name (from the engine at start, then runtime loads), and the runtime
        # loads/unloads waiting for the engine's answer.
        self.loras: dict[str, LoRARequest] = {}
        self._lora_updates: dict[str, asyncio.Future] = {}
        # Requests of a router: token ids in, the engine's own outputs out (no text, no metrics here).
        self.raw_streams: dict[str, RawStream] = {}
        self._raw_seqs: dict[str, RawStream] = {}
        self._seqs: dict[str, tuple[RequestStream, _SeqTiming]] = {}  # core sequence id -> its request
        self.ready = False
        self.draining = False
        self.dead: str | None = None  # why the engine died
        self.on_engine_death: Callable[[str], None] | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._context: zmq.asyncio.Context | None = None
        self._to_engine: zmq.asyncio.Socket | None = None
        self._from_engine: zmq.asyncio.Socket | None = None
        self._socket_dir: str | None = None
        self._outgoing: asyncio.Queue[bytes] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the engine (and load the tokenizer meanwhile); ready once the model is loaded."""
        ready = await self._start_engine()
        self.engine_info = ready
        self.processor = OutputProcessor(self.tokenizer)
        self.eos_token_ids = list(dict.fromkeys(self.tokenizer.eos_token_ids + ready.eos_token_ids))
        self.loras = {lora.lora_name: lora for lora in ready.lora_modules}
        self.info = ModelInfo(
            max_model_len=ready.max_model_len,
            vocab_size=ready.vocab_size,
            num_kv_blocks=ready.num_kv_blocks,
            block_size=ready.block_size,
        )
        self.metrics = ServerMetrics(self.served_model_name, ready.max_model_len)
        self.ready = True
        logger.info(
            "engine ready: model %s, max_model_len %d, %d KV blocks of %d tokens",
            self.served_model_name,
            ready.max_model_len,
            ready.num_kv_blocks,
            ready.block_size,
        )

    async def _start_engine(self) -> Ready:
        """Spawn the engine process and its socket tasks; returns its Ready message."""
        self._socket_dir = tempfile.mkdtemp(prefix="duoserve-")
        to_engine = f"ipc://{self._socket_dir}/requests"
        from_engine = f"ipc://{self._socket_dir}/outputs"
        self._context = zmq.asyncio.Context()
        self._to_engine = self._context.socket(zmq.PUSH)
        self._from_engine = self._context.socket(zmq.PULL)
        for sock in (self._to_engine, self._from_engine):
            sock.setsockopt(zmq.LINGER, 0)
        self._to_engine.bind(to_engine)
        self._from_engine.bind(from_engine)
        # spawn, not fork: the engine must not inherit this process's event loop, threads and sockets.
        self._process = multiprocessing.get_context("spawn").Process(
            target=run_engine_process,
            args=(
                self.config,
                to_engine,
                from_engine,
                self.max_queued_requests,
                self.log_level,
                self.kv,
                self.cluster_secret,
                self.make_step_observer,
            ),
            name="duoserve-engine",
            daemon=True,
        )
        with engine_environment() as added:  # its OpenMP threads sleep, not spin, when they wait
            self._process.start()
        logger.info("engine process %d started%s", self._process.pid, _env_note(added))
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model_path)
        ready = await self._wait_ready()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._receive_loop(), name="engine-receive"),
            loop.create_task(self._send_loop(), name="engine-send"),
            loop.create_task(self._watch_process(), name="engine-watch"),
        ]
        return ready

    async def _wait_ready(self) -> Ready:
        while True:
            if await self._from_engine.poll(500):
                message = self._decode(await self._from_engine.recv())
                if isinstance(message, Ready):
                    return message
                if isinstance(message, EngineFailed):
                    raise RuntimeError(f"the engine failed to start: {message.message}")
            elif not self._process.is_alive():
                raise RuntimeError(
                    f"the engine process exited with code {self._process.exitcode} while loading"
                )

    async def drain(self, timeout: float) -> None:
        """Stop admitting requests and wait up to `timeout` seconds for the in-flight ones to finish."""
        self.draining = True
        deadline = time.monotonic() + timeout
        if self.streams or self.raw_streams:
            count = len(self.streams) + len(self.raw_streams)
            logger.info("draining %d in-flight request(s) (up to %.0fs)", count, timeout)
        while (self.streams or self.raw_streams) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self.raw_streams):
            self._end_raw(request_id, EngineUnavailable("the server shut down before the request finished"))
        for request_id in list(self.streams):
            logger.warning("request %s still running at shutdown: aborted", request_id)
            self._end_stream(
                request_id, EngineUnavailable("the server shut down before the request finished")
            )

    async def shutdown(self) -> None:
        """Abort what is left, stop the engine process and release the sockets."""
        self._closing = True
        self.ready = False
        for request_id in list(self.raw_streams):
            self._end_raw(request_id, EngineUnavailable("the server is shutting down"))
        for request_id in list(self.streams):
            self._end_stream(request_id, EngineUnavailable("the server is shutting down"))
        await self._stop_engine()

    async def _stop_engine(self) -> None:
        if self._process is not None and self._process.is_alive() and self.info is None:
            self._process.kill()  # still loading the model: it would not read a Shutdown message yet
            await asyncio.to_thread(self._process.join, _ENGINE_STOP_SECONDS)
        if self._process is not None and self._process.is_alive() and self._to_engine is not None:
            with contextlib.suppress(zmq.ZMQError):
                await self._to_engine.send(request_encoder.encode(Shutdown()), flags=zmq.NOBLOCK)
            await asyncio.to_thread(self._process.join, _ENGINE_STOP_SECONDS)
            if self._process.is_alive():
                logger.warning("the engine process did not stop in time; killing it")
                self._process.kill()
                await asyncio.to_thread(self._process.join, _ENGINE_STOP_SECONDS)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._context is not None:
            for sock in (self._to_engine, self._from_engine):
                sock.close()
            self._context.term()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # ---------------------------------------------------------------- requests

    def check_available(self) -> None:
        if self.dead is not None:
            raise EngineUnavailable(f"the engine is not running: {self.dead}")
        if self.draining or self._closing:
            raise EngineUnavailable("the server is shutting down")
        if not self.ready:
            raise EngineUnavailable("the model is still loading")

    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """Send a request to the engine and wait until it is accepted (RequestRejected if not)."""
        self.check_available()
        seq_params = child_params(params)
        seq_ids = self.processor.add(request_id, prompt, prompt_token_ids, seq_params)
        try:
            self._send(
                AddRequest(
                    request_id,
                    seq_ids,
                    prompt_token_ids,
                    seq_params,
                    self.eos_token_ids,
                    lora_request=lora_request,
                )
            )
        except OverflowError as err:  # msgpack integers stop at 64 bits, and so does every engine limit
            self.processor.remove(request_id)
            raise RequestRejected(400, f"a number in the request is out of range: {err}") from err
        stream = RequestStream(
            request_id=request_id,
            seq_ids=seq_ids,
            num_prompt_tokens=len(prompt_token_ids),
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            accepted=asyncio.get_running_loop().create_future(),
            timings=[_SeqTiming() for _ in seq_ids],
        )
        self.streams[request_id] = stream
        self._seqs.update(zip(seq_ids, ((stream, t) for t in stream.timings), strict=True))
        try:
            await stream.accepted
        except RequestRejected:
            self._forget(request_id)
            raise
        except BaseException:
            # Cancelled (the client left) or the engine died: the engine may still have queued it.
            self.abort(request_id)
            raise
        stream.admitted = True
        self.metrics.request_params_n.observe(params.n)
        if params.max_tokens is not None:
            self.metrics.request_params_max_tokens.observe(params.max_tokens)
        return stream

    # ---------------------------------------------------------------- LoRA adapters

    def lora_adapters(self) -> dict[str, LoRARequest]:
        """The adapters a request's `model` may name."""
        return self.loras

    async def load_lora(self, name: str, path: str) -> LoRARequest:
        """Load an adapter in the engine (RequestRejected: 400 if it cannot be loaded)."""
        if name in self.loras or name == self.served_model_name:
            raise RequestRejected(400, f"the LoRA adapter {name!r} has already been loaded")
        lora = LoRARequest(name, max((r.lora_int_id for r in self.loras.values()), default=0) + 1, path)
        await self._update_loras(LoadLoRA(f"lora-load-{uuid.uuid4().hex}", lora))
        self.loras[name] = lora
        return lora

    async def unload_lora(self, name: str) -> None:
        """Unload an adapter (RequestRejected: 404 if none has that name); requests using it finish."""
        if name not in self.loras:
            raise RequestRejected(404, f"the LoRA adapter {name!r} cannot be found")
        await self._update_loras(UnloadLoRA(f"lora-unload-{uuid.uuid4().hex}", name))
        self.loras.pop(name, None)

    async def _update_loras(self, message: LoadLoRA | UnloadLoRA) -> None:
        self.check_available()
        future = asyncio.get_running_loop().create_future()
        self._lora_updates[message.request_id] = future
        self._send(message)
        try:
            await future
        finally:
            self._lora_updates.pop(message.request_id, None)

    async def outputs(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """The request's outputs until it finishes; leaving early (client gone) aborts it."""
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                # Outputs are cumulative, so a consumer that fell behind only needs the latest one.
                while isinstance(item, RequestOutput) and not stream.queue.empty():
                    item = stream.queue.get_nowait()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request now: its sequences leave the engine and their KV blocks are freed."""
        if request_id not in self.streams:
            return
        self._end_stream(request_id, None)

    def _end_stream(self, request_id: str, error: Exception | None) -> None:
        stream = self.streams.get(request_id)
        if stream is None:
            return
        unfinished = self.processor.remove(request_id)
        if unfinished:
            self._send(Abort(unfinished))
        now = time.monotonic()
        if stream.admitted:
            for timing in stream.timings:
                if not timing.finished:
                    self._finish_seq(stream, timing, "abort", now)
            self._log_request(stream, now, ["abort"])
        self._fail_stream(stream, error)
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self.processor.remove(request_id)
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            for seq_id in stream.seq_ids:
                self._seqs.pop(seq_id, None)

    @staticmethod
    def _fail_stream(stream: RequestStream, error: Exception | None) -> None:
        """Wake whoever waits on the stream: with `error`, or a cancellation when there is none."""
        if not stream.accepted.done():
            if error is None:
                stream.accepted.cancel()
            else:
                stream.accepted.set_exception(error)
                stream.accepted.exception()  # mark retrieved: nobody may be awaiting it any more
        elif not stream.finished and error is not None:
            stream.queue.put_nowait(error)

    def _send(self, message: EngineRequest) -> None:
        self._outgoing.put_nowait(request_encoder.encode(message))

    # ---------------------------------------------------------------- raw requests (from a router)

    def add_raw(self, message: AddRequest) -> RawStream:
        """Queue a router's request as it is; its stream gets the engine's batches for it."""
        self.check_available()
        if message.request_id in self.streams or message.request_id in self.raw_streams:
            raise RequestRejected(400, f"request id {message.request_id!r} is already in use")
        stream = RawStream(message.request_id, set(message.seq_ids))
        self.raw_streams[message.request_id] = stream
        self._raw_seqs.update(dict.fromkeys(message.seq_ids, stream))
        self._send(message)
        return stream

    def abort_raw(self, request_id: str, seq_ids: list[str] | None = None) -> None:
        """Abort some sequences of a raw request (all of them by default)."""
        stream = self.raw_streams.get(request_id)
        if stream is None:
            return
        seq_ids = [s for s in (seq_ids or stream.unfinished) if s in stream.unfinished]
        if seq_ids:
            self._send(Abort(seq_ids))
            stream.unfinished.difference_update(seq_ids)
        if not stream.unfinished:
            self._forget_raw(request_id)

    def _end_raw(self, request_id: str, error: Exception) -> None:
        stream = self.raw_streams.get(request_id)
        if stream is not None:
            self.abort_raw(request_id)
            stream.queue.put_nowait(error)

    def _forget_raw(self, request_id: str) -> None:
        stream = self.raw_streams.pop(request_id, None)
        if stream is not None:
            for seq_id in stream.seq_ids:
                self._raw_seqs.pop(seq_id, None)

    def _split_raw(self, batch: EngineOutputs) -> EngineOutputs:
        """Hand each raw stream its share of the batch; returns the rest, for the API's own requests."""
        if not self.raw_streams:
            return batch
        shares: dict[str, EngineOutputs] = {}

        def share(stream: RawStream) -> EngineOutputs:
            if stream.request_id not in shares:
                shares[stream.request_id] = EngineOutputs(timestamp=batch.timestamp)
            return shares[stream.request_id]

        rest = EngineOutputs(timestamp=batch.timestamp, step_tokens=batch.step_tokens, stats=batch.stats)
        for request_id in batch.accepted:
            target = share(self.raw_streams[request_id]) if request_id in self.raw_streams else rest
            target.accepted.append(request_id)
        for error in batch.errors:
            stream = self.raw_streams.get(error.request_id)
            if stream is not None:
                share(stream).errors.append(error)
                stream.unfinished.clear()  # refused: nothing more will come
            else:
                rest.errors.append(error)
        for name in ("outputs", "starts", "tickets"):
            for item in getattr(batch, name):
                seq_id = item.seq_id if name == "starts" else item.request_id
                stream = self._raw_seqs.get(seq_id)
                getattr(share(stream) if stream is not None else rest, name).append(item)
        for request_id, part in shares.items():
            stream = self.raw_streams[request_id]
            for out in part.outputs:
                if out.finished:
                    stream.unfinished.discard(out.request_id)
            stream.queue.put_nowait(part)
            if not stream.unfinished:
                stream.queue.put_nowait(None)  # the end
                self._forget_raw(request_id)
        return rest

    # ---------------------------------------------------------------- background tasks

    async def _send_loop(self) -> None:
        while True:
            await self._to_engine.send(await self._outgoing.get())

    async def _receive_loop(self) -> None:
        while True:
            raw = await self._from_engine.recv(copy=False)
            message = self._decode(raw.buffer)
            if isinstance(message, EngineFailed):
                self._engine_died(message.message)
                return
            if isinstance(message, EngineOutputs):
                try:
                    self._on_outputs(message)
                except Exception:
                    logger.exception("failed to process engine outputs")

    def _decode(self, data: memoryview) -> Ready | EngineFailed | EngineOutputs | None:
        """The engine's message, or None (dropped and counted as socket "api_ipc") when it is not one:
        a bad message must not end the task that every request's outputs come through."""
        try:
            return message_decoder.decode(data)
        except msgspec.DecodeError as err:  # ValidationError is a DecodeError too
            reason = "invalid" if isinstance(err, msgspec.ValidationError) else "malformed"
            logger.error("dropped a %s message from the engine (%d bytes): %s", reason, len(data), err)
            if self.metrics is not None:
                self.metrics.untrusted_dropped("api_ipc", reason)
            return None

    async def _watch_process(self) -> None:
        while self._process.is_alive() or self._closing:
            await asyncio.sleep(0.5)
        self._engine_died(f"the engine process exited with code {self._process.exitcode}")

    def _engine_died(self, reason: str) -> None:
        if self.dead is not None or self._closing:
            return
        logger.error("engine died: %s", reason)
        self.dead = reason
        self.ready = False
        for request_id in list(self.raw_streams):
            self._end_raw(request_id, EngineUnavailable(f"the engine died: {reason}"))
        for request_id in list(self.streams):
            self._fail_stream(self.streams[request_id], EngineUnavailable(f"the engine died: {reason}"))
            self._forget(request_id)
        for update in self._lora_updates.values():
            if not update.done():
                update.set_exception(EngineUnavailable(f"the engine died: {reason}"))
        if self.on_engine_death is not None:
            self.on_engine_death(reason)

    # ---------------------------------------------------------------- outputs

    def _on_outputs(self, batch: EngineOutputs) -> None:
        metrics = self.metrics
        if batch.stats:
            metrics.set_engine_stats(batch.stats)
        batch = self._split_raw(batch)
        if batch.step_tokens:
            metrics.iteration_tokens.observe(batch.step_tokens)
        for request_id in batch.accepted:
            stream = self.streams.get(request_id)
            if stream is not None and not stream.accepted.done():
                stream.accepted.set_result(None)
            update = self._lora_updates.get(request_id)
            if update is not None and not update.done():
                update.set_result(None)
        for error in batch.errors:
            stream = self.streams.get(error.request_id)
            if stream is not None and not stream.accepted.done():
                stream.accepted.set_exception(RequestRejected(error.status, error.message))
            update = self._lora_updates.get(error.request_id)
            if update is not None and not update.done():
                update.set_exception(RequestRejected(error.status, error.message))
        self._record_starts(batch)
        # A sequence a stop string ended runs on in the engine until our abort lands: drop its late tokens.
        outputs = [out for out in batch.outputs if self._live(out.request_id)]
        self._record_tokens(outputs, batch.timestamp)
        results, stopped = self.processor.process(outputs)
        if stopped:
            self._send(Abort(stopped))  # a stop string ended them; the engine would run on
        now = time.monotonic()
        for result in results:
            self._deliver(result, now)

    def _live(self, seq_id: str) -> bool:
        found = self._seqs.get(seq_id)
        return found is not None and not found[1].finished

    def _record_starts(self, batch: EngineOutputs) -> None:
        for start in batch.starts:
            found = self._seqs.get(start.seq_id)
            if found is not None:
                found[1].prefill_time = start.prefill_time
                self.metrics.queue_time.observe(start.queue_time)
                self.metrics.prefill_time.observe(start.prefill_time)

    def _record_tokens(self, outputs: list[CoreOutput], engine_time: float) -> None:
        now = time.monotonic()
        for out in outputs:
            if not out.new_token_ids:
                continue
            stream, timing = self._seqs[out.request_id]
            if timing.first_token_time is None:
                timing.first_token_time, timing.first_engine_time = now, engine_time
                self.metrics.ttft.observe(now - stream.arrival_time)
                self.metrics.prompt_tokens.inc(stream.num_prompt_tokens)
            else:
                self.metrics.observe_itl(now - timing.last_token_time)
            timing.last_token_time, timing.last_engine_time = now, engine_time
            timing.num_tokens += len(out.new_token_ids)
            self.metrics.generation_tokens.inc(len(out.new_token_ids))

    def _deliver(self, result: RequestOutput, now: float) -> None:
        stream = self.streams.get(result.request_id)
        if stream is None:
            return
        for completion, timing in zip(result.outputs, stream.timings, strict=True):
            if completion.finish_reason is not None and not timing.finished:
                self._finish_seq(stream, timing, completion.finish_reason, now)
        stream.queue.put_nowait(result)
        if result.finished:
            stream.finished = True
            self._forget(result.request_id)
            self._log_request(stream, now, [c.finish_reason for c in result.outputs])

    def _finish_seq(self, stream: RequestStream, timing: _SeqTiming, reason: str, now: float) -> None:
        timing.finished = True
        metrics = self.metrics
        metrics.request_finished(reason)
        metrics.e2e.observe(now - stream.arrival_time)
        if timing.first_engine_time is not None:
            decode = timing.last_engine_time - timing.first_engine_time
            metrics.decode_time.observe(decode)
            metrics.inference_time.observe((timing.prefill_time or 0.0) + decode)
            metrics.request_prompt_tokens.observe(stream.num_prompt_tokens)
            metrics.request_generation_tokens.observe(timing.num_tokens)

    @staticmethod
    def _log_request(stream: RequestStream, now: float, reasons: list[str | None]) -> None:
        first = [t.first_token_time for t in stream.timings if t.first_token_time is not None]
        ttft = f"{min(first) - stream.arrival_time:.3f}s" if first else "-"
        logger.info(
            "request %s: prompt_tokens=%d output_tokens=%d ttft=%s total=%.3fs finish_reason=%s",
            stream.request_id,
            stream.num_prompt_tokens,
            sum(t.num_tokens for t in stream.timings),
            ttft,
            now - stream.arrival_time,
            ",".join(r or "abort" for r in reasons),
        )
