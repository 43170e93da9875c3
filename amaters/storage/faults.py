"""A fault-injecting :class:`~amaters.interfaces.IStorageBackend` wrapper, for tests.

It passes every call through to the wrapped backend until told to fail writes: then writes
(``put``, ``delete``, ``write_batch``, ``compare_and_write``, ``create_collection``, ``drop_collection``, ``sync``,
``flush``, ``snapshot``) fail as a full disk (``StorageFull``) or a failing disk
(``StorageIOError``) would, while reads (``get``, ``scan``, ``list_collections``,
``has_collection``, ``stats``) are still served.  That is the behaviour the server promises on a
real disk-full or I/O failure, so the protocol, pipeline and retry tests can check their side of it
without filling a disk.

``fail_writes(kind, count=None)`` fails the next ``count`` writes (or all of them until
``heal()``); failed writes are not passed on, so nothing is applied.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from twisted.internet import defer
from zope.interface import implementer

from amaters.errors import AmatersError, StorageFull, StorageIOError
from amaters.interfaces import IRangeCursor, IStorageBackend
from amaters.types import CipherBlob, ConditionalResult, Expect, WriteOp

FaultKind = Literal["disk_full", "io_error"]


@implementer(IStorageBackend)
class FaultInjectingBackend:
    """Wraps ``inner``; in pass-through mode it behaves exactly like ``inner``."""

    def __init__(self, inner: IStorageBackend) -> None:
        # Typed Any: the interface declares its Deferred results as ``object``.
        self.inner: Any = inner
        self._kind: FaultKind | None = None
        self._remaining: int | None = None
        #: Writes refused so far.
        self.failed_writes = 0

    @property
    def name(self) -> str:
        return str(self.inner.name)

    # -- control ------------------------------------------------------------------------------

    def fail_writes(self, kind: FaultKind = "disk_full", count: int | None = None) -> None:
        """Fail the next ``count`` writes (all writes when None) with ``kind``."""
        self._kind = kind
        self._remaining = count

    def heal(self) -> None:
        """Back to pass-through."""
        self._kind = None
        self._remaining = None

    @property
    def failing(self) -> bool:
        return self._kind is not None

    def _fault(self, action: str) -> AmatersError | None:
        kind = self._kind
        if kind is None:
            return None
        if self._remaining is not None:
            self._remaining -= 1
            if self._remaining <= 0:
                self.heal()
        return self._error(kind, action)

    def _error(self, kind: FaultKind, action: str) -> AmatersError:
        self.failed_writes += 1
        if kind == "disk_full":
            return StorageFull(f"{action}: the disk is full; the write was not applied (injected)")
        return StorageIOError(f"{action}: I/O error (injected)")

    def _write(self, action: str, f: Any, *args: Any) -> defer.Deferred[Any]:
        error = self._fault(action)
        if error is not None:
            return defer.fail(error)
        return defer.maybeDeferred(f, *args)

    # -- IStorageBackend ----------------------------------------------------------------------

    def open(self) -> defer.Deferred[None]:
        return defer.maybeDeferred(self.inner.open)

    def close(self) -> defer.Deferred[None]:
        return defer.maybeDeferred(self.inner.close)

    def create_collection(self, name: str) -> defer.Deferred[bool]:
        return self._write(f"creating collection {name!r}", self.inner.create_collection, name)

    def drop_collection(self, name: str) -> defer.Deferred[bool]:
        return self._write(f"dropping collection {name!r}", self.inner.drop_collection, name)

    def list_collections(self) -> defer.Deferred[list[str]]:
        return defer.maybeDeferred(self.inner.list_collections)

    def has_collection(self, name: str) -> bool:
        return bool(self.inner.has_collection(name))

    def collection_count(self) -> int:
        return int(self.inner.collection_count())

    def get(self, collection: str, key: bytes) -> defer.Deferred[CipherBlob | None]:
        return defer.maybeDeferred(self.inner.get, collection, key)

    def put(self, collection: str, key: bytes, value: CipherBlob) -> defer.Deferred[None]:
        return self._write(f"writing to collection {collection!r}", self.inner.put, collection, key, value)

    def delete(self, collection: str, key: bytes) -> defer.Deferred[bool]:
        return self._write(f"deleting from collection {collection!r}", self.inner.delete, collection, key)

    def write_batch(self, ops: Iterable[WriteOp]) -> defer.Deferred[None]:
        return self._write("writing a batch", self.inner.write_batch, list(ops))

    def compare_and_write(
        self, expected: Iterable[Expect], ops: Iterable[WriteOp]
    ) -> defer.Deferred[ConditionalResult]:
        return self._write(
            "writing a conditional batch", self.inner.compare_and_write, list(expected), list(ops)
        )

    def scan(
        self, collection: str, start: bytes, end: bytes | None, limit: int | None, chunk_size: int
    ) -> IRangeCursor:
        cursor: IRangeCursor = self.inner.scan(collection, start, end, limit, chunk_size)
        return cursor

    def sync(self) -> defer.Deferred[None]:
        return self._write("syncing the write-ahead log", self.inner.sync)

    def flush(self) -> defer.Deferred[None]:
        return self._write("flushing memtables", self.inner.flush)

    def stats(self) -> defer.Deferred[dict[str, Any]]:
        return defer.maybeDeferred(self.inner.stats)

    def snapshot(self, destination: str) -> defer.Deferred[None]:
        return self._write("writing a snapshot", self.inner.snapshot, destination)
