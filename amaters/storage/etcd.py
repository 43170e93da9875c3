"""The ``etcd`` backend: collections of ``key -> CipherBlob`` kept in an etcd v3 cluster.

Consensus, replication and durability are etcd's (Raft, a quorum fsync before each answer); this
module only maps the storage contract onto etcd keys under one prefix ``P``:

``P c/<name>``
    a collection's marker; every keyed operation is one transaction that compares the marker, so a
    write to a dropped collection is refused atomically (``NotFound``).
``P d/<hex name>/<key>``
    one entry.  Keys of a collection share a prefix, so etcd's bytewise order is the key order and a
    RANGE is a paged etcd range, pinned to the revision of its first page.
``P k/<hex name>/<hex key>/<id>/<n>``
    chunks of a value too large for one etcd request (etcd refuses requests over 1.5 MiB).  They are
    written first, under a pending marker ``P p/<id>`` held by a lease; the entry then becomes a
    pointer in one transaction that also checks and deletes the pending marker, so a reader sees the
    old value or the whole new one, never part of it.  Chunks nothing points to (a writer died, or
    the value was replaced) are deleted by :meth:`EtcdBackend.clean_orphans`.

A stored entry is ``kind (1 byte) + write id (8 bytes) + body``: kind 1 holds the record of
:mod:`amaters.storage.codec` inline, kind 2 a chunk pointer.  The write id lets a writer whose
request timed out read back whether its write was applied: if it was, the write is acknowledged;
if that cannot be known, it fails with the retryable ``Unavailable`` and nothing wrong is
acknowledged.  Reads are linearizable unless ``serializable_reads`` is set.  Every read and write
reports the etcd revision it saw to the request's revision scope (:mod:`amaters.cluster.session`),
which the server returns to the client as its session token; a serializable read older than the
session's token is done again through the quorum, so a session always reads its own writes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from amaters.cluster import session
from amaters.cluster.etcd import (
    EtcdAmbiguous,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    compare_mod,
    compare_version,
    delete_op,
    kv_of,
    prefix_end,
    put_op,
    range_op,
    unb64,
)
from amaters.errors import AmatersError, Corrupted, InvalidOperation, NotFound, StorageIOError, Unavailable
from amaters.interfaces import IRangeCursor, IStorageBackend
from amaters.storage import codec
from amaters.types import CipherBlob, ConditionalResult, Expect, KeyValue, WriteKind, WriteOp

_INLINE = 1
_POINTER = 2
_POINTER_BODY = struct.Struct(">8sIQ")  # chunk group id, chunk count, total bytes
#: Largest stored entry written inline; larger records are chunked (etcd's request cap is 1.5 MiB).
INLINE_LIMIT = 1024 * 1024
#: Bytes per chunk.
CHUNK_SIZE = 1024 * 1024
#: Largest transaction, estimated from its keys and values, sent as one request.
TXN_LIMIT = 1400 * 1024
#: Seconds a pending marker (and so a half-written chunked value) lives without its writer.
PENDING_TTL = 60


#: Times a conditional write reads and tries again when its guard failed although every value
#: read back still equals the expected one (rewritten with the same value meanwhile).
CONDITIONAL_ATTEMPTS = 3


class _Compacted(Exception):
    """A pinned read found its revision compacted."""


class _GuardFailed(Exception):
    """A conditional transaction's guard (a key's mod revision) no longer held: nothing applied."""


class StaleEpoch(Unavailable):
    """The shard's epoch moved on (virtual shards are moving): nothing was applied; re-read the
    shard map and try again."""

    def __init__(self, shard: str, epoch: int) -> None:
        super().__init__(f"shard {shard} is being rebalanced; retry")
        self.shard = shard
        self.epoch = epoch


def _deferred(coro: Any) -> defer.Deferred[Any]:
    return defer.Deferred.fromCoroutine(coro)


def _translate(e: EtcdError) -> AmatersError:
    if isinstance(e, (EtcdUnavailable, EtcdAmbiguous)):
        return Unavailable(f"etcd is not available: {e.message}")
    if "request is too large" in e.message or "too many operations" in e.message:
        return InvalidOperation(f"etcd refused the request: {e.message}")
    return StorageIOError(f"etcd refused the request: {e.message}")


@implementer(IRangeCursor)
class EtcdCursor:
    """Pages of one collection's range, all read at the revision of the first page."""

    def __init__(
        self,
        backend: EtcdBackend,
        collection: str,
        start: bytes,
        end: bytes | None,
        limit: int | None,
        chunk_size: int,
    ) -> None:
        self._backend = backend
        self._collection = collection
        base = backend._data_prefix(collection)
        self._base = base
        self._next = base + start
        self._end = base + end if end is not None else prefix_end(base)
        self._remaining = limit
        self._chunk_size = max(1, chunk_size)
        self._revision = 0
        self._done = (end is not None and start >= end) or (limit is not None and limit <= 0)

    def next_chunk(self) -> defer.Deferred[list[KeyValue]]:
        if self._done:
            return defer.succeed([])
        return _deferred(self._next_chunk())

    async def _next_chunk(self) -> list[KeyValue]:
        try:
            return await self._read_page()
        except _Compacted:
            # The revision this range was pinned to was compacted away (a cursor older than the
            # compaction interval): continue from the current revision.
            self._revision = 0
            return await self._read_page()

    async def _read_page(self) -> list[KeyValue]:
        want = self._chunk_size if self._remaining is None else min(self._chunk_size, self._remaining)
        backend = self._backend
        try:
            if not self._revision:
                answer = await backend._txn_in_collection(
                    self._collection, [range_op(self._next, self._end, limit=want)], idempotent=True
                )
                self._revision = int(answer["header"]["revision"])
                page = answer["responses"][0]["response_range"]
            else:
                page = await backend.client.range(self._next, self._end, limit=want, revision=self._revision)
            entries: list[KeyValue] = []
            for item in page.get("kvs", []):
                raw_key, stored, _ = kv_of(item)
                key = raw_key[len(self._base) :]
                blob = await backend._decode(self._collection, raw_key, stored, self._revision)
                entries.append((key, blob))
        except EtcdError as e:
            if "compacted" in e.message and self._revision:
                raise _Compacted() from None
            self._done = True
            raise _translate(e) from None
        except AmatersError:
            self._done = True
            raise
        if entries:
            self._next = self._base + entries[-1][0] + b"\x00"
        if self._remaining is not None:
            self._remaining -= len(entries)
            if self._remaining <= 0:
                self._done = True
        if not page.get("more") or len(entries) < want:
            self._done = True
        return entries

    def close(self) -> None:
        self._done = True


@implementer(IStorageBackend)
class EtcdBackend:
    """Collections in etcd under ``prefix`` (see the module docstring), through ``client``.

    The constructor does no I/O; :meth:`open` reads the collection list and starts a watch that keeps
    :meth:`has_collection` current when other nodes create or drop collections.
    """

    name = "etcd"
    #: The collection list is a cache other nodes change: a keyed read or delete of a collection
    #: missing from it asks etcd rather than answering absent (the executor reads this).
    collections_remote = True
    _log = Logger()

    def __init__(
        self,
        client: EtcdClient,
        reactor: Any,
        *,
        prefix: bytes = b"/amaters/",
        shard: str = "0",
        serializable_reads: bool = False,
    ) -> None:
        self.client = client
        self.reactor = reactor
        self.prefix = prefix
        #: The shard name revisions are reported under (session tokens).
        self.shard = shard
        #: The shard's fencing epoch as this node knows it: every read and write checks it in its
        #: transaction, so a shard whose virtual shards are moving refuses nodes with an old map.
        self.epoch = 0
        self.epoch_key = prefix + b"epoch"
        #: Serve GETs from the member the node talks to, without a quorum round; a request's session
        #: token still forces a linearizable read when that member is behind it.
        self.serializable_reads = serializable_reads
        self._collections: set[str] = set()
        self._watch: Any = None
        self._open = False
        #: The etcd revision of the newest write this backend acknowledged.
        self.last_revision = 0

    # -- keys -----------------------------------------------------------------------------------

    def _marker(self, collection: str) -> bytes:
        return self.prefix + b"c/" + collection.encode("utf-8")

    def _data_prefix(self, collection: str) -> bytes:
        return self.prefix + b"d/" + collection.encode("utf-8").hex().encode("ascii") + b"/"

    def _chunk_prefix(self, collection: str, key: bytes | None = None) -> bytes:
        base = self.prefix + b"k/" + collection.encode("utf-8").hex().encode("ascii") + b"/"
        return base if key is None else base + key.hex().encode("ascii") + b"/"

    def _pending(self, group: bytes) -> bytes:
        return self.prefix + b"p/" + group.hex().encode("ascii")

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> defer.Deferred[None]:
        return _deferred(self._open_store())

    async def _open_store(self) -> None:
        try:
            answer = await self.client.range(
                self.prefix + b"c/", prefix_end(self.prefix + b"c/"), keys_only=True
            )
        except EtcdError as e:
            raise StorageIOError(f"cannot read the collection list from etcd: {e.message}") from None
        start = len(self.prefix) + 2
        self._collections = {kv_of(item)[0][start:].decode("utf-8") for item in answer.get("kvs", [])}
        revision = int(answer["header"]["revision"])
        if self._watch is None:
            self._watch = self.client.watch(
                self.prefix + b"c/", prefix_end(self.prefix + b"c/"), revision + 1, self._collections_changed
            )
        self._open = True

    def _collections_changed(self, events: list[dict[str, Any]] | None, revision: int) -> None:
        if events is None:
            d = _deferred(self._open_store())
            d.addErrback(lambda f: self._log.failure("Could not reload the collection list", f))
            return
        start = len(self.prefix) + 2
        for event in events:
            name = unb64((event.get("kv") or {}).get("key"))[start:].decode("utf-8")
            if event.get("type") == "DELETE":
                self._collections.discard(name)
            else:
                self._collections.add(name)

    def close(self) -> defer.Deferred[None]:
        return _deferred(self._close())

    async def _close(self) -> None:
        self._open = False
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.stop()
        await self.client.close()

    # -- collections ----------------------------------------------------------------------------

    def create_collection(self, name: str) -> defer.Deferred[bool]:
        return _deferred(self._create_collection(name))

    async def _create_collection(self, name: str) -> bool:
        marker = self._marker(name)
        try:
            answer = await self.client.txn(
                [compare_version(marker, "EQUAL", 0)], [put_op(marker, b"1")], idempotent=True
            )
        except EtcdError as e:
            raise _translate(e) from None
        self._collections.add(name)
        self._note(answer)
        return bool(answer.get("succeeded"))

    def drop_collection(self, name: str) -> defer.Deferred[bool]:
        return _deferred(self._drop_collection(name))

    async def _drop_collection(self, name: str) -> bool:
        marker = self._marker(name)
        data, chunks = self._data_prefix(name), self._chunk_prefix(name)
        ops = [delete_op(marker), delete_op(data, prefix_end(data)), delete_op(chunks, prefix_end(chunks))]
        try:
            answer = await self.client.txn([compare_version(marker, "GREATER", 0)], ops, idempotent=True)
        except EtcdError as e:
            raise _translate(e) from None
        self._collections.discard(name)
        self._note(answer)
        return bool(answer.get("succeeded"))

    def list_collections(self) -> defer.Deferred[list[str]]:
        return _deferred(self._list_collections())

    async def _list_collections(self) -> list[str]:
        base = self.prefix + b"c/"
        try:
            answer = await self.client.range(base, prefix_end(base), keys_only=True)
        except EtcdError as e:
            raise _translate(e) from None
        names = sorted(kv_of(item)[0][len(base) :].decode("utf-8") for item in answer.get("kvs", []))
        self._collections = set(names)
        return names

    def has_collection(self, name: str) -> bool:
        return name in self._collections

    def collection_count(self) -> int:
        return len(self._collections)

    # -- reads ----------------------------------------------------------------------------------

    async def _txn_in_collection(
        self, collection: str, ops: list[dict[str, Any]], *, idempotent: bool
    ) -> dict[str, Any]:
        """``ops`` in one transaction that runs only while ``collection`` exists (else NotFound) and
        the shard's epoch is the one this node knows (else StaleEpoch)."""
        epoch = self.epoch
        answer = await self.client.txn(
            [compare_version(self._marker(collection), "GREATER", 0), self._epoch_compare(epoch)],
            ops,
            [range_op(self.epoch_key)],
            idempotent=idempotent,
        )
        self._note(answer)
        if not answer.get("succeeded"):
            self._check_epoch(answer["responses"][0], epoch)
            self._collections.discard(collection)
            raise NotFound(f"collection {collection!r} does not exist")
        self._collections.add(collection)
        return answer

    def get(self, collection: str, key: bytes) -> defer.Deferred[CipherBlob | None]:
        return _deferred(self._get(collection, key))

    async def _get(self, collection: str, key: bytes) -> CipherBlob | None:
        full = self._data_prefix(collection) + key
        try:
            if self.serializable_reads:
                answer = await self._txn_in_collection(
                    collection, [range_op(full, serializable=True)], idempotent=True
                )
                if int(answer["header"]["revision"]) < session.wanted(self.shard):
                    # This member is behind the session: read through the quorum instead.
                    answer = await self._txn_in_collection(collection, [range_op(full)], idempotent=True)
            else:
                answer = await self._txn_in_collection(collection, [range_op(full)], idempotent=True)
            kvs = answer["responses"][0]["response_range"].get("kvs")
            if not kvs:
                return None
            _, stored, _ = kv_of(kvs[0])
            return await self._decode(collection, full, stored, int(answer["header"]["revision"]))
        except EtcdError as e:
            raise _translate(e) from None

    async def _decode(self, collection: str, full_key: bytes, stored: bytes, revision: int) -> CipherBlob:
        where = f"a stored value in collection {collection!r}"
        if len(stored) < 9:
            raise Corrupted(f"{where} is truncated")
        kind, body = stored[0], stored[9:]
        if kind == _INLINE:
            return codec.decode(body, where=where)
        if kind != _POINTER or len(body) != _POINTER_BODY.size:
            raise Corrupted(f"{where} has an unknown entry kind {kind}")
        group, count, total = _POINTER_BODY.unpack(body)
        key = full_key[len(self._data_prefix(collection)) :]
        base = self._chunk_prefix(collection, key) + group.hex().encode("ascii") + b"/"
        parts: list[bytes] = []
        # Chunk by chunk: each answer stays under etcd's response limits.
        for index in range(count):
            answer = await self.client.range(base + b"%06d" % index, revision=revision)
            kvs = answer.get("kvs")
            if not kvs:
                raise Corrupted(f"{where} is missing chunk {index} of {count}")
            parts.append(kv_of(kvs[0])[1])
        record = b"".join(parts)
        if len(record) != total:
            raise Corrupted(f"{where} has {len(record)} bytes in its chunks, expected {total}")
        return codec.decode(record, where=where)

    def scan(
        self, collection: str, start: bytes, end: bytes | None, limit: int | None, chunk_size: int
    ) -> EtcdCursor:
        if collection not in self._collections:
            raise NotFound(f"collection {collection!r} does not exist")
        return EtcdCursor(self, collection, start, end, limit, chunk_size)

    # -- writes ---------------------------------------------------------------------------------

    def put(self, collection: str, key: bytes, value: CipherBlob) -> defer.Deferred[None]:
        return _deferred(self._write([WriteOp.put(collection, key, value)]))

    def delete(self, collection: str, key: bytes) -> defer.Deferred[bool]:
        return _deferred(self._delete(collection, key))

    async def _delete(self, collection: str, key: bytes) -> bool:
        answer = await self._write([WriteOp.delete(collection, key)])
        if answer is None:
            return True
        deleted = answer["responses"][0].get("response_delete_range", {})
        return int(deleted.get("deleted", 0)) > 0

    def write_batch(self, ops: Iterable[WriteOp]) -> defer.Deferred[None]:
        return _deferred(self._write_batch(list(ops)))

    async def _write_batch(self, ops: list[WriteOp]) -> None:
        if ops:
            await self._write(ops)

    def compare_and_write(
        self, expected: Iterable[Expect], ops: Iterable[WriteOp]
    ) -> defer.Deferred[ConditionalResult]:
        return _deferred(self._compare_and_write(list(expected), list(ops)))

    async def _compare_and_write(self, expected: list[Expect], ops: list[WriteOp]) -> ConditionalResult:
        """Read the expected keys (one transaction: their values and mod revisions), compare the
        values here, then write in one transaction guarded by those mod revisions (absent keys: by
        version 0).  A guard that fails means a key was written in between: read again."""
        every_op = frozenset((op.collection, op.key) for op in ops)
        wanted: dict[tuple[str, bytes], list[CipherBlob | None]] = {}
        for e in expected:
            wanted.setdefault((e.collection, e.key), []).append(e.value)
        if not wanted:
            if ops:
                await self._write(ops)
            return ConditionalResult()
        where = list(wanted)
        collections = sorted({c for c, _ in where})
        for _ in range(CONDITIONAL_ATTEMPTS):
            answer = await self._read_in_collections(
                collections, [range_op(self._data_prefix(c) + k) for c, k in where]
            )
            revision = int(answer["header"]["revision"])
            guards: list[dict[str, Any]] = []
            changed: set[tuple[str, bytes]] = set()
            for (collection, key), response in zip(where, answer["responses"], strict=False):
                full = self._data_prefix(collection) + key
                kvs = response["response_range"].get("kvs")
                current: CipherBlob | None = None
                if kvs:
                    _, stored, mod = kv_of(kvs[0])
                    current = await self._decode(collection, full, stored, revision)
                    guards.append(compare_mod(full, "EQUAL", mod))
                else:
                    guards.append(compare_version(full, "EQUAL", 0))
                if any(value != current for value in wanted[(collection, key)]):
                    changed.add((collection, key))
            if changed:
                return ConditionalResult(frozenset(changed), every_op)
            if not ops:
                return ConditionalResult()
            try:
                await self._write(ops, guards)
            except _GuardFailed:
                continue
            return ConditionalResult()
        raise Unavailable("the rows a conditional write checks kept being rewritten; nothing was applied")

    async def _read_in_collections(self, collections: list[str], ops: list[dict[str, Any]]) -> dict[str, Any]:
        """``ops`` (reads) in one transaction that runs only while every collection exists (else
        NotFound) and the shard's epoch is the one this node knows (else StaleEpoch)."""
        epoch = self.epoch
        compares = [compare_version(self._marker(c), "GREATER", 0) for c in collections]
        compares.append(self._epoch_compare(epoch))
        failure = [range_op(self.epoch_key)] + [range_op(self._marker(c)) for c in collections]
        try:
            answer = await self.client.txn(compares, ops, failure, idempotent=True)
        except EtcdError as e:
            raise _translate(e) from None
        self._note(answer)
        if not answer.get("succeeded"):
            self._check_epoch(answer["responses"][0], epoch)
            for name, response in zip(collections, answer["responses"][1:], strict=False):
                if not response.get("response_range", {}).get("kvs"):
                    self._collections.discard(name)
                    raise NotFound(f"collection {name!r} does not exist")
            raise Unavailable("etcd refused a read for no reason it gave; try again")
        return answer

    async def _write(
        self, ops: list[WriteOp], guards: Sequence[dict[str, Any]] = ()
    ) -> dict[str, Any] | None:
        """Apply ``ops`` in one transaction; the answer, or None when it was confirmed by reading back.

        The last op on a key wins (etcd refuses a key twice in one transaction).  ``guards``:
        further compares the transaction needs; when one fails, :class:`_GuardFailed` is raised
        and nothing was applied.
        """
        final: dict[tuple[str, bytes], WriteOp] = {}
        for op in ops:
            final.pop((op.collection, op.key), None)
            final[(op.collection, op.key)] = op
        collections = sorted({c for c, _ in final})
        write_id = os.urandom(8)
        # Encode every put; chunk the largest records until the transaction fits one request.
        records: dict[tuple[str, bytes], bytes] = {}
        for where, op in final.items():
            if op.kind is WriteKind.PUT:
                assert op.value is not None
                records[where] = codec.encode(op.value)
        size = sum(len(r) + len(k) + 64 for (_, k), r in records.items()) + 64 * len(final)
        chunked: dict[tuple[str, bytes], bytes] = {}
        pending: list[bytes] = []
        lease = 0
        for where in sorted(records, key=lambda w: -len(records[w])):
            record = records[where]
            if len(record) <= INLINE_LIMIT and size <= TXN_LIMIT:
                break
            if not lease:
                lease = await self._grant_pending_lease()
            pointer, marker = await self._write_chunks(where[0], where[1], record, lease)
            chunked[where] = pointer
            pending.append(marker)
            size -= len(record) - len(pointer)
        compares = [compare_version(self._marker(c), "GREATER", 0) for c in collections]
        epoch = self.epoch
        compares.append(self._epoch_compare(epoch))
        compares += [compare_version(marker, "GREATER", 0) for marker in pending]
        compares += list(guards)
        success: list[dict[str, Any]] = []
        for where, op in final.items():
            full = self._data_prefix(where[0]) + where[1]
            if op.kind is WriteKind.PUT:
                body = chunked.get(where)
                stored = body if body is not None else bytes([_INLINE]) + write_id + records[where]
                if body is not None:
                    stored = bytes([_POINTER]) + write_id + body
                success.append(put_op(full, stored, prev_kv=True))
            else:
                success.append(delete_op(full, prev_kv=True))
        success += [delete_op(marker) for marker in pending]
        failure = [range_op(self._marker(c)) for c in collections] + [range_op(self.epoch_key)]
        before = self.client.revision
        try:
            answer = await self.client.txn(compares, success, failure)
        except EtcdAmbiguous as e:
            await self._confirm(final, write_id, e)
            return None
        except EtcdError as e:
            raise _translate(e) from None
        finally:
            if lease:
                await self._revoke_quietly(lease)
        if not answer.get("succeeded"):
            self._check_epoch(answer["responses"][-1], epoch)
            missing = [
                c
                for c, response in zip(collections, answer.get("responses", []), strict=False)
                if not response.get("response_range", {}).get("kvs")
            ]
            for name in missing:
                self._collections.discard(name)
            if missing:
                raise NotFound(f"collection {missing[0]!r} does not exist")
            if guards:
                # A guarded key changed (or a chunked value's pending marker expired): the caller
                # reads again; chunks nothing points to are left to orphan cleanup.
                raise _GuardFailed()
            raise Unavailable("a large value's pending write expired before it was committed; try again")
        del before
        for name in collections:
            self._collections.add(name)
        self._note(answer)
        await self._drop_replaced_chunks(answer)
        return answer

    async def _confirm(
        self, final: dict[tuple[str, bytes], WriteOp], write_id: bytes, cause: EtcdError
    ) -> None:
        """After an ambiguous write: succeed if any of its puts is visible, else fail retryably."""
        puts = [w for w, op in final.items() if op.kind is WriteKind.PUT]
        if puts:
            ops = [range_op(self._data_prefix(c) + k) for c, k in puts]
            try:
                answer = await self.client.txn([], ops, idempotent=True)
            except EtcdError:
                answer = {}
            for response in answer.get("responses", []):
                kvs = response.get("response_range", {}).get("kvs")
                if kvs:
                    _, stored, revision = kv_of(kvs[0])
                    if stored[1:9] == write_id:
                        self.last_revision = max(self.last_revision, revision)
                        session.observe(self.shard, revision)
                        return
        raise Unavailable(f"etcd did not confirm the write; it may or may not be applied ({cause.message})")

    async def _grant_pending_lease(self) -> int:
        try:
            return await self.client.lease_grant(PENDING_TTL)
        except EtcdError as e:
            raise _translate(e) from None

    async def _revoke_quietly(self, lease: int) -> None:
        try:
            await self.client.lease_revoke(lease)
        except EtcdError:
            # The lease expires by itself; its only key is a pending marker.
            self._log.info("Could not revoke a pending-write lease; it expires in {ttl}s", ttl=PENDING_TTL)

    async def _write_chunks(
        self, collection: str, key: bytes, record: bytes, lease: int
    ) -> tuple[bytes, bytes]:
        """Write ``record`` as chunks under a new pending marker; the pointer body and the marker."""
        group = os.urandom(8)
        marker = self._pending(group)
        base = self._chunk_prefix(collection, key) + group.hex().encode("ascii") + b"/"
        count = max(1, -(-len(record) // CHUNK_SIZE))
        try:
            await self.client.txn([], [put_op(marker, base, lease=lease)], idempotent=True)
            for index in range(count):
                part = record[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE]
                # Chunk keys are new and their content fixed: writing one twice is harmless.
                await self.client.txn([], [put_op(base + b"%06d" % index, part)], idempotent=True)
        except EtcdError as e:
            raise _translate(e) from None
        return _POINTER_BODY.pack(group, count, len(record)), marker

    async def _drop_replaced_chunks(self, answer: dict[str, Any]) -> None:
        """Delete the chunks of values this write replaced or deleted (orphan cleanup catches misses)."""
        for response in answer.get("responses", []):
            inner = response.get("response_put") or response.get("response_delete_range") or {}
            previous = inner.get("prev_kv")
            previous_list = [previous] if previous else inner.get("prev_kvs", [])
            for item in previous_list:
                raw_key, stored, _ = kv_of(item)
                if stored[:1] != bytes([_POINTER]) or len(stored) != 9 + _POINTER_BODY.size:
                    continue
                base = self._chunk_base_for(raw_key, _POINTER_BODY.unpack(stored[9:])[0])
                if base is None:
                    continue
                try:
                    await self.client.txn([], [delete_op(base, prefix_end(base))], idempotent=True)
                except EtcdError:
                    self._log.info("Could not delete replaced chunks now; orphan cleanup will")

    def _chunk_base_for(self, data_key: bytes, group: bytes) -> bytes | None:
        rest = data_key[len(self.prefix) + 2 :]
        hex_name, sep, key = rest.partition(b"/")
        if not sep:
            return None
        return (
            self.prefix
            + b"k/"
            + hex_name
            + b"/"
            + key.hex().encode("ascii")
            + b"/"
            + group.hex().encode()
            + b"/"
        )

    def _epoch_compare(self, epoch: int) -> dict[str, Any]:
        return compare_version(self.epoch_key, "EQUAL", epoch)

    def _check_epoch(self, response: dict[str, Any], epoch: int) -> None:
        """Raise StaleEpoch if the transaction failed on the epoch it was sent with (the node may
        have learnt a newer epoch while it was in flight)."""
        kvs = response.get("response_range", {}).get("kvs") or []
        actual = int(kvs[0].get("version", 0)) if kvs else 0
        if actual != epoch:
            raise StaleEpoch(self.shard, actual)

    def _note(self, answer: dict[str, Any]) -> None:
        revision = int((answer.get("header") or {}).get("revision", 0))
        if revision > self.last_revision:
            self.last_revision = revision
        session.observe(self.shard, revision)

    # -- maintenance ----------------------------------------------------------------------------

    def clean_orphans(self) -> defer.Deferred[int]:
        """Delete chunk groups that no entry points to and no live writer is still filling.

        Deferred firing with the number of groups deleted.  Each deletion is one transaction that
        checks the group is still unreferenced, so it is safe while writers run.
        """
        return _deferred(self._clean_orphans())

    async def _clean_orphans(self) -> int:
        base = self.prefix + b"k/"
        answer = await self.client.range(base, prefix_end(base), keys_only=True)
        groups: dict[bytes, tuple[bytes, bytes]] = {}
        for item in answer.get("kvs", []):
            raw = kv_of(item)[0]
            parts = raw[len(base) :].split(b"/")
            if len(parts) != 4:
                continue
            hex_name, hex_key, hex_group, _ = parts
            group_base = base + b"/".join((hex_name, hex_key, hex_group)) + b"/"
            data_key = self.prefix + b"d/" + hex_name + b"/" + bytes.fromhex(hex_key.decode())
            groups[group_base] = (data_key, bytes.fromhex(hex_group.decode()))
        deleted = 0
        for group_base, (data_key, group) in groups.items():
            marker = self._pending(group)
            look = await self.client.txn([], [range_op(marker), range_op(data_key)], idempotent=True)
            responses = look.get("responses", [])
            if responses[0].get("response_range", {}).get("kvs"):
                continue  # a writer is still filling it
            kvs = responses[1].get("response_range", {}).get("kvs")
            mod = 0
            if kvs:
                _, stored, mod = kv_of(kvs[0])
                if stored[:1] == bytes([_POINTER]) and stored[9:17] == group:
                    continue  # in use
            guard = [compare_version(marker, "EQUAL", 0), {**_mod_compare(data_key, mod)}]
            result = await self.client.txn(
                guard, [delete_op(group_base, prefix_end(group_base))], idempotent=True
            )
            if result.get("succeeded"):
                deleted += 1
        return deleted

    def sync(self) -> defer.Deferred[None]:
        # etcd answers a write after a quorum of members has it on disk.
        return defer.succeed(None)

    def flush(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def stats(self) -> defer.Deferred[dict[str, Any]]:
        return _deferred(self._stats())

    async def _stats(self) -> dict[str, Any]:
        names = await self._list_collections()
        keys: dict[str, int] = {}
        try:
            for name in names:
                base = self._data_prefix(name)
                answer = await self.client.range(base, prefix_end(base), count_only=True)
                keys[name] = int(answer.get("count", 0))
            status = await self.client.call("/v3/maintenance/status", {}, idempotent=True)
        except EtcdError as e:
            raise _translate(e) from None
        return {
            "backend": self.name,
            "keys": keys,
            "bytes": int(status.get("dbSizeInUse", status.get("dbSize", 0))),
            "revision": int(status.get("header", {}).get("revision", 0)),
        }

    def snapshot(self, destination: str) -> defer.Deferred[None]:
        return defer.fail(
            InvalidOperation("the etcd backend is snapshotted with etcd's own snapshot (see docs/cluster.md)")
        )


def _mod_compare(key: bytes, revision: int) -> dict[str, Any]:
    return compare_mod(key, "EQUAL", revision)


def build_etcd_backend(cluster: Any, reactor: Any) -> EtcdBackend:
    """The backend for a ``[cluster]`` config section (no I/O until ``open``)."""
    client = EtcdClient(cluster.endpoints, reactor, request_timeout=cluster.request_timeout)
    return EtcdBackend(
        client, reactor, prefix=cluster.prefix.encode("utf-8"), serializable_reads=cluster.serializable_reads
    )
