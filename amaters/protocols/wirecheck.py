"""Bound the cost of parsing a protobuf message before parsing it.

Parsing cost and memory grow with the number of field occurrences, not with bytes: 53 MB of empty
repeated sub-messages (two bytes each) become 26 million message objects, about 1 GB, and stall the
reactor while they are built.  :func:`count_elements` walks the wire format of a message and
counts field occurrences, stopping as soon as ``limit`` is passed, so a frame that would be costly
to parse is refused after at most ``limit`` steps.

The walk uses the message's descriptor to know which length-delimited fields are sub-messages.
It descends only into sub-messages whose type can (transitively) hold repeated fields: anything
else parses into a bounded number of objects however it is encoded (a singular field repeated on
the wire is merged, not multiplied), so it counts as one occurrence and its bytes are skipped in one
step.  A packed repeated scalar counts one element per byte (an upper bound).  The walk is
iterative (its depth is bounded by :data:`MAX_DEPTH`) and never raises on malformed input: it
stops, and the real parser reports the error.

A message of ``n`` bytes holds at most ``n // 2`` occurrences, so callers skip the walk for frames
shorter than ``2 * limit`` bytes.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor

#: Sub-message nesting the walk follows; deeper is refused (the protobuf parser stops at 100).
MAX_DEPTH = 64

# A plan maps a field number to: _SKIP (count one, skip its bytes), _PACKED (count its bytes), or
# another plan (count one, descend).
_SKIP: Any = "skip"
_PACKED: Any = "packed"
_plans: dict[str, dict[int, Any]] = {}


class TooManyElements(ValueError):
    """The message holds more field occurrences than allowed, or nests deeper than MAX_DEPTH."""


def _has_repeated(descriptor: Any, seen: set[str]) -> bool:
    if descriptor.full_name in seen:
        return True  # recursive types may nest repeated fields without bound
    seen.add(descriptor.full_name)
    for field in descriptor.fields:
        if field.is_repeated:
            return True
        if field.type == FieldDescriptor.TYPE_MESSAGE and _has_repeated(field.message_type, seen):
            return True
    return False


def _plan(descriptor: Any) -> dict[int, Any]:
    """The walk plan for one message type (built once; recursive types share their plan)."""
    plan = _plans.get(descriptor.full_name)
    if plan is not None:
        return plan
    plan = {}
    _plans[descriptor.full_name] = plan
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if _has_repeated(field.message_type, set()):
                plan[field.number] = _plan(field.message_type)
            else:
                plan[field.number] = _SKIP
        elif field.is_repeated and field.type not in (
            FieldDescriptor.TYPE_STRING,
            FieldDescriptor.TYPE_BYTES,
        ):
            plan[field.number] = _PACKED
        else:
            plan[field.number] = _SKIP
    return plan


def count_elements(data: bytes, descriptor: Any, limit: int) -> int:
    """Field occurrences in ``data`` (a serialized ``descriptor`` message), walking as described in
    the module docstring; raises :class:`TooManyElements` as soon as more than ``limit`` are seen
    or sub-messages nest deeper than :data:`MAX_DEPTH`."""
    count = 0
    # Each level: (plan, end offset).
    stack: list[tuple[dict[int, Any], int]] = [(_plan(descriptor), len(data))]
    pos = 0
    plan, end = stack[-1]
    while True:
        if pos >= end:
            stack.pop()
            if not stack:
                return count
            plan, end = stack[-1]
            continue
        # The tag (a varint).
        key = 0
        shift = 0
        while True:
            if pos >= end or shift > 63:
                return count  # malformed: the parser will say so
            byte = data[pos]
            pos += 1
            key |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        count += 1
        if count > limit:
            raise TooManyElements(f"more than {limit} fields")
        wire_type = key & 7
        if wire_type == 0:
            while pos < end and data[pos] >= 0x80:
                pos += 1
            pos += 1
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length = 0
            shift = 0
            while True:
                if pos >= end or shift > 63:
                    return count
                byte = data[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
            stop = pos + length
            if stop > end:
                return count
            sub = plan.get(key >> 3, _SKIP)
            if sub is _SKIP:
                pos = stop
            elif sub is _PACKED:
                count += length
                if count > limit:
                    raise TooManyElements(f"more than {limit} fields")
                pos = stop
            else:
                if len(stack) >= MAX_DEPTH:
                    raise TooManyElements(f"sub-messages nested more than {MAX_DEPTH} deep")
                stack.append((sub, stop))
                plan, end = sub, stop
        else:
            return count  # groups and invalid wire types: the parser refuses them


__all__ = ["MAX_DEPTH", "TooManyElements", "count_elements"]
