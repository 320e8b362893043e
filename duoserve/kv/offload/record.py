"""One offloaded KV block as bytes: a record that says what it is and checks itself.

Layout (little-endian):

    header   magic "DSKVBLK\\0" | version u16 | header bytes u16 | fingerprint 16B | block hash i64 |
             parent hash i64 | tokens u32 | payload bytes u64 | checksum u64
    tokens   the block's token ids, u32 each
    payload  the block's K and V for every layer, [layers, 2, block_size, kv_heads, row], in the
             KV cache's dtype (row = head_dim, and a quantized cache's 2-byte row scale: KVLayout.row)

The checksum covers everything before it and after it (header, tokens, payload). A reader checks, in
this order, and drops the record with the first reason that applies:
    torn          shorter than its header says (a write cut off by a crash or a full disk)
    corrupt       bad magic, longer than its header says, or the checksum does not match
    foreign       another format version, or another fingerprint (model, layout, numerics)
    wrong_tokens  another block than the one asked for (hash, parent hash or token ids differ)

The checksum is XXH3-64 (the `xxhash` package), computed on the I/O thread for every block written and
read. On this project's CPU (AMD EPYC Zen 1, 2 cores shared with other jobs; Python 3.11) over a
SmolLM2-135M float32 block (737 KB): XXH3-64 10.9 GB/s, XXH64 6.2, zlib.crc32 1.9 (format version 1's
checksum; `python benchmarks/kv_offload.py --checksums` measures them again), hashlib's blake2b, sha1,
sha256 and md5 0.3-0.9. With CRC-32, checking a block cost 0.4 ms, more than reading it from the page
cache (a load of 64 blocks spent 42 of its 70 ms of I/O-thread time in zlib.crc32); with XXH3 it costs
70 us. A 64-bit non-cryptographic hash catches torn tails and bit flips (a random corruption goes
unnoticed with probability 2^-64); it is no defence against a forger, and needs none: the directory is
the worker's own.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import xxhash

MAGIC = b"DSKVBLK\x00"
VERSION = 2  # 1: CRC-32 in a u32
_HEADER = struct.Struct("<8sHH16sqqIQQ")
HEADER_BYTES = _HEADER.size
_CHECKSUM_BYTES = 8  # the header's last field
TOKEN_BYTES = 4  # u32 each
DROP_REASONS = ("torn", "corrupt", "foreign", "wrong_tokens")


def checksum(parts: Iterable) -> int:
    """XXH3-64 of the bytes-like `parts` one after the other (as of their concatenation)."""
    state = xxhash.xxh3_64()
    for part in parts:
        state.update(part)
    return state.intdigest()


@dataclass(frozen=True)
class BlockKey:
    """Which block: its chained prefix hash (duoserve/kv/block_pool.hash_block), and what it stands for,
    compared on every lookup so that a hash collision is never served."""

    block_hash: int
    parent_hash: int
    token_ids: tuple[int, ...]


class RecordError(Exception):
    """A record that must not be served; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class RecordHeader:
    key: BlockKey
    payload_bytes: int
    checksum: int
    header_bytes: int  # header and tokens: where the payload starts

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + self.payload_bytes


def encode_header(fingerprint: bytes, key: BlockKey, payload: list[memoryview]) -> bytes:
    """Header and tokens of the record holding `payload`, the payload's bytes in pieces, in order (a block
    of the cache is one piece per layer and K/V: written as they are, never copied into one buffer first);
    the checksum covers the payload too."""
    tokens = struct.pack(f"<{len(key.token_ids)}I", *key.token_ids)
    fields = (MAGIC, VERSION, HEADER_BYTES, fingerprint, key.block_hash, key.parent_hash, len(key.token_ids))
    head = _HEADER.pack(*fields, sum(piece.nbytes for piece in payload), 0)[:-_CHECKSUM_BYTES]
    value = checksum((head, tokens, *payload))
    return head + struct.pack("<Q", value) + tokens


def decode_header(data: bytes | memoryview, fingerprint: bytes) -> RecordHeader:
    """The header of a record starting with `data` (which must hold the header and the tokens)."""
    if len(data) < HEADER_BYTES:
        raise RecordError("torn", f"{len(data)} bytes, shorter than a header")
    magic, version, header_bytes, found, block_hash, parent, num_tokens, payload_bytes, value = (
        _HEADER.unpack_from(data)
    )
    if magic != MAGIC:
        raise RecordError("corrupt", "not a duoserve KV block record")
    if version != VERSION or header_bytes != HEADER_BYTES:
        raise RecordError("foreign", f"format version {version}, this worker reads {VERSION}")
    if found != fingerprint:
        raise RecordError("foreign", f"fingerprint {found.hex()}, this worker's is {fingerprint.hex()}")
    end = HEADER_BYTES + TOKEN_BYTES * num_tokens
    if len(data) < end:
        raise RecordError("torn", f"{len(data)} bytes, shorter than the header and its {num_tokens} tokens")
    tokens = struct.unpack_from(f"<{num_tokens}I", data, HEADER_BYTES)
    return RecordHeader(BlockKey(block_hash, parent, tokens), payload_bytes, value, end)


def check_size(header: RecordHeader, size: int) -> None:
    if size < header.total_bytes:
        raise RecordError("torn", f"{size} bytes of {header.total_bytes}")
    if size > header.total_bytes:
        raise RecordError("corrupt", f"{size} bytes, its header says {header.total_bytes}")


def check_key(header: RecordHeader, expected: BlockKey) -> None:
    if header.key != expected:
        raise RecordError(
            "wrong_tokens", f"holds block {header.key.block_hash:x}, not {expected.block_hash:x} as asked"
        )


def check_record(
    head: bytes | bytearray | memoryview,
    payload: bytes | bytearray | memoryview,
    fingerprint: bytes,
    expected: BlockKey,
    payload_bytes: int,
) -> None:
    """Check a record read in two pieces, `head` (its header and tokens, exactly) and `payload` (the rest,
    exactly: the caller read the file whole, so its size was checked); RecordError says why it must be
    dropped."""
    header = decode_header(head, fingerprint)
    check_size(header, memoryview(head).nbytes + memoryview(payload).nbytes)
    check_key(header, expected)
    if header.payload_bytes != payload_bytes:
        raise RecordError(
            "foreign", f"a payload of {header.payload_bytes} bytes, the layout has {payload_bytes}"
        )
    view = memoryview(head)
    value = checksum(
        (view[: HEADER_BYTES - _CHECKSUM_BYTES], view[HEADER_BYTES : header.header_bytes], payload)
    )
    if value != header.checksum:
        raise RecordError("corrupt", f"checksum {value:016x}, its header says {header.checksum:016x}")


def decode_record(
    data: bytearray | memoryview, fingerprint: bytes, expected: BlockKey, payload_bytes: int
) -> memoryview:
    """The payload of a whole record, after every check; RecordError says why it must be dropped."""
    header = decode_header(data, fingerprint)
    check_size(header, len(data))
    view = memoryview(data)
    check_record(
        view[: header.header_bytes], view[header.header_bytes :], fingerprint, expected, payload_bytes
    )
    return view[header.header_bytes :]
