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

from amaters.proto.answers import query_answer
from amaters.query import operations as ops
from amaters.query.pipeline import QueryPipeline, RequestContext
from amaters.query.validation import Validator

__all__ = ["answer_cached_gets", "take_keyed_frames"]

_frame_header = struct.Struct(">I").pack


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
    while len(batch) < room and end - offset >= 4:
        length = (
            (buffer[offset] << 24)
            | (buffer[offset + 1] << 16)
            | (buffer[offset + 2] << 8)
            | buffer[offset + 3]
        )
        start = offset + 4
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
        if not done or response is None:
            return answered, size, (done, outcome)
        answer = query_answer(ctx.request_id, response)
        length = len(answer)
        if 0 <= compress_from <= length or size + length > room:
            return answered, size, (done, outcome)
        out.append(_frame_header(length))
        out.append(answer)
        size += length
        answered += 1
    return answered, size, None
