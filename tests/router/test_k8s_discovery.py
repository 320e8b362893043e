"""`--discover k8s` against a local server speaking the Kubernetes API's EndpointSlice list/watch protocol:
list then watch, every event kind, bookmarks, a watch the server ends, 410 Gone (as an event and as a
status), readiness and termination of endpoints, the port named http, and the service account's token."""

from __future__ import annotations

import asyncio

import pytest

from duoserve.router.discovery import Endpoint
from duoserve.router.k8s_discovery import K8sConfig, K8sSource, k8s_config, slice_endpoints
from tests.router.fake_k8s import FakeKubernetes, endpoint_slice

DEADLINE = 30.0  # a deadline, not a measure: each wait returns as soon as the snapshot comes


def decode_slice(*endpoints: tuple[str, bool, bool]) -> dict:
    return endpoint_slice("decode-x1", "decode", 8000, list(endpoints))


def test_slice_endpoints_follow_conditions_and_the_http_port():
    obj = decode_slice(("10.0.0.1", True, False), ("10.0.0.2", False, False), ("10.0.0.3", False, True))
    obj["endpoints"].append({"addresses": ["10.0.0.4"], "conditions": {}})  # nil ready: ready (API docs)
    obj["endpoints"].append({"addresses": [], "conditions": {"ready": True}})  # no address: skipped
    assert slice_endpoints(obj) == [
        Endpoint("http://10.0.0.1:8000", "decode", True),
        Endpoint("http://10.0.0.2:8000", "decode", False),
        Endpoint("http://10.0.0.3:8000", "decode", False),
        Endpoint("http://10.0.0.4:8000", "decode", True),
    ]
    v6 = endpoint_slice("both-x", "both", 8000, [("fd00::5", True, False)])
    assert slice_endpoints(v6) == [Endpoint("http://[fd00::5]:8000", "both", True)]
    unnamed = endpoint_slice("prefill-x", "prefill", 8000, [("10.0.0.9", True, False)], port_name="grpc")
    assert slice_endpoints(unnamed) == []  # two ports and none named http: no way to reach it
    unnamed["ports"] = [{"port": 8100}]  # a Service of one port need not name it
    assert slice_endpoints(unnamed) == [Endpoint("http://10.0.0.9:8100", "prefill", True)]
    unnamed["metadata"]["labels"]["duoserve.io/role"] = "router"
    assert slice_endpoints(unnamed) == []


def test_config_from_the_pods_service_account(tmp_path, monkeypatch):
    (tmp_path / "namespace").write_text("inference\n")
    (tmp_path / "token").write_text("tok")
    monkeypatch.setenv("DUOSERVE_K8S_SERVICEACCOUNT_DIR", str(tmp_path))
    monkeypatch.delenv("DUOSERVE_K8S_API_URL", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    config = k8s_config()
    assert config == K8sConfig("https://10.96.0.1:443", "inference", str(tmp_path / "token"), None)
    assert config.slices_path == "/apis/discovery.k8s.io/v1/namespaces/inference/endpointslices"
    assert k8s_config("other", "http://127.0.0.1:8001/").api_url == "http://127.0.0.1:8001"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(ValueError, match="--k8s-api-url"):
        k8s_config()
    (tmp_path / "namespace").unlink()
    with pytest.raises(ValueError, match="--k8s-namespace"):
        k8s_config(api_url="http://127.0.0.1:1")


class Snapshots:
    """The source's snapshots, awaited one at a time."""

    def __init__(self, source: K8sSource) -> None:
        self.iterator = source.watch()

    async def next(self) -> list[Endpoint]:
        return await asyncio.wait_for(anext(self.iterator), DEADLINE)

    async def close(self) -> None:
        await self.iterator.aclose()


def test_list_then_watch_every_event_kind(tmp_path):
    (tmp_path / "token").write_text("sa-token\n")

    async def scenario(fake: FakeKubernetes) -> None:
        config = K8sConfig(fake.url, fake.namespace, token_path=str(tmp_path / "token"))
        source = K8sSource(config)
        snapshots = Snapshots(source)
        try:
            # Listed: the router's Services only (the selector), ready and not.
            first = await snapshots.next()
            assert first == [
                Endpoint("http://10.0.0.1:8000", "decode", True),
                Endpoint("http://10.0.0.2:8000", "decode", False),
            ]
            assert fake.lists == 1 and source.resource_version == str(fake.version)
            # MODIFIED: the second pod passed its readiness probe; the first is terminating.
            fake.apply(decode_slice(("10.0.0.1", False, True), ("10.0.0.2", True, False)))
            assert [e.ready for e in await snapshots.next()] == [False, True]
            # A BOOKMARK moves the resourceVersion on without a snapshot; ADDED comes next.
            fake.bookmark()
            fake.apply(endpoint_slice("prefill-y2", "prefill", 8001, [("10.0.1.1", True, False)]))
            assert (await snapshots.next())[-1] == Endpoint("http://10.0.1.1:8001", "prefill", True)
            # The server ends the watch: watched again from the last resourceVersion, no new list.
            fake.end_watches()
            fake.delete("prefill-y2")
            assert await snapshots.next() == [
                Endpoint("http://10.0.0.1:8000", "decode", False),
                Endpoint("http://10.0.0.2:8000", "decode", True),
            ]
            assert fake.lists == 1 and len(fake.watches) >= 2 and fake.watches[-1] != fake.watches[0]
            # 410 Gone as an ERROR event (the history was compacted): listed again.
            fake.compact()
            fake.end_watches()
            await snapshots.next()
            assert fake.lists == 2
            fake.apply(decode_slice(("10.0.0.2", True, False)))
            assert await snapshots.next() == [Endpoint("http://10.0.0.2:8000", "decode", True)]
            # 410 as the HTTP status of the watch request: listed again too.
            fake.gone_as_status = True
            fake.compact()
            fake.end_watches()
            await snapshots.next()
            assert fake.lists == 3
            assert fake.unauthorized == 0  # every request carried the service account's token
        finally:
            await snapshots.close()

    with FakeKubernetes(token="sa-token") as fake:
        fake.apply(decode_slice(("10.0.0.1", True, False), ("10.0.0.2", False, False)))
        unlabelled = endpoint_slice("kubernetes-a", "decode", 443, [("10.0.9.9", True, False)])
        del unlabelled["metadata"]["labels"]["duoserve.io/role"]
        fake.apply(unlabelled)
        asyncio.run(scenario(fake))


def test_an_unreachable_api_server_is_retried(tmp_path):
    """Refused (a wrong token, then the right one): the source backs off and lists once it may."""
    token = tmp_path / "token"
    token.write_text("old")

    async def scenario(fake: FakeKubernetes) -> None:
        snapshots = Snapshots(K8sSource(K8sConfig(fake.url, fake.namespace, token_path=str(token))))
        try:
            pending = asyncio.ensure_future(snapshots.next())
            while fake.unauthorized == 0:
                await asyncio.sleep(0.01)
            token.write_text("rotated")  # kubelet rotated it: read again for every request
            assert await pending == [Endpoint("http://10.0.0.1:8000", "decode", True)]
        finally:
            await snapshots.close()

    with FakeKubernetes(token="rotated") as fake:
        fake.apply(decode_slice(("10.0.0.1", True, False)))
        asyncio.run(scenario(fake))
