"""The client's FHE key set: generate, save, load, encrypt records and constants, decrypt results.

The secret key never leaves this object except into the file :meth:`FheKeys.save` writes (mode
0600).  What a server receives is :meth:`FheKeys.evaluation_keys` (public evaluation keys), the
encrypted records and the encrypted constants of predicates and updates.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from amaters.fhe import circuits, records
from amaters.fhe import predicate as predicates
from amaters.fhe.schema import Schema, SchemaError, from_chunks, to_chunks
from amaters.proto import types_pb2

_FILE_MAGIC = b"AMATERS-FHE-KEYS\n"
EVALUATORS = ("concrete", "cleartext-insecure")


def key_set_id(kind: str, schema: Schema, evaluation_keys: bytes) -> bytes:
    """The key set's identity: sha256 over its evaluator, schema and public evaluation keys."""
    h = hashlib.sha256()
    h.update(f"{kind}\n{schema}\n".encode())
    h.update(evaluation_keys)
    return h.digest()


class FheKeys:
    """A client key set for one schema (secret key included: keep it private)."""

    def __init__(self, kind: str, schema: Schema, specs: bytes, keyset: bytes) -> None:
        self.kind = kind
        self.schema = schema
        self._specs = specs
        self._keyset_bytes = keyset
        self._client: Any = None
        self._evaluation: bytes | None = None
        if kind == "concrete":
            fhe = circuits.concrete()

            client = fhe.Client(fhe.ClientSpecs.deserialize(specs))
            client._keys = fhe.Keys.deserialize(keyset)
            self._client = client
            self._evaluation = bytes(client._keys.evaluation.serialize())
        elif kind == "cleartext-insecure":
            self._evaluation = keyset  # a public nonce: there is nothing secret
        else:
            raise SchemaError(f"unknown evaluator {kind!r}; use one of {', '.join(EVALUATORS)}")
        self.key_set_id = key_set_id(kind, schema, self._evaluation)

    def __repr__(self) -> str:
        return f"<FheKeys {self.kind} schema={self.schema} id={self.key_set_id.hex()[:16]}>"

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def generate(cls, schema: str | Mapping[str, int] | Schema, *, evaluator: str = "concrete") -> FheKeys:
        """New keys for ``schema`` (``"age:8,balance:16"`` or a dict).  Concrete: ~10-20 s."""
        parsed = Schema.parse(schema)
        if evaluator == "cleartext-insecure":
            return cls(evaluator, parsed, b"", os.urandom(32))
        if evaluator != "concrete":
            raise SchemaError(f"unknown evaluator {evaluator!r}; use one of {', '.join(EVALUATORS)}")
        from amaters.fhe import circuits

        module = circuits.compile_module(parsed.widths)
        client = module.execution_runtime.val.client
        client.keygen()
        specs = bytes(client.specs.serialize())
        keyset = bytes(client.keys.serialize())
        return cls("concrete", parsed, specs, keyset)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key set (secret key included) to ``path`` with mode 0600."""
        header = json.dumps({"evaluator": self.kind, "schema": str(self.schema)}).encode()
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_FILE_MAGIC)
            for part in (header, self._specs, self._keyset_bytes):
                f.write(struct.pack(">Q", len(part)))
                f.write(part)
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FheKeys:
        """The key set saved at ``path``; raises :class:`SchemaError` if it is not one."""
        data = Path(path).read_bytes()
        if not data.startswith(_FILE_MAGIC):
            raise SchemaError(f"{os.fspath(path)} is not an amaters FHE key file")
        pos = len(_FILE_MAGIC)
        parts = []
        for _ in range(3):
            (n,) = struct.unpack_from(">Q", data, pos)
            pos += 8
            parts.append(data[pos : pos + n])
            pos += n
        header = json.loads(parts[0])
        return cls(header["evaluator"], Schema.parse(header["schema"]), parts[1], parts[2])

    # -- public material ------------------------------------------------------------------------

    def evaluation_keys(self) -> bytes:
        """The public evaluation keys the server needs (no secret key)."""
        assert self._evaluation is not None
        return self._evaluation

    @property
    def specs_sha256(self) -> str:
        """sha256 of the public client specs: the circuit these keys were made for."""
        return hashlib.sha256(self._specs).hexdigest() if self._specs else ""

    def secret_key_material(self) -> list[bytes]:
        """The secret LWE keys' bytes (for tests proving they never reach a server)."""
        if self.kind != "concrete":
            return []
        keyset = self._client.keys._keyset
        client_keys = keyset.get_client_keys()
        out = []
        for key in client_keys.get_secret_keys():
            out.append(bytes(key.serialize()))
        return out

    # -- encryption -----------------------------------------------------------------------------

    def encrypt_value(self, name: str, value: int) -> bytes:
        """One field value (or a constant for it) as a chunk-tensor ciphertext."""
        bits = self.schema.bits(name)
        value = self.schema.check_value(name, value)
        chunks = to_chunks(value, bits)
        if self.kind == "cleartext-insecure":
            return bytes(chunks)
        encrypted = self._client.encrypt(np.array(chunks), None, function_name=f"add{bits}")
        return bytes(encrypted[0].serialize())

    def warm_ciphertext(self) -> bytes:
        """An encrypted boolean the server evaluates once to warm a freshly loaded key set."""
        if self.kind == "cleartext-insecure":
            return b"\x00"
        return bytes(self._client.encrypt(0, function_name="bnot").serialize())

    def encrypt(self, record: Mapping[str, int]) -> bytes:
        """The stored form of ``record`` (every schema field), for ``client.set``."""
        values = self.schema.check_record(record)
        fields = tuple(self.encrypt_value(n, values[n]) for n in self.schema.names)
        return records.encode(records.Record(self.kind, self.key_set_id, self.schema, fields))

    def decrypt(self, data: bytes | Any) -> dict[str, int]:
        """The cleartext record of a stored value (bytes or a CipherBlob)."""
        raw = getattr(data, "data", data)
        row = records.decode(bytes(raw))
        if row.key_set_id != self.key_set_id:
            raise SchemaError("the record was encrypted under another key set")
        out = {}
        for (name, bits), ciphertext in zip(row.schema.fields, row.fields, strict=True):
            out[name] = self._decrypt_chunks(ciphertext, bits)
        return out

    def _decrypt_chunks(self, ciphertext: bytes, bits: int) -> int:
        if self.kind == "cleartext-insecure":
            return from_chunks(ciphertext)
        fhe = circuits.concrete()

        value = fhe.Value.deserialize(ciphertext)
        return from_chunks(np.atleast_1d(self._client.decrypt(value, function_name=f"add{bits}")))

    def decrypt_bool(self, ciphertext: bytes) -> bool:
        """An encrypted boolean the server returned (FILTER)."""
        if self.kind == "cleartext-insecure":
            return bool(ciphertext[0])
        fhe = circuits.concrete()

        return bool(int(self._client.decrypt(fhe.Value.deserialize(ciphertext), function_name="bnot")))

    def encrypt_predicate(self, p: predicates.Predicate) -> types_pb2.Predicate:
        """The Predicate message of ``p`` with every constant encrypted."""
        return predicates.to_proto(p, self.encrypt_value)

    def encrypt_updates(self, updates: list[predicates.UpdateOp]) -> list[types_pb2.Update]:
        out = []
        for u in updates:
            if not isinstance(u, predicates.UpdateOp):
                raise TypeError("updates are set_(), add() or mul() values")
            m = types_pb2.Update()
            node = getattr(m, u.op)
            node.column.name = u.field
            node.value.data = self.encrypt_value(u.field, u.value)
            out.append(m)
        return out
