"""The disk tier: files written atomically, found again after a restart, an LRU under a byte limit, and
torn, corrupt, foreign or misplaced files dropped and counted, never served."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from duoserve.kv.offload.disk_tier import SUFFIX, TEMP_SUFFIX, DiskTier
from duoserve.kv.offload.fingerprint import KVFingerprint
from duoserve.kv.offload.record import HEADER_BYTES
from tests.kv.offload.conftest import BLOCK_SHAPE, FINGERPRINT, LAYOUT, WAIT_S, chain, random_blocks

KEYS = chain(list(range(200, 224)))  # 6 blocks
BLOCKS = random_blocks(6, seed=1)
FILE_BYTES = HEADER_BYTES + 4 * LAYOUT.block_size + LAYOUT.nbytes(1)


def store(tier: DiskTier, indices) -> None:
    for i in indices:
        assert tier.put(KEYS[i], BLOCKS[i]) == []
    assert tier.io.wait(WAIT_S)


def load(tier: DiskTier, indices):
    """(blocks, drop reason) of one read of these blocks, once the I/O thread has done it."""
    got = []
    handles = [tier.pin(KEYS[i]) for i in indices]
    tier.read([KEYS[i] for i in indices], got.append)
    assert tier.io.wait(WAIT_S)
    for handle in handles:
        tier.unpin(handle)
    ((blocks, reason, _),) = got
    return blocks, reason


def files(tier: DiskTier) -> set[str]:
    return set(os.listdir(tier.directory))


def test_blocks_round_trip_through_files(make_disk):
    tier = make_disk()
    store(tier, [0, 1, 2])
    assert files(tier) >= {os.path.basename(tier.path(KEYS[i].block_hash)) for i in range(3)}
    assert not any(name.endswith(TEMP_SUFFIX) for name in files(tier))
    blocks, reason = load(tier, [2, 0])
    assert reason is None
    assert torch.equal(blocks[0], BLOCKS[2]) and torch.equal(blocks[1], BLOCKS[0])
    assert tier.used_bytes == 3 * tier.file_bytes and tier.counters.stores == 3


def test_a_load_reads_each_file_once_into_one_tensor(make_disk, monkeypatch):
    tier = make_disk()
    # Blocks handed over as the connector does: views of one exported batch [layers, 2, n, ...], written
    # piece by piece (a layer's K or V each) without a copy.
    views = BLOCKS[:3].permute(1, 2, 0, 3, 4, 5).contiguous().permute(2, 0, 1, 3, 4, 5)
    assert not views[0].is_contiguous()
    for i in range(3):
        assert tier.put(KEYS[i], views[i]) == []
    assert tier.io.wait(WAIT_S)
    assert all(os.path.getsize(tier.path(KEYS[i].block_hash)) == FILE_BYTES for i in range(3))
    reads = []
    preadv = os.preadv

    def counted(fd, buffers, offset):
        reads.append(fd)
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counted)
    blocks, reason = load(tier, [2, 0, 1])
    assert reason is None and len(reads) == 3  # one read per file, whole
    assert isinstance(blocks, torch.Tensor) and blocks.shape == (3, *BLOCK_SHAPE)
    assert torch.equal(blocks, BLOCKS[[2, 0, 1]])


def test_a_load_reuses_the_buffer_of_one_handed_back(make_disk):
    """A new buffer costs a page fault per 4 KiB on first touch: the next load of at most as many blocks
    reads into the last one's, once its reader handed it back; never into one still in use."""
    tier = make_disk()
    store(tier, [0, 1, 2, 3])
    got = []
    give_back = tier.read([KEYS[0], KEYS[1], KEYS[2]], got.append)
    assert tier.io.wait(WAIT_S)
    first = got[0][0]
    held = tier.read([KEYS[3]], got.append)  # the first is not handed back yet: a buffer of its own
    assert tier.io.wait(WAIT_S)
    assert got[1][0].data_ptr() != first.data_ptr() and torch.equal(got[1][0][0], BLOCKS[3])
    give_back()
    tier.read([KEYS[3], KEYS[0]], got.append)
    assert tier.io.wait(WAIT_S)
    again = got[2][0]
    assert again.data_ptr() == first.data_ptr()
    assert torch.equal(again, BLOCKS[[3, 0]])
    held()


def test_a_block_is_served_from_memory_until_its_file_is_written(make_disk, io):
    tier = make_disk()
    assert tier.put(KEYS[0], BLOCKS[0]) == []  # no wait: the write may still be queued
    got = []
    handle = tier.pin(KEYS[0])
    tier.read([KEYS[0]], got.append)
    assert io.wait(WAIT_S)
    tier.unpin(handle)
    assert torch.equal(got[0][0][0], BLOCKS[0])


def test_restart_finds_the_blocks(tmp_path, io):
    first = DiskTier(str(tmp_path), FINGERPRINT, LAYOUT, io)
    store(first, [0, 1, 2, 3])
    first.close()
    again = DiskTier(str(tmp_path), FINGERPRINT, LAYOUT, io)
    try:
        assert all(again.holds(k) for k in KEYS[:4]) and not again.holds(KEYS[4])
        blocks, reason = load(again, [3, 1])
        assert reason is None and torch.equal(blocks[0], BLOCKS[3]) and torch.equal(blocks[1], BLOCKS[1])
        # Another fingerprint (model, layout or numerics) sees none of them: its own directory.
        other = DiskTier(str(tmp_path), KVFingerprint(bytes(16), {}), LAYOUT, io)
        assert not any(other.holds(k) for k in KEYS) and other.directory != again.directory
        other.close()
    finally:
        again.close()


def test_lru_under_the_byte_limit_and_restart_keeps_the_order(tmp_path, io):
    tier = DiskTier(str(tmp_path), FINGERPRINT, LAYOUT, io, max_bytes=3 * FILE_BYTES)
    store(tier, [0, 1, 2])
    tier.touch(KEYS[0])
    store(tier, [3])  # evicts KEYS[1], the least recently used
    assert [tier.holds(k) for k in KEYS[:4]] == [True, False, True, True]
    assert not os.path.exists(tier.path(KEYS[1].block_hash))
    assert tier.used_bytes == 3 * tier.file_bytes <= tier.max_bytes
    # A restart orders the files by mtime (a load touches its file): make KEYS[2] the oldest.
    for age, i in enumerate([0, 3, 2]):
        os.utime(tier.path(KEYS[i].block_hash), ns=(10**18 - age * 10**9, 10**18 - age * 10**9))
    tier.close()
    again = DiskTier(str(tmp_path), FINGERPRINT, LAYOUT, io, max_bytes=3 * tier.file_bytes)
    store(again, [4])
    assert [again.holds(KEYS[i]) for i in (0, 2, 3, 4)] == [True, False, True, True]
    # A smaller limit than the last run's: the oldest files go at start.
    again.close()
    small = DiskTier(str(tmp_path), FINGERPRINT, LAYOUT, io, max_bytes=2 * tier.file_bytes)
    assert (
        small.used_bytes == 2 * small.file_bytes and len([f for f in files(small) if f.endswith(SUFFIX)]) == 2
    )
    small.close()


def test_pinned_blocks_are_not_evicted(make_disk):
    tier = make_disk(max_bytes=2 * FILE_BYTES)
    store(tier, [0, 1])
    handles = [tier.pin(KEYS[0]), tier.pin(KEYS[1])]
    store(tier, [2])
    assert tier.counters.stores_skipped == 1 and not tier.holds(KEYS[2])
    tier.unpin(handles[1])
    store(tier, [2])
    assert [tier.holds(k) for k in KEYS[:3]] == [True, False, True]
    tier.unpin(handles[0])
    assert tier.num_pinned() == 0


def corrupt(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (corrupt, "corrupt"),
        (lambda path: os.truncate(path, os.path.getsize(path) - 5), "torn"),
        (os.unlink, "unreadable"),
    ],
)
def test_a_bad_file_fails_its_load_is_dropped_and_counted(make_disk, caplog, damage, reason):
    tier = make_disk()
    store(tier, [0, 1, 2])
    damage(tier.path(KEYS[1].block_hash))
    with caplog.at_level(logging.WARNING):
        blocks, why = load(tier, [0, 1, 2])
    assert blocks is None and why == reason
    assert tier.counters.dropped == {reason: 1}
    assert not tier.holds(KEYS[1]) and tier.holds(KEYS[0]) and tier.holds(KEYS[2])
    assert tier.io.wait(WAIT_S) and not os.path.exists(tier.path(KEYS[1].block_hash))
    assert "dropped" in caplog.text


@pytest.mark.parametrize("from_end", [1, LAYOUT.nbytes(1) // 2, LAYOUT.nbytes(1) - 1])
def test_a_flipped_payload_byte_anywhere_fails_the_checksum(make_disk, from_end):
    tier = make_disk()
    store(tier, [0, 1])
    with open(tier.path(KEYS[1].block_hash), "r+b") as f:
        f.seek(-from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    blocks, why = load(tier, [0, 1])
    assert blocks is None and why == "corrupt" and tier.counters.dropped == {"corrupt": 1}


def test_a_file_holding_another_block_is_never_served(make_disk):
    tier = make_disk()
    store(tier, [0, 1])
    shutil.copyfile(tier.path(KEYS[0].block_hash), tier.path(KEYS[1].block_hash))
    blocks, why = load(tier, [1])
    assert blocks is None and why == "wrong_tokens" and tier.counters.dropped == {"wrong_tokens": 1}


def test_bad_files_are_dropped_at_start(tmp_path, io):
    tier = DiskTier(str(tmp_path), FINGERPRINT, LAYOUT, io)
    store(tier, [0, 1, 2, 3, 4])
    tier.close()
    os.truncate(tier.path(KEYS[0].block_hash), 100)  # torn
    # Foreign: a record of another fingerprint, under a valid name in this directory.
    other = DiskTier(str(tmp_path / "other"), KVFingerprint(bytes(16), {}), LAYOUT, io)
    store(other, [1])
    other.close()
    shutil.copyfile(other.path(KEYS[1].block_hash), tier.path(KEYS[1].block_hash))
    shutil.copyfile(tier.path(KEYS[3].block_hash), tier.path(KEYS[2].block_hash))  # another block's record
    with open(tier.path(KEYS[3].block_hash), "r+b") as f:  # bad magic
        f.write(b"garbage!")
    leftover = tier.path(KEYS[4].block_hash) + TEMP_SUFFIX  # a write cut off by a crash
    with open(leftover, "wb") as f:
        f.write(b"half a block")
    again = DiskTier(str(tmp_path), FINGERPRINT, LAYOUT, io)
    try:
        assert again.counters.dropped == {"torn": 1, "foreign": 1, "wrong_tokens": 1, "corrupt": 1}
        assert [again.holds(k) for k in KEYS[:5]] == [False, False, False, False, True]
        assert {f for f in files(again) if f.endswith((SUFFIX, TEMP_SUFFIX))} == {
            os.path.basename(again.path(KEYS[4].block_hash))
        }
    finally:
        again.close()


def test_an_unusable_directory_is_a_clear_error_at_start(tmp_path, io):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ValueError, match="is not a writable directory"):
        DiskTier(str(not_a_dir), FINGERPRINT, LAYOUT, io)
    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="is not a writable directory"):
            DiskTier(str(read_only), FINGERPRINT, LAYOUT, io)
    first = DiskTier(str(tmp_path / "kv"), FINGERPRINT, LAYOUT, io)
    with pytest.raises(ValueError, match="in use by another duoserve worker"):
        DiskTier(str(tmp_path / "kv"), FINGERPRINT, LAYOUT, io)
    first.close()
    with pytest.raises(ValueError, match="holds no KV block"):
        DiskTier(str(tmp_path / "kv"), FINGERPRINT, LAYOUT, io, max_bytes=100)


def test_a_failing_disk_turns_the_tier_off_with_a_warning(make_disk, caplog):
    tier = make_disk()
    store(tier, [0])
    shutil.rmtree(tier.directory)  # what a full disk or a lost mount does to the next write: an OSError
    with caplog.at_level(logging.WARNING):
        tier.put(KEYS[1], BLOCKS[1])
        assert tier.io.wait(WAIT_S)
    assert not tier.enabled and "turned off" in caplog.text
    assert not tier.holds(KEYS[0]) and not tier.holds(KEYS[1])
    tier.put(KEYS[2], BLOCKS[2])  # taken no more, and nothing raised
    assert tier.counters.stores_skipped == 1
