"""Disaggregated serving: KV transfer between workers, KV events, the router and `duoserve up`."""
