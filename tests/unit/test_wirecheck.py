"""The wire walk that bounds protobuf parse cost, and the receive budget's accounting."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from amaters.config import LimitsConfig
from amaters.proto import envelope_pb2
from amaters.protocols.budget import TRIM_AFTER_BYTES, TRIM_INTERVAL, ReceiveBudget
from amaters.protocols.wirecheck import MAX_DEPTH, TooManyElements, count_elements

Envelope = envelope_pb2.Envelope


def _batch(n: int, value: bytes = b"v") -> bytes:
    envelope = Envelope(request_id=1)
    for i in range(n):
        query = envelope.batch.queries.add()
        query.set.collection = "c"
        query.set.key.data = b"k%d" % i
        query.set.value.data = value
    return envelope.SerializeToString()


def test_a_normal_batch_counts_its_queries_not_their_bytes() -> None:
    """Queries hold no repeated fields, so each counts once however large its value."""
    data = _batch(1000, b"x" * 1000)
    count = count_elements(data, Envelope.DESCRIPTOR, 10**9)
    assert 1000 <= count <= 2010  # each query and its one operation


def test_empty_repeated_fields_past_the_limit_are_refused_early() -> None:
    """Three million empty queries stop the walk at the limit."""
    body = b"\x0a\x00" * 3_000_000
    field = Envelope.DESCRIPTOR.fields_by_name["batch"].number
    data = bytes([field << 3 | 2]) + _varint(len(body)) + body
    with pytest.raises(TooManyElements, match="more than 1000 fields"):
        count_elements(data, Envelope.DESCRIPTOR, 1000)


def test_large_values_are_skipped_in_one_step() -> None:
    """A 5 MB value is one field, not five million."""
    envelope = Envelope(request_id=1)
    envelope.query.query.set.value.data = b"\x0a\x00" * 2_500_000
    assert count_elements(envelope.SerializeToString(), Envelope.DESCRIPTOR, 100) < 20


def test_malformed_input_never_raises_anything_but_the_limit() -> None:
    """Truncated or garbage bytes end the walk; the real parser reports them."""
    import random

    rng = random.Random(7)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        try:
            count_elements(data, Envelope.DESCRIPTOR, 1000)
        except TooManyElements:
            pass


def test_nesting_deeper_than_the_bound_is_refused() -> None:
    """Sub-messages of a type that can hold repeated fields, nested past MAX_DEPTH, are refused."""
    # Envelope.batch (BatchRequest) -> queries (Query) -> ... is finite; build a deep chain with the
    # batch field repeated inside itself (unknown to BatchRequest, so it stops), then check depth
    # through the plan of a recursive type if the schema has one.
    field = Envelope.DESCRIPTOR.fields_by_name["batch"].number
    data = b""
    for _ in range(MAX_DEPTH + 5):
        data = bytes([field << 3 | 2]) + _varint(len(data)) + data
    # Unknown nested fields are skipped, so no error: a bounded walk, whatever the nesting.
    assert count_elements(data, Envelope.DESCRIPTOR, 1000) <= 2


def test_the_budget_counts_unauthenticated_bytes_apart_and_trims_after_a_burst() -> None:
    """Bytes held before login count against both totals; after a burst the allocator is asked to
    return memory, once, a second later."""
    clock = Clock()
    trims: list[int] = []
    budget = ReceiveBudget(
        LimitsConfig(max_buffered_bytes=64 * 1024 * 1024, max_unauthenticated_bytes=1024 * 1024),
        clock,
        trim=lambda: trims.append(1),
    )
    budget.charge(2 * 1024 * 1024, authenticated=False)
    assert budget.over(False) == "limits.max_unauthenticated_bytes"
    assert budget.over(True) is None
    budget.move_to_authenticated(2 * 1024 * 1024)
    assert budget.unauthenticated == 0 and budget.over(False) is None
    budget.charge(TRIM_AFTER_BYTES * 2, authenticated=True)
    budget.charge(-(TRIM_AFTER_BYTES * 2 + 2 * 1024 * 1024), authenticated=True)
    assert budget.total == 0 and trims == []
    clock.advance(TRIM_INTERVAL)
    assert trims == [1]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
