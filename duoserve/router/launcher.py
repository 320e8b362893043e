"""`duoserve router` and `duoserve up`: the router on its own, or a whole local deployment.

`router` takes its workers as URLs (`--prefill URL --decode URL`) and/or finds them
(`--discover k8s`, `--discover dns:NAME[:PORT]`: duoserve.router.discovery).

`up` starts N prefill, M decode and K colocated workers as `duoserve serve` processes on free ports
(each with its share of the CPU cores, optionally pinned to them), restarts any that dies, and runs
the router in its own process in front of them. Ctrl-C or SIGTERM stops all of it.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from duoserve.config import add_engine_args, engine_config_from_args, engine_flags
from duoserve.disagg.auth import SECRET_ENV
from duoserve.router.discovery import DEFAULT_PORT, K8S_API_URL_ENV
from duoserve.router.routing import POLICIES, RouterConfig
from duoserve.server.settings import add_server_args, settings_from_args

logger = logging.getLogger("duoserve.up")

_RESTART_DELAY = 1.0


def _add_routing_args(parser: argparse.ArgumentParser) -> None:
    defaults = RouterConfig(decode_urls=["-"])
    group = parser.add_argument_group("routing")
    group.add_argument(
        "--policy", choices=POLICIES, default=defaults.policy, help="kv (KV-aware, default), ..."
    )
    group.add_argument(
        "--remote-prefill-min-tokens",
        type=int,
        default=defaults.remote_prefill_min_tokens,
        help="prompts with fewer uncached tokens are prefilled on their decode worker "
        f"(default: {defaults.remote_prefill_min_tokens})",
    )
    group.add_argument(
        "--max-prefill-queue-tokens",
        type=int,
        default=defaults.max_prefill_queue_tokens,
        help="past this many prompt tokens queued on prefill workers, prefill locally "
        f"(default: {defaults.max_prefill_queue_tokens})",
    )
    group.add_argument(
        "--health-interval",
        type=float,
        default=defaults.health_interval,
        help=f"seconds between worker health checks (default: {defaults.health_interval})",
    )


def _add_discovery_args(parser: argparse.ArgumentParser) -> None:
    defaults = RouterConfig(decode_urls=["-"])
    group = parser.add_argument_group("discovery")
    group.add_argument(
        "--discover",
        action="append",
        default=[],
        metavar="{k8s,dns:NAME[:PORT]}",
        help="find workers: k8s watches the EndpointSlices of the Services labelled duoserve.io/role "
        "(prefill|decode|both) in the namespace; dns:NAME re-resolves a headless Service's records "
        f"(port default {DEFAULT_PORT}; each worker says its role). Repeatable; adds to --prefill/--decode",
    )
    group.add_argument(
        "--discover-interval",
        type=float,
        default=defaults.discover_interval,
        help=f"seconds between DNS lookups (default: {defaults.discover_interval:g})",
    )
    group.add_argument(
        "--k8s-namespace",
        default=None,
        help="namespace whose EndpointSlices --discover k8s watches (default: the pod's own)",
    )
    group.add_argument(
        "--k8s-api-url",
        default=None,
        help=f"the Kubernetes API server (default: ${K8S_API_URL_ENV}, else the in-cluster one; "
        "e.g. http://127.0.0.1:8001 through kubectl proxy)",
    )


def _router_config(args: argparse.Namespace, prefill: list[str], decode: list[str]) -> RouterConfig:
    return RouterConfig(
        prefill_urls=prefill,
        decode_urls=decode,
        policy=args.policy,
        remote_prefill_min_tokens=args.remote_prefill_min_tokens,
        max_prefill_queue_tokens=args.max_prefill_queue_tokens,
        health_interval=args.health_interval,
        discover=getattr(args, "discover", []),  # `up` knows its workers
        discover_interval=getattr(args, "discover_interval", RouterConfig.discover_interval),
        k8s_namespace=getattr(args, "k8s_namespace", None),
        k8s_api_url=getattr(args, "k8s_api_url", None),
    )


def add_router_parsers(commands) -> None:
    router = commands.add_parser("router", help="OpenAI-compatible router in front of prefill/decode workers")
    router.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model whose tokenizer the router uses (default: the embedded one)",
    )
    router.add_argument("--prefill", action="append", default=[], metavar="URL", help="a prefill worker")
    router.add_argument(
        "--decode", action="append", default=[], metavar="URL", help="a decode (or colocated) worker"
    )
    _add_routing_args(router)
    _add_discovery_args(router)
    add_server_args(router)
    router.set_defaults(func=cmd_router)

    up = commands.add_parser("up", help="start a local deployment: workers (with these engine args) + router")
    up.add_argument("--prefill", type=int, default=0, help="prefill workers (default: 0)")
    up.add_argument("--decode", type=int, default=0, help="decode workers (default: 0)")
    up.add_argument("--replicas", type=int, default=0, help="colocated (role both) workers (default: 0)")
    up.add_argument(
        "--threads-per-worker",
        type=int,
        default=None,
        help="torch threads per worker (default: cores / workers)",
    )
    up.add_argument("--pin", action="store_true", help="pin each worker to its own cores")
    _add_routing_args(up)
    add_server_args(up)
    add_engine_args(up, positional_model=True)
    up.set_defaults(func=cmd_up)


def cmd_router(args: argparse.Namespace) -> int:
    from duoserve.router.router import RouterClient
    from duoserve.server.launcher import run_server

    settings = settings_from_args(args)
    client = RouterClient(
        args.model,
        _router_config(args, args.prefill, args.decode),
        served_model_name=settings.served_model_name,
        api_key=settings.api_key,
        log_level=settings.log_level,
        cluster_secret=settings.cluster_secret,
    )
    return run_server(client, settings, worker_routes=False)


@dataclass
class _WorkerProcess:
    role: str
    port: int
    command: list[str]
    env: dict[str, str]
    cores: list[int] | None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cores = self.cores
        self.process = subprocess.Popen(
            self.command, env=self.env, preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cmd_up(args: argparse.Namespace) -> int:
    roles = ["prefill"] * args.prefill + ["decode"] * args.decode + ["both"] * args.replicas
    if not roles or args.decode + args.replicas == 0:
        raise ValueError("duoserve up needs at least one --decode or --replicas worker")
    if args.prefill and not args.decode:
        raise ValueError("--prefill workers need --decode workers to hand their KV to")
    num_cores = os.cpu_count() or 1
    threads = args.threads_per_worker or max(1, num_cores // len(roles))
    if threads < 1:
        raise ValueError("--threads-per-worker must be >= 1")
    config = engine_config_from_args(args)
    worker_flags = engine_flags(config, skip=("model", "num_threads", "step_trace"))
    trace_paths = step_trace_paths(config.step_trace, roles) if config.step_trace else [None] * len(roles)
    workers = []
    for i, (role, trace_path) in enumerate(zip(roles, trace_paths, strict=True)):
        port = _free_port()
        command = [sys.executable, "-m", "duoserve.cli", "serve"]
        command += [args.model] if args.model else []
        command += ["--role", role, "--port", str(port), "--num-threads", str(threads), *worker_flags]
        command += ["--api-key", args.api_key] if args.api_key else []
        # The queue bound is the workers' (the router queues nothing): overload gets 429 from them.
        command += ["--max-queued-requests", str(args.max_queued_requests)]
        command += ["--step-trace", trace_path] if trace_path else []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if args.cluster_secret:  # in the environment, where `ps` does not show it
            env[SECRET_ENV] = args.cluster_secret
        cores = [(i * threads + c) % num_cores for c in range(threads)] if args.pin else None
        workers.append(_WorkerProcess(role, port, command, env, cores))
    for worker in workers:
        worker.start()
    stopping = threading.Event()
    supervisor = threading.Thread(target=_supervise, args=(workers, stopping), daemon=True)
    supervisor.start()
    prefill = [w.url for w in workers if w.role == "prefill"]
    decode = [w.url for w in workers if w.role != "prefill"]
    print(
        f"duoserve up: http://{args.host}:{args.port} -> prefill {prefill or '-'}, decode {decode}",
        flush=True,
    )
    try:
        return cmd_router_with(args, prefill, decode)
    finally:
        stopping.set()
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        deadline = time.monotonic() + 30
        for worker in workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()


def step_trace_paths(pattern: str, roles: list[str]) -> list[str]:
    """Each worker's --step-trace file: `{role}` in the pattern becomes the worker's role (numbered when
    several workers share it: decode0, decode1), and a pattern naming neither `{role}` nor `{pid}` gets
    `.{role}` appended when there are several workers, so no two write one file. `{pid}` is left to
    each engine process. The trace's header says the role too (`plan profile --from-trace` fits each
    role's steps apart)."""
    if len(roles) > 1 and "{role}" not in pattern and "{pid}" not in pattern:
        pattern += ".{role}"
    paths, numbered = [], dict.fromkeys(roles, 0)
    for role in roles:
        name = role if roles.count(role) == 1 else f"{role}{numbered[role]}"
        numbered[role] += 1
        paths.append(pattern.replace("{role}", name))
    return paths


def cmd_router_with(args: argparse.Namespace, prefill: list[str], decode: list[str]) -> int:
    args.prefill, args.decode = prefill, decode
    return cmd_router(args)


def _supervise(workers: list[_WorkerProcess], stopping: threading.Event) -> None:
    """Restart a worker that died (on the same port: the router sees it rejoin)."""
    while not stopping.wait(_RESTART_DELAY):
        for worker in workers:
            if worker.process.poll() is not None and not stopping.is_set():
                logger.warning(
                    "%s worker on port %d exited with %s; restarting",
                    worker.role,
                    worker.port,
                    worker.process.returncode,
                )
                worker.start()
