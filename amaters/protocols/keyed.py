"""Runs of GET, SET and DELETE frames read into a connection's batch in one call.

A read that brings several requests (a pipelining client) is mostly a run of keyed frames, each
of which only joins the read's batch (``AmatersServerProtocol._batch``) before the batch goes
through the pipeline together.  :func:`take_keyed_frames` reads such a run from the read's buffer
and appends each request to the batch, instead of one interpreted call per frame through the frame
loop and the frame handler.  It is compiled with the request path (``amaters/compiled.py``), and
reads the frames with the same :meth:`~amaters.query.validation.Validator.keyed_frame` as the frame
handler, so a request is read, checked and refused the same way on either path.
"""

from __future__ import annotations

from typing import Any

from amaters.query.pipeline import RequestContext
from amaters.query.validation import Validator

__all__ = ["take_keyed_frames"]


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
