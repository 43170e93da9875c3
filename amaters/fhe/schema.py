"""Record schemas: named unsigned integer fields of 8 or 16 bits, each split into 4-bit chunks.

A schema is written ``"age:8,balance:16"`` (or given as ``{"age": 8, "balance": 16}``).  A field
of ``bits`` bits is encrypted as a tensor of ``bits // 4`` chunks, most significant chunk first,
because one ciphertext per whole 16-bit value would need gigabytes of evaluation keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

#: Bits per encrypted chunk.
CHUNK_BITS = 4
#: Field widths a schema may declare.
FIELD_BITS = (8, 16)
MAX_FIELDS = 16
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class SchemaError(ValueError):
    """A schema string, a record or a field value that does not fit the rules (one-line message)."""


@attrs.frozen
class Schema:
    """Field names and widths, in declaration order."""

    fields: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, spec: str | Mapping[str, int] | Schema) -> Schema:
        """A schema from ``"name:bits,..."`` or a mapping; raises :class:`SchemaError`."""
        if isinstance(spec, Schema):
            return spec
        items: list[tuple[str, Any]] = []
        if isinstance(spec, Mapping):
            items = [(str(k), v) for k, v in spec.items()]
        else:
            for part in str(spec).split(","):
                part = part.strip()
                if not part:
                    continue
                name, sep, bits = part.partition(":")
                if not sep:
                    raise SchemaError(f"schema field {part!r} needs a width, e.g. {part}:8")
                try:
                    items.append((name.strip(), int(bits)))
                except ValueError:
                    raise SchemaError(
                        f"schema field {name.strip()!r}: width {bits!r} is not a number"
                    ) from None
        if not items:
            raise SchemaError("a schema needs at least one field, e.g. age:8,balance:16")
        if len(items) > MAX_FIELDS:
            raise SchemaError(f"a schema has at most {MAX_FIELDS} fields")
        seen: set[str] = set()
        for name, bits in items:
            if not _NAME.fullmatch(name):
                raise SchemaError(f"field name {name!r} must be a letter or '_' then letters, digits, '_'")
            if name in seen:
                raise SchemaError(f"field {name!r} appears twice in the schema")
            if not isinstance(bits, int) or bits not in FIELD_BITS:
                raise SchemaError(f"field {name!r} has {bits} bits; fields are 8 or 16 bits")
            seen.add(name)
        return cls(tuple(items))

    def __str__(self) -> str:
        return ",".join(f"{n}:{b}" for n, b in self.fields)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.fields)

    @property
    def widths(self) -> tuple[int, ...]:
        """The distinct field widths, ascending: what the compiled circuit depends on."""
        return tuple(sorted({b for _, b in self.fields}))

    def bits(self, name: str) -> int:
        for n, b in self.fields:
            if n == name:
                return b
        raise SchemaError(f"the schema has no field {name!r} (fields: {', '.join(self.names)})")

    def check_value(self, name: str, value: object) -> int:
        """``value`` as an int that fits field ``name``; raises :class:`SchemaError`."""
        bits = self.bits(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"field {name!r} takes an unsigned integer, not {type(value).__name__}")
        if not 0 <= value < (1 << bits):
            raise SchemaError(f"field {name!r} is {bits} bits: {value} is outside 0..{(1 << bits) - 1}")
        return value

    def check_record(self, record: Mapping[str, object]) -> dict[str, int]:
        """Every field of the schema, checked; raises :class:`SchemaError` on missing or extra ones."""
        extra = sorted(set(record) - set(self.names))
        if extra:
            raise SchemaError(f"the schema has no field {extra[0]!r} (fields: {', '.join(self.names)})")
        missing = [n for n in self.names if n not in record]
        if missing:
            raise SchemaError(f"the record lacks field {missing[0]!r}")
        return {n: self.check_value(n, record[n]) for n in self.names}


def to_chunks(value: int, bits: int) -> list[int]:
    """``value`` as ``bits // 4`` chunks of 4 bits, most significant first."""
    n = bits // CHUNK_BITS
    return [(value >> (CHUNK_BITS * (n - 1 - i))) & 0xF for i in range(n)]


def from_chunks(chunks: object) -> int:
    """The integer of a chunk sequence, most significant first."""
    value = 0
    for c in chunks:  # type: ignore[attr-defined]
        value = (value << CHUNK_BITS) | (int(c) & 0xF)
    return value
