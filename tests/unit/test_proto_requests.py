"""GET, SET and DELETE frames read from their bytes agree with the protobuf runtime, and the
validator hands on only what its rules accept.

``keyed_request`` returns None (the frame is then parsed by the runtime) or exactly the fields the
runtime reads; ``Validator.keyed_frame`` returns None or exactly the operation ``Validator.query``
makes of the parsed frame, so a request the rules refuse always takes the runtime's path and gets
its usual error.
"""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from amaters.config import LimitsConfig
from amaters.errors import AmatersError
from amaters.proto import envelope_pb2, requests, types_pb2
from amaters.proto.convert import blob_from_proto
from amaters.proto.requests import DELETE, GET, SET, blob_fields, keyed_request
from amaters.query import operations as ops
from amaters.query.validation import Validator
from amaters.types import CipherBlob, crc32

Envelope = envelope_pb2.Envelope
_KINDS = {"get": GET, "set": SET, "delete": DELETE}


def _runtime_fields(frame: bytes) -> tuple[int, int, bytes, bytes, CipherBlob | None] | None:
    """What the runtime reads from ``frame`` in the shape keyed_request gives, or None when it is
    not a GET, SET or DELETE query."""
    envelope = Envelope()
    envelope.ParseFromString(frame)
    if envelope.WhichOneof("body") != "query":
        return None
    query = envelope.query.query
    which = query.WhichOneof("query")
    if which not in _KINDS:
        return None
    message = getattr(query, which)
    value = blob_from_proto(message.value) if which == "set" else None
    return envelope.request_id, _KINDS[which], message.collection.encode(), message.key.data, value


def _fields(frame: bytes) -> tuple[int, int, bytes, bytes, CipherBlob | None] | None:
    """keyed_request's reading of ``frame``, the same whether a SET's value is parsed by the runtime
    (as the interpreted build does) or read from its bytes (as the compiled build does)."""
    readings = []
    compiled = requests._COMPILED
    try:
        for by_hand in (False, True):
            requests._COMPILED = by_hand
            readings.append(keyed_request(frame))
    finally:
        requests._COMPILED = compiled
    assert readings[0] == readings[1]
    return readings[0]


def _envelope(
    kind: str,
    request_id: int,
    collection: str,
    key: bytes,
    data: bytes = b"",
    *,
    size: int = 0,
    compression: int = 0,
    checksum: int | None = None,
    created_at: int = 0,
    version: int | None = None,
) -> Envelope:
    envelope = Envelope(request_id=request_id)
    message = getattr(envelope.query.query, kind)
    message.collection = collection
    message.key.data = key
    if kind == "set":
        value = message.value
        value.SetInParent()
        value.data = data
        metadata = value.metadata
        metadata.size = size
        metadata.compression = compression  # type: ignore[assignment]
        metadata.checksum = crc32(data) if checksum is None else checksum
        metadata.created_at = created_at
        if version is not None:
            metadata.version = version
    return envelope


_IDS = [0, 1, 0x7F, 0x80, 0x3FFF, 0x4000, 2**21 - 1, 2**21, 2**32, 2**63, 2**64 - 1]


@pytest.mark.parametrize("kind", ["get", "set", "delete"])
@pytest.mark.parametrize("request_id", _IDS)
def test_serialized_requests_are_read_as_the_runtime_reads_them(kind: str, request_id: int) -> None:
    frame = _envelope(kind, request_id, "people", b"alice", b"v" * 100, size=100).SerializeToString()
    assert _fields(frame) == _runtime_fields(frame)
    assert _fields(frame) is not None


@pytest.mark.parametrize("length", [1, 100, 127, 128, 200, 4096, 16383, 16384, 70_000])
def test_values_and_keys_of_every_length_class(length: int) -> None:
    """Lengths of one, two and three varint bytes, at every level."""
    frame = _envelope(
        "set", 99_999, "c", b"k" * min(length, 3000), b"x" * length, size=length
    ).SerializeToString()
    assert _fields(frame) == _runtime_fields(frame) != None  # noqa: E711


@pytest.mark.parametrize(
    "metadata",
    [
        {"version": 0},
        {"version": 2**32 - 1},
        {"created_at": -1},
        {"created_at": -(2**63)},
        {"created_at": 2**63 - 1},
        {"size": 2**64 - 1},
        {"compression": 1, "checksum": 0},
        {"compression": 2, "checksum": 2**32 - 1},
    ],
)
def test_set_metadata_edges(metadata: dict[str, int]) -> None:
    frame = _envelope("set", 5, "c", b"k", b"data", **metadata).SerializeToString()
    assert _fields(frame) == _runtime_fields(frame) != None  # noqa: E711


def test_what_the_shape_leaves_out_is_left_to_the_runtime() -> None:
    """A trace context, revisions, another request, or a QueryRequest field besides the query:
    None, never a reading that drops them."""
    with_trace = _envelope("get", 1, "c", b"k")
    with_trace.trace_context["traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    with_revisions = _envelope("get", 1, "c", b"k")
    with_revisions.revisions["0"] = 7
    with_timeout = _envelope("set", 1, "c", b"k", b"v")
    with_timeout.query.timeout_ms = 5
    ping = Envelope(request_id=1)
    ping.ping.payload = b"x"
    range_query = Envelope(request_id=1)
    range_query.query.query.range.collection = "c"
    for envelope in (with_trace, with_revisions, with_timeout, ping, range_query):
        assert keyed_request(envelope.SerializeToString()) is None
    # A field repeated (the runtime keeps the last one) or written out of order.
    frame = _envelope("get", 1, "c", b"k").SerializeToString()
    assert keyed_request(frame + b"\x08\x02") is None
    assert keyed_request(b"\x08\x02" + frame) is None
    assert keyed_request(b"") is None


def test_arbitrary_mutations_never_raise_and_never_disagree() -> None:
    """Truncated, extended and corrupted frames: None, or what the runtime reads."""
    rng = random.Random(11)
    frames = [
        _envelope("set", rng.randrange(2**20), "coll", b"key", b"v" * rng.randrange(300)).SerializeToString()
        for _ in range(20)
    ] + [_envelope("get", 300, "coll", b"key").SerializeToString()]
    for _ in range(20_000):
        _agrees(_mutated(rng, rng.choice(frames)))


def _mutated(rng: random.Random, original: bytes) -> bytes:
    """``original`` truncated, with one byte changed, or with a run replaced by 0-3 random bytes."""
    data = bytearray(original)
    what = rng.randrange(3)
    if what == 0:
        del data[rng.randrange(len(data)) :]
    elif what == 1:
        data[rng.randrange(len(data))] = rng.randrange(256)
    else:
        data[rng.randrange(len(data)) : rng.randrange(len(data) + 1)] = rng.randbytes(rng.randrange(4))
    return bytes(data)


@pytest.fixture
def full_readings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The frames' lengths each time a frame is read in full (and leaves its layout)."""
    from amaters.proto import requests

    monkeypatch.setattr(requests, "_layouts", {})
    seen: list[int] = []
    remember = requests._remember

    def counting(frame: bytes, *args: object) -> None:
        seen.append(len(frame))
        remember(frame, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(requests, "_remember", counting)
    return seen


@pytest.mark.interpreted_only
@pytest.mark.parametrize("kind", ["get", "set", "delete"])
def test_frames_of_one_layout_are_read_from_it(kind: str, full_readings: list[int]) -> None:
    """After the first frame of a run, frames differing only in request id, key and value bytes
    are read from the remembered layout, and read exactly as the runtime reads them."""
    rng = random.Random(5)
    frames = [
        _envelope(
            kind, rng.choice(_IDS), "people", rng.randbytes(8), rng.randbytes(100), size=100
        ).SerializeToString()
        for _ in range(50)
    ]
    for frame in frames:
        assert _fields(frame) == _runtime_fields(frame) != None  # noqa: E711
    # One full reading per length of the query (the values' checksums take 1 to 5 bytes).
    queries = {len(Envelope.FromString(frame).query.SerializeToString()) for frame in frames}
    assert len(full_readings) == len(queries) < len(frames)


@pytest.mark.interpreted_only
def test_a_frame_of_a_remembered_length_but_another_shape_is_read_in_full(
    full_readings: list[int],
) -> None:
    """Same length from the query on, different collection, kind or key length: each is read
    in full and read right, never taken for the remembered one."""
    crc = 0x1234  # the same length of checksum everywhere
    first = _envelope("set", 7, "people", b"alice", b"v" * 100, size=100, checksum=crc)
    others = [
        _envelope("set", 7, "pupils", b"alice", b"v" * 100, size=100, checksum=crc),  # another name
        _envelope("set", 7, "people", b"alic", b"v" * 101, size=100, checksum=crc),  # key shorter
        _envelope("get", 7, "people", b"a" * 116),
        _envelope("delete", 7, "people", b"a" * 116),
    ]
    frames = [first.SerializeToString()] + [e.SerializeToString() for e in others]
    for frame in frames:
        assert len(frame) == len(frames[0])
        assert _fields(frame) == _runtime_fields(frame) != None  # noqa: E711
    assert len(full_readings) == len(frames)
    # One layout per length: the last one read is remembered, and the next frame like it uses it.
    assert _fields(frames[-1]) == _runtime_fields(frames[-1])
    assert len(full_readings) == len(frames)


def test_layouts_are_bounded(full_readings: list[int]) -> None:
    from amaters.proto import requests

    for length in range(1, 300):
        frame = _envelope("get", 1, "people", b"k" * length).SerializeToString()
        assert _fields(frame) == _runtime_fields(frame)
        assert len(requests._layouts) <= requests._MAX_LAYOUTS


def test_a_long_collection_name_is_not_kept(full_readings: list[int]) -> None:
    """The layout is remembered before any rule is checked: a name longer than a valid one (a
    megabyte, say) is read but not kept, and 64 of them cannot pin 64 frames' worth of memory."""
    from amaters.proto import requests

    for length in (128, 129, 1 << 20):
        frame = _envelope("set", 1, "n" * length, b"k", b"v" * 10, size=10).SerializeToString()
        assert _fields(frame) == _runtime_fields(frame) != None  # noqa: E711
    held = sum(len(layout[0]) + len(layout[1]) for layout in requests._layouts.values())
    assert len(requests._layouts) == 1 and held < 300


def _agrees(frame: bytes) -> None:
    read = _fields(frame)
    if read is None:
        return
    try:
        runtime = _runtime_fields(frame)
    except DecodeError:
        # The one check left to the caller: a collection name that is not UTF-8 (the runtime
        # refuses the frame; the validator only takes names it has seen valid).
        with pytest.raises(UnicodeDecodeError):
            read[2].decode()
        return
    assert read == runtime


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise(frame: bytes) -> None:
    _agrees(frame)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["get", "set", "delete"]),
    request_id=st.integers(0, 2**64 - 1),
    collection=st.text(max_size=140),
    key=st.binary(max_size=300),
    data=st.binary(max_size=600),
    size=st.integers(0, 2**64 - 1),
    compression=st.integers(0, 3),
    checksum=st.integers(0, 2**32 - 1),
    created_at=st.integers(-(2**63), 2**63 - 1),
    version=st.none() | st.integers(0, 2**32 - 1),
)
def test_generated_requests(
    kind: str,
    request_id: int,
    collection: str,
    key: bytes,
    data: bytes,
    size: int,
    compression: int,
    checksum: int,
    created_at: int,
    version: int | None,
) -> None:
    frame = _envelope(
        kind,
        request_id,
        collection,
        key,
        data,
        size=size,
        compression=compression,
        checksum=checksum,
        created_at=created_at,
        version=version,
    ).SerializeToString()
    read = _fields(frame)
    assert read is None or read == _runtime_fields(frame)
    if collection and key and compression <= 2:
        assert read is not None  # every well-formed GET, SET and DELETE is read


# -- the validator --------------------------------------------------------------------------


def _validator(**limits: int) -> Validator:
    validator = Validator(LimitsConfig(**limits))
    validator.collection("people")  # seen valid once, as the first request naming it is
    return validator


def _runtime_operation(validator: Validator, frame: bytes) -> tuple[int, ops.Operation]:
    envelope = Envelope()
    envelope.ParseFromString(frame)
    return envelope.request_id, validator.query(envelope.query.query)


@pytest.mark.parametrize("kind", ["get", "set", "delete"])
def test_a_valid_request_gives_the_operation_query_gives(kind: str) -> None:
    validator = _validator()
    frame = _envelope(kind, 70_000, "people", b"alice", b"v" * 50, size=50, version=3).SerializeToString()
    assert validator.keyed_frame(frame) == _runtime_operation(validator, frame)


@pytest.mark.parametrize(
    ("envelope", "limits"),
    [
        (_envelope("get", 1, "strangers", b"k"), {}),  # a name not yet seen valid
        (_envelope("get", 1, "bad name!", b"k"), {}),
        (_envelope("get", 1, "people", b""), {}),
        (_envelope("delete", 1, "people", b"k" * 11), {"max_key_bytes": 10}),
        (_envelope("set", 1, "people", b"k", b"v" * 11), {"max_value_bytes": 10}),
        (_envelope("set", 1, "people", b"k", b"v", checksum=123), {}),
    ],
)
def test_whatever_the_rules_might_refuse_takes_the_runtimes_path(
    envelope: Envelope, limits: dict[str, int]
) -> None:
    validator = _validator(**limits)
    frame = envelope.SerializeToString()
    assert validator.keyed_frame(frame) is None
    if envelope.query.query.get.collection != "strangers":
        with pytest.raises(AmatersError):
            _runtime_operation(validator, frame)


def test_a_set_missing_its_value_is_refused_by_the_runtime_path() -> None:
    envelope = Envelope(request_id=1)
    envelope.query.query.set.collection = "people"
    envelope.query.query.set.key.data = b"k"
    assert keyed_request(envelope.SerializeToString()) is None


def test_the_value_is_the_cipherblob_it_carries() -> None:
    """The SET value handed on is the value type, a version of 0 told from none."""
    frame = _envelope("set", 1, "people", b"k", b"abc", size=3, version=0).SerializeToString()
    read = keyed_request(frame)
    assert read is not None and isinstance(read[4], CipherBlob)
    assert read[4].data == b"abc" and read[4].version == 0
    frame = _envelope("set", 1, "people", b"k", b"abc", size=3).SerializeToString()
    read = keyed_request(frame)
    assert read is not None and read[4] is not None and read[4].version is None


# -- a value read from its bytes ------------------------------------------------------------


def _runtime_blob(buf: bytes) -> tuple[bytes, int, int, int, int, int | None]:
    message = types_pb2.CipherBlob.FromString(buf)
    metadata = message.metadata
    version = metadata.version if metadata.HasField("version") else None
    return (
        message.data,
        metadata.checksum,
        metadata.size,
        int(metadata.compression),
        metadata.created_at,
        version,
    )


def _blob_agrees(buf: bytes) -> None:
    """blob_fields gives None, or what the runtime reads from the same bytes; None whenever the
    runtime cannot parse them."""
    read = blob_fields(buf, 0, len(buf))
    try:
        runtime = _runtime_blob(buf)
    except DecodeError:
        assert read is None
        return
    assert read is None or read == runtime


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=600),
    size=st.integers(0, 2**64 - 1),
    compression=st.integers(0, 2**31 - 1),
    checksum=st.integers(0, 2**32 - 1),
    created_at=st.integers(-(2**63), 2**63 - 1),
    version=st.none() | st.integers(0, 2**32 - 1),
)
def test_serialized_values_are_read_as_the_runtime_reads_them(
    data: bytes, size: int, compression: int, checksum: int, created_at: int, version: int | None
) -> None:
    message = types_pb2.CipherBlob(data=data)
    metadata = message.metadata
    metadata.size = size
    metadata.compression = compression  # type: ignore[assignment]
    metadata.checksum = checksum
    metadata.created_at = created_at
    if version is not None:
        metadata.version = version
    buf = message.SerializeToString()
    assert blob_fields(buf, 0, len(buf)) == _runtime_blob(buf)  # every serialized value is read
    # ... and from inside a larger buffer, up to the given end.
    framed = b"xyz" + buf
    assert blob_fields(framed, 3, len(framed)) == _runtime_blob(buf)


def test_what_a_value_reading_leaves_to_the_runtime() -> None:
    """Fields out of order, repeated or unknown, or a value the runtime would truncate: None from
    blob_fields, and a SET carrying such a value still gives the runtime's reading."""
    good = types_pb2.CipherBlob(data=b"abc")
    good.metadata.size = 3
    good.metadata.checksum = crc32(b"abc")
    buf = good.SerializeToString()
    metadata = good.metadata.SerializeToString()
    cases = [
        b"\x12" + bytes([len(metadata)]) + metadata + b"\x0a\x03abc",  # metadata before data
        buf + b"\x0a\x01z",  # data again (the runtime keeps the last)
        b"\x0a\x03abc\x12\x04\x18\x01\x08\x03",  # checksum before size
        b"\x0a\x03abc\x12\x04\x08\x03\x08\x04",  # size twice
        b"\x0a\x03abc\x12\x02\x30\x01",  # an unknown metadata field (6)
        buf + b"\x18\x01",  # an unknown field (3)
        b"\x0a\x03abc\x12\x06\x18\xff\xff\xff\xff\x1f",  # a checksum over 32 bits
    ]
    for case in cases:
        assert blob_fields(case, 0, len(case)) is None, case
        frame = _set_frame(7, b"people", b"k", case)
        read = _fields(frame)
        assert read is not None and read == _runtime_fields(frame)
        assert read[4] == blob_from_proto(types_pb2.CipherBlob.FromString(case))


def _set_frame(request_id: int, collection: bytes, key: bytes, value: bytes) -> bytes:
    """A SET frame carrying ``value`` exactly as given (the runtime would re-serialize it)."""
    key_message = b"\x0a" + _len(key) + key
    inner = (
        b"\x0a" + _len(collection) + collection
        + b"\x12" + _len(key_message) + key_message
        + b"\x1a" + _len(value) + value
    )  # fmt: skip
    query = b"\x12" + _len(inner) + inner
    request = b"\x0a" + _len(query) + query
    return b"\x08" + _varint(request_id) + b"\x1a" + _len(request) + request


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _len(data: bytes) -> bytes:
    return _varint(len(data))


def test_arbitrary_value_mutations_never_raise_and_never_disagree() -> None:
    rng = random.Random(13)
    values = []
    for _ in range(20):
        data = rng.randbytes(rng.randrange(200))
        message = types_pb2.CipherBlob(data=data)
        message.metadata.size = rng.randrange(2**40)
        message.metadata.checksum = crc32(data)
        message.metadata.created_at = rng.randrange(-(2**40), 2**40)
        if rng.random() < 0.5:
            message.metadata.version = rng.randrange(2**32)
        values.append(message.SerializeToString())
    for _ in range(20_000):
        _blob_agrees(_mutated(rng, rng.choice(values)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_value_bytes_never_raise(buf: bytes) -> None:
    _blob_agrees(buf)
