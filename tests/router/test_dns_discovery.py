"""`--discover dns:NAME`: a headless Service's records, re-resolved; the resolver is injected (and the
system's one is checked on localhost, which needs no network)."""

from __future__ import annotations

import asyncio

from duoserve.router.discovery import Endpoint
from duoserve.router.dns_discovery import DnsSource, resolve_addresses

DEADLINE = 30.0


def test_snapshots_follow_the_records():
    records: list[str] | OSError = ["10.0.0.2", "10.0.0.1"]
    lookups: list[str] = []

    async def resolve(name: str) -> list[str]:
        lookups.append(name)
        if isinstance(records, OSError):
            raise records
        return list(records)

    async def scenario() -> None:
        nonlocal records
        snapshots = DnsSource("decode.duoserve.svc", 8100, interval=0.01, resolve=resolve).watch()
        try:
            first = await asyncio.wait_for(anext(snapshots), DEADLINE)
            assert first == [Endpoint("http://10.0.0.1:8100"), Endpoint("http://10.0.0.2:8100")]
            # A failed lookup keeps the last set (no snapshot); a pod that goes is dropped next time.
            records = OSError("temporary failure in name resolution")
            count = len(lookups)
            pending = asyncio.ensure_future(anext(snapshots))
            while len(lookups) < count + 3:
                await asyncio.sleep(0.01)
            assert not pending.done()
            records = ["10.0.0.2", "fd00::7"]
            assert await asyncio.wait_for(pending, DEADLINE) == [
                Endpoint("http://10.0.0.2:8100"),
                Endpoint("http://[fd00::7]:8100"),
            ]
            records = []  # no ready pod: the Service has no records
            assert await asyncio.wait_for(anext(snapshots), DEADLINE) == []
        finally:
            await snapshots.aclose()
        assert set(lookups) == {"decode.duoserve.svc"}

    asyncio.run(scenario())


def test_the_system_resolver():
    addresses = asyncio.run(resolve_addresses("localhost"))
    assert addresses and set(addresses) <= {"127.0.0.1", "::1"}
