"""The router's own gauges, read from its worker pool at each scrape: what autoscalers need of it.

- `duoserve:router_queued_prefill_tokens`: prompt tokens routed to prefill workers and not prefilled
  yet (their first token has not come back), summed over the prefill workers. Divided by the prefill
  throughput of one worker (tokens/s), it is the seconds of prefill backlog: KEDA scales the prefill
  workers on it. It is the same count `--max-prefill-queue-tokens` bounds per worker.
- `duoserve:router_ready_workers{role}`: workers the router routes to now (listed ready by discovery
  and passing its health checks), per role (prefill, decode, both); every role's series exists, at 0.

The decode side scales on the workers' own `duoserve:num_requests_waiting` and `duoserve:kv_cache_usage_perc`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from duoserve.router.discovery import ROLES
from duoserve.router.routing import RoutingPolicy
from duoserve.server.metrics import PREFIX


class RouterCollector(Collector):
    def __init__(self, policy: RoutingPolicy, labels: dict[str, str]) -> None:
        self.policy = policy
        self.labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        names, values = list(self.labels), list(self.labels.values())
        queued = GaugeMetricFamily(
            PREFIX + "router_queued_prefill_tokens",
            "Prompt tokens routed to prefill workers and not prefilled yet, summed over them.",
            labels=names,
        )
        queued.add_metric(values, float(sum(w.queued_prefill_tokens for w in self.policy.prefill)))
        yield queued
        ready = GaugeMetricFamily(
            PREFIX + "router_ready_workers",
            "Workers the router routes new requests to, per role.",
            labels=[*names, "role"],
        )
        counts = dict.fromkeys(ROLES, 0)
        for worker in self.policy.workers:
            if worker.ready and worker.role in counts:
                counts[worker.role] += 1
        for role, count in counts.items():
            ready.add_metric([*values, role], float(count))
        yield ready
