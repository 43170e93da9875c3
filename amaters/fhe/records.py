"""The stored form of an encrypted record, and of encrypted constants.

A record is stored as an ordinary CipherBlob whose data is::

    b"AFHE" | version (1 byte) | evaluator kind (1 byte) | key set id (32 bytes)
    | schema length (u16) | schema ("age:8,balance:16") | per field: length (u32) | ciphertext

so GET, RANGE, BATCH, snapshots and replication treat it like any value, and the server can tell
which key set and schema a row belongs to without decrypting anything.
"""

from __future__ import annotations

import struct

import attrs

from amaters.fhe.schema import Schema, SchemaError

MAGIC = b"AFHE"
VERSION = 1
#: Evaluator kinds: the concrete TFHE evaluator, or the insecure cleartext one (tests).
KINDS = {0: "concrete", 1: "cleartext-insecure"}
KIND_CODES = {v: k for k, v in KINDS.items()}


@attrs.frozen
class Record:
    kind: str
    key_set_id: bytes
    schema: Schema
    fields: tuple[bytes, ...]

    def field(self, name: str) -> bytes:
        return self.fields[self.schema.names.index(name)]

    def replace(self, values: dict[str, bytes]) -> Record:
        return attrs.evolve(
            self, fields=tuple(values.get(n, f) for n, f in zip(self.schema.names, self.fields, strict=True))
        )


def is_record(data: bytes) -> bool:
    return data[:4] == MAGIC


def encode(record: Record) -> bytes:
    schema = str(record.schema).encode()
    parts = [
        MAGIC,
        bytes([VERSION, KIND_CODES[record.kind]]),
        record.key_set_id,
        struct.pack(">H", len(schema)),
        schema,
    ]
    for f in record.fields:
        parts.append(struct.pack(">I", len(f)))
        parts.append(f)
    return b"".join(parts)


def decode(data: bytes) -> Record:
    """The record in ``data``; raises :class:`SchemaError` when it is not one."""
    if data[:4] != MAGIC or len(data) < 40:
        raise SchemaError("the value is not an encrypted record")
    if data[4] != VERSION or data[5] not in KINDS:
        raise SchemaError("the encrypted record has an unknown format version")
    key_set_id = data[6:38]
    (slen,) = struct.unpack_from(">H", data, 38)
    pos = 40 + slen
    schema = Schema.parse(data[40:pos].decode("ascii", "replace"))
    fields: list[bytes] = []
    for _ in schema.fields:
        if pos + 4 > len(data):
            raise SchemaError("the encrypted record is truncated")
        (flen,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + flen > len(data):
            raise SchemaError("the encrypted record is truncated")
        fields.append(data[pos : pos + flen])
        pos += flen
    return Record(KINDS[data[5]], key_set_id, schema, tuple(fields))
