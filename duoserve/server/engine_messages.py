"""What the API process and the engine core process say to each other over ZeroMQ.

Every message is a msgspec Struct (or one of the engine's plain dataclasses) encoded with msgpack:
nothing is pickled across the socket, so a peer can only ever send data, never code. Tagged unions
let each side decode whatever arrives on its socket with a single typed decoder.
"""

from __future__ import annotations

import msgspec

from duoserve.disagg.kv_transfer import KVTicket, KVTransferParams
from duoserve.engine.core import CoreOutput
from duoserve.lora.request import LoRARequest
from duoserve.sampling_params import SamplingParams

# ------------------------------------------------------------------ API process -> engine process


class AddRequest(msgspec.Struct, tag=True):
    """One API request: its n sequences share the prompt, each has its own sampling params."""

    request_id: str
    seq_ids: list[str]
    prompt_token_ids: list[int]
    params: list[SamplingParams]
    eos_token_ids: list[int]
    kv_transfer: KVTransferParams | None = None  # one half of a disaggregated request (n = 1)
    lora_request: LoRARequest | None = None  # the LoRA adapter it runs with (None: the base model)


class Abort(msgspec.Struct, tag=True):
    seq_ids: list[str]


class LoadLoRA(msgspec.Struct, tag=True):
    """Load an adapter at run time; acknowledged (accepted or a RequestError) under `request_id`."""

    request_id: str
    lora_request: LoRARequest


class UnloadLoRA(msgspec.Struct, tag=True):
    request_id: str
    lora_name: str


class Shutdown(msgspec.Struct, tag=True):
    pass


EngineRequest = AddRequest | Abort | LoadLoRA | UnloadLoRA | Shutdown

# ------------------------------------------------------------------ engine process -> API process


class Ready(msgspec.Struct, tag=True):
    """Sent once the model is loaded: what the API process must know about the engine."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    num_kv_blocks: int
    block_size: int
    kv_address: str = ""  # where prefill workers push KV to this engine (tcp://host:port)
    events_address: str = ""  # where it publishes KV events (block stored / removed), for routers
    lora_modules: list[LoRARequest] = []  # the adapters loaded at start (--lora-modules)


class EngineFailed(msgspec.Struct, tag=True):
    """The engine could not load the model, or its loop died: it exits after sending this."""

    message: str


class RequestError(msgspec.Struct):
    """An AddRequest the engine refused: 400 (invalid) or 429 (queue full), with the reason."""

    request_id: str
    status: int
    message: str


class SeqStart(msgspec.Struct):
    """Engine-side timings of a sequence, sent with its first token (vLLM's queue and prefill phases)."""

    seq_id: str
    queue_time: float  # arrival in the engine -> first scheduled
    prefill_time: float  # first scheduled -> first token


class EngineOutputs(msgspec.Struct, tag=True):
    """One batch: acks and refusals of new requests, then (after a step) what the step produced."""

    timestamp: float  # engine's time.monotonic() when sent; differences give decode times
    accepted: list[str] = []
    errors: list[RequestError] = []
    outputs: list[CoreOutput] = []
    starts: list[SeqStart] = []
    step_tokens: int = 0  # tokens the step computed (0: no step in this batch)
    stats: dict[str, float] = {}  # EngineCore.stats() after this batch
    tickets: list[KVTicket] = []  # blocks allocated for requests whose prompt KV another worker sends


EngineMessage = Ready | EngineFailed | EngineOutputs

request_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(EngineRequest)
message_encoder = msgspec.msgpack.Encoder()
message_decoder = msgspec.msgpack.Decoder(EngineMessage)
