"""`--discover dns:NAME[:PORT]`: the workers behind a headless Service, re-resolved every few seconds.

A headless Service's name resolves to the addresses of its ready pods (not those that are starting,
failing their readiness probe, or terminating), so the records already say who is ready; the router's
health checks confirm it. Records carry no role: each worker tells it in its `/internal/info`. A name
that does not exist (no ready pod: the Service has no records) is an empty set; a lookup that fails
otherwise (DNS unreachable) keeps the last set rather than dropping every worker.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from duoserve.router.discovery import Endpoint, http_url

logger = logging.getLogger("duoserve.router")

Resolver = Callable[[str], Awaitable[list[str]]]


async def resolve_addresses(name: str) -> list[str]:
    """The A and AAAA records of `name` (through the system resolver, as the pod's resolv.conf says)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        if err.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []  # no such name: a headless Service with no ready pod
        raise
    return sorted({info[4][0] for info in infos})


class DnsSource:
    def __init__(self, name: str, port: int, interval: float, resolve: Resolver = resolve_addresses) -> None:
        self.name = name
        self.port = port
        self.interval = interval
        self.resolve = resolve

    async def watch(self) -> AsyncIterator[list[Endpoint]]:
        last: list[str] | None = None
        while True:
            try:
                addresses = sorted(await self.resolve(self.name))
            except OSError as err:
                logger.warning(
                    "resolving %s failed (keeping its %s workers): %s", self.name, len(last or []), err
                )
            else:
                if addresses != last:
                    last = addresses
                    yield [Endpoint(http_url(a, self.port)) for a in addresses]
            await asyncio.sleep(self.interval)
