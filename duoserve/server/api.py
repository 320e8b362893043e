"""The FastAPI app: OpenAI routes, health/readiness, tokenize/detokenize and /metrics.

Probes, as clients and Kubernetes expect them: `/health` (and its alias `/ready`) and `/v1/models`
answer 200 only when a request would be served: the model is loaded (for a router: it has a ready
decode-capable worker) and the server is not draining; otherwise 503 with the reason, so a client that
waited for a 200 never then gets a 503 for loading. `/livez` answers 200 whenever the event loop does,
loading and draining included: the liveness probe, which must not restart a server that is only busy
loading or finishing its requests.

A generation request is validated and tokenized here, admitted by the engine (only then does the
client get a 200, so every refusal is a proper 4xx), and then streamed as Server-Sent Events or
collected into one JSON body. A client that goes away aborts its request at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from duoserve.lora.request import LoRARequest
from duoserve.outputs import RequestOutput
from duoserve.sampling_params import SamplingParams
from duoserve.server.engine_client import EngineClient, EngineUnavailable, RequestRejected, RequestStream
from duoserve.server.lora_routes import (
    LoadLoRAAdapterRequest,
    LoRARoutes,
    UnloadLoRAAdapterRequest,
    model_cards,
)
from duoserve.server.openapi import UNAUTHENTICATED_PATHS, error_responses, install_openapi, json_body_route
from duoserve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_body,
)
from duoserve.server.serving import (
    SSE_DONE,
    ChatChunks,
    CompletionChunks,
    ResponseContext,
    StreamTracker,
    chat_response,
    completion_response,
    error_event,
    holdback_for,
)
from duoserve.server.settings import ServerSettings, runtime_lora_from_env
from duoserve.server.tool_calls import ToolCalling
from duoserve.server.worker_api import WorkerRoutes

logger = logging.getLogger("duoserve.server")

# A client told to come back later (429) gets this as Retry-After, in seconds.
RETRY_AFTER_SECONDS = 1
# What a handler answers when its client went away, which nobody reads (nginx's "client closed request").
CLIENT_CLOSED_REQUEST = 499


class PrometheusResponse(Response):
    """For /openapi.json: /metrics answers Prometheus' text format."""

    media_type = CONTENT_TYPE_LATEST


def json_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        msgspec.json.encode(body), status_code=status, media_type="application/json", headers=headers
    )


def error_response(error: APIError, headers: dict[str, str] | None = None) -> Response:
    return json_response(error.body(), error.status, headers)


class APIKeyMiddleware:
    """Every route but the probes needs `Authorization: Bearer <key>` (plain ASGI: streaming is untouched)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNAUTHENTICATED_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'")
        await error_response(error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self.expected)
        return False


class OpenAIServer:
    """The route handlers, over one EngineClient."""

    def __init__(self, client: EngineClient, settings: ServerSettings) -> None:
        self.client = client
        self.settings = settings

    # ---------------------------------------------------------------- generation routes

    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        body: CompletionRequest = parse_body(await self._read_body(request), CompletionRequest)
        lora = self._lora_for(body.model)
        params = body.to_sampling_params()
        tokenizer = self._tokenizer()
        prompts = [(p, tokenizer.encode(p)) if isinstance(p, str) else (None, p) for p in body.prompts()]
        self.client.metrics.prompt_tokenizations.inc(sum(text is not None for text, _ in prompts))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._admit(request_id, prompts, params, arrival, lora)
        ctx = ResponseContext(
            request_id,
            lora.lora_name if lora else self.client.served_model_name,
            include_usage=body.include_usage,
            as_token_ids=body.return_tokens_as_token_ids,
            num_top_logprobs=body.logprobs,
        )
        if body.stream:
            return _sse_response(self._stream_completion(ctx, streams, params))
        outputs = await self._collect(request, streams)
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return json_response(completion_response(ctx, outputs, params.n))

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        body: ChatCompletionRequest = parse_body(await self._read_body(request), ChatCompletionRequest)
        lora = self._lora_for(body.model)
        tools = ToolCalling.of(body, self.settings.tool_call_parser, self.settings.enable_auto_tool_choice)
        params = body.to_sampling_params()
        text, prompt_ids = self._render_chat(
            body.template_messages(),
            body.add_generation_prompt,
            body.chat_template_kwargs or {},
            body.template_tools(),
        )
        self.client.metrics.prompt_tokenizations.inc()
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._admit(request_id, [(text, prompt_ids)], params, arrival, lora)
        ctx = ResponseContext(
            request_id,
            lora.lora_name if lora else self.client.served_model_name,
            include_usage=body.include_usage,
            as_token_ids=body.return_tokens_as_token_ids,
            num_top_logprobs=params.logprobs,
        )
        if body.stream:
            return _sse_response(self._stream_chat(ctx, streams[0], params, tools))
        outputs = await self._collect(request, streams)
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return json_response(chat_response(ctx, outputs[0], tools))

    async def _admit(
        self,
        request_id: str,
        prompts: list[tuple[str | None, list[int]]],
        params: SamplingParams,
        arrival: float,
        lora: LoRARequest | None = None,
    ) -> list[RequestStream]:
        """Queue every prompt in the engine (on `lora`, or the base model); if one is refused, the others
        are withdrawn."""
        self.client.check_available()
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        results = await asyncio.gather(
            *(
                self.client.add_request(rid, text, token_ids, params, arrival, lora)
                for rid, (text, token_ids) in zip(ids, prompts, strict=True)
            ),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for result in results:
                if isinstance(result, RequestStream):
                    self.client.abort(result.request_id)
            logger.info("request %s refused: %s", request_id, failures[0])
            raise failures[0]
        return list(results)

    async def _merge(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) of several requests as they come; leaving early aborts them all."""
        if len(streams) == 1:
            async for output in self.client.outputs(streams[0]):
                yield 0, output
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for output in self.client.outputs(stream):
                    queue.put_nowait((index, output))
                queue.put_nowait((index, None))
            except Exception as err:  # handed to the consumer, which raises it
                queue.put_nowait((index, err))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    remaining -= 1
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def _collect(self, request: Request, streams: list[RequestStream]) -> list[RequestOutput] | None:
        """The final outputs; None when the client disconnected first (everything is aborted then)."""

        async def run() -> list[RequestOutput]:
            finals: list[Any] = [None] * len(streams)
            async for index, output in self._merge(streams):
                finals[index] = output
            return finals

        work = asyncio.ensure_future(run())
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
            for stream in streams:
                self.client.abort(stream.request_id)
        if not work.done() or work.cancelled():
            logger.info("client disconnected: aborted %s", ", ".join(s.request_id for s in streams))
            return None
        return work.result()

    async def _stream_completion(
        self, ctx: ResponseContext, streams: list[RequestStream], params: SamplingParams
    ) -> AsyncIterator[bytes]:
        chunks = CompletionChunks(ctx)
        tracker = StreamTracker(params.n, holdback_for(params.stop))
        finals: list[Any] = [None] * len(streams)
        try:
            async for index, output in self._merge(streams):
                finals[index] = output
                for delta in tracker.deltas(index, output):
                    for chunk in chunks.delta(delta):
                        yield chunk
            if ctx.include_usage:
                yield chunks.usage(finals)
        except Exception as err:
            yield _stream_error(err)
        finally:
            for stream in streams:
                self.client.abort(stream.request_id)
        yield SSE_DONE

    async def _stream_chat(
        self, ctx: ResponseContext, stream: RequestStream, params: SamplingParams, tools: ToolCalling | None
    ) -> AsyncIterator[bytes]:
        chunks = ChatChunks(ctx, tools)
        tracker = StreamTracker(params.n, holdback_for(params.stop))
        final = None
        try:
            for index in range(params.n):
                yield chunks.role(index)
            async for _, output in self._merge([stream]):
                final = output
                for delta in tracker.deltas(0, output):
                    for chunk in chunks.delta(delta):
                        yield chunk
            if ctx.include_usage:
                yield chunks.usage([final])
        except Exception as err:
            yield _stream_error(err)
        finally:
            self.client.abort(stream.request_id)
        yield SSE_DONE

    # ---------------------------------------------------------------- other routes

    async def models(self, request: Request) -> Response:
        self.client.check_available()  # 503 while loading or draining: a 200 here means "send requests"
        info = self.client.info
        card = {
            "id": self.client.served_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "duoserve",
            "root": self.client.model_path,
            "parent": None,
            "max_model_len": info.max_model_len if info else None,
        }
        return json_response({"object": "list", "data": [card, *model_cards(self.client, card)]})

    async def health(self, request: Request) -> Response:
        """Readiness: 200 once a request would be served, 503 (why, as an OpenAI error) until then."""
        try:
            self.client.check_available()
        except EngineUnavailable as err:
            return error_response(APIError(503, str(err)))
        return Response(status_code=200)

    async def livez(self, request: Request) -> Response:
        """Liveness: the event loop answers (also while loading or draining)."""
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        try:
            self.client.check_available()
        except EngineUnavailable as err:
            return error_response(APIError(503, str(err)))
        return json_response({"status": "ready"})

    async def tokenize(self, request: Request) -> Response:
        body: TokenizeRequest = parse_body(await self._read_body(request), TokenizeRequest)
        self._check_model(body.model)
        if body.messages is not None:
            messages = [m.template_message() for m in body.messages]
            _, tokens = self._render_chat(messages, body.add_generation_prompt, {})
        else:
            tokens = self._tokenizer().encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return json_response(
            {"count": len(tokens), "max_model_len": self.client.info.max_model_len, "tokens": tokens}
        )

    async def detokenize(self, request: Request) -> Response:
        body: DetokenizeRequest = parse_body(await self._read_body(request), DetokenizeRequest)
        self._check_model(body.model)
        tokenizer = self._tokenizer()
        vocab = self.client.info.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must be in [0, {vocab}), got {bad[0]}", "tokens")
        return json_response({"prompt": tokenizer.decode(body.tokens)})

    async def metrics(self, request: Request) -> Response:
        metrics = self.client.metrics
        content = metrics.render() if metrics is not None else b""
        return Response(content, media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------- helpers

    async def _read_body(self, request: Request) -> bytes:
        """The JSON body, read up to --max-request-bytes and within --request-read-timeout."""
        _check_json_content_type(request.headers.get("content-type"))
        limit = self.settings.max_request_bytes
        too_big = APIError(413, f"the request body is larger than the server's limit of {limit} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big

        async def read() -> bytes:
            chunks, size = [], 0
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_big
                    chunks.append(chunk)
            except ClientDisconnect as err:  # nobody reads the answer; not a 500 in the log
                raise APIError(CLIENT_CLOSED_REQUEST, "the client disconnected while sending") from err
            return b"".join(chunks)

        timeout = self.settings.request_read_timeout
        try:
            return await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError as err:  # not TimeoutError: Python 3.10's asyncio has its own
            raise APIError(408, f"the request body did not arrive within {timeout:g} s") from err

    def _check_model(self, model: str | None) -> None:
        self._lora_for(model)

    def _lora_for(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names (None: the base model); 404 for an unknown name."""
        if model is None or model == self.client.served_model_name:
            return None
        lora = self.client.lora_adapters().get(model)
        if lora is None:
            self.client.check_available()  # while loading, 503: its adapters are not known yet
            served = ", ".join(
                f"`{name}`" for name in [self.client.served_model_name, *self.client.lora_adapters()]
            )
            raise APIError(404, f"the model `{model}` does not exist (this server serves {served})", "model")
        return lora

    def _render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any],
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[str, list[int]]:
        """The prompt text of a conversation (the template receives the tools), and its token ids."""
        tokenizer = self._tokenizer()
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs
            )
        except (ValueError, TypeError) as err:  # TypeError: a template tripping over chat_template_kwargs
            raise APIError(400, f"the chat template failed on this conversation: {err}", "messages") from err
        # The template already wrote the special tokens the model expects.
        return text, tokenizer.encode(text, add_special_tokens=False)

    def _tokenizer(self):
        self.client.check_available()
        return self.client.tokenizer


def _sse_response(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    # no-cache and no proxy buffering, so each event reaches the client as soon as it is written.
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)


def _stream_error(err: Exception) -> bytes:
    """An error after the 200 went out: told in the stream, as OpenAI does."""
    if isinstance(err, EngineUnavailable):
        return error_event(503, str(err))
    logger.exception("request failed mid-stream", exc_info=err)
    return error_event(500, f"internal error: {type(err).__name__}: {err}")


def _check_json_content_type(value: str | None) -> None:
    """As FastAPI (and so vLLM) does for a typed body: JSON when declared so or not declared at all."""
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise APIError(
        415, f"the request body must be JSON: send 'Content-Type: application/json', not {value[:80]!r}"
    )


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------- the app


def _error_for(exc: Exception) -> tuple[APIError, dict[str, str] | None]:
    if isinstance(exc, APIError):
        return exc, None
    if isinstance(exc, RequestRejected):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status == 429 else None
        return APIError(exc.status, exc.message), headers
    if isinstance(exc, EngineUnavailable):
        return APIError(503, str(exc)), None
    if isinstance(exc, StarletteHTTPException):  # 404, 405 (with its Allow header)
        return APIError(exc.status_code, str(exc.detail)), exc.headers
    logger.error("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}"), None


async def _handle_error(request: Request, exc: Exception) -> Response:
    error, headers = _error_for(exc)
    return error_response(error, headers)


def build_app(client: EngineClient, settings: ServerSettings, worker_routes: bool = True) -> FastAPI:
    # No /docs: Swagger UI would load its scripts from a CDN.
    app = FastAPI(title="duoserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    server = OpenAIServer(client, settings)
    json_only = {"responses": {200: {"description": "OK", "content": {"application/json": {}}}}}
    routes: list[tuple[str, Any, str, dict[str, Any]]] = [
        ("/v1/completions", server.completions, "POST", json_body_route(CompletionRequest, streams=True)),
        (
            "/v1/chat/completions",
            server.chat_completions,
            "POST",
            json_body_route(ChatCompletionRequest, streams=True),
        ),
        (
            "/v1/models",
            server.models,
            "GET",
            {"responses": {**json_only["responses"], **error_responses(503)}},
        ),
        ("/health", server.health, "GET", {"response_class": Response, "responses": error_responses(503)}),
        ("/livez", server.livez, "GET", {"response_class": Response}),
        ("/ready", server.ready, "GET", {"responses": error_responses(503)}),
        ("/tokenize", server.tokenize, "POST", json_body_route(TokenizeRequest)),
        ("/detokenize", server.detokenize, "POST", json_body_route(DetokenizeRequest)),
        ("/metrics", server.metrics, "GET", {"response_class": PrometheusResponse}),
    ]
    body_models = [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest]
    if settings.allow_runtime_lora_updating or runtime_lora_from_env():
        loras = LoRARoutes(client, server._read_body)
        routes += [
            ("/v1/load_lora_adapter", loras.load, "POST", json_body_route(LoadLoRAAdapterRequest)),
            ("/v1/unload_lora_adapter", loras.unload, "POST", json_body_route(UnloadLoRAAdapterRequest)),
        ]
        body_models += [LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest]
    worker = WorkerRoutes(client, settings.role, settings.cluster_secret, settings.max_request_bytes)
    # A worker's routes for its router are not part of the public API: left out of /openapi.json.
    internal = {"include_in_schema": False}
    routes += (
        [("/router/workers", worker.workers, "GET", json_only)]
        if not worker_routes
        else [
            ("/internal/generate", worker.generate, "POST", internal),
            ("/internal/abort", worker.abort, "POST", internal),
            ("/internal/info", worker.info, "GET", internal),
        ]
    )
    for path, handler, method, doc in routes:
        app.add_api_route(path, handler, methods=[method], **doc)
    install_openapi(app, body_models, bool(settings.api_key))
    for exc_type in (APIError, RequestRejected, EngineUnavailable, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, _handle_error)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    return app
