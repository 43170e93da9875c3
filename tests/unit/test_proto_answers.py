"""The pre-encoded answers are byte for byte the protobuf runtime's serialization."""

from __future__ import annotations

import random

import pytest

from amaters.proto.answers import query_answer, query_response, set_answer
from amaters.proto.convert import fill_result
from amaters.proto.envelope_pb2 import Envelope
from amaters.protocols import keyed
from amaters.protocols.framing import frame_header
from amaters.protocols.keyed import set_answer_frame, set_answer_frames
from amaters.types import CipherBlob, Compression


def _runtime_set_answer(request_id: int) -> bytes:
    envelope = Envelope(request_id=request_id)
    fill_result(envelope.query_response.result, "set", None)
    return envelope.SerializeToString()


@pytest.mark.parametrize(
    "request_id", [0, 1, 0x7F, 0x80, 300, 2**14 - 1, 2**14, 2**21 - 1, 2**21, 2**28, 2**32, 2**63, 2**64 - 1]
)
def test_set_answer_matches_the_runtime_at_varint_boundaries(request_id: int) -> None:
    assert set_answer(request_id) == _runtime_set_answer(request_id)


def test_set_answer_matches_the_runtime_for_random_ids() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        request_id = rng.randrange(2 ** rng.randrange(1, 65))
        assert set_answer(request_id) == _runtime_set_answer(request_id)


def test_set_answer_parses_as_one_affected_row() -> None:
    envelope = Envelope()
    envelope.ParseFromString(set_answer(12345))
    assert envelope.request_id == 12345
    assert envelope.WhichOneof("body") == "query_response"
    assert envelope.query_response.result.success.affected_rows == 1


def _runtime_get_answer(request_id: int, value: CipherBlob | None) -> bytes:
    envelope = Envelope(request_id=request_id)
    fill_result(envelope.query_response.result, "get", value)
    return envelope.SerializeToString()


@pytest.mark.parametrize(
    "value",
    [
        None,
        CipherBlob.wrap(b""),
        CipherBlob.wrap(b"x" * 100, created_at=1_733_300_000_123),
        CipherBlob.wrap(b"y" * 5000, version=0),
        CipherBlob(data=b"z" * 200, checksum=7, size=4096, compression=Compression.ZSTD, version=2**32 - 1),
        CipherBlob(data=b"n", checksum=0, size=0, created_at=-5),
    ],
)
def test_query_answer_matches_the_runtime_for_get_results(value: CipherBlob | None) -> None:
    """A GET answer built from a serialized QueryResponse is the runtime's Envelope, byte for
    byte, at request ids across the varint boundaries."""
    response = query_response("get", value)
    for request_id in (0, 1, 0x7F, 0x80, 2**14, 2**21, 2**63, 2**64 - 1):
        assert query_answer(request_id, response) == _runtime_get_answer(request_id, value)


def test_framed_set_answers_are_each_answer_framed() -> None:
    """set_answer_frames equals each id's set_answer behind its frame header, at every id length
    (the three-byte ids are packed apart)."""
    ids = [0, 1, 127, 128, 0x3FFF, 0x4000, 0x4001, 12345, 99_999, 0x1FFFFF, 0x200000, 2**32 - 1, 2**40]
    expected = b"".join(frame_header(len(set_answer(i))) + set_answer(i) for i in ids)
    assert set_answer_frames(ids) == expected
    assert set_answer_frames(ids) == expected  # again, the short ids' answers now remembered
    assert set_answer_frames([]) == b""
    for i in ids:
        assert set_answer_frame(i) == frame_header(len(set_answer(i))) + set_answer(i)
    assert all(i < 0x4000 for i in keyed._SET_FRAMES)  # only a connection's first ids are kept
