"""Disaggregated prefill/decode between workers: KV transfer and its KV connectors, KV events, the
sockets' endpoints and their cluster-secret authentication."""
