"""The block record: a round trip, and every way a record can be wrong is caught with its reason."""

from __future__ import annotations

import struct

import pytest
import torch

from duoserve.kv.offload.record import (
    HEADER_BYTES,
    VERSION,
    RecordError,
    check_size,
    decode_header,
    decode_record,
    encode_header,
)
from tests.kv.offload.conftest import FINGERPRINT, LAYOUT, chain, random_blocks

KEY = chain(list(range(10, 22)))[2]  # a block with a parent: every header field differs from zero
PAYLOAD_BYTES = LAYOUT.nbytes(1)


def make_record(block: torch.Tensor, key=KEY, fingerprint: bytes = FINGERPRINT.digest) -> bytearray:
    payload = memoryview(block.contiguous().view(torch.uint8).numpy()).cast("B")
    return bytearray(encode_header(fingerprint, key, [payload]) + payload.tobytes())


def reason(data: bytearray, key=KEY) -> str:
    with pytest.raises(RecordError) as caught:
        decode_record(data, FINGERPRINT.digest, key, PAYLOAD_BYTES)
    return caught.value.reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(dtype):
    block = random_blocks(1)[0].to(dtype)
    data = make_record(block)
    header = decode_header(data, FINGERPRINT.digest)
    assert header.key == KEY and header.key.token_ids == tuple(range(18, 22))
    assert header.payload_bytes == block.numel() * block.element_size()
    assert len(data) == header.total_bytes == HEADER_BYTES + 4 * len(KEY.token_ids) + header.payload_bytes
    payload = decode_record(data, FINGERPRINT.digest, KEY, header.payload_bytes)
    back = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).view(block.shape)
    assert torch.equal(back, block)


def test_torn_records():
    data = make_record(random_blocks(1)[0])
    for length in (len(data) - 1, len(data) - PAYLOAD_BYTES, HEADER_BYTES + 3, HEADER_BYTES - 1, 0):
        assert reason(data[:length]) == "torn", length


def test_corrupt_records():
    clean = make_record(random_blocks(1)[0])
    for position in (len(clean) - 1, len(clean) - PAYLOAD_BYTES, HEADER_BYTES - 1):  # payload, checksum
        data = bytearray(clean)
        data[position] ^= 0x10
        assert reason(data) == "corrupt", position
    assert reason(clean + b"\0") == "corrupt"  # longer than its header says
    data = bytearray(clean)
    data[0:8] = b"NOTABLOK"
    assert reason(data) == "corrupt"


def test_foreign_records():
    block = random_blocks(1)[0]
    assert reason(make_record(block, fingerprint=bytes(16))) == "foreign"
    data = make_record(block)
    struct.pack_into("<H", data, 8, VERSION + 1)
    assert reason(data) == "foreign"


def test_a_record_of_another_block_is_never_served():
    data = make_record(random_blocks(1)[0])
    other = chain(list(range(10, 22)))
    assert reason(data, other[1]) == "wrong_tokens"
    # Same hash and parent asked for, other tokens (a collision): refused too.
    collision = type(KEY)(KEY.block_hash, KEY.parent_hash, (1, 2, 3, 4))
    assert reason(data, collision) == "wrong_tokens"


def test_sizes_checked_from_the_header_alone():
    data = make_record(random_blocks(1)[0])
    header = decode_header(data[: HEADER_BYTES + 16], FINGERPRINT.digest)
    check_size(header, len(data))
    with pytest.raises(RecordError, match="torn"):
        check_size(header, len(data) - 1)
