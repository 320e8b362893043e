"""`duoserve serve`: the API process. Starts uvicorn at once (so /livez answers, and /health says 503
"loading", while the model loads), spawns the engine process, and shuts down gracefully on SIGTERM or
Ctrl-C.

Graceful shutdown: the first signal stops admitting at once (503 on /health, /ready, /v1/models and new
requests, so readiness probes and routers stop sending) and lets in-flight requests finish for up to
--shutdown-timeout seconds; then the server stops, the engine process is told to exit, and the process
exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from duoserve.config import EngineConfig
from duoserve.disagg.auth import warn_if_exposed
from duoserve.disagg.endpoints import KVEndpoints, advertised_host
from duoserve.engine.step_observer import MakeStepObserver
from duoserve.server.api import build_app
from duoserve.server.engine_client import EngineClient
from duoserve.server.http_protocol import with_header_timeout
from duoserve.server.settings import ServerSettings

logger = logging.getLogger("duoserve.server")


class _DrainingServer(uvicorn.Server):
    """uvicorn, with a signal meaning 'drain, then stop' instead of 'stop accepting now'."""

    def __init__(self, config: uvicorn.Config, client: EngineClient, drain_timeout: float) -> None:
        super().__init__(config)
        self.client = client
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): uvicorn would re-raise the signal after exiting, and the exit status must be 0.
        if self._drain is not None or self._loop is None:
            logger.warning("second signal: stopping now")
            self.should_exit = self.force_exit = True
            return
        logger.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.client.drain(self.drain_timeout)
        self.should_exit = True


def serve(
    engine_config: EngineConfig,
    settings: ServerSettings,
    kv: KVEndpoints | None = None,
    make_step_observer: MakeStepObserver | None = None,
) -> int:
    """`kv`: where the KV sockets bind and what address they are given out as (default: --host's).
    `make_step_observer`: the engine core's step observer (--step-trace), built by the caller."""
    if kv is None:
        kv = KVEndpoints(bind_host=settings.host, advertise_host=advertised_host(settings.host))
    client = EngineClient(
        engine_config,
        served_model_name=settings.served_model_name,
        max_queued_requests=settings.max_queued_requests,
        log_level=settings.log_level,
        kv=kv,
        cluster_secret=settings.cluster_secret,
        make_step_observer=make_step_observer,
    )
    return run_server(client, settings)


def run_server(client: EngineClient, settings: ServerSettings, worker_routes: bool = True) -> int:
    """Serve the app over `client` (a local engine, or a router's workers) until told to stop."""
    return asyncio.run(_serve(client, settings, worker_routes))


async def _serve(client: EngineClient, settings: ServerSettings, worker_routes: bool) -> int:
    warn_if_exposed(settings.host, settings.cluster_secret)
    config = uvicorn.Config(
        build_app(client, settings, worker_routes),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep duoserve's logging setup; uvicorn's loggers propagate to it
        log_level=settings.log_level.lower(),
        access_log=False,  # the engine client logs one line per request instead
        lifespan="off",
        timeout_graceful_shutdown=5,
        http=with_header_timeout(settings.request_read_timeout),
    )
    server = _DrainingServer(config, client, settings.shutdown_timeout)
    failure: list[BaseException] = []

    async def start_engine() -> None:
        try:
            await client.start()
        except Exception as err:
            logger.error("%s", err)
            failure.append(err)
            server.should_exit = True

    def engine_died(reason: str) -> None:
        # Nothing can be served any more: exit non-zero so a supervisor restarts the server.
        failure.append(RuntimeError(reason))
        server.should_exit = True

    client.on_engine_death = engine_died
    starter = asyncio.create_task(start_engine())
    logger.info("duoserve serving %s on http://%s:%d", client.served_model_name, settings.host, settings.port)
    try:
        await server.serve()
    finally:
        starter.cancel()
        await asyncio.gather(starter, return_exceptions=True)
        await client.shutdown()
    return 1 if failure else 0
