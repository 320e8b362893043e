"""The server's own settings (the engine's come from EngineConfig), and their command-line flags.

Kept free of heavy imports so `duoserve --help` and the other subcommands stay fast.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from duoserve.disagg.auth import SECRET_ENV as CLUSTER_SECRET_ENV


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queued_requests: int | None = 1024
    max_request_bytes: int = 8 * 2**20
    # Seconds a client gets to send a request's headers, then as much again for its body (nginx gives 60
    # to each); past it, 408 and the connection is closed: slowloris clients cannot pile up.
    request_read_timeout: float = 30.0
    shutdown_timeout: float = 30.0
    log_level: str = "INFO"
    role: str = "both"  # prefill | decode | both: what this worker does for a router
    # Authenticates /internal/*, KV transfer and KV events between workers and routers (an HMAC key).
    cluster_secret: str | None = None
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING).
    allow_runtime_lora_updating: bool = False
    # Tool calling (vLLM's flags): how replies are read for calls, and whether tool_choice "auto" is served.
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False


ROLES = ("prefill", "decode", "both")
# duoserve.server.tool_calls.TOOL_CALL_PARSERS, spelled here to keep this module free of heavy imports.
TOOL_CALL_PARSERS = ("hermes", "llama3_json")


API_KEY_ENV = "DUOSERVE_API_KEY"
RUNTIME_LORA_ENV = "DUOSERVE_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_lora_from_env() -> bool:
    """vLLM's convention: the env variable set to true (or 1) opens the runtime LoRA routes."""
    return os.environ.get(RUNTIME_LORA_ENV, "").strip().lower() in ("true", "1")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    defaults = ServerSettings()
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=defaults.host, help=f"address to bind (default: {defaults.host})")
    group.add_argument("--port", type=int, default=defaults.port, help=f"port (default: {defaults.port})")
    group.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on every route but the probes /health and /livez "
        f"(default: ${API_KEY_ENV})",
    )
    group.add_argument(
        "--cluster-secret",
        default=os.environ.get(CLUSTER_SECRET_ENV),
        help="shared secret of a deployment's workers and router: /internal/* routes, KV transfers and KV "
        "events must be authenticated with it (HMAC-SHA256). Prefer the environment variable, which "
        f"`ps` does not show (default: ${CLUSTER_SECRET_ENV}; without one nothing is authenticated)",
    )
    group.add_argument(
        "--served-model-name", default=None, help="the model name clients use (default: the model argument)"
    )
    group.add_argument(
        "--max-queued-requests",
        type=int,
        default=defaults.max_queued_requests,
        help="most requests waiting for a seat in the running batch; past it, 429 with Retry-After "
        f"(default: {defaults.max_queued_requests})",
    )
    group.add_argument(
        "--max-request-bytes",
        type=int,
        default=defaults.max_request_bytes,
        help=f"largest request body accepted; larger ones get 413 (default: {defaults.max_request_bytes})",
    )
    group.add_argument(
        "--request-read-timeout",
        type=float,
        default=defaults.request_read_timeout,
        help="seconds a client gets to send a request's headers, and then its body; past either, 408 and "
        f"the connection is closed (default: {defaults.request_read_timeout})",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=float,
        default=defaults.shutdown_timeout,
        help="on SIGTERM, seconds in-flight requests get to finish before they are aborted "
        f"(default: {defaults.shutdown_timeout})",
    )
    group.add_argument(
        "--role",
        choices=ROLES,
        default=defaults.role,
        help="what this worker does behind `duoserve router`: prefill, decode or both (colocated; "
        "the default). Every role also serves the OpenAI routes directly",
    )
    group.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help=f"serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (or set {RUNTIME_LORA_ENV}=true)",
    )
    group.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="how tool calls are read from a chat reply: hermes (<tool_call> JSON blocks: Hermes, Qwen 2.5 "
        "and 3) or llama3_json (Llama 3.x JSON calls)",
    )
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='serve tool_choice "auto" (the default when a request has tools): the model decides whether to '
        "call, and --tool-call-parser reads its calls",
    )
    group.add_argument(
        "--log-level",
        default="INFO",
        help="DEBUG, INFO (one line per request), WARNING, ERROR (default: INFO)",
    )


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        served_model_name=args.served_model_name,
        max_queued_requests=args.max_queued_requests,
        max_request_bytes=args.max_request_bytes,
        request_read_timeout=args.request_read_timeout,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level.upper(),
        role=args.role,
        cluster_secret=args.cluster_secret or None,
        allow_runtime_lora_updating=args.allow_runtime_lora_updating or runtime_lora_from_env(),
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
    )
    if settings.enable_auto_tool_choice and settings.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    for name in ("max_queued_requests", "shutdown_timeout"):
        if getattr(settings, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(settings, name)}")
    if settings.request_read_timeout <= 0:
        raise ValueError(f"--request-read-timeout must be > 0, got {settings.request_read_timeout}")
    if settings.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {settings.max_request_bytes}")
    return settings
