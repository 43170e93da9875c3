"""The ``memory`` backend: a sorted map per collection, for tests and ephemeral use.

Nothing is durable: a restart loses everything.  Every method answers at once (``succeed``/``fail``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sortedcontainers import SortedDict
from twisted.internet import defer
from zope.interface import implementer

from amaters.errors import AmatersError, Corrupted, NotFound, StorageError
from amaters.interfaces import IRangeCursor, IStorageBackend
from amaters.types import CipherBlob, ConditionalResult, Expect, KeyValue, WriteKind, WriteOp


def _check(collection: str, key: bytes, blob: CipherBlob) -> CipherBlob:
    if not blob.checksum_ok():
        raise Corrupted(f"stored value of a key in collection {collection!r} fails its CRC32 check")
    return blob


_dict_set = dict.__setitem__


def _missing(name: str) -> NotFound:
    return NotFound(f"collection {name!r} does not exist")


def _store(data: SortedDict, key: bytes, value: CipherBlob | None) -> None:
    """``data[key] = value``; a key already there keeps its place in the sorted keys, so only its
    value is replaced (three times cheaper than SortedDict's own assignment)."""
    if key in data:
        _dict_set(data, key, value)
    else:
        data[key] = value


@implementer(IRangeCursor)
class MemoryCursor:
    """A cursor over a sorted map; it resumes after the last key it returned."""

    def __init__(
        self,
        collection: str,
        data: SortedDict,
        start: bytes,
        end: bytes | None,
        limit: int | None,
        chunk_size: int,
    ) -> None:
        self._collection = collection
        self._data = data
        self._next = start
        self._inclusive = True
        self._end = end
        self._remaining = limit
        self._chunk_size = max(1, chunk_size)
        self._done = (end is not None and start >= end) or (limit is not None and limit <= 0)

    def next_chunk(self) -> defer.Deferred[list[KeyValue]]:
        if self._done:
            return defer.succeed([])
        want = self._chunk_size
        if self._remaining is not None:
            want = min(want, self._remaining)
        keys = self._data.irange(
            minimum=self._next,
            maximum=self._end,
            inclusive=(self._inclusive, False),
        )
        chunk: list[KeyValue] = []
        try:
            for key in keys:
                chunk.append((key, _check(self._collection, key, self._data[key])))
                if len(chunk) >= want:
                    break
        except AmatersError:
            self._done = True
            return defer.fail()
        if chunk:
            self._next = chunk[-1][0]
            self._inclusive = False
        if self._remaining is not None:
            self._remaining -= len(chunk)
            if self._remaining <= 0:
                self._done = True
        if len(chunk) < want:
            self._done = True
        return defer.succeed(chunk)

    def close(self) -> None:
        self._done = True


@implementer(IStorageBackend)
class MemoryBackend:
    """Collections of sorted ``key -> CipherBlob`` maps held in memory."""

    name = "memory"
    #: ``write_batch`` is applied in-process, for about the cost of one put per write.
    local_batches = True

    def __init__(self) -> None:
        self._collections: dict[str, SortedDict] = {}
        self._open = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "put" in cls.__dict__ and "put_now" not in cls.__dict__:
            # A subclass that changes put (one that holds or fails writes) has its SETs go through
            # it: put_now would write past it.
            cls.put_now = None  # type: ignore[assignment]

    def open(self) -> defer.Deferred[None]:
        self._open = True
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        self._open = False
        return defer.succeed(None)

    def _collection(self, name: str) -> SortedDict:
        try:
            return self._collections[name]
        except KeyError:
            raise _missing(name) from None

    def create_collection(self, name: str) -> defer.Deferred[bool]:
        if name in self._collections:
            return defer.succeed(False)
        self._collections[name] = SortedDict()
        return defer.succeed(True)

    def drop_collection(self, name: str) -> defer.Deferred[bool]:
        return defer.succeed(self._collections.pop(name, None) is not None)

    def list_collections(self) -> defer.Deferred[list[str]]:
        return defer.succeed(sorted(self._collections))

    def has_collection(self, name: str) -> bool:
        return name in self._collections

    def collection_count(self) -> int:
        return len(self._collections)

    def get(self, collection: str, key: bytes) -> defer.Deferred[CipherBlob | None]:
        try:
            blob = self._collection(collection).get(key)
            return defer.succeed(None if blob is None else _check(collection, key, blob))
        except StorageError:
            return defer.fail()

    def put(self, collection: str, key: bytes, value: CipherBlob) -> defer.Deferred[None]:
        try:
            _store(self._collection(collection), key, value)
        except StorageError:
            return defer.fail()
        return defer.succeed(None)

    def put_now(self, collection: str, key: bytes, value: CipherBlob) -> bool:
        """:meth:`put` done at once: whether the value was written (False: the collection does
        not exist, and nothing was done)."""
        data = self._collections.get(collection)
        if data is None:
            return False
        _store(data, key, value)
        return True

    def delete(self, collection: str, key: bytes) -> defer.Deferred[bool]:
        try:
            existed = self._collection(collection).pop(key, None) is not None
        except StorageError:
            return defer.fail()
        return defer.succeed(existed)

    def write_batch(self, ops: Iterable[WriteOp]) -> defer.Deferred[None]:
        ops = list(ops)
        collections = self._collections
        try:
            # _collection's lookup without a call per write.
            targets = [collections[op.collection] for op in ops]
        except KeyError as e:
            return defer.fail(_missing(e.args[0]))
        self._apply(ops, targets)
        return defer.succeed(None)

    @staticmethod
    def _apply(ops: list[WriteOp], targets: list[SortedDict]) -> None:
        put = WriteKind.PUT
        for op, target in zip(ops, targets, strict=True):
            key = op.key
            if op.kind is not put:
                target.pop(key, None)
            elif key in target:  # _store, inline: this runs for every write of a batch
                _dict_set(target, key, op.value)
            else:
                target[key] = op.value

    def compare_and_write(
        self, expected: Iterable[Expect], ops: Iterable[WriteOp]
    ) -> defer.Deferred[ConditionalResult]:
        """Check and apply in one step (nothing else runs in between): all or nothing."""
        expected, ops = list(expected), list(ops)
        try:
            sources = [self._collection(e.collection) for e in expected]
            targets = [self._collection(op.collection) for op in ops]
        except StorageError:
            return defer.fail()
        changed = frozenset(
            (e.collection, e.key)
            for e, source in zip(expected, sources, strict=True)
            if source.get(e.key) != e.value
        )
        if changed:
            return defer.succeed(ConditionalResult(changed, frozenset((op.collection, op.key) for op in ops)))
        self._apply(ops, targets)
        return defer.succeed(ConditionalResult())

    def scan(
        self,
        collection: str,
        start: bytes,
        end: bytes | None,
        limit: int | None,
        chunk_size: int,
    ) -> MemoryCursor:
        return MemoryCursor(collection, self._collection(collection), start, end, limit, chunk_size)

    def sync(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def flush(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def stats(self) -> defer.Deferred[dict[str, Any]]:
        keys = {name: len(data) for name, data in self._collections.items()}
        sizes = {
            name: sum(len(k) + len(v.data) for k, v in data.items())
            for name, data in self._collections.items()
        }
        return defer.succeed(
            {"backend": self.name, "keys": keys, "collection_bytes": sizes, "bytes": sum(sizes.values())}
        )

    def snapshot(self, destination: str) -> defer.Deferred[None]:
        from amaters.errors import InvalidOperation

        return defer.fail(InvalidOperation("the memory backend keeps no files to snapshot"))
