"""The disk tier: one file per block under a directory per fingerprint, found again after a restart.

    <kv_offload_dir>/<fingerprint hex>/<block hash as 16 hex digits>.kvblock   (record.py's format)
                                      /fingerprint.json                       (what the hex stands for)
                                      /.lock                                  (held by the worker using it)

Files are written to a temporary name and renamed into place, so a reader never sees half a file
under a block's name; a crash or a full disk can still leave a torn or corrupt one (no fsync: one per
block would cost more than the block), which the record's size and checksum catch at load. At start
the directory is scanned (headers only: a few ms per thousand blocks) to rebuild the index, oldest
first by mtime (a load touches its file), so a restarted worker starts warm with its LRU order.

The index lives on the engine loop; the I/O thread (io_worker.py) only writes, reads and deletes the
files it is handed. A block stays in memory until its file is written, and is served from there
meanwhile. Any OSError writing or deleting (a full disk, a directory gone, a read-only remount) turns
the tier off with one warning: requests then compute what it would have served, and none fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from duoserve.kv.layout import KVLayout
from duoserve.kv.offload.fingerprint import KVFingerprint
from duoserve.kv.offload.io_worker import IOWorker
from duoserve.kv.offload.record import (
    HEADER_BYTES,
    TOKEN_BYTES,
    BlockKey,
    RecordError,
    check_record,
    check_size,
    decode_header,
    encode_header,
)
from duoserve.kv.offload.tier import LoadResult, TierCounters

logger = logging.getLogger(__name__)

SUFFIX = ".kvblock"
TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"
DESCRIPTION_NAME = "fingerprint.json"
# Without --kv-offload-max-bytes, the tier may fill this share of its filesystem's free space at start.
DEFAULT_FREE_SPACE_SHARE = 0.5
# Blocks waiting in memory for their file: past this, new ones are not stored (the disk is too slow).
MAX_PENDING_BYTES = 256 << 20
# Read buffers kept for the next loads. A new one costs a page fault per 4 KiB on first touch: on this
# project's VM, reading 64 float32 blocks (47 MB) into a new buffer ran at 0.19 GB/s, into a reused one at
# 0.9 GB/s. The largest ones are kept (a load takes the smallest that holds it).
MAX_SPARE_BUFFERS = 2
_HASH_MASK = (1 << 64) - 1


@dataclass
class _Entry:
    key: BlockKey
    pending: torch.Tensor | None = None  # the block, until its file is written
    pins: int = 0


class DiskTier:
    name = "disk"
    durable = True

    def __init__(
        self,
        root: str,
        fingerprint: KVFingerprint,
        layout: KVLayout,
        io: IOWorker,
        max_bytes: int | None = None,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        self.directory = os.path.join(root, fingerprint.hex)
        self.fingerprint = fingerprint.digest
        self.layout = layout
        self.io = io
        self.payload_bytes = layout.nbytes(1)
        self.file_bytes = HEADER_BYTES + TOKEN_BYTES * layout.block_size + self.payload_bytes
        self._lock = _open_directory(root, self.directory, fingerprint)
        if max_bytes is None:
            max_bytes = int(shutil.disk_usage(self.directory).free * DEFAULT_FREE_SPACE_SHARE)
        if max_bytes < self.file_bytes:
            self._lock.close()
            raise ValueError(
                f"kv_offload_max_bytes={max_bytes} holds no KV block (one file is {self.file_bytes} bytes)"
            )
        self.max_bytes = max_bytes
        self.max_pending_bytes = max_pending_bytes
        self.enabled = True
        self.counters = TierCounters()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # block hash -> entry, least recent first
        self._pending_bytes = 0
        self._spare_buffers: list[torch.Tensor] = []  # [capacity, layers, 2, block_size, heads, dim] each
        self.events: list[tuple[bool, int]] | None = None
        self._scan()

    def start_events(self) -> None:
        self.events = [(True, block_hash) for block_hash in self._entries] if self.enabled else []

    @property
    def used_bytes(self) -> int:
        return len(self._entries) * self.file_bytes

    @property
    def backlogged(self) -> bool:
        """Whether a block put now would be skipped for the writes already waiting."""
        return self._pending_bytes + self.payload_bytes > self.max_pending_bytes

    def path(self, block_hash: int) -> str:
        return os.path.join(self.directory, f"{block_hash & _HASH_MASK:016x}{SUFFIX}")

    # ------------------------------------------------------------------ index (engine loop)

    def holds(self, key: BlockKey) -> bool:
        entry = self._entries.get(key.block_hash)
        return self.enabled and entry is not None and entry.key == key

    def touch(self, key: BlockKey) -> None:
        self._entries.move_to_end(key.block_hash)

    def pin(self, key: BlockKey) -> _Entry:
        entry = self._entries[key.block_hash]
        entry.pins += 1
        return entry

    def unpin(self, entry: _Entry) -> None:
        entry.pins -= 1  # an entry dropped meanwhile is no longer indexed: harmless

    def num_pinned(self) -> int:
        return sum(e.pins for e in self._entries.values())

    def copies(self) -> Iterator[tuple[BlockKey, torch.Tensor]]:
        """Nothing to copy at shutdown: its blocks outlive the process."""
        return iter(())

    def put(self, key: BlockKey, block: torch.Tensor) -> list[tuple[BlockKey, torch.Tensor]]:
        if key.block_hash in self._entries:
            if self.holds(key):
                self.touch(key)
            return []
        if not self.enabled or self.backlogged:
            self.counters.stores_skipped += 1
            return []
        if not self._make_room():
            self.counters.stores_skipped += 1
            return []
        block = block.to("cpu")  # the caller's copy (often a view of a batch of them): written as it is
        entry = _Entry(key, pending=block)
        self._entries[key.block_hash] = entry
        self._pending_bytes += self.payload_bytes
        self.counters.stores += 1
        self.counters.store_bytes += self.file_bytes
        if self.events is not None:
            self.events.append((True, key.block_hash))
        path = self.path(key.block_hash)

        def written(_, error: BaseException | None) -> None:
            self._pending_bytes -= self.payload_bytes
            if self._entries.get(key.block_hash) is entry:
                entry.pending = None
            if error is not None:
                self._fail("writing", path, error)

        self.io.submit(lambda: _write_file(path, self.fingerprint, key, block), written)
        return []

    def _make_room(self) -> bool:
        """Evict least recently used blocks (not pinned) until one more file fits the byte limit."""
        while self.used_bytes + self.file_bytes > self.max_bytes:
            victim = next((e for e in self._entries.values() if e.pins == 0), None)
            if victim is None:
                return False
            self._remove(victim.key.block_hash)
        return True

    def _remove(self, block_hash: int) -> None:
        del self._entries[block_hash]
        if self.events is not None and self.enabled:
            self.events.append((False, block_hash))
        path = self.path(block_hash)

        def deleted(_, error: BaseException | None) -> None:
            if error is not None:
                self._fail("deleting", path, error)

        self.io.submit(lambda: _delete_file(path), deleted)

    def _fail(self, action: str, path: str, error: BaseException) -> None:
        if self.enabled:
            logger.warning(
                "KV offload: %s %s failed (%s); the disk tier is turned off until restart, and requests "
                "compute what it would have served",
                action,
                path,
                error,
            )
            if self.events is not None:  # it serves none of them any more
                self.events.extend((False, block_hash) for block_hash in self._entries)
        self.enabled = False

    # ------------------------------------------------------------------ loads

    def read(self, keys: list[BlockKey], on_done: Callable[[LoadResult], None]) -> Callable[[], None]:
        """Read the blocks' files into one tensor [n, layers, 2, block_size, heads, dim] (those still in
        memory are copied from there), checking every record. Returns what to call once the caller is
        done with that tensor: its buffer then serves a later load (the I/O thread runs reads in order, so
        one handed back while its read is still queued is written by that read before the next)."""
        sources = [(key, self._entries[key.block_hash].pending, self.path(key.block_hash)) for key in keys]
        fingerprint = self.fingerprint
        buffer = self._take_buffer(len(keys))
        blocks = buffer[: len(keys)]

        def job() -> tuple[torch.Tensor, list[RecordError | None], float]:
            start = time.perf_counter()
            errors = _read_files(sources, fingerprint, blocks)
            return blocks, errors, time.perf_counter() - start

        def done(outcome: tuple | None, error: BaseException | None) -> None:
            if error is not None:  # the job itself failed, not a file: turn the tier off rather than retry
                self._fail("reading from", self.directory, error)
                on_done((None, "unreadable", 0.0))
                return
            blocks, errors, seconds = outcome
            reason = None
            for (key, _, _), bad in zip(sources, errors, strict=True):
                if bad is not None:
                    self._drop_bad(key, bad)
                    reason = reason or bad.reason
            on_done((None, reason, seconds) if reason else (blocks, None, seconds))

        self.io.submit(job, done, urgent=True)
        return lambda: self._give_back(buffer)

    def _take_buffer(self, count: int) -> torch.Tensor:
        fitting = [i for i, b in enumerate(self._spare_buffers) if b.shape[0] >= count]
        if fitting:
            return self._spare_buffers.pop(min(fitting, key=lambda i: self._spare_buffers[i].shape[0]))
        num_layers, _, _, block_size, num_heads, row = self.layout.shape(1)
        shape = (count, num_layers, 2, block_size, num_heads, row)
        return torch.empty(shape, dtype=self.layout.torch_dtype)

    def _give_back(self, buffer: torch.Tensor) -> None:
        self._spare_buffers.append(buffer)
        self._spare_buffers.sort(key=lambda b: b.shape[0], reverse=True)
        del self._spare_buffers[MAX_SPARE_BUFFERS:]

    def _drop_bad(self, key: BlockKey, error: RecordError) -> None:
        logger.warning("KV offload: dropped %s: %s", self.path(key.block_hash), error)
        self.counters.drop(error.reason)
        entry = self._entries.get(key.block_hash)
        if entry is not None and entry.key == key:
            self._remove(key.block_hash)

    # ------------------------------------------------------------------ start and end

    def _scan(self) -> None:
        """Index the files a previous run left (dropping bad ones), least recently used first."""
        found = []
        for item in os.scandir(self.directory):
            if item.name.endswith(TEMP_SUFFIX):  # a write cut off by a crash: we hold the lock
                _delete_file(item.path)
            elif item.name.endswith(SUFFIX):
                try:
                    key, mtime = self._check_file(item.path, item.name)
                except RecordError as err:
                    logger.warning("KV offload: dropped %s at start: %s", item.path, err)
                    self.counters.drop(err.reason)
                    _delete_file(item.path)
                    continue
                except OSError as err:
                    logger.warning("KV offload: cannot read %s at start: %s", item.path, err)
                    self.counters.drop("unreadable")
                    continue
                found.append((mtime, key))
        found.sort(key=lambda item: item[0])
        for _, key in found:
            self._entries[key.block_hash] = _Entry(key)
        while self.used_bytes > self.max_bytes:  # a smaller limit than the last run's
            block_hash = next(iter(self._entries))
            del self._entries[block_hash]
            _delete_file(self.path(block_hash))
        if found:
            logger.info("KV offload: %d blocks found in %s", len(self._entries), self.directory)

    def _check_file(self, path: str, name: str) -> tuple[BlockKey, int]:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            header = decode_header(
                f.read(HEADER_BYTES + TOKEN_BYTES * self.layout.block_size), self.fingerprint
            )
        check_size(header, stat.st_size)
        if header.payload_bytes != self.payload_bytes or len(header.key.token_ids) != self.layout.block_size:
            raise RecordError("corrupt", "its sizes are not this layout's")
        if name != os.path.basename(self.path(header.key.block_hash)):
            raise RecordError("wrong_tokens", f"it holds block {header.key.block_hash & _HASH_MASK:016x}")
        return header.key, stat.st_mtime_ns

    def close(self) -> None:
        """Release the directory (the I/O thread's owner finishes the queued writes first)."""
        self._lock.close()


def _open_directory(root: str, directory: str, fingerprint: KVFingerprint):
    """Create the fingerprint's directory and lock it; ValueError if it cannot be written or is in use."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".probe-{os.getpid()}{TEMP_SUFFIX}")
        with open(probe, "wb") as f:
            f.write(b"duoserve")
        os.unlink(probe)
        lock = open(os.path.join(directory, LOCK_NAME), "a")  # noqa: SIM115 (held until close())
    except OSError as err:
        raise ValueError(f"kv_offload_dir={root!r} is not a writable directory: {err}") from err
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(
            f"kv_offload_dir={root!r}: {directory} is in use by another duoserve worker (give each "
            "worker its own directory)"
        ) from None
    description = os.path.join(directory, DESCRIPTION_NAME)
    with open(description + TEMP_SUFFIX, "w") as f:
        json.dump(fingerprint.description, f, indent=1)
    os.replace(description + TEMP_SUFFIX, description)
    return lock


# ---------------------------------------------------------------------- on the I/O thread


def _write_file(path: str, fingerprint: bytes, key: BlockKey, block: torch.Tensor) -> None:
    pieces = _pieces(block)
    header = encode_header(fingerprint, key, pieces)
    temp = path + TEMP_SUFFIX
    try:
        with open(temp, "wb") as f:
            f.write(header)
            for piece in pieces:
                f.write(piece)
        os.replace(temp, path)
    except BaseException:
        _delete_file(temp)
        raise


def _pieces(block: torch.Tensor) -> list[memoryview]:
    """The bytes of a block [layers, 2, block_size, heads, dim] in order, in as few contiguous pieces as its
    strides allow: one per layer and K/V for a block of an exported batch (a view [layers, 2, n, ...] ->
    block i), which is thus written without being copied into one buffer first."""
    if block.is_contiguous():
        return [memoryview(block.reshape(-1).view(torch.uint8).numpy())]
    rows = block.flatten(2)  # a view when each layer's K (V) of the block is contiguous, else a copy
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    raw = rows.view(torch.uint8).numpy()
    return [memoryview(raw[layer, kv]) for layer in range(raw.shape[0]) for kv in range(raw.shape[1])]


def _read_files(
    sources: list[tuple[BlockKey, torch.Tensor | None, str]], fingerprint: bytes, blocks: torch.Tensor
) -> list[RecordError | None]:
    """Read the blocks of one load into `blocks` [n, layers, 2, block_size, heads, dim] (the connector
    imports it into the cache with one copy); for each block, the RecordError saying why its file must be
    dropped, or None (returned, not raised: one bad block of a load does not hide what the others were).
    Each file is read with one system call straight into its block's place; a block still in memory (its
    file not written yet) is copied from there."""
    raw = blocks.view(torch.uint8).numpy()  # numpy copies and views: no torch op (nor its threads) here
    head = bytearray(HEADER_BYTES + TOKEN_BYTES * blocks.shape[3])
    errors: list[RecordError | None] = []
    for i, (key, pending, path) in enumerate(sources):
        if pending is not None:
            raw[i] = pending.view(torch.uint8).numpy()
            errors.append(None)
        else:
            errors.append(_read_into(path, fingerprint, key, head, memoryview(raw[i].reshape(-1))))
    return errors


def _read_into(
    path: str, fingerprint: bytes, key: BlockKey, head: bytearray, payload: memoryview
) -> RecordError | None:
    """Read a block's file: its header and tokens into `head`, its payload into `payload`, exactly as
    large as they must be; then check the record. The error saying why it must be dropped, or None."""
    expected = len(head) + payload.nbytes
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size != expected:  # checked before reading: a file of another size is never read
                return RecordError("torn" if size < expected else "corrupt", f"{size} bytes, not {expected}")
            if os.preadv(fd, [head, payload], 0) != size:
                return RecordError("torn", "it shrank while being read")
            with contextlib.suppress(OSError):
                os.utime(fd)  # the LRU order a restart rebuilds
        finally:
            os.close(fd)
        check_record(head, payload, fingerprint, key, payload.nbytes)
    except RecordError as err:
        return err
    except OSError as err:
        return RecordError("unreadable", str(err))
    return None


def _delete_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
