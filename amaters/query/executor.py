"""The operations themselves, over an :class:`~amaters.interfaces.IStorageBackend`.

The executor knows operations, not policy: it trusts that :mod:`amaters.query.validation` and the
pipeline's stages have already accepted the request.  Every method returns a Deferred failing only
with :class:`~amaters.errors.AmatersError` subclasses that the backend or the executor raise.

Rules it implements:

- collections are created on their first SET when ``storage.auto_create_collections`` is true;
  then reads and deletes on a collection that does not exist yet behave as on an empty one.  When
  it is false, every operation on a missing collection fails with ``STORAGE_NOT_FOUND``.
- at most ``limits.max_collections`` collections exist (0: no limit): creating one more, explicitly
  or by a first SET, fails with ``VALIDATION_SIZE_EXCEEDED`` and creates nothing.  Whether the
  principal may create a collection at all is the RBAC stage's decision (``collection:create``).
- GET of a missing key is ``None``, not an error; DELETE tells whether the key existed.
- BATCH is atomic: every write is collected first and applied with one ``write_batch``; reads in a
  batch see the batch's earlier writes.  Collections a batch auto-creates are dropped again if the
  write fails, so a failed batch leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from amaters import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS
from amaters.errors import (
    AmatersError,
    ComputeError,
    ErrorCategory,
    InvalidOperation,
    NotFound,
    SizeExceeded,
    Unavailable,
)
from amaters.interfaces import IRangeCursor, IServerAdmin, IStorageBackend
from amaters.query import operations as ops
from amaters.service import fire_all
from amaters.types import CipherBlob, Expect, WriteKind, WriteOp

#: What this server offers, announced in the handshake and in ServerInfo.
CAPABILITIES = (
    "get",
    "set",
    "delete",
    "range.stream",
    "range.cancel",
    "batch.atomic",
    "collections",
    "server_info",
    "health_check",
    "ping",
)


class _EmptyCursor:
    """The cursor of a range over a collection that does not exist (yet)."""

    def next_chunk(self) -> defer.Deferred[list[Any]]:
        return defer.succeed([])

    def close(self) -> None:
        pass


async def _drain(cursor: IRangeCursor) -> list[Any]:
    """Every row of ``cursor`` as one list (for callers that do not stream); closes it."""
    found: list[Any] = []
    try:
        while True:
            chunk = await cursor.next_chunk()
            if not chunk:
                return found
            found.extend(chunk)
    finally:
        cursor.close()


#: How many times an UPDATE writes its rows back: once, then again after rows changed while they
#: were evaluated (those are read and evaluated again).  Past it the UPDATE fails.
UPDATE_ATTEMPTS = 8

#: FILTER evaluates and streams this many encrypted rows at a time: a chunk is a few seconds of
#: work, so the first rows arrive early and a cancelled stream stops within one chunk.
FILTER_CHUNK_ROWS = 8


class _FilterCursor:
    """A FILTER's rows as a cursor (``IRangeCursor``): each ``next_chunk`` evaluates the predicate
    on the next :data:`FILTER_CHUNK_ROWS` encrypted rows and fires with ``(key, blob, encrypted
    boolean)`` triples; after ``close`` no further row is evaluated."""

    def __init__(self, executor: QueryExecutor, op: ops.Filter, deadline: float) -> None:
        self._executor = executor
        self._op = op
        self._deadline = deadline
        self._rows: list[tuple[bytes, CipherBlob]] | None = None
        self._next = 0
        self._closed = False

    def next_chunk(self) -> defer.Deferred[list[tuple[bytes, CipherBlob, bytes]]]:
        return defer.Deferred.fromCoroutine(self._next_chunk())

    async def _next_chunk(self) -> list[tuple[bytes, CipherBlob, bytes]]:
        executor, op = self._executor, self._op
        if self._rows is None:
            self._rows = await executor._encrypted_rows(op.collection, op.key_set_id, op.limit, op.offset)
        while not self._closed and self._next < len(self._rows):
            rows = self._rows[self._next : self._next + FILTER_CHUNK_ROWS]
            self._next += len(rows)
            flags = await executor.fhe.evaluate(
                op.key_set_id, "filter", op.predicate, None, [v.data for _, v in rows], self._deadline
            )
            found = [(k, v, flag) for (k, v), flag in zip(rows, flags, strict=True) if flag is not None]
            if found:
                return found
        return []

    def close(self) -> None:
        self._closed = True


class QueryExecutor:
    """Runs :mod:`amaters.query.operations` against a storage backend."""

    _log = Logger()

    def __init__(
        self,
        backend: IStorageBackend,
        *,
        auto_create_collections: bool = True,
        range_chunk_size: int = 256,
        server_info: Callable[[], ops.ServerInfoResult] | None = None,
        health: Callable[[], ops.HealthResult] | None = None,
        fhe: Any = None,
        fhe_max_rows: int = 10_000,
        fhe_query_timeout: float = 600.0,
        clock: Any = None,
        admin: IServerAdmin | None = None,
    ) -> None:
        self.backend = backend
        self.auto_create_collections = auto_create_collections
        self.range_chunk_size = range_chunk_size
        self._server_info = server_info
        self._health = health
        #: The FHE evaluator (an amaters.fhe.service.FheService) or None: FILTER/UPDATE refused.
        self.fhe = fhe
        self.fhe_max_rows = fhe_max_rows
        self.fhe_query_timeout = fhe_query_timeout
        self._clock = clock
        #: limits.max_collections (0: no limit); the pipeline passes reloaded limits on.
        self.max_collections = 0
        #: Server administration (status, reload, snapshots, ...); None: admin operations refused.
        self.admin: Any = admin
        #: The backend's collection list is a cache of one shared by other servers (clustered mode):
        #: a miss there is asked of the backend instead of answered "absent" at once.
        from amaters.storage import innermost

        self._remote_collections = bool(getattr(innermost(backend), "collections_remote", False))
        #: The backend applies a ``write_batch`` in-process for about the cost of one put (memory,
        #: rocksdb), so independent SETs arriving together may share one (:meth:`set_many`).
        self._local_batches = bool(getattr(innermost(backend), "local_batches", False))
        #: The backend's ``put_now(collection, key, value)``: a write done at once, or None.
        self._put_now: Callable[[str, bytes, CipherBlob], bool] | None = getattr(backend, "put_now", None)
        #: Whether :meth:`set_now` can ever write (else the pipeline does not ask it).
        self.writes_now = self._put_now is not None
        #: Collections being created for a first SET, with the Deferreds of the SETs waiting.
        self._creating: dict[str, list[defer.Deferred[Any]]] = {}
        self._dispatch: dict[type, Callable[[Any], defer.Deferred[Any]]] = {
            ops.Get: self.get,
            ops.Set: self.set,
            ops.Delete: self.delete,
            ops.Batch: self.batch,
            ops.CreateCollection: self.create_collection,
            ops.DropCollection: self.drop_collection,
            ops.ListCollections: self.list_collections,
            ops.ServerInfo: self.server_info,
            ops.HealthCheck: self.health_check,
            ops.Range: self.range_list,
            ops.ServerStatus: lambda op: self._admin().status(),
            ops.CollectionStats: lambda op: self._admin().collections(),
            ops.StorageStats: lambda op: self._admin().stats(),
            ops.Compact: lambda op: self._admin().compact(),
            ops.ReloadConfig: lambda op: self._admin().reload(op.requested_by),
            ops.ListSnapshots: lambda op: self._admin().list_snapshots(op.remote),
            ops.CreateSnapshot: lambda op: self._admin().create_snapshot(op.upload),
            ops.ListKeySets: lambda op: self._admin().fhe_key_sets(),
            ops.DeleteKeySet: lambda op: self._admin().delete_fhe_key_set(op.key_set_id),
            ops.ClusterStatus: lambda op: self._admin().cluster_status(),
            ops.ClusterAddShard: lambda op: self._admin().cluster_add_shard(op.shard, list(op.endpoints)),
            ops.ClusterMove: lambda op: self._admin().cluster_move(op.vshard, op.to),
            ops.ClusterRemoveShard: lambda op: self._admin().cluster_remove_shard(op.shard),
            ops.VerifySnapshot: lambda op: self._admin().verify_snapshot(op.archive),
            ops.ConfigView: lambda op: self._admin().config_view(),
            ops.AuditTail: lambda op: self._admin().audit_tail(op.limit),
            ops.ServerResources: lambda op: self._admin().resources(),
            ops.Filter: self.filter,
            ops.Update: self.update,
            ops.UploadKeys: self.upload_keys,
        }

    def fhe_unavailable(self, what: str) -> str | None:
        """Why ``what`` (FILTER, UPDATE) cannot run on this server, or None when it can."""
        if self.fhe is None:
            return (
                f"{what} needs the FHE evaluator, which this server does not have configured"
                " (install amaters[fhe]; see docs/fhe.md); the key-value operations work without it"
            )
        reason: str | None = self.fhe.unavailable(what)
        return reason

    def update_limits(self, limits: Any) -> None:
        """Apply (reloaded) ``[limits]``: the collection count limit."""
        self.max_collections = limits.max_collections

    def _room_for(self, count: int) -> AmatersError | None:
        """The error for creating ``count`` more collections past limits.max_collections, or None."""
        limit = self.max_collections
        if not limit or not count:
            return None
        existing = self.backend.collection_count()
        if existing + count <= limit:
            return None
        return SizeExceeded(
            f"the server already holds {existing} collection(s) and limits.max_collections is {limit};"
            " drop a collection or raise the limit"
        )

    def _admin(self) -> Any:
        if self.admin is None:
            raise InvalidOperation("server administration is not available here")
        return self.admin

    def execute(self, op: ops.Operation) -> defer.Deferred[Any]:
        """Run any operation (RANGE as a complete list; streams use :meth:`open_range`)."""
        return self._dispatch[type(op)](op)

    # -- single keys --------------------------------------------------------------------------

    def _missing(self, collection: str) -> NotFound:
        return NotFound(f"collection {collection!r} does not exist")

    def get(self, op: ops.Get) -> defer.Deferred[CipherBlob | None]:
        backend = self.backend
        if not backend.has_collection(op.collection):
            if self._remote_collections:
                return self._ask_anyway(backend.get(op.collection, op.key), None)
            if self.auto_create_collections:
                return defer.succeed(None)
            return defer.fail(self._missing(op.collection))
        return backend.get(op.collection, op.key)

    def set_now(self, op: ops.Set) -> bool:
        """Write ``op`` at once when its backend can (its ``put_now``: the memory backend) and its
        collection exists: whether it was written (False: nothing was done, :meth:`execute` runs
        it, creating the collection if need be).  The same outcome as :meth:`set`, without a
        Deferred."""
        put_now = self._put_now
        return put_now is not None and put_now(op.collection, op.key, op.value)

    def set(self, op: ops.Set) -> defer.Deferred[None]:
        backend = self.backend
        if backend.has_collection(op.collection):
            return backend.put(op.collection, op.key, op.value)
        if not self.auto_create_collections:
            return defer.fail(self._missing(op.collection))
        full = self._room_for(1)
        if full is not None:
            return defer.fail(full)
        d = self._create(op.collection)
        d.addCallback(lambda _: backend.put(op.collection, op.key, op.value))
        return d

    def _create(self, name: str) -> defer.Deferred[Any]:
        """Create collection ``name`` for a first SET: once, however many SETs arrive before it
        exists (a client pipelining writes to a new collection), each waiting for that one."""
        waiting = self._creating.get(name)
        mine: defer.Deferred[Any] = defer.Deferred()
        if waiting is not None:
            waiting.append(mine)
            return mine
        # Listed before the call: a backend may create it at once (memory).
        self._creating[name] = [mine]
        created = defer.maybeDeferred(self.backend.create_collection, name)
        created.addBoth(self._created, name)
        return mine

    def _created(self, outcome: Any, name: str) -> None:
        fire_all(outcome, self._creating.pop(name))

    def set_many(self, writes: list[ops.Set]) -> defer.Deferred[None] | None:
        """Independent SETs that arrived together, in order, as one atomic ``write_batch``: fires
        None once all are written (as durable as one SET), or fails for all of them with nothing
        applied.  None: not done here (a clustered backend, whose batch is a transaction of its
        own and bounded in size, or a collection that does not exist yet); run them one by one.
        """
        if not self._local_batches:
            return None
        backend = self.backend
        has = backend.has_collection
        checked = ""
        for op in writes:
            name = op.collection
            if name != checked:
                if not has(name):
                    return None
                checked = name
        put = WriteKind.PUT  # WriteOp.put's work, without a call per write
        d: defer.Deferred[None] = backend.write_batch(
            [WriteOp(put, op.collection, op.key, op.value) for op in writes]
        )
        return d

    def delete(self, op: ops.Delete) -> defer.Deferred[bool]:
        backend = self.backend
        if not backend.has_collection(op.collection):
            if self._remote_collections:
                return self._ask_anyway(backend.delete(op.collection, op.key), False)
            if self.auto_create_collections:
                return defer.succeed(False)
            return defer.fail(self._missing(op.collection))
        return backend.delete(op.collection, op.key)

    def _ask_anyway(self, d: defer.Deferred[Any], absent: Any) -> defer.Deferred[Any]:
        """A keyed read or delete sent to the backend although its cache lacks the collection:
        the collection really missing answers ``absent`` with auto-create, NotFound without."""
        if self.auto_create_collections:
            d.addErrback(lambda failure: failure.trap(NotFound) and absent)
        return d

    # -- ranges -------------------------------------------------------------------------------

    def open_range(self, op: ops.Range | ops.Filter) -> IRangeCursor:
        """A cursor over the range, read chunk by chunk (raises ``NotFound`` synchronously); for a
        FILTER, its rows evaluated chunk by chunk."""
        if isinstance(op, ops.Filter):
            return self.open_filter(op)
        if not self.backend.has_collection(op.collection):
            if self.auto_create_collections:
                return _EmptyCursor()  # type: ignore[return-value]
            raise self._missing(op.collection)
        if op.limit == 0 or (op.end is not None and op.start >= op.end):
            return _EmptyCursor()  # type: ignore[return-value]
        return self.backend.scan(op.collection, op.start, op.end, op.limit, self.range_chunk_size)

    def range_list(self, op: ops.Range) -> defer.Deferred[list[tuple[bytes, CipherBlob]]]:
        """The whole range as one list (for callers that do not stream)."""
        return defer.Deferred.fromCoroutine(self._range_list(op))

    async def _range_list(self, op: ops.Range) -> list[tuple[bytes, CipherBlob]]:
        return await _drain(self.open_range(op))

    # -- batches ------------------------------------------------------------------------------

    def batch(self, op: ops.Batch) -> defer.Deferred[list[Any]]:
        return defer.Deferred.fromCoroutine(self._batch(op))

    async def _batch(self, batch: ops.Batch) -> list[Any]:
        backend = self.backend
        to_create: list[str] = []
        for name in sorted(batch.collections):
            if backend.has_collection(name):
                continue
            if not self.auto_create_collections:
                raise self._missing(name)
            if any(isinstance(o, ops.Set) and o.collection == name for o in batch.ops):
                to_create.append(name)

        # What this batch has written so far: (collection, key) -> blob, or None when deleted.
        overlay: dict[tuple[str, bytes], CipherBlob | None] = {}
        writes: list[WriteOp] = []
        results: list[Any] = []
        missing = object()

        async def current(collection: str, key: bytes) -> CipherBlob | None:
            seen = overlay.get((collection, key), missing)
            if seen is not missing:
                return seen  # type: ignore[return-value]
            if not backend.has_collection(collection):
                return None
            value: CipherBlob | None = await backend.get(collection, key)
            return value

        for item in batch.ops:
            if isinstance(item, ops.Get):
                results.append(await current(item.collection, item.key))
            elif isinstance(item, ops.Set):
                overlay[(item.collection, item.key)] = item.value
                writes.append(WriteOp.put(item.collection, item.key, item.value))
                results.append(None)
            else:
                existed = await current(item.collection, item.key) is not None
                overlay[(item.collection, item.key)] = None
                if backend.has_collection(item.collection) or item.collection in to_create:
                    writes.append(WriteOp.delete(item.collection, item.key))
                results.append(existed)

        if not writes:
            return results
        full = self._room_for(len(to_create))
        if full is not None:
            raise full
        created: list[str] = []
        try:
            for name in to_create:
                if await backend.create_collection(name):
                    created.append(name)
            await backend.write_batch(writes)
        except BaseException:
            for name in created:
                try:
                    await backend.drop_collection(name)
                except Exception:
                    self._log.failure(
                        "Could not drop collection {collection} after a failed batch", collection=name
                    )
            raise
        return results

    # -- homomorphic FILTER and UPDATE -------------------------------------------------------

    def filter(self, op: ops.Filter) -> defer.Deferred[list[tuple[bytes, CipherBlob, bytes]]]:
        """Every row of a FILTER as one list (for callers that do not stream)."""
        return defer.Deferred.fromCoroutine(self._filter(op))

    def open_filter(self, op: ops.Filter) -> IRangeCursor:
        """The rows of a FILTER, evaluated and returned chunk by chunk (raises ``InvalidOperation``
        synchronously without an FHE evaluator)."""
        if self.fhe is None:
            raise InvalidOperation(self.fhe_unavailable("FILTER") or "")
        return _FilterCursor(self, op, self._deadline())  # type: ignore[return-value]

    def update(self, op: ops.Update) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(self._update(op))

    def upload_keys(self, op: ops.UploadKeys) -> defer.Deferred[Any]:
        if self.fhe is None:
            return defer.fail(InvalidOperation(self.fhe_unavailable("uploading FHE keys") or ""))
        return self.fhe.upload_chunk(op.chunk)

    async def _encrypted_rows(
        self, collection: str, key_set_id: str, limit: int | None, offset: int
    ) -> list[tuple[bytes, CipherBlob]]:
        from amaters.fhe.records import is_record

        if not self.fhe.has_key_set(key_set_id):
            raise NotFound(
                "the server has no evaluation keys with this key set id; upload them first"
                " (client.upload_keys or amaters fhe upload)"
            )
        rows = await self._range_list(ops.Range(collection, b"", None, None))
        encrypted = [(k, v) for k, v in rows if is_record(v.data)][offset:]
        if limit is not None:
            encrypted = encrypted[:limit]
        if len(encrypted) > self.fhe_max_rows:
            raise SizeExceeded(
                f"the query would examine {len(encrypted)} encrypted rows; fhe.max_rows_per_query"
                f" is {self.fhe_max_rows} (use limit and offset)"
            )
        return encrypted

    def _deadline(self) -> float:
        clock = self._clock
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        return float(clock.seconds()) + self.fhe_query_timeout

    async def _filter(self, op: ops.Filter) -> list[tuple[bytes, CipherBlob, bytes]]:
        return await _drain(self.open_filter(op))  # a _FilterCursor: its chunks are triples

    async def _update(self, op: ops.Update) -> int:
        """Evaluate, then write each row back only if it still holds what was read (one
        conditional write: all or nothing where the backend is one atomic unit).  Rows written
        meanwhile are read again and evaluated again from their new value, rows deleted meanwhile
        stay deleted; after :data:`UPDATE_ATTEMPTS` write-backs the UPDATE gives up.  Answers the
        number of rows written."""
        from amaters.fhe.records import is_record

        if self.fhe is None:
            raise InvalidOperation(self.fhe_unavailable("UPDATE") or "")
        deadline = self._deadline()
        rows = await self._encrypted_rows(op.collection, op.key_set_id, None, 0)
        pending = await self._evaluate_update(op, rows, deadline)
        written = 0
        try:
            for attempt in range(1, UPDATE_ATTEMPTS + 1):
                if not pending:
                    break
                result = await self.backend.compare_and_write(
                    [Expect(op.collection, key, old) for key, (old, _) in pending.items()],
                    [WriteOp.put(op.collection, key, new) for key, (_, new) in pending.items()],
                )
                for key in [k for k in pending if (op.collection, k) not in result.not_applied]:
                    del pending[key]
                    written += 1
                if not pending or attempt == UPDATE_ATTEMPTS:
                    break
                # Rows held back only because they shared an atomic write with a changed row keep
                # their evaluation; changed rows are read and evaluated again.
                again: list[tuple[bytes, CipherBlob]] = []
                for collection, key in sorted(result.changed):
                    if collection != op.collection or key not in pending:
                        continue
                    current = await self.backend.get(op.collection, key)
                    del pending[key]
                    if current is not None and is_record(current.data):
                        again.append((key, current))
                self._log.info(
                    "UPDATE on {collection}: {changed} row(s) changed while they were evaluated;"
                    " evaluating {again} again (write-back {attempt} of {attempts})",
                    collection=op.collection,
                    changed=len(result.changed),
                    again=len(again),
                    attempt=attempt + 1,
                    attempts=UPDATE_ATTEMPTS,
                )
                pending.update(await self._evaluate_update(op, again, deadline))
        except AmatersError as e:
            if written:
                raise e.partly_applied(f"{written} rows were already updated") from None
            raise
        if pending:
            message = (
                f"{len(pending)} rows kept changing while the UPDATE evaluated them"
                f" ({UPDATE_ATTEMPTS} write-backs)"
            )
            if written:
                raise ComputeError(
                    f"{message}; {written} rows were updated, those were not",
                    category=ErrorCategory.NON_RETRYABLE,
                )
            raise Unavailable(f"{message}; nothing was written, try again")
        return written

    async def _evaluate_update(
        self, op: ops.Update, rows: list[tuple[bytes, CipherBlob]], deadline: float
    ) -> dict[bytes, tuple[CipherBlob, CipherBlob]]:
        """``key -> (the value read, its new value)`` for the rows the UPDATE rewrites (rows of
        another key set or schema are left out)."""
        if not rows:
            return {}
        new = await self.fhe.evaluate(
            op.key_set_id, "update", op.predicate, op.updates, [v.data for _, v in rows], deadline
        )
        return {
            key: (old, CipherBlob.wrap(data, created_at=old.created_at, version=old.version))
            for (key, old), data in zip(rows, new, strict=True)
            if data is not None
        }

    # -- collections and server ---------------------------------------------------------------

    def create_collection(self, op: ops.CreateCollection) -> defer.Deferred[bool]:
        if not self.backend.has_collection(op.collection):
            full = self._room_for(1)
            if full is not None:
                return defer.fail(full)
        return defer.maybeDeferred(self.backend.create_collection, op.collection)

    def drop_collection(self, op: ops.DropCollection) -> defer.Deferred[bool]:
        return defer.maybeDeferred(self.backend.drop_collection, op.collection)

    def list_collections(self, op: ops.ListCollections) -> defer.Deferred[list[str]]:
        return defer.maybeDeferred(self.backend.list_collections)

    def server_info(self, op: ops.ServerInfo) -> defer.Deferred[ops.ServerInfoResult]:
        if self._server_info is None:
            return defer.succeed(
                ops.ServerInfoResult(PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS, CAPABILITIES, 0)
            )
        return defer.succeed(self._server_info())

    def health_check(self, op: ops.HealthCheck) -> defer.Deferred[ops.HealthResult]:
        if self._health is None:
            return defer.succeed(ops.HealthResult(True, "serving"))
        return defer.succeed(self._health())


__all__ = ["CAPABILITIES", "AmatersError", "QueryExecutor"]
