"""Input rules: what a client may send, turned from protobuf requests into validated operations.

Every rule raises an :class:`~amaters.errors.AmatersError` with a precise code and a message that
names the rule (never the key or value):

- collection names: ``[A-Za-z0-9_.-]{1,128}`` → ``VALIDATION_INVALID_COLLECTION``;
- keys: 1 to ``limits.max_key_bytes`` bytes → ``VALIDATION_INVALID_KEY`` / ``VALIDATION_SIZE_EXCEEDED``;
- values: at most ``limits.max_value_bytes`` → ``VALIDATION_SIZE_EXCEEDED``; the CRC32 in
  ``CipherMetadata.checksum`` must match the data → ``VALIDATION_INVALID_VALUE``;
- a batch: at most ``limits.max_batch_ops`` of GET, SET and DELETE;
- FILTER and UPDATE need an FHE evaluator → ``COMPUTE_INVALID_OPERATION``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from amaters.config import LimitsConfig
from amaters.errors import (
    AmatersError,
    InvalidCollection,
    InvalidKey,
    InvalidOperation,
    InvalidValue,
    MissingField,
    ProtocolError,
    SizeExceeded,
)
from amaters.proto import aql_pb2, query_pb2, types_pb2
from amaters.proto.convert import blob_from_proto
from amaters.proto.requests import GET, keyed_request
from amaters.query import operations as ops
from amaters.types import CipherBlob, crc32

COLLECTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_FHE_MISSING = (
    "{what} needs the FHE evaluator, which this server does not have configured"
    " (install amaters[fhe] and enable [fhe]); the key-value operations work without it"
)


class Validator:
    """Checks requests against the current limits; ``limits`` may be replaced on reload."""

    # Names seen valid, so the regular expression runs once per collection, not per request.
    _MAX_REMEMBERED = 4096

    def __init__(
        self, limits: LimitsConfig, fhe_unavailable: Callable[[str], str | None] | None = None
    ) -> None:
        self.limits = limits
        #: Why FILTER/UPDATE cannot run (None: they can); absent: no FHE evaluator at all.
        self.fhe_unavailable = fhe_unavailable
        self._valid_names: set[str] = set()
        #: The same names as bytes (as :func:`keyed_request` reads them), each to its str.
        self._valid_name_bytes: dict[bytes, str] = {}

    def collection(self, name: str) -> str:
        if name in self._valid_names:
            return name
        if not COLLECTION_NAME.fullmatch(name):
            if not name:
                raise InvalidCollection("a collection name is required")
            raise InvalidCollection(
                "collection names are 1 to 128 characters of A-Z, a-z, 0-9, '_', '.' and '-'"
            )
        if len(self._valid_names) < self._MAX_REMEMBERED:
            self._valid_names.add(name)
            self._valid_name_bytes[name.encode()] = name
        return name

    def keyed_frame(self, frame: bytes) -> tuple[int, ops.Get | ops.Set | ops.Delete] | None:
        """The request id and the GET, SET or DELETE an Envelope frame asks for, when the frame
        can be read without the protobuf runtime (:func:`~amaters.proto.requests.keyed_request`)
        and the request keeps every rule, its collection's name already seen valid.  None
        otherwise: the frame is then parsed, and :meth:`query` gives the operation or the error,
        so a request refused is refused with the same error either way."""
        fields = keyed_request(frame)
        if fields is None:
            return None
        request_id, kind, collection, key, blob = fields
        name = self._valid_name_bytes.get(collection)
        limits = self.limits
        if name is None or not key or len(key) > limits.max_key_bytes:
            return None
        if kind == GET:
            return request_id, ops.Get(name, key)
        if blob is None:
            return request_id, ops.Delete(name, key)
        try:
            value = self.checked(blob)  # the same rules as query's, refused the same way below
        except AmatersError:
            return None
        return request_id, ops.Set(name, key, value)

    def key(self, message: types_pb2.Key, what: str = "key") -> bytes:
        data = message.data
        if not data:
            raise InvalidKey(f"the {what} must not be empty")
        if len(data) > self.limits.max_key_bytes:
            raise SizeExceeded(f"the {what} is {len(data)} bytes; the limit is {self.limits.max_key_bytes}")
        return data

    def bound(self, message: types_pb2.Key, what: str) -> bytes:
        """A range bound: may be empty (open), but no longer than a key."""
        data = message.data
        if len(data) > self.limits.max_key_bytes:
            raise SizeExceeded(
                f"the range {what} is {len(data)} bytes; the limit is {self.limits.max_key_bytes}"
            )
        return data

    def value(self, message: types_pb2.CipherBlob) -> CipherBlob:
        return self.checked(blob_from_proto(message))

    def checked(self, blob: CipherBlob) -> CipherBlob:
        """``blob`` when it keeps the rules for a value (its size, its checksum)."""
        if len(blob.data) > self.limits.max_value_bytes:
            raise SizeExceeded(
                f"the value is {len(blob.data)} bytes; the limit is {self.limits.max_value_bytes}"
            )
        if crc32(blob.data) != blob.checksum:
            raise InvalidValue(
                "the value's CRC32 (metadata.checksum) does not match its data;"
                " it was corrupted in transit or the checksum was not set"
            )
        return blob

    def query(self, query: query_pb2.Query) -> ops.Operation:
        """The operation a Query asks for.  RANGE gives :class:`~amaters.query.operations.Range`."""
        which = query.WhichOneof("query")
        if which == "get":
            # The hottest request: the common case inlined, the rules applied by the helpers.
            get = query.get
            name = get.collection
            if name not in self._valid_names:
                self.collection(name)
            key = get.key.data
            if not key or len(key) > self.limits.max_key_bytes:
                self.key(get.key)
            return ops.Get(name, key)
        if which == "set":
            s = query.set
            if not s.HasField("value"):
                raise MissingField("SET needs a value")
            # Inlined like GET, the rules in the same order: collection, key, value.
            name = s.collection
            if name not in self._valid_names:
                self.collection(name)
            key = s.key.data
            if not key or len(key) > self.limits.max_key_bytes:
                self.key(s.key)
            return ops.Set(name, key, self.value(s.value))
        if which == "delete":
            d = query.delete
            return ops.Delete(self.collection(d.collection), self.key(d.key))
        if which == "range":
            r = query.range
            end = self.bound(r.end, "end")
            return ops.Range(
                self.collection(r.collection),
                self.bound(r.start, "start"),
                end or None,
                r.limit if r.HasField("limit") else None,
            )
        if which == "filter":
            f = query.filter
            self.collection(f.collection)
            self._fhe_ready("FILTER")
            return ops.Filter(
                f.collection,
                self._key_set(f.key_set),
                self._predicate(f),
                f.limit if f.HasField("limit") else None,
                f.offset if f.HasField("offset") else 0,
            )
        if which == "update":
            u = query.update
            self.collection(u.collection)
            self._fhe_ready("UPDATE")
            from amaters.fhe.predicate import PredicateError, updates_from_proto

            try:
                updates = updates_from_proto(u.updates)
            except PredicateError as e:
                raise InvalidValue(str(e)) from None
            return ops.Update(u.collection, self._key_set(u.key_set), self._predicate(u), updates)
        raise MissingField("the query names no operation (get, set, delete, range, filter, update)")

    def _fhe_ready(self, what: str) -> None:
        if self.fhe_unavailable is None:
            raise InvalidOperation(_FHE_MISSING.format(what=what))
        reason = self.fhe_unavailable(what)
        if reason is not None:
            raise InvalidOperation(reason)

    @staticmethod
    def _key_set(key_set: str) -> str:
        if len(key_set) != 64 or any(c not in "0123456789abcdef" for c in key_set):
            raise MissingField("FILTER and UPDATE need key_set: the 64-hex sha256 id of uploaded FHE keys")
        return key_set

    @staticmethod
    def _predicate(query: query_pb2.FilterQuery | query_pb2.UpdateQuery) -> object:
        from amaters.fhe.predicate import PredicateError, from_proto

        if not query.HasField("predicate"):
            raise MissingField("FILTER and UPDATE need a predicate")
        try:
            return from_proto(query.predicate)
        except PredicateError as e:
            raise InvalidValue(str(e)) from None

    def batch(self, request: aql_pb2.BatchRequest) -> ops.Batch:
        """A batch of GET, SET and DELETE, every item validated before anything runs."""
        queries = request.queries
        if not queries:
            raise MissingField("a batch needs at least one query")
        if len(queries) > self.limits.max_batch_ops:
            raise SizeExceeded(
                f"the batch has {len(queries)} queries; the limit is {self.limits.max_batch_ops}"
            )
        items: list[ops.BatchItem] = []
        for index, query in enumerate(queries):
            try:
                op = self.query(query)
            except AmatersError as e:
                e.message = f"batch query {index}: {e.message}"
                raise
            if not isinstance(op, (ops.Get, ops.Set, ops.Delete)):
                raise ProtocolError(f"batch query {index}: only GET, SET and DELETE may be batched")
            items.append(op)
        return ops.Batch(tuple(items))
