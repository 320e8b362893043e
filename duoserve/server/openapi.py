"""/openapi.json: FastAPI's document of the public routes, with the request bodies they really accept.

The handlers read their bodies themselves (parse_body: a size limit, UTF-8 and nesting errors, strict
types, unknown fields ignored, OpenAI-style 400s), so FastAPI never sees a typed body parameter. The
request schemas are instead generated from the same pydantic models parse_body validates with, and
attached to each route here: one source of truth for what is accepted, and FastAPI's own 422 path is
never reached.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from duoserve.server.protocol import ErrorResponse

_REF = "#/components/schemas/{model}"
# The probes answer without the API key: a kubelet or a load balancer has none.
UNAUTHENTICATED_PATHS = frozenset({"/health", "/livez"})
_BEARER = "bearerAuth"

# What each refusal means, for every route that can answer it.
_ERRORS = {
    400: "Invalid request: the message and `param` name the problem",
    401: "Missing or wrong API key",
    404: "Unknown model",
    408: "The request body did not arrive in time",
    413: "Request body larger than --max-request-bytes",
    415: "Content-Type is not application/json",
    429: "Too many queued requests; retry after Retry-After seconds",
    503: "The engine is loading, draining or dead",
}
# One Server-Sent Event: `data` is a JSON chunk, or [DONE] at the end.
_SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
_JSON_ERRORS = (400, 404, 408, 413, 415, 503)
_GENERATION_ERRORS = (*_JSON_ERRORS, 429)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in statuses}


def json_body_route(model: type[BaseModel], streams: bool = False) -> dict[str, Any]:
    """add_api_route's arguments that document a route taking `model` as its JSON body."""
    ok: dict[str, Any] = {"application/json": {"schema": {}}}
    if streams:
        ok["text/event-stream"] = {"schema": _SSE_EVENT}
    description = "The response (with `stream: true`, Server-Sent Events)" if streams else "OK"
    return {
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
            }
        },
        "responses": {
            200: {"description": description, "content": ok},
            **error_responses(*(_GENERATION_ERRORS if streams else _JSON_ERRORS)),
        },
    }


def install_openapi(app: FastAPI, body_models: list[type[BaseModel]], api_key: bool) -> None:
    """The app's /openapi.json (FastAPI(openapi_url=...)) from its routes, with `body_models` among its
    component schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=_version(), description=_DESCRIPTION, routes=app.routes
            )
            _, defs = models_json_schema([(m, "validation") for m in body_models], ref_template=_REF)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            if api_key:
                _require_bearer(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _version() -> str:
    try:
        return version("duoserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def _require_bearer(schema: dict[str, Any]) -> None:
    """With --api-key, every operation but the probes takes the key and may answer 401."""
    schema["components"]["securitySchemes"] = {_BEARER: {"type": "http", "scheme": "bearer"}}
    unauthorized = {
        "description": _ERRORS[401],
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=ErrorResponse.__name__)}}},
    }
    for path, operations in schema["paths"].items():
        if path in UNAUTHENTICATED_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{_BEARER: []}]
            operation.setdefault("responses", {})["401"] = unauthorized


_DESCRIPTION = (
    "OpenAI-compatible completions and chat completions, with vLLM's sampling extras. Every error "
    'is a JSON body `{"error": {"message", "type", "param", "code"}}`. Unknown body fields are '
    "ignored (with a warning in the log); types are strict (a string is not a number, 2.0 is not an "
    "integer); value ranges (top_p, max_tokens against the context, token ids against the vocabulary) "
    "are checked against the model and answered with a 400 naming the parameter."
)
