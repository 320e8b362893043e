"""Where a worker's KV sockets listen, and the address it gives out for them.

A worker binds two TCP sockets besides its HTTP port: the KV receiver (prefill workers push prompt KV
to it) and the KV event publisher (routers index its prefix cache). They bind where the HTTP server
does (all interfaces for a wildcard `--host`), and other hosts are told the *advertised* host: in a
Kubernetes pod that is the pod IP (`--advertise-host $(POD_IP)`), which the bound address cannot say.
Both ends authenticate over the advertised address (`duoserve.disagg.auth`), so it must be the one
peers connect to. Fixed ports (`--kv-port`, `--kv-events-port`) let a NetworkPolicy admit only
prefill pods to decode pods' KV port; 0 picks a free one.
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass

import zmq

ADVERTISE_HOST_ENV = "DUOSERVE_ADVERTISE_HOST"
_WILDCARDS = ("", "0.0.0.0", "::", "*")


@dataclass(frozen=True)
class KVEndpoints:
    bind_host: str = "127.0.0.1"
    advertise_host: str = "127.0.0.1"
    kv_port: int = 0  # the KV receiver's; 0: a free one
    events_port: int = 0  # the KV event publisher's; 0: a free one

    def __post_init__(self) -> None:
        for flag, port in (("--kv-port", self.kv_port), ("--kv-events-port", self.events_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{flag} must be in [0, 65535], got {port}")
        if self.kv_port and self.kv_port == self.events_port:
            raise ValueError("--kv-port and --kv-events-port must differ")


# Both sockets on 127.0.0.1, at free ports: a worker that only talks to processes on its own host.
LOOPBACK = KVEndpoints()


def advertised_host(host: str) -> str:
    """The address other hosts reach this one at: the bound one, unless it is a wildcard."""
    if host in _WILDCARDS:
        return socket.gethostbyname(socket.gethostname())
    return host


def tcp_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def bind_tcp(sock: zmq.Socket, bind_host: str, port: int, advertise_host: str) -> str:
    """Bind `sock` on `bind_host` (all interfaces for a wildcard) at `port` (0: a free one); returns the
    advertised address, `tcp://advertise_host:port`."""
    if bind_host in ("::", "") or ":" in bind_host:
        sock.setsockopt(zmq.IPV6, 1)  # "::" binds both families
    host = "*" if bind_host in _WILDCARDS else (f"[{bind_host}]" if ":" in bind_host else bind_host)
    if port:
        sock.bind(f"tcp://{host}:{port}")
    else:
        port = sock.bind_to_random_port(f"tcp://{host}")
    return tcp_address(advertise_host, port)


def add_kv_endpoint_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KV sockets (disaggregation)")
    group.add_argument(
        "--advertise-host",
        default=os.environ.get(ADVERTISE_HOST_ENV),
        help="the address other pods reach this worker's KV sockets at, e.g. the pod IP (default: "
        f"${ADVERTISE_HOST_ENV}, else --host, else this host name's address for a wildcard --host)",
    )
    group.add_argument(
        "--kv-port", type=int, default=0, help="the KV receiver's port (default: 0, a free one)"
    )
    group.add_argument(
        "--kv-events-port",
        type=int,
        default=0,
        help="the KV event publisher's port (default: 0, a free one)",
    )


def kv_endpoints_from_args(args: argparse.Namespace) -> KVEndpoints:
    return KVEndpoints(
        bind_host=args.host,
        advertise_host=args.advertise_host or advertised_host(args.host),
        kv_port=args.kv_port,
        events_port=args.kv_events_port,
    )
