"""The stored-value record: CipherBlob metadata and data round-trip; any damage reads as Corrupted."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amaters.errors import Corrupted, InvalidValue
from amaters.storage import codec
from amaters.types import CipherBlob, Compression, crc32

U64 = st.integers(min_value=0, max_value=2**64 - 1)

blobs = st.builds(
    CipherBlob,
    data=st.binary(max_size=300),
    checksum=st.integers(min_value=0, max_value=2**32 - 1),
    size=U64,
    compression=st.sampled_from(list(Compression)),
    created_at=U64,
    version=st.one_of(st.none(), U64),
)


@given(
    st.builds(
        lambda b: CipherBlob(b.data, crc32(b.data), b.size, b.compression, b.created_at, b.version), blobs
    )
)
def test_round_trip(blob: CipherBlob) -> None:
    """Every field of a blob, including an absent or zero version, survives encode/decode."""
    assert codec.decode(codec.encode(blob)) == blob


def test_header_layout() -> None:
    """The record starts with format version 1 and a 35-byte header, then the data verbatim."""
    blob = CipherBlob.wrap(b"data", created_at=9, version=0)
    record = codec.encode(blob)
    assert codec.HEADER_SIZE == 35
    assert record[0] == codec.RECORD_FORMAT_VERSION == 1
    assert record[codec.HEADER_SIZE :] == b"data"
    assert codec.decode(record).version == 0


def test_every_single_byte_change_is_detected() -> None:
    """Changing any one byte of a record, header or data, makes decode raise Corrupted."""
    record = codec.encode(CipherBlob.wrap(b"some ciphertext bytes", created_at=123, version=4))
    for position in range(len(record)):
        for flip in (0x01, 0x80, 0xFF):
            damaged = bytearray(record)
            damaged[position] ^= flip
            with pytest.raises(Corrupted):
                codec.decode(bytes(damaged))


def test_truncated_records_are_detected() -> None:
    """Every proper prefix of a record (a torn or truncated value) is reported as Corrupted."""
    record = codec.encode(CipherBlob.wrap(b"0123456789" * 5))
    for length in range(len(record)):
        with pytest.raises(Corrupted):
            codec.decode(record[:length])


def test_data_not_matching_the_client_checksum_is_corrupted() -> None:
    """A blob stored with a wrong CRC32 reads back as Corrupted, not as the bytes."""
    record = codec.encode(CipherBlob(data=b"abc", checksum=crc32(b"abd")))
    with pytest.raises(Corrupted, match="CRC32"):
        codec.decode(record, where="a stored value in collection 'c'")


def _with_valid_header_crc(header: bytes, data: bytes) -> bytes:
    return header + struct.pack(">I", crc32(header)) + data


def test_unknown_format_version_is_refused() -> None:
    """A record of a format this code does not know is Corrupted, even with valid CRCs."""
    header = struct.pack(">BBBIQQQ", 2, 0, 0, crc32(b"x"), 1, 0, 0)
    with pytest.raises(Corrupted, match="format version 2"):
        codec.decode(_with_valid_header_crc(header, b"x"))


def test_unknown_compression_is_refused() -> None:
    """An unknown compression type is Corrupted, even with valid CRCs."""
    header = struct.pack(">BBBIQQQ", 1, 9, 0, crc32(b"x"), 1, 0, 0)
    with pytest.raises(Corrupted, match="compression"):
        codec.decode(_with_valid_header_crc(header, b"x"))


@pytest.mark.parametrize(
    "blob",
    [
        CipherBlob(b"x", checksum=-1),
        CipherBlob(b"x", checksum=2**32),
        CipherBlob(b"x", checksum=0, size=-1),
        CipherBlob(b"x", checksum=0, created_at=2**64),
        CipherBlob(b"x", checksum=0, version=-5),
    ],
)
def test_out_of_range_metadata_is_an_invalid_value(blob: CipherBlob) -> None:
    """Metadata that does not fit its field is refused with InvalidValue, not stored mangled."""
    with pytest.raises(InvalidValue):
        codec.encode(blob)
