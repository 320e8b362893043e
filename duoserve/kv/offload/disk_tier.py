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
    check_size,
    decode_header,
    decode_record,
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
        block = block.to("cpu").contiguous()
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

    def read(self, keys: list[BlockKey], on_done: Callable[[LoadResult], None]) -> None:
        """Read the blocks' files (those still in memory are taken from there), checking every record."""
        sources = [(key, self._entries[key.block_hash].pending, self.path(key.block_hash)) for key in keys]
        fingerprint, layout = self.fingerprint, self.layout

        def job() -> tuple[list[torch.Tensor | RecordError], float]:
            start = time.perf_counter()
            results = [
                pending if pending is not None else _read_file(path, fingerprint, key, layout)
                for key, pending, path in sources
            ]
            return results, time.perf_counter() - start

        def done(outcome: tuple | None, error: BaseException | None) -> None:
            if error is not None:  # the job itself failed, not a file: turn the tier off rather than retry
                self._fail("reading from", self.directory, error)
                on_done((None, "unreadable", 0.0))
                return
            results, seconds = outcome
            reason = None
            for (key, _, _), result in zip(sources, results, strict=True):
                if isinstance(result, RecordError):
                    self._drop_bad(key, result)
                    reason = reason or result.reason
            on_done((None, reason, seconds) if reason else (results, None, seconds))

        self.io.submit(job, done, urgent=True)

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
    payload = memoryview(block.view(torch.uint8).numpy()).cast("B")
    header = encode_header(fingerprint, key, payload)
    temp = path + TEMP_SUFFIX
    try:
        with open(temp, "wb") as f:
            f.write(header)
            f.write(payload)
        os.replace(temp, path)
    except BaseException:
        _delete_file(temp)
        raise


def _read_file(path: str, fingerprint: bytes, key: BlockKey, layout: KVLayout) -> torch.Tensor | RecordError:
    """The block's tensor, or the RecordError saying why the file must be dropped (returned, not raised:
    one bad block of a load does not hide what the others were)."""
    payload_bytes = layout.nbytes(1)
    expected = HEADER_BYTES + TOKEN_BYTES * layout.block_size + payload_bytes
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != expected:  # checked before reading: a huge file is never read into memory
                return RecordError("torn" if size < expected else "corrupt", f"{size} bytes, not {expected}")
            data = bytearray(size)
            if f.readinto(data) != size:
                return RecordError("torn", "it shrank while being read")
        payload = decode_record(data, fingerprint, key, payload_bytes)
    except RecordError as err:
        return err
    except OSError as err:
        return RecordError("unreadable", str(err))
    with contextlib.suppress(OSError):
        os.utime(path)  # the LRU order a restart rebuilds
    offset = len(data) - payload.nbytes
    flat = torch.frombuffer(data, dtype=torch.uint8, count=payload_bytes, offset=offset)
    shape = (layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.row)
    return flat.view(layout.torch_dtype).view(shape)


def _delete_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
