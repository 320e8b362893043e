"""A worker's KV sockets: bound where --host says, given out as --advertise-host, on fixed or free ports."""

from __future__ import annotations

import pytest
import zmq

from duoserve.cli import build_parser
from duoserve.disagg.endpoints import KVEndpoints, bind_tcp, kv_endpoints_from_args, tcp_address
from duoserve.disagg.kv_events import KVEventPublisher
from tests.server.harness import free_port


def test_bound_on_the_wildcard_and_advertised_as_given(zmq_context):
    port = free_port()
    publisher = KVEventPublisher(zmq_context, "0.0.0.0", None, port, advertise_host="127.0.0.1")
    try:
        assert publisher.address == f"tcp://127.0.0.1:{port}"
        subscriber = zmq_context.socket(zmq.SUB)
        subscriber.connect(publisher.address)  # reachable at the advertised address
        subscriber.close(0)
    finally:
        publisher.close()


def test_a_free_port_and_ipv6(zmq_context):
    sock = zmq_context.socket(zmq.PULL)
    try:
        address = bind_tcp(sock, "::", 0, "fd00::3")
        assert address.startswith("tcp://[fd00::3]:") and int(address.rsplit(":", 1)[1]) > 0
    finally:
        sock.close(0)
    assert tcp_address("10.1.2.3", 5) == "tcp://10.1.2.3:5"


def test_flags(monkeypatch):
    monkeypatch.delenv("DUOSERVE_ADVERTISE_HOST", raising=False)
    args = build_parser().parse_args(
        ["serve", "--host", "0.0.0.0", "--kv-port", "7000", "--kv-events-port", "7001"]
    )
    kv = kv_endpoints_from_args(args)
    assert (kv.bind_host, kv.kv_port, kv.events_port) == ("0.0.0.0", 7000, 7001)
    assert kv.advertise_host not in ("0.0.0.0", "")  # this host's address, as before
    monkeypatch.setenv("DUOSERVE_ADVERTISE_HOST", "10.0.0.7")
    assert kv_endpoints_from_args(build_parser().parse_args(["serve"])).advertise_host == "10.0.0.7"
    args = build_parser().parse_args(["serve", "--advertise-host", "10.0.0.8"])
    assert kv_endpoints_from_args(args) == KVEndpoints("127.0.0.1", "10.0.0.8")
    with pytest.raises(ValueError, match="--kv-port"):
        KVEndpoints(kv_port=70000)
    with pytest.raises(ValueError, match="differ"):
        KVEndpoints(kv_port=7000, events_port=7000)
