"""A Kubernetes API server's EndpointSlice list/watch, on 127.0.0.1 (no cluster runs here).

It speaks the real protocol for one resource: `GET /apis/discovery.k8s.io/v1/namespaces/NS/endpointslices`
with a `labelSelector` (here: a label key that must exist), answering an `EndpointSliceList` with its
`metadata.resourceVersion`; with `watch=1`, a chunked stream of newline-delimited `{"type", "object"}`
events after the given resourceVersion (ADDED, MODIFIED, DELETED, BOOKMARK when allowed, and
ERROR with a 410 Status when that resourceVersion was compacted away), as kube-apiserver does.
The test drives it: `apply`/`delete` slices, `bookmark()`, `end_watches()`, `compact()`.
"""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

ROLE_LABEL = "duoserve.io/role"


def endpoint_slice(
    name: str, role: str, port: int, endpoints: list[tuple[str, bool, bool]], port_name: str = "http"
) -> dict:
    """An EndpointSlice of a Service labelled with `role`: endpoints are (address, ready, terminating)."""
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": "",
            "labels": {ROLE_LABEL: role, "kubernetes.io/service-name": name.rsplit("-", 1)[0]},
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": ready, "serving": ready or terminating, "terminating": terminating},
                "targetRef": {"kind": "Pod", "name": f"{name}-{i}"},
            }
            for i, (address, ready, terminating) in enumerate(endpoints)
        ],
        "ports": [{"name": "metrics", "port": 9090, "protocol": "TCP"}]
        + [{"name": port_name, "port": port, "protocol": "TCP"}],
    }


class FakeKubernetes:
    def __init__(self, namespace: str = "duoserve", token: str | None = None) -> None:
        self.namespace = namespace
        self.token = token
        self.path = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        self.version = 100
        self.slices: dict[str, dict] = {}
        self.events: list[tuple[int, str, dict]] = []  # (resourceVersion, type, object)
        self.oldest = 0  # a watch from before this resourceVersion gets 410 Gone
        self.generation = 0  # end_watches() bumps it: open watch streams end
        self.lists = 0
        self.watches: list[str] = []  # the resourceVersion each watch started from
        self.gone_as_status = False  # answer 410 as the HTTP status rather than as an ERROR event
        self.unauthorized = 0  # requests refused for a wrong token
        self.changed = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeKubernetes:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.end_watches()
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------- what the test does

    def apply(self, obj: dict) -> None:
        with self.changed:
            obj = copy.deepcopy(obj)
            obj["metadata"]["namespace"] = self.namespace
            name = obj["metadata"]["name"]
            kind = "MODIFIED" if name in self.slices else "ADDED"
            self._record(kind, obj)
            self.slices[name] = obj

    def delete(self, name: str) -> None:
        with self.changed:
            self._record("DELETED", self.slices.pop(name))

    def bookmark(self) -> None:
        with self.changed:
            self.version += 1
            obj = {"kind": "EndpointSlice", "metadata": {"resourceVersion": str(self.version)}}
            self.events.append((self.version, "BOOKMARK", obj))
            self.changed.notify_all()

    def end_watches(self) -> None:
        """The API server ends every open watch (as its watch timeout does)."""
        with self.changed:
            self.generation += 1
            self.changed.notify_all()

    def compact(self) -> None:
        """Forget the history (after a change elsewhere): a watch from before now gets 410 Gone."""
        with self.changed:
            self.version += 1
            self.oldest = self.version
            self.events.clear()

    def _record(self, kind: str, obj: dict) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.events.append((self.version, kind, copy.deepcopy(obj)))
        self.changed.notify_all()

    # ---------------------------------------------------------------- the API server

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    fake.unauthorized += 1
                    return self._json(401, _status(401, "Unauthorized"))
                if url.path != fake.path:
                    return self._json(404, _status(404, f"{url.path} not found"))
                if query.get("watch") in ("1", "true"):
                    return self._watch(query)
                with fake.changed:
                    fake.lists += 1
                    items = [s for s in fake.slices.values() if _selected(s, query.get("labelSelector"))]
                    body = {
                        "kind": "EndpointSliceList",
                        "apiVersion": "discovery.k8s.io/v1",
                        "metadata": {"resourceVersion": str(fake.version)},
                        "items": copy.deepcopy(items),
                    }
                self._json(200, body)

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _watch(self, query: dict[str, str]) -> None:
                since = int(query.get("resourceVersion") or 0)
                bookmarks = query.get("allowWatchBookmarks") == "true"
                with fake.changed:
                    fake.watches.append(query.get("resourceVersion", ""))
                    generation = fake.generation
                    gone = since < fake.oldest
                if gone and fake.gone_as_status:
                    return self._json(410, _status(410, f"too old resource version: {since}"))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    if gone:
                        event = {
                            "type": "ERROR",
                            "object": _status(410, f"too old resource version: {since}"),
                        }
                        self._chunk(json.dumps(event).encode() + b"\n")
                    else:
                        self._stream(since, generation, bookmarks, query.get("labelSelector"))
                    self._chunk(b"")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _stream(self, since: int, generation: int, bookmarks: bool, selector: str | None) -> None:
                while True:
                    with fake.changed:
                        fake.changed.wait_for(
                            lambda since=since: (
                                fake.generation != generation or any(v > since for v, _, _ in fake.events)
                            ),
                            timeout=1.0,
                        )
                        if fake.generation != generation:
                            return
                        pending = [(v, k, o) for v, k, o in fake.events if v > since]
                    for version, kind, obj in pending:
                        since = version
                        if (kind == "BOOKMARK" and not bookmarks) or (
                            kind != "BOOKMARK" and not _selected(obj, selector)
                        ):
                            continue
                        self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        return Handler


def _selected(obj: dict, selector: str | None) -> bool:
    """An existence selector (`key`), the only kind the router uses."""
    return selector is None or selector in (obj["metadata"].get("labels") or {})


def _status(code: int, message: str) -> dict:
    reason = {401: "Unauthorized", 404: "NotFound", 410: "Expired"}[code]
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
