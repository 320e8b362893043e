"""How a router learns its workers: discovery sources, each yielding the current set of workers.

A source is an async iterator of snapshots: every time what it knows changes, it yields the complete
list of `Endpoint`s (URL, role when it knows it, and whether it is ready). The router keeps the last
snapshot of each source, adds the workers that appear, and removes those that are gone; it health-checks
every worker itself and routes to one only when both agree it is ready (duoserve.router.router).

- `StaticSource`: fixed URLs (`--prefill URL --decode URL`, what `duoserve up` and tests use);
- `DnsSource` (`--discover dns:NAME[:PORT]`, duoserve.router.dns_discovery): a headless Service's
  records, re-resolved every `--discover-interval` seconds;
- `K8sSource` (`--discover k8s`, duoserve.router.k8s_discovery): a watch of the EndpointSlices of the
  Services labelled `duoserve.io/role`, through the Kubernetes API with the pod's service account.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

ROLES = ("prefill", "decode", "both")
DEFAULT_PORT = 8000  # `duoserve serve`'s
# The Kubernetes API server for --discover k8s outside a pod (tests, kubectl proxy).
K8S_API_URL_ENV = "DUOSERVE_K8S_API_URL"


@dataclass(frozen=True)
class Endpoint:
    url: str  # http://host:port
    role: str | None = None  # prefill | decode | both; None: the worker's /internal/info says (DNS)
    ready: bool = True  # the source may route to it (not terminating, its readiness probe passes)


class DiscoverySource(Protocol):
    def watch(self) -> AsyncIterator[list[Endpoint]]:
        """Snapshots of the whole set of workers, one each time it changes; runs until cancelled."""
        ...


class StaticSource:
    """Fixed URLs: one snapshot, then nothing changes (the router's health checks still decide readiness)."""

    def __init__(self, prefill_urls: list[str], decode_urls: list[str]) -> None:
        self.endpoints = [Endpoint(u, "prefill") for u in prefill_urls]
        # A decode URL may be a decode or a colocated worker: both are decode-capable.
        self.endpoints += [Endpoint(u, "decode") for u in decode_urls]

    async def watch(self) -> AsyncIterator[list[Endpoint]]:
        yield list(self.endpoints)


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def parse_discover(spec: str) -> tuple[str, str | None, int]:
    """`k8s` or `dns:NAME[:PORT]` -> (kind, name, port); ValueError naming the flag otherwise."""
    if spec == "k8s":
        return "k8s", None, 0
    if spec.startswith("dns:"):
        name, _, port = spec.removeprefix("dns:").partition(":")
        if not name or (port and not port.isdigit()) or not 0 < int(port or DEFAULT_PORT) <= 65535:
            raise ValueError(
                f"--discover dns:NAME[:PORT] needs a host name and a port in 1..65535, got {spec!r}"
            )
        return "dns", name, int(port or DEFAULT_PORT)
    raise ValueError(f"--discover must be k8s or dns:NAME[:PORT], got {spec!r}")
