"""A worker's routes for routers: run token-id requests, abort them, and describe the worker.

Mounted on every `duoserve serve` (the OpenAI routes stay too, so a worker can be used directly).
Its role (prefill, decode or both) is what it tells routers in `/internal/info`.

With a cluster secret, every request must carry the router's tag (`X-Duoserve-Auth`, an HMAC over
method, path and body with a sequence number and timestamp, see `duoserve.disagg.auth`): one without
a valid tag, or one sent again, gets 401 before its body is decoded.
"""

from __future__ import annotations

import os

import msgspec
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from duoserve.disagg.auth import AUTH_HEADER, HTTP_PURPOSE, Verifier, verify_http
from duoserve.server.engine_client import EngineClient, EngineUnavailable
from duoserve.server.protocol import APIError
from duoserve.server.worker_protocol import (
    FRAME_MEDIA_TYPE,
    WorkerError,
    abort_decoder,
    add_request_decoder,
    encode_frame,
)


class WorkerRoutes:
    def __init__(
        self,
        client: EngineClient,
        role: str,
        cluster_secret: str | None = None,
        max_body_bytes: int = 8 * 2**20,
    ) -> None:
        self.client = client
        self.role = role
        self.verifier = Verifier(cluster_secret, HTTP_PURPOSE)
        self.max_body_bytes = max_body_bytes

    async def _authenticated_body(self, request: Request) -> bytes:
        """The request's body, once its size and its tag are checked (401 / 413 otherwise)."""
        limit = self.max_body_bytes
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is larger than the server's limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        header = request.headers.get(AUTH_HEADER)
        reason = verify_http(self.verifier, header, request.method, request.url.path, body)
        if reason is not None:
            message = f"/internal/* needs a valid {AUTH_HEADER} made with the cluster secret ({reason})"
            raise APIError(401, message)
        return body

    async def generate(self, request: Request) -> Response:
        body = await self._authenticated_body(request)
        try:
            message = add_request_decoder.decode(body)
        except msgspec.DecodeError as err:
            raise APIError(400, f"invalid internal request: {err}") from err
        stream = self.client.add_raw(message)

        async def frames():
            ended = False
            try:
                while True:
                    item = await stream.queue.get()
                    if item is None:
                        ended = True
                        return
                    if isinstance(item, Exception):
                        ended = True
                        status = 503 if isinstance(item, EngineUnavailable) else 500
                        yield encode_frame(WorkerError(status, str(item)))
                        return
                    yield encode_frame(item)
            finally:
                if not ended:  # the router went away (or aborted by closing the stream)
                    self.client.abort_raw(message.request_id)

        return StreamingResponse(frames(), media_type=FRAME_MEDIA_TYPE)

    async def abort(self, request: Request) -> Response:
        body = await self._authenticated_body(request)
        try:
            message = abort_decoder.decode(body)
        except msgspec.DecodeError as err:
            raise APIError(400, f"invalid internal request: {err}") from err
        self.client.abort_raw(message.request_id, message.seq_ids or None)
        return Response(status_code=204)

    async def info(self, request: Request) -> Response:
        await self._authenticated_body(request)
        self.client.check_available()
        ready = self.client.engine_info
        body = {
            "role": self.role,
            "pid": os.getpid(),
            "model": self.client.served_model_name,
            "max_model_len": ready.max_model_len,
            "vocab_size": ready.vocab_size,
            "eos_token_ids": self.client.eos_token_ids,
            "num_kv_blocks": ready.num_kv_blocks,
            "block_size": ready.block_size,
            "kv_address": ready.kv_address,
            "events_address": ready.events_address,
            "lora_modules": [msgspec.to_builtins(lora) for lora in self.client.lora_adapters().values()],
            "stats": self.client.metrics.engine_state.stats,
        }
        return Response(msgspec.json.encode(body), media_type="application/json")

    async def workers(self, request: Request) -> Response:
        """A router's workers: health, load and the prefix blocks it knows they hold."""
        body = {"workers": self.client.workers_status()}
        return Response(msgspec.json.encode(body), media_type="application/json")
