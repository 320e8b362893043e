"""Engine stats as Prometheus metrics: the KV offload tiers' families (counters, gauges, the load
latency histogram), one series per tier, and none at all without an offload tier."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from duoserve.server.metrics import ServerMetrics

OFFLOAD_STATS = {
    "kv_offload_loads_declined": 2,
    "kv_offload_load_failures": 1,
    "kv_offload_prefill_tokens_per_second": 1500.0,
    "kv_offload_stores:cpu": 7,
    "kv_offload_stores:disk": 3,
    "kv_offload_hits:disk": 5,
    "kv_offload_used_bytes:disk": 4096,
    "kv_offload_enabled:disk": 0.0,
    "kv_offload_dropped:disk:corrupt": 1,
    "kv_offload_load_seconds_bucket:disk:0.001": 1,
    "kv_offload_load_seconds_bucket:disk:0.01": 3,
    "kv_offload_load_seconds_bucket:disk:inf": 4,
    "kv_offload_load_seconds_sum:disk": 0.5,
}


def scrape(stats: dict[str, float]) -> dict[tuple[str, tuple], float]:
    metrics = ServerMetrics("m")
    metrics.set_engine_stats(stats)
    samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine")))
            samples[(s.name, labels)] = s.value
    return samples


def test_kv_offload_metrics_per_tier():
    samples = scrape(OFFLOAD_STATS)
    assert samples[("duoserve:kv_offload_stores_total", (("tier", "cpu"),))] == 7
    assert samples[("duoserve:kv_offload_stores_total", (("tier", "disk"),))] == 3
    assert samples[("duoserve:kv_offload_hits_total", (("tier", "disk"),))] == 5
    assert samples[("duoserve:kv_offload_used_bytes", (("tier", "disk"),))] == 4096
    assert samples[("duoserve:kv_offload_enabled", (("tier", "disk"),))] == 0
    assert samples[("duoserve:kv_offload_dropped_total", (("reason", "corrupt"), ("tier", "disk")))] == 1
    assert samples[("duoserve:kv_offload_loads_declined_total", ())] == 2
    assert samples[("duoserve:kv_offload_prefill_tokens_per_second", ())] == 1500
    bucket = "duoserve:kv_offload_load_seconds_bucket"
    assert samples[(bucket, (("le", "0.01"), ("tier", "disk")))] == 3
    assert samples[(bucket, (("le", "+Inf"), ("tier", "disk")))] == 4
    assert samples[("duoserve:kv_offload_load_seconds_count", (("tier", "disk"),))] == 4
    assert samples[("duoserve:kv_offload_load_seconds_sum", (("tier", "disk"),))] == 0.5


def test_no_offload_families_without_a_tier():
    assert not any("kv_offload" in name for name, _ in scrape({"num_requests_running": 1}))
