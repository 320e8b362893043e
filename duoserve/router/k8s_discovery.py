"""`--discover k8s`: the workers of the Services labelled `duoserve.io/role`, from their EndpointSlices.

The EndpointSlice controller copies a Service's labels onto its slices, so the Services of a deployment
(`duoserve.io/role: prefill | decode | both`) are found by that label. This LISTs the slices of the
pod's namespace, then WATCHes them from the list's resourceVersion (`watch=1&allowWatchBookmarks=true`),
as client-go's informers do:

- ADDED / MODIFIED replace a slice's endpoints, DELETED drops them, BOOKMARK only moves the
  resourceVersion on; every change yields a new snapshot of all the workers;
- 410 Gone (as a status, or as an ERROR event: the resourceVersion is too old) lists again;
- a watch the server ends (after `timeoutSeconds`, 290 s) is started again from the last
  resourceVersion; errors back off exponentially (0.2 s to 30 s).

Each endpoint is a worker at `http://<its first address>:<the slice's port named "http">`. An endpoint
is ready unless its `conditions.ready` is false or it is terminating (a nil `ready` means ready, as the
API documents): a draining pod turns not ready, and the router stops sending it new requests while its
in-flight ones finish. The pod's service account authenticates (its token is read again for every
request, since kubelet rotates it); it needs get/list/watch on `discovery.k8s.io` endpointslices.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from duoserve.router.discovery import K8S_API_URL_ENV, ROLES, Endpoint, http_url

logger = logging.getLogger("duoserve.router")

ROLE_LABEL = "duoserve.io/role"
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Overrides, for tests and for running a router outside the cluster (kubectl proxy: http://127.0.0.1:8001).
API_URL_ENV = K8S_API_URL_ENV
SERVICEACCOUNT_DIR_ENV = "DUOSERVE_K8S_SERVICEACCOUNT_DIR"
PORT_NAME = "http"
_MIN_BACKOFF, _MAX_BACKOFF = 0.2, 30.0
# The API server ends each watch after this (client-go asks for 5-10 min): a connection that died
# without a reset cannot leave the router blind for longer than the read timeout that backs it up.
WATCH_SECONDS = 290
_READ_TIMEOUT = WATCH_SECONDS + 40.0


@dataclass(frozen=True)
class K8sConfig:
    api_url: str  # https://kubernetes.default.svc:443, or an override
    namespace: str
    token_path: str | None = None  # the service account's token; None: no Authorization header
    ca_path: str | None = None  # the API server's CA; None: the system's

    @property
    def slices_path(self) -> str:
        return f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"


def k8s_config(namespace: str | None = None, api_url: str | None = None) -> K8sConfig:
    """From the pod's environment: KUBERNETES_SERVICE_HOST/PORT and the service account's files."""
    account = os.environ.get(SERVICEACCOUNT_DIR_ENV, SERVICEACCOUNT_DIR)
    api_url = api_url or os.environ.get(API_URL_ENV)
    if not api_url:
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        if not host:
            raise ValueError(
                "--discover k8s: not in a pod (no KUBERNETES_SERVICE_HOST): "
                f"give --k8s-api-url or ${API_URL_ENV}"
            )
        api_url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    if namespace is None:
        try:
            with open(os.path.join(account, "namespace")) as file:
                namespace = file.read().strip()
        except OSError as err:
            raise ValueError(
                f"--discover k8s: give --k8s-namespace (no service account namespace: {err})"
            ) from err
    token, ca = os.path.join(account, "token"), os.path.join(account, "ca.crt")
    return K8sConfig(
        api_url.rstrip("/"),
        namespace,
        token if os.path.exists(token) else None,
        ca if os.path.exists(ca) else None,
    )


def slice_endpoints(obj: dict[str, Any]) -> list[Endpoint]:
    """The workers of one EndpointSlice (none if it has no duoserve role or no port to reach them on)."""
    metadata = obj.get("metadata") or {}
    role = (metadata.get("labels") or {}).get(ROLE_LABEL)
    if role not in ROLES:
        logger.warning(
            "EndpointSlice %s: label %s=%r is not one of %s", metadata.get("name"), ROLE_LABEL, role, ROLES
        )
        return []
    ports = obj.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == PORT_NAME), None)
    if port is None and len(ports) == 1:  # a Service with one port need not name it
        port = ports[0].get("port")
    if not isinstance(port, int):
        logger.warning("EndpointSlice %s has no port named %r", metadata.get("name"), PORT_NAME)
        return []
    endpoints = []
    for endpoint in obj.get("endpoints") or []:
        addresses = endpoint.get("addresses") or []
        if not addresses:
            continue
        conditions = endpoint.get("conditions") or {}
        ready = conditions.get("ready") is not False and not conditions.get("terminating", False)
        # Addresses of one endpoint are one pod's: consumers use the first (the API's convention).
        endpoints.append(Endpoint(http_url(addresses[0], port), role, ready))
    return endpoints


class _Expired(Exception):
    """410 Gone: the resourceVersion watched from is older than the API server keeps; list again."""


class K8sSource:
    def __init__(self, config: K8sConfig) -> None:
        self.config = config
        self.resource_version = ""
        self.slices: dict[str, list[Endpoint]] = {}  # slice name -> its workers

    def _headers(self) -> dict[str, str]:
        if self.config.token_path is None:
            return {}
        with open(self.config.token_path) as file:  # again each time: kubelet rotates it
            return {"Authorization": f"Bearer {file.read().strip()}"}

    def _client(self) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = True
        if self.config.ca_path is not None:
            verify = ssl.create_default_context(cafile=self.config.ca_path)
        # A watch is silent for as long as nothing changes: the read timeout outlasts the watch itself.
        return httpx.AsyncClient(
            base_url=self.config.api_url, verify=verify, timeout=httpx.Timeout(10.0, read=_READ_TIMEOUT)
        )

    def snapshot(self) -> list[Endpoint]:
        return [e for name in sorted(self.slices) for e in self.slices[name]]

    async def watch(self) -> AsyncIterator[list[Endpoint]]:
        backoff = _MIN_BACKOFF
        last: list[Endpoint] | None = None
        listed = False
        async with self._client() as http:
            while True:
                try:
                    if not listed:
                        await self._list(http)
                        listed, backoff, last = True, _MIN_BACKOFF, self.snapshot()
                        yield last
                        continue  # and watch from the list's resourceVersion at once
                    async for _ in self._watch_once(http):
                        backoff = _MIN_BACKOFF
                        if self.snapshot() != last:
                            last = self.snapshot()
                            yield last
                    # The server ended the watch (its timeout): watch again from the last resourceVersion.
                except _Expired:
                    logger.info(
                        "EndpointSlices: resourceVersion %s expired, listing again", self.resource_version
                    )
                    listed = False
                    continue
                except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                    logger.warning(
                        "EndpointSlices: %s: %s (again in %.1f s)", type(err).__name__, err, backoff
                    )
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, _MAX_BACKOFF)

    async def _list(self, http: httpx.AsyncClient) -> None:
        response = await http.get(
            self.config.slices_path, params={"labelSelector": ROLE_LABEL}, headers=self._headers()
        )
        response.raise_for_status()
        body = response.json()
        self.slices = {item["metadata"]["name"]: slice_endpoints(item) for item in body.get("items") or []}
        self.resource_version = body["metadata"]["resourceVersion"]

    async def _watch_once(self, http: httpx.AsyncClient) -> AsyncIterator[None]:
        """Apply each event of one watch request; yields after each ADDED, MODIFIED or DELETED."""
        params = {
            "labelSelector": ROLE_LABEL,
            "watch": "1",
            "allowWatchBookmarks": "true",
            "resourceVersion": self.resource_version,
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        async with http.stream(
            "GET", self.config.slices_path, params=params, headers=self._headers()
        ) as response:
            if response.status_code == 410:
                raise _Expired
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":  # a metav1.Status
                    if obj.get("code") == 410:
                        raise _Expired
                    raise ValueError(f"watch error {obj.get('code')}: {obj.get('message')}")
                self.resource_version = obj["metadata"]["resourceVersion"]
                name = obj["metadata"].get("name")
                if kind in ("ADDED", "MODIFIED"):
                    self.slices[name] = slice_endpoints(obj)
                elif kind == "DELETED":
                    self.slices.pop(name, None)
                else:  # BOOKMARK: only the resourceVersion moves on
                    continue
                yield
