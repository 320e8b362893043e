"""Discovery specs and the static source, without processes (test_discovery_router.py runs the router
over real workers)."""

from __future__ import annotations

import asyncio

import pytest

from duoserve.router.discovery import Endpoint, StaticSource, http_url, parse_discover
from duoserve.router.routing import RouterConfig


def test_parse_discover():
    assert parse_discover("k8s") == ("k8s", None, 0)
    assert parse_discover("dns:decode.ns.svc.cluster.local") == ("dns", "decode.ns.svc.cluster.local", 8000)
    assert parse_discover("dns:decode:8100") == ("dns", "decode", 8100)
    for bad in ("dns:", "dns:x:port", "dns:x:0", "dns:x:70000", "consul", ""):
        with pytest.raises(ValueError, match="--discover"):
            parse_discover(bad)
    with pytest.raises(ValueError, match="--discover"):
        RouterConfig(discover=["etcd"])
    with pytest.raises(ValueError, match="--decode or --discover"):
        RouterConfig()
    assert RouterConfig(discover=["k8s"]).decode_urls == []


def test_static_source_is_one_snapshot():
    async def snapshots() -> list[list[Endpoint]]:
        return [s async for s in StaticSource(["http://p"], ["http://d"]).watch()]

    assert asyncio.run(snapshots()) == [[Endpoint("http://p", "prefill"), Endpoint("http://d", "decode")]]
    assert http_url("fd00::1", 80) == "http://[fd00::1]:80" and http_url("a.b", 1) == "http://a.b:1"
