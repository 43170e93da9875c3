"""The commonest constant-shaped answer, a successful SET, encoded straight to bytes.

Building an ``Envelope`` with its three nested levels and serializing it costs about twice as much
as writing the few bytes directly (a GET answer carrying a value is cheaper through the protobuf
runtime, so it stays there).  The output is byte for byte what
``Envelope.SerializeToString()`` gives for the same message (``tests/unit/test_proto_answers.py``
checks it against the protobuf runtime), so a client cannot tell the difference.
"""

from __future__ import annotations

__all__ = ["set_answer"]

_MASK64 = (1 << 64) - 1
_SMALL = [bytes((value,)) for value in range(0x80)]


def _varint(value: int) -> bytes:
    """A protobuf varint of an unsigned 64-bit value."""
    if value < 0x80:
        return _SMALL[value]
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    if value < 0x200000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    value &= _MASK64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: Envelope.query_response (field 21, length-delimited): tag bytes.
_QUERY_RESPONSE = _varint((21 << 3) | 2)
#: Envelope.request_id is field 1, varint.
_REQUEST_ID = b"\x08"

#: ``query_response { result { success { affected_rows: 1 } } }`` after the request id.
_SET_OK = _QUERY_RESPONSE + _varint(6) + b"\x0a\x04\x1a\x02\x08\x01"


def _request_id(request_id: int) -> bytes:
    return _REQUEST_ID + _varint(request_id) if request_id else b""


#: ``_SET_OK`` after each request id below 0x4000 (one or two varint bytes), as they are reused.
_SET_ANSWERS: dict[int, bytes] = {}


def set_answer(request_id: int) -> bytes:
    """The serialized Envelope answering a successful SET (one row affected)."""
    answer = _SET_ANSWERS.get(request_id)
    if answer is None:
        answer = _request_id(request_id) + _SET_OK
        if request_id < 0x4000:
            _SET_ANSWERS[request_id] = answer
    return answer
