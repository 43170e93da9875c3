"""Fill every field of a protobuf message with deterministic values (for wire round trips).

Depends only on google.protobuf, so both the upstream-stub driver process and the test process
can use it.  Oneofs: every member is set in turn would clear the others, so the member chosen is
``variant`` modulo the number of members; nesting stops at ``depth`` (recursive predicates).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor

_SCALARS: dict[int, Any] = {
    FieldDescriptor.TYPE_DOUBLE: 1.5,
    FieldDescriptor.TYPE_FLOAT: 2.5,
    FieldDescriptor.TYPE_INT64: -(2**40),
    FieldDescriptor.TYPE_UINT64: 2**40 + 7,
    FieldDescriptor.TYPE_INT32: -123456,
    FieldDescriptor.TYPE_FIXED64: 2**50,
    FieldDescriptor.TYPE_FIXED32: 2**20,
    FieldDescriptor.TYPE_BOOL: True,
    FieldDescriptor.TYPE_STRING: "ü-value",
    FieldDescriptor.TYPE_BYTES: b"\x00\xffbytes",
    FieldDescriptor.TYPE_UINT32: 4_000_000_000,
    FieldDescriptor.TYPE_SFIXED32: -77,
    FieldDescriptor.TYPE_SFIXED64: -(2**45),
    FieldDescriptor.TYPE_SINT32: -99,
    FieldDescriptor.TYPE_SINT64: -(2**41),
}


def fill(message: Any, variant: int = 0, depth: int = 3) -> Any:
    """Set every field of ``message`` (in place) and return it."""
    chosen = {}
    for oneof in message.DESCRIPTOR.oneofs:
        if oneof.fields:
            chosen[oneof.name] = oneof.fields[variant % len(oneof.fields)].name
    for field in message.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and chosen.get(oneof.name) != field.name:
            continue
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth <= 0:
                continue
            if repeated:
                for i in range(2):
                    fill(getattr(message, field.name).add(), variant + i, depth - 1)
            else:
                fill(getattr(message, field.name), variant, depth - 1)
                getattr(message, field.name).SetInParent()
        elif field.type == FieldDescriptor.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values if v.number != 0] or [0]
            value = values[variant % len(values)]
            if repeated:
                getattr(message, field.name).extend([value, values[0]])
            else:
                setattr(message, field.name, value)
        else:
            value = _SCALARS[field.type]
            if repeated:
                getattr(message, field.name).extend([value, value])
            else:
                setattr(message, field.name, value)
    return message
