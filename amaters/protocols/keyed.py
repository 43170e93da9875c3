"""Runs of GET, SET and DELETE frames read into a connection's batch, and a batch's cached GETs
answered, each in one call.

A read that brings several requests (a pipelining client) is mostly a run of keyed frames, each
of which only joins the read's batch (``AmatersServerProtocol._batch``) before the batch goes
through the pipeline together.  :func:`take_keyed_frames` reads such a run from the read's buffer
and appends each request to the batch, instead of one interpreted call per frame through the frame
loop and the frame handler; :func:`answer_cached_gets` runs a batch's GETs that the query cache
answers with their answers already encoded, and queues those answers, instead of one interpreted
call per request through the protocol's answering.  Both are compiled with the request path
(``amaters/compiled.py``) and call what the protocol calls (the same
:meth:`~amaters.query.validation.Validator.keyed_frame`, the same
:meth:`~amaters.query.pipeline.QueryPipeline.run_admitted`), so a request is read, checked, run,
refused and answered the same way on either path.
"""

from __future__ import annotations

import struct
from typing import Any

from amaters.proto.answers import query_answer, set_answer
from amaters.protocols.framing import HEADER_SIZE, frame_header
from amaters.query import operations as ops
from amaters.query.pipeline import QueryPipeline, RequestContext
from amaters.query.validation import Validator

__all__ = [
    "answer_cached_gets",
    "run_lone",
    "set_answer_frame",
    "set_answer_frames",
    "take_keyed_frames",
]

#: A framed SET answer to a request id of three varint bytes (0x4000 to 0x1FFFFF: a long-lived
#: connection's usual case) is its frame header, the id's tag and bytes (packed here), then the
#: same tail for every id.
_SET3 = struct.Struct(">IBBBB")
_SET3_LENGTH = len(set_answer(0x4000))
_SET3_TAIL = set_answer(0x4000)[4:]


#: Framed SET answers to the request ids below 0x4000 seen so far (a connection's first 16,384
#: requests; at most 16,384 short byte strings, shared by all connections).
_SET_FRAMES: dict[int, bytes] = {}


def set_answer_frame(request_id: int) -> bytes:
    """The framed answer of a successful SET (too short to be compressed)."""
    framed = _SET_FRAMES.get(request_id)
    if framed is None:
        payload = set_answer(request_id)
        framed = frame_header(len(payload)) + payload
        if request_id < 0x4000:
            _SET_FRAMES[request_id] = framed
    return framed


def set_answer_frames(request_ids: list[int]) -> bytes:
    """The framed answers of successful SETs, one after another."""
    parts: list[bytes] = []
    append = parts.append
    pack = _SET3.pack
    frames = _SET_FRAMES
    for request_id in request_ids:
        if 0x4000 <= request_id < 0x200000:
            append(
                pack(
                    _SET3_LENGTH,
                    0x08,
                    0x80 | (request_id & 0x7F),
                    0x80 | ((request_id >> 7) & 0x7F),
                    request_id >> 14,
                )
            )
            append(_SET3_TAIL)
        else:
            append(frames.get(request_id) or set_answer_frame(request_id))
    return b"".join(parts)


def take_keyed_frames(
    validator: Validator,
    buffer: bytes,
    offset: int,
    max_length: int,
    batch: list[tuple[RequestContext, Any]],
    room: int,
    principal: Any,
    source: str,
    started: float,
    session: Any,
) -> int:
    """Append the requests of the complete keyed frames at ``offset`` in ``buffer`` to ``batch``,
    until ``batch`` holds ``room`` requests; the offset after the last frame taken.

    It stops, leaving the frame where it is for the frame loop, at a frame that is incomplete,
    longer than ``max_length``, or not a GET, SET or DELETE that
    :meth:`~amaters.query.validation.Validator.keyed_frame` reads (anything else, or anything a
    rule refuses).  Each request's context is made as the protocol makes it for a keyed frame:
    its bytes arrived at ``started``, no trace context.
    """
    end = len(buffer)
    header: int = HEADER_SIZE  # the framing's 4-byte big-endian length, read inline below
    while len(batch) < room and end - offset >= header:
        length = (
            (buffer[offset] << 24)
            | (buffer[offset + 1] << 16)
            | (buffer[offset + 2] << 8)
            | buffer[offset + 3]
        )
        start = offset + header
        stop = start + length
        if length > max_length or stop > end:
            break
        read = validator.keyed_frame(buffer[start:stop])
        if read is None:
            break
        request_id, op = read
        batch.append((RequestContext(request_id, principal, source, started, session), op))
        offset = stop
    return offset


def answer_cached_gets(
    pipeline: QueryPipeline,
    batch: list[tuple[RequestContext, Any]],
    finished: list[Any],
    out: list[bytes],
    room: int,
    compress_from: int,
) -> tuple[int, int, tuple[bool, Any] | None]:
    """Run the requests of ``batch``, every stage having let them through, in order, while each is
    a GET answered at once with its answer already encoded (the query cache's, ``ctx.response``),
    appending each answer's frame to ``out`` (its header, then the Envelope, as the protocol
    queues its answers).  Returns how many were answered so, the bytes appended, and the outcome
    ``(done, outcome)`` of the request after them if it was run but answered otherwise (a cache
    miss, an answer of ``compress_from`` bytes or more unless that is negative, or one that would take
    the bytes appended past ``room``), else None: that request and the rest are the caller's.
    """
    size = 0
    answered = 0
    for ctx, op in batch:
        if type(op) is not ops.Get:
            return answered, size, None
        done, outcome = pipeline.run_admitted(ctx, op, finished)
        response = ctx.response
        length = (
            -1
            if not done or response is None
            else _queue_encoded(ctx, response, out, room - size, compress_from)
        )
        if length < 0:
            return answered, size, (done, outcome)
        size += length
        answered += 1
    return answered, size, None


def run_lone(
    pipeline: QueryPipeline,
    ctx: RequestContext,
    op: Any,
    finished: list[Any],
    out: list[bytes],
    room: int,
    compress_from: int,
) -> tuple[bool, Any, int]:
    """Run a GET, SET or DELETE that came alone in its read (:meth:`QueryPipeline.run
    <amaters.query.pipeline.QueryPipeline.run>`, its afters left in ``finished``): its ``(done,
    outcome)``, and the bytes of its answer appended to ``out`` (as the protocol queues answers)
    when it is done and answered with bytes known here, a SET's, or an answer already encoded (a
    cached GET's) that :func:`_queue_encoded` takes; -1 when the caller answers it.
    """
    done, outcome = pipeline.run(ctx, op, finished)
    if done:
        if type(op) is ops.Set:
            framed = set_answer_frame(ctx.request_id)
            out.append(framed)
            return done, outcome, len(framed)
        response = ctx.response
        if response is not None:
            return done, outcome, _queue_encoded(ctx, response, out, room, compress_from)
    return done, outcome, -1


def _queue_encoded(
    ctx: RequestContext, response: bytes, out: list[bytes], room: int, compress_from: int
) -> int:
    """Append the framed answer carrying the encoded ``response`` to ``ctx``'s request to ``out``
    (its header, then the Envelope) and return its length; -1, appending nothing, when it is of
    ``compress_from`` bytes or more (unless that is negative: frames are not compressed) or longer
    than ``room``."""
    answer = query_answer(ctx.request_id, response)
    length = len(answer)
    if 0 <= compress_from <= length or length > room:
        return -1
    out.append(frame_header(length))
    out.append(answer)
    return length
