"""KV offload: prefix blocks evicted from the KV cache kept in host RAM and on disk, and loaded back.

connector.py    OffloadConnector: the KVConnector hooks (what the scheduler and engine core call)
store.py        the tier chain (RAM, then disk) and loads across it
host_tier.py    pinned host-RAM slab, LRU
disk_tier.py    one file per block per fingerprint directory, LRU, rebuilt at start
io_worker.py    the disk tier's background thread
record.py       a block's bytes on disk: header, tokens, payload, checksum
fingerprint.py  model + KV layout + numerics, so that no worker reads another's KV
cost.py         load or compute again, by measured speeds
"""
