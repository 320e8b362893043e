"""Prometheus metrics with vLLM's names and meanings under the `duoserve:` prefix.

Same labels as vLLM (`model_name`, `engine`), same buckets, same units (KV usage in [0, 1], prefix
cache counters in tokens), so a vLLM Grafana dashboard works after replacing `vllm:` by `duoserve:`.
Engine-state metrics (running/waiting, KV usage, prefix cache, preemptions) are read from the latest
stats snapshot the engine process sent; request metrics are observed here as outputs arrive.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Messages a socket dropped (duoserve.disagg.auth.DropCounts): engine stats carry them as
# "untrusted_messages_dropped:<socket>:<reason>"; the API process counts its own the same way.
from duoserve.disagg.auth import DROPPED_STAT

PREFIX = "duoserve:"
FINISH_REASONS = ("stop", "length", "abort")

_TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip
_ITL_BUCKETS = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
]  # fmt: skip
_LATENCY_BUCKETS = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
]  # fmt: skip
_ITERATION_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def _1_2_5_buckets(maximum: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to maximum (vLLM's token-count buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > maximum:
                return buckets
            buckets.append(value)
        exponent += 1


class _EngineStateCollector(Collector):
    """Gauges and cumulative counters straight from the engine's latest stats snapshot."""

    _GAUGES = {
        "num_requests_running": "Number of requests in model execution batches.",
        "num_requests_waiting": "Number of requests waiting to be processed.",
        "kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    }
    _COUNTERS = {
        "prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
        "prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
        "num_preemptions": "Cumulative number of preemption from the engine.",
        # Disaggregation (not in vLLM): KV bytes sent (prefill worker) or received (decode worker), and
        # on the decode side the requests whose KV arrived and their summed ticket-to-complete seconds.
        "kv_transfer_bytes": "KV cache bytes transferred between workers.",
        "kv_transfer_requests": "Requests whose prompt KV arrived from a prefill worker.",
        "kv_transfer_seconds": "Seconds from KV ticket to complete KV, summed over requests.",
        "kv_transfer_busy_seconds": "Seconds the engine loop spent exporting/sending or importing KV.",
        # Speculative decoding (only with --speculative): acceptance rate = accepted / draft tokens,
        # mean accepted length = 1 + accepted / drafts (tokens per verification step).
        "spec_decode_num_drafts": "Number of spec decoding drafts.",
        "spec_decode_num_draft_tokens": "Number of draft tokens.",
        "spec_decode_num_accepted_tokens": "Number of accepted tokens.",
    }
    _PER_POSITION = "spec_decode_num_accepted_tokens_per_pos"

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.stats: dict[str, float] = {}
        self.local: dict[str, float] = {}  # this process's own counts, in the stats' key format

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        names, values = list(self.labels), list(self.labels.values())
        for key, doc in self._GAUGES.items():
            family = GaugeMetricFamily(PREFIX + key, doc, labels=names)
            family.add_metric(values, float(self.stats.get(key, 0.0)))
            yield family
        for key, doc in self._COUNTERS.items():
            family = CounterMetricFamily(PREFIX + key, doc, labels=names)
            family.add_metric(values, float(self.stats.get(key, 0.0)))
            yield family
        family = CounterMetricFamily(
            PREFIX + self._PER_POSITION, "Accepted tokens per draft position.", labels=[*names, "position"]
        )
        for key, value in self.stats.items():
            if key.startswith(self._PER_POSITION + ":"):
                family.add_metric([*values, key.rsplit(":", 1)[1]], float(value))
        yield family
        family = CounterMetricFamily(
            PREFIX + DROPPED_STAT,
            "Network messages dropped: malformed, oversized, unauthenticated, replayed or foreign.",
            labels=[*names, "socket", "reason"],
        )
        for key, value in (self.stats | self.local).items():
            if key.startswith(DROPPED_STAT + ":"):
                _, socket, reason = key.split(":", 2)
                family.add_metric([*values, socket, reason], float(value))
        yield family
        yield from _kv_offload_families(self.stats, names, values)


# ---- KV offload tiers (duoserve/kv/offload; not in vLLM). Stats keys "<name>:<tier>[:<reason>]"; the
# load-latency histogram as "kv_offload_load_seconds_bucket:<tier>:<le>" and "..._sum:<tier>".
_OFFLOAD_COUNTERS = {
    "kv_offload_stores": "KV blocks stored into an offload tier.",
    "kv_offload_store_bytes": "Bytes of KV blocks stored into an offload tier.",
    "kv_offload_stores_skipped": "KV blocks a tier could not take (all pinned, writes backed up, or off).",
    "kv_offload_hits": "KV blocks loaded from an offload tier into the KV cache.",
    "kv_offload_load_bytes": "Bytes of KV blocks loaded from an offload tier into the KV cache.",
}
_OFFLOAD_GAUGES = {
    "kv_offload_used_bytes": "Bytes of KV blocks an offload tier holds.",
    "kv_offload_max_bytes": "Byte limit of an offload tier.",
    "kv_offload_enabled": "1 while an offload tier works; 0 once it failed at run time (until restart).",
    "kv_offload_read_bytes_per_second": "Measured speed of loads from an offload tier (the cost model's).",
}
_OFFLOAD_UNLABELED = {
    "kv_offload_loads": ("counter", "Loads from the offload tiers (one per request admitted with a load)."),
    "kv_offload_loads_declined": ("counter", "KV blocks a tier held that were computed again, as cheaper."),
    "kv_offload_load_failures": (
        "counter",
        "Loads from an offload tier that failed; their requests computed.",
    ),
    "kv_offload_prefill_tokens_per_second": ("gauge", "Prefill speed the offload cost model compares with."),
}


def _kv_offload_families(stats: dict[str, float], names: list[str], values: list[str]) -> Iterator:
    """The offload tiers' metrics, one series per tier; none when the engine has no offload tier."""
    if not any(key.startswith("kv_offload_") for key in stats):
        return
    for key, (kind, doc) in _OFFLOAD_UNLABELED.items():
        family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
            PREFIX + key, doc, labels=names
        )
        family.add_metric(values, float(stats.get(key, 0.0)))
        yield family
    for table, kind in ((_OFFLOAD_COUNTERS, CounterMetricFamily), (_OFFLOAD_GAUGES, GaugeMetricFamily)):
        for name, doc in table.items():
            family = kind(PREFIX + name, doc, labels=[*names, "tier"])
            for key, value in stats.items():
                if key.startswith(name + ":"):
                    family.add_metric([*values, key.split(":", 1)[1]], float(value))
            yield family
    dropped = CounterMetricFamily(
        PREFIX + "kv_offload_dropped",
        "KV blocks found torn, corrupt, foreign or holding other tokens, dropped and never served.",
        labels=[*names, "tier", "reason"],
    )
    for key, value in stats.items():
        if key.startswith("kv_offload_dropped:"):
            _, tier, reason = key.split(":", 2)
            dropped.add_metric([*values, tier, reason], float(value))
    yield dropped
    latency = HistogramMetricFamily(
        PREFIX + "kv_offload_load_seconds",
        "Seconds a request waited for its KV blocks to load from an offload tier (the deepest it read).",
        labels=[*names, "tier"],
    )
    for key, total in stats.items():
        if key.startswith("kv_offload_load_seconds_sum:"):
            tier = key.split(":", 1)[1]
            prefix = f"kv_offload_load_seconds_bucket:{tier}:"
            buckets = sorted((float(k[len(prefix) :]), v) for k, v in stats.items() if k.startswith(prefix))
            latency.add_metric([*values, tier], [(floatToGoString(le), n) for le, n in buckets], total)
    yield latency


class ServerMetrics:
    def __init__(self, model_name: str, max_model_len: int = 1 << 20) -> None:
        self.registry = CollectorRegistry()
        label_values = {"model_name": model_name, "engine": "0"}
        self.engine_state = _EngineStateCollector(label_values)
        self.registry.register(self.engine_state)
        names = list(label_values)
        values = list(label_values.values())

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, names, registry=self.registry).labels(*values)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, names, buckets=buckets, registry=self.registry).labels(
                *values
            )

        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        success = Counter(
            PREFIX + "request_success",
            "Count of successfully processed requests.",
            [*names, "finished_reason"],
            registry=self.registry,
        )
        self._success = success
        self._label_values = values
        for reason in FINISH_REASONS:  # each series exists from the start, at 0, as in vLLM
            success.labels(*values, reason)
        token_buckets = _1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        # Not in vLLM: shows that a router tokenizes each prompt once and its workers never do.
        self.prompt_tokenizations = counter(
            "prompt_tokenizations", "Number of prompts tokenized (or chat-templated) by this server."
        )
        self.request_params_n = histogram(
            "request_params_n", "Histogram of the n request parameter.", [1, 2, 5, 10, 20]
        )
        self.request_params_max_tokens = histogram(
            "request_params_max_tokens", "Histogram of the max_tokens request parameter.", token_buckets
        )
        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Histogram of number of tokens per engine_step.", _ITERATION_BUCKETS
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", _TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _ITL_BUCKETS
        )
        # The name older vLLM versions (and their dashboards) use for the same observations.
        self.tpot = histogram(
            "time_per_output_token_seconds", "Histogram of time per output token in seconds.", _ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", _LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            _LATENCY_BUCKETS,
        )
        self.prefill_time = histogram(
            "request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            _LATENCY_BUCKETS,
        )
        self.decode_time = histogram(
            "request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            _LATENCY_BUCKETS,
        )
        self.inference_time = histogram(
            "request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            _LATENCY_BUCKETS,
        )

    def request_finished(self, finish_reason: str) -> None:
        self._success.labels(*self._label_values, finish_reason).inc()

    def set_engine_stats(self, stats: dict[str, float]) -> None:
        self.engine_state.stats = stats

    def untrusted_dropped(self, socket: str, reason: str) -> None:
        """Count a message this process dropped from `socket` (the engine counts its own in its stats)."""
        key = f"{DROPPED_STAT}:{socket}:{reason}"
        self.engine_state.local[key] = self.engine_state.local.get(key, 0.0) + 1

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.tpot.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
