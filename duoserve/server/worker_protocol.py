"""What a router and a worker say to each other over HTTP (the `/internal/*` routes).

The router sends an `AddRequest` (token ids and sampling params, optionally a KV transfer role) as
msgpack; the worker answers with a stream of length-prefixed msgpack frames: the engine's own
`EngineOutputs` batches for that request (acceptance, tokens, tickets, timings), or a `WorkerError`.
Text, stop strings and metrics are the router's business, so a worker never tokenizes a prompt.
"""

from __future__ import annotations

import msgspec

from duoserve.server.engine_messages import AddRequest, EngineOutputs

FRAME_MEDIA_TYPE = "application/x-duoserve-frames"
_LENGTH_BYTES = 4


class WorkerError(msgspec.Struct, tag=True):
    status: int
    message: str


class AbortSequences(msgspec.Struct):
    request_id: str
    seq_ids: list[str] = []  # empty: all of them


WorkerFrame = EngineOutputs | WorkerError

_encoder = msgspec.msgpack.Encoder()
add_request_decoder = msgspec.msgpack.Decoder(AddRequest)
abort_decoder = msgspec.msgpack.Decoder(AbortSequences)
_frame_decoder = msgspec.msgpack.Decoder(WorkerFrame)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def encode_frame(frame: WorkerFrame) -> bytes:
    payload = _encoder.encode(frame)
    return len(payload).to_bytes(_LENGTH_BYTES, "big") + payload


class FrameReader:
    """Splits a byte stream back into frames, whatever the chunking of the HTTP body."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[WorkerFrame]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _LENGTH_BYTES:
            size = int.from_bytes(self._buffer[:_LENGTH_BYTES], "big")
            if len(self._buffer) < _LENGTH_BYTES + size:
                break
            frames.append(_frame_decoder.decode(bytes(self._buffer[_LENGTH_BYTES : _LENGTH_BYTES + size])))
            del self._buffer[: _LENGTH_BYTES + size]
        return frames
