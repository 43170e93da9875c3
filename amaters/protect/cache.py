"""The query cache: GET results in an LRU bounded by bytes, invalidated by every write.

:class:`CachingExecutor` sits between the pipeline's stages and the
:class:`~amaters.query.executor.QueryExecutor` (it replaces ``pipeline.executor``), so every
stage, RBAC included, has accepted a request before the cache can answer it, whatever order the
stages were installed in.  Entries are keyed by ``(collection, key)`` for keys of up to 32 bytes
and by the BLAKE3 hash of the length-prefixed collection name and key for longer ones (so
``("a", b"bc")`` and ``("ab", b"c")`` never collide, and a 64 KiB key costs 32 bytes of index); a
missing key is cached too, as ``None``.

Never stale, even with reads and writes in flight at once:

- a write (SET, DELETE, a BATCH with writes) marks its keys *pending* and drops their entries
  before it reaches storage, and again when it finishes, successfully or not;
- a GET that misses takes a ticket: the key's generation and the cache's epoch when it started.
  Its result is cached only if no write to that key started or finished meanwhile (the generation
  moved), no collection-wide invalidation happened (the epoch moved) and no write is pending;
- collection drops, and any other operation that writes without naming its keys, invalidate the
  whole collection the same way (``epoch``), before and after.

So a read that began before a write can still return the old value (it was concurrent with the
write) but can never put it in the cache after the write's invalidation, and every read that
begins after a write was acknowledged sees that write or a later one.  Writes that bypass the
pipeline (an offline restore) must call :meth:`QueryCache.clear`.

The cache is per process: with several nodes writing to shared storage it must stay off
(``cache.max_bytes = 0``; clustered mode turns it off by itself).  Hit, miss, eviction and
invalidation counts are in
:meth:`QueryCache.stats` and exported by :mod:`amaters.protect.metrics`.
"""

from __future__ import annotations

import functools
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from blake3 import blake3
from twisted.internet import defer
from twisted.python.failure import Failure

from amaters.config import CacheConfig, Config, cache_settings
from amaters.proto.answers import query_response
from amaters.proto.convert import blob_to_proto
from amaters.query import operations as ops
from amaters.query.pipeline import NOT_YET, RequestContext
from amaters.types import CipherBlob

#: Bytes counted for an entry besides its value's data and its collection name (the entry, its
#: key digest, the LRU and collection index slots): measured with tracemalloc at about 270 bytes
#: plus the 65-byte digest object.
ENTRY_OVERHEAD = 336

_pack_length = struct.Struct(">I").pack

#: Operations that change nothing stored.
_READ_ONLY: frozenset[type] = frozenset(
    {
        ops.Range,
        ops.ListCollections,
        ops.ServerInfo,
        ops.HealthCheck,
        ops.CreateCollection,
        # FILTER reads; a key upload writes no stored key.
        ops.Filter,
        ops.UploadKeys,
        # Administration that only looks (a console polls these every few seconds).
        ops.ServerStatus,
        ops.CollectionStats,
        ops.StorageStats,
        ops.ListSnapshots,
        ops.VerifySnapshot,
        ops.ConfigView,
        ops.AuditTail,
        ops.ServerResources,
    }
)


@functools.lru_cache(maxsize=4096)
def _collection_prefix(collection: str) -> bytes:
    """The length-prefixed collection name (built once per collection, not per request)."""
    name = collection.encode()
    return _pack_length(len(name)) + name


#: Keys up to this many bytes index the cache as they are; longer ones by their digest.
SHORT_KEY_BYTES = 32

#: Values up to this many bytes keep their encoded GET answer in the cache beside them (saving
#: about 1.3 µs per hit, the protobuf runtime's cost per field).  A larger value would double the
#: entry: it keeps only the bytes of that answer around its data (``_Entry.around``, a few dozen),
#: and a hit joins them with the value's bytes, one copy instead of the runtime's 1.5 µs or more.
ENCODED_MAX_BYTES = 1024

#: A cache entry's index: ``(collection, key)`` for a short key, else a 32-byte digest.
CacheKey = bytes | tuple[str, bytes]


def cache_key(collection: str, key: bytes) -> CacheKey:
    """The cache index of ``key`` in ``collection``.

    A key of at most :data:`SHORT_KEY_BYTES` is its own index, paired with the collection name (a
    tuple costs a few percent of a BLAKE3 hash, and takes about as much memory as the digest);
    a longer key is indexed by the BLAKE3 of the length-prefixed collection name and key, so a
    64 KiB key costs 32 bytes of index.  A tuple never equals a digest, and length prefixes keep
    ``("a", b"bc")`` and ``("ab", b"c")`` apart.
    """
    if len(key) <= SHORT_KEY_BYTES:
        return (collection, key)
    return blake3(_collection_prefix(collection) + _pack_length(len(key)) + key).digest()


def _around(response: bytes, value: CipherBlob) -> tuple[bytes, bytes] | None:
    """The bytes of a GET's serialized ``QueryResponse`` before and after the value's data: the
    levels' tags and lengths, then the value's metadata, its last field.  None if ``response``
    is not laid out so (checked, not assumed)."""
    data = value.data
    metadata = CipherBlob(b"", value.checksum, value.size, value.compression, value.created_at, value.version)
    tail = blob_to_proto(metadata).SerializeToString()
    start = len(response) - len(tail) - len(data)
    if start <= 0 or not response.endswith(tail) or response[start : start + len(data)] != data:
        return None
    return response[:start], tail


class _Entry:
    """A cached GET result; ``response`` its serialized ``QueryResponse``, made at the first hit."""

    __slots__ = ("around", "collection", "response", "size", "value")

    def __init__(self, collection: str, value: CipherBlob | None, size: int) -> None:
        self.collection = collection
        self.value = value
        self.size = size
        self.response: bytes | None = None
        #: For a value over ENCODED_MAX_BYTES (``response`` then ``b""``): the serialized answer's
        #: bytes before and after the value's data, or None when it could not be split so.
        self.around: tuple[bytes, bytes] | None = None


class _Reads:
    """GETs of one key in flight, and the key's generation (moved by every write to it)."""

    __slots__ = ("generation", "readers")

    def __init__(self) -> None:
        self.readers = 0
        self.generation = 0


class ReadTicket:
    """What a GET that missed needs to know, when it finishes, to decide whether to cache."""

    __slots__ = ("collection", "epoch", "generation", "hashed", "reads")

    def __init__(self, hashed: CacheKey, collection: str, reads: _Reads, epoch: int) -> None:
        self.hashed = hashed
        self.collection = collection
        self.reads = reads
        self.generation = reads.generation
        self.epoch = epoch


#: What :meth:`QueryCache.lookup` returns when the key is not cached.
MISS: Any = object()


class QueryCache:
    """An LRU of GET results bounded by ``max_bytes``, with write ordering (see the module doc)."""

    def __init__(self, max_bytes: int, max_entry_bytes: int = 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._by_collection: dict[str, set[CacheKey]] = {}
        self._reads: dict[CacheKey, _Reads] = {}
        self._writing: dict[CacheKey, int] = {}
        self._collections_writing: dict[str, int] = {}
        self._epoch = 0
        #: Writes started while the cache was off and not finished yet: nothing may be cached
        #: until they have (they were not tracked, so they could land after a read).
        self.untracked_writes = 0
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.invalidations = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        """Counters and sizes, for metrics and the admin API."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "invalidations": self.invalidations,
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
        }

    # -- reads --------------------------------------------------------------------------------

    def lookup(self, hashed: CacheKey) -> Any:
        """The cached value (a CipherBlob or None), or :data:`MISS`; counts the hit or miss."""
        entry = self._entries.get(hashed)
        if entry is None:
            self.misses += 1
            return MISS
        self._entries.move_to_end(hashed)
        self.hits += 1
        return entry.value

    def encode(self, entry: _Entry) -> bytes:
        """The serialized ``QueryResponse`` of a cached entry, kept in it and counted in its size
        (older entries are evicted if that takes the cache over ``max_bytes``).  For a value over
        :data:`ENCODED_MAX_BYTES` the entry keeps only the bytes around the value's data
        (``around``; ``response`` is set to ``b""``), and :meth:`answer` joins them again."""
        value = entry.value
        response = query_response("get", value)
        if value is not None and len(value.data) > ENCODED_MAX_BYTES:
            entry.response = b""
            around = _around(response, value)
            if around is None:
                return response
            entry.around = around
            kept = len(around[0]) + len(around[1])
        else:
            entry.response = response
            kept = len(response)
        entry.size += kept
        self.bytes += kept
        self._evict_to(self.max_bytes)
        return response

    @staticmethod
    def answer(entry: _Entry) -> bytes | None:
        """A cached entry's serialized ``QueryResponse`` once :meth:`encode` has seen it (None when
        it cannot be given without the protobuf runtime)."""
        response = entry.response
        if response:
            return response
        around = entry.around
        if around is None or entry.value is None:
            return None
        return b"".join((around[0], entry.value.data, around[1]))

    def begin_read(self, hashed: CacheKey, collection: str) -> ReadTicket:
        """A GET that missed is about to read storage."""
        reads = self._reads.get(hashed)
        if reads is None:
            reads = self._reads[hashed] = _Reads()
        reads.readers += 1
        return ReadTicket(hashed, collection, reads, self._epoch)

    def end_read(self, ticket: ReadTicket, value: CipherBlob | None, ok: bool) -> bool:
        """The GET finished (``ok``: with ``value``); returns whether the value was cached."""
        hashed = ticket.hashed
        reads = ticket.reads
        reads.readers -= 1
        if reads.readers <= 0 and self._reads.get(hashed) is reads:
            del self._reads[hashed]
        if (
            not ok
            or not self.enabled
            or reads.generation != ticket.generation
            or self._epoch != ticket.epoch
            or self.untracked_writes
            or hashed in self._writing
            or (self._collections_writing and self._collection_pending(ticket.collection))
        ):
            return False
        return self._store(hashed, ticket.collection, value)

    def _collection_pending(self, collection: str) -> bool:
        pending = self._collections_writing
        return collection in pending or "" in pending

    def _store(self, hashed: CacheKey, collection: str, value: CipherBlob | None) -> bool:
        size = ENTRY_OVERHEAD + len(collection) + (len(value.data) if value is not None else 0)
        if value is not None and len(value.data) > self.max_entry_bytes:
            return False
        if size > self.max_bytes:
            return False
        old = self._entries.pop(hashed, None)
        if old is not None:
            self._forget(hashed, old)
        self._entries[hashed] = _Entry(collection, value, size)
        self._by_collection.setdefault(collection, set()).add(hashed)
        self.bytes += size
        self._evict_to(self.max_bytes)
        return True

    # -- writes -------------------------------------------------------------------------------

    def begin_write(self, hashed: Iterable[CacheKey]) -> None:
        """Writes to these keys are about to reach storage."""
        writing = self._writing
        for key in hashed:
            writing[key] = writing.get(key, 0) + 1
            self.invalidate_key(key)

    def end_write(self, hashed: Iterable[CacheKey]) -> None:
        """Writes to these keys finished (successfully or not)."""
        writing = self._writing
        for key in hashed:
            count = writing.get(key, 0) - 1
            if count > 0:
                writing[key] = count
            else:
                writing.pop(key, None)
            self.invalidate_key(key)

    def begin_key_write(self, hashed: CacheKey) -> None:
        """:meth:`begin_write` for one key (a SET or a DELETE: the commonest write)."""
        writing = self._writing
        writing[hashed] = writing.get(hashed, 0) + 1
        self.invalidate_key(hashed)

    def end_key_write(self, hashed: CacheKey) -> None:
        """:meth:`end_write` for one key."""
        writing = self._writing
        count = writing.pop(hashed, 0) - 1
        if count > 0:
            writing[hashed] = count
        self.invalidate_key(hashed)

    def begin_collection_write(self, collection: str | None) -> None:
        """A write to unnamed keys of ``collection`` (None: of any collection) is about to start."""
        name = "" if collection is None else collection
        self._collections_writing[name] = self._collections_writing.get(name, 0) + 1
        self._invalidate_collection(collection)

    def end_collection_write(self, collection: str | None) -> None:
        name = "" if collection is None else collection
        count = self._collections_writing.get(name, 0) - 1
        if count > 0:
            self._collections_writing[name] = count
        else:
            self._collections_writing.pop(name, None)
        self._invalidate_collection(collection)

    def invalidate_key(self, hashed: CacheKey) -> None:
        """Drop the key's entry and move its generation (a read in flight will not cache what it
        read).  On its own: a write to the key that started and ended with no reactor turn between
        (:meth:`begin_key_write` and :meth:`end_key_write` at once)."""
        if self._reads:
            reads = self._reads.get(hashed)
            if reads is not None:
                reads.generation += 1
        entry = self._entries.pop(hashed, None)
        if entry is not None:
            self.invalidations += 1
            self._forget(hashed, entry)

    def _invalidate_collection(self, collection: str | None) -> None:
        self._epoch += 1
        if collection is None:
            self.invalidations += len(self._entries)
            self._entries.clear()
            self._by_collection.clear()
            self.bytes = 0
            return
        for hashed in list(self._by_collection.get(collection, ())):
            entry = self._entries.pop(hashed, None)
            if entry is not None:
                self.invalidations += 1
                self._forget(hashed, entry)

    # -- size ---------------------------------------------------------------------------------

    def _forget(self, hashed: CacheKey, entry: _Entry) -> None:
        self.bytes -= entry.size
        keys = self._by_collection.get(entry.collection)
        if keys is not None:
            keys.discard(hashed)
            if not keys:
                del self._by_collection[entry.collection]

    def _evict_to(self, limit: int) -> None:
        entries = self._entries
        while self.bytes > limit and entries:
            hashed, entry = entries.popitem(last=False)
            self.evictions += 1
            self._forget(hashed, entry)

    def clear(self) -> None:
        """Drop every entry, and keep reads in flight from caching what they read."""
        self._invalidate_collection(None)

    def resize(self, max_bytes: int, max_entry_bytes: int) -> None:
        """New bounds: evicts down to ``max_bytes`` now (0 empties and disables the cache)."""
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        if max_bytes <= 0:
            self.clear()
            return
        self._evict_to(max_bytes)
        if max_entry_bytes < 0:
            return
        too_big = [
            hashed
            for hashed, entry in self._entries.items()
            if entry.value is not None and len(entry.value.data) > max_entry_bytes
        ]
        for hashed in too_big:
            self._forget(hashed, self._entries.pop(hashed))

    # -- reload -------------------------------------------------------------------------------

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        settings: CacheConfig = cache_settings(new)
        if (settings.max_bytes, settings.max_entry_bytes) == (self.max_bytes, self.max_entry_bytes):
            return None
        return lambda: self.resize(settings.max_bytes, settings.max_entry_bytes)


def _never(op: Any) -> bool:
    return False


class CachingExecutor:
    """Wraps a QueryExecutor: answers GETs from the cache and invalidates on every write.

    Anything else the pipeline or others read from the executor is the wrapped executor's.
    """

    def __init__(self, inner: Any, cache: QueryCache) -> None:
        self.inner = inner
        self.cache = cache
        self._inner_set_now: Callable[[ops.Set], bool] = getattr(inner, "set_now", _never)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_range(self, op: ops.Range | ops.Filter) -> Any:
        return self.inner.open_range(op)

    def update_limits(self, limits: Any) -> None:
        self.inner.update_limits(limits)

    def execute(self, op: ops.Operation) -> defer.Deferred[Any]:
        kind = type(op)
        cache = self.cache
        if kind is ops.Get:
            if cache.max_bytes <= 0:  # off
                return self.inner.execute(op)
            return self._get(op)  # type: ignore[arg-type]
        if kind in _READ_ONLY:
            return self.inner.execute(op)
        if cache.max_bytes <= 0:  # off
            return self._untracked(self.inner.execute, op)
        if kind is ops.Set or kind is ops.Delete:
            single: Any = op
            if not cache._entries and not cache._reads:
                # Nothing cached and no read in flight (a write-heavy load): a write that finishes
                # now has nothing to invalidate.  One that does not is tracked like any other
                # (no reactor turn has passed, as in _key_write).
                d: defer.Deferred[Any] = self.inner.execute(op)
                if d.called and not d.paused:
                    return d
                return self._track_key_write(cache_key(single.collection, single.key), d)
            key = single.key
            # cache_key's short case inline: this runs for every write.
            hashed = (
                (single.collection, key) if len(key) <= SHORT_KEY_BYTES else cache_key(single.collection, key)
            )
            return self._key_write(hashed, op)
        if kind is ops.Batch:
            batch: Any = op
            keys = [cache_key(item.collection, item.key) for item in batch.ops if item.kind == "write"]
            if not keys:
                return self.inner.execute(op)
            return self._write(keys, op)
        # Drops, and any later operation that writes keys it does not name (UPDATE): the whole
        # collection, or everything when the operation names none.
        return self._collection_write(getattr(op, "collection", None), op)

    def set_now(self, op: ops.Set) -> bool:
        """Write ``op`` at once where the executor can (:meth:`QueryExecutor.set_now
        <amaters.query.executor.QueryExecutor.set_now>`), its key's entry then invalidated as
        :meth:`_key_write` does for a write that finished during its call: whether it was written
        (False: nothing was done, :meth:`execute` runs it)."""
        cache = self.cache
        try:
            if not self._inner_set_now(op):
                return False
        except BaseException:
            cache.invalidate_key(cache_key(op.collection, op.key))
            raise
        if cache._entries or cache._reads:
            key = op.key
            # cache_key's short case inline, as in execute.
            cache.invalidate_key(
                (op.collection, key) if len(key) <= SHORT_KEY_BYTES else cache_key(op.collection, key)
            )
        return True

    def cached(self, op: ops.Get, ctx: RequestContext | None = None) -> Any:
        """What the cache holds for a GET now (a CipherBlob or None, counted as a hit), or
        :data:`~amaters.query.pipeline.NOT_YET` (not counted: :meth:`execute` then counts the miss).

        The pipeline asks this first, so that a hit needs no Deferred.  On a hit ``ctx.response``
        is set to the entry's serialized ``QueryResponse`` (encoded at its first hit and counted
        in the cache's bytes from then on; values up to :data:`ENCODED_MAX_BYTES`), which a front
        end can send without encoding it again.
        """
        cache = self.cache
        if cache.max_bytes <= 0:
            return NOT_YET
        entries = cache._entries
        hashed = cache_key(op.collection, op.key)
        entry = entries.get(hashed)
        if entry is None:
            return NOT_YET
        entries.move_to_end(hashed)
        cache.hits += 1
        if ctx is not None:
            response = entry.response
            if response is None:
                ctx.response = cache.encode(entry)
            elif response:
                ctx.response = response
            else:  # a large value
                ctx.response = cache.answer(entry)
        return entry.value

    def _get(self, op: ops.Get) -> defer.Deferred[Any]:
        cache = self.cache
        hashed = cache_key(op.collection, op.key)
        value = cache.lookup(hashed)
        if value is not MISS:
            return defer.succeed(value)
        ticket = cache.begin_read(hashed, op.collection)
        try:
            d: defer.Deferred[Any] = self.inner.execute(op)
        except BaseException:
            cache.end_read(ticket, None, False)
            raise
        if d.called and not d.paused:
            # Answered synchronously: what addBoth would do right now, without the callback.
            self._read_done(d.result, ticket)
        else:
            d.addBoth(self._read_done, ticket)
        return d

    def _read_done(self, result: Any, ticket: ReadTicket) -> Any:
        ok = not isinstance(result, Failure)
        self.cache.end_read(ticket, result if ok else None, ok)
        return result

    def _write(self, keys: Sequence[CacheKey], op: ops.Operation) -> defer.Deferred[Any]:
        cache = self.cache
        cache.begin_write(keys)
        return self._execute_then(op, cache.end_write, keys)

    def _key_write(self, hashed: CacheKey, op: ops.Operation) -> defer.Deferred[Any]:
        """:meth:`_write` for one key, without the list and the closure.

        The write is marked in progress only once it is known not to have finished during the
        call (a write to the memory backend finishes at once, and then only needs its entry
        invalidated).  Nothing the cache holds can be read between the call and the marking (no
        reactor turn), and whatever a read finishing *during* the call stored is dropped by the
        invalidation that follows either way.
        """
        cache = self.cache
        try:
            d: defer.Deferred[Any] = self.inner.execute(op)
        except BaseException:
            cache.invalidate_key(hashed)
            raise
        if d.called and not d.paused:
            cache.invalidate_key(hashed)  # finished: begin and end at once
            return d
        return self._track_key_write(hashed, d)

    def _track_key_write(self, hashed: CacheKey, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """Mark the write to ``hashed``, still in progress as ``d``, until it ends."""
        self.cache.begin_key_write(hashed)
        d.addBoth(self._key_written, hashed)
        return d

    def set_many(self, writes: list[ops.Set]) -> defer.Deferred[Any] | None:
        """The executor's ``set_many`` (SETs that arrived together, written as one), with the keys'
        entries invalidated as :meth:`_key_write` does for one; None where it is not done."""
        cache = self.cache
        if cache.max_bytes <= 0:  # off
            return self._untracked(self.inner.set_many, writes)
        try:
            d: defer.Deferred[Any] | None = self.inner.set_many(writes)
        except BaseException:
            for op in writes:
                cache.invalidate_key(cache_key(op.collection, op.key))
            raise
        if d is None:
            return None
        if d.called and not d.paused:
            # Finished: begin and end at once; nothing to do while nothing is cached or being read.
            if cache._entries or cache._reads:
                for op in writes:
                    cache.invalidate_key(cache_key(op.collection, op.key))
        else:
            keys = [cache_key(op.collection, op.key) for op in writes]
            cache.begin_write(keys)
            d.addBoth(self._keys_written, keys)
        return d

    def _keys_written(self, result: Any, keys: list[CacheKey]) -> Any:
        self.cache.end_write(keys)
        return result

    def _key_written(self, result: Any, hashed: CacheKey) -> Any:
        self.cache.end_key_write(hashed)
        return result

    def _collection_write(self, collection: str | None, op: ops.Operation) -> defer.Deferred[Any]:
        cache = self.cache
        cache.begin_collection_write(collection)
        return self._execute_then(op, cache.end_collection_write, collection)

    def _execute_then(self, op: ops.Operation, end: Callable[[Any], None], what: Any) -> defer.Deferred[Any]:
        """Execute ``op``, then ``end(what)`` once it has finished, whether it succeeded or not."""
        try:
            d: defer.Deferred[Any] = self.inner.execute(op)
        except BaseException:
            end(what)
            raise

        if d.called and not d.paused:
            # Already finished (memory backend): what the callback would do now, without it.
            end(what)
            return d

        def finished(result: Any) -> Any:
            end(what)
            return result

        d.addBoth(finished)
        return d

    def _untracked(self, write: Callable[[Any], Any], arg: Any) -> Any:
        """``write(arg)`` (a Deferred, or None: nothing was written) while the cache is off, counted
        as in flight: a reload may turn the cache on while it is."""
        cache = self.cache
        cache.untracked_writes += 1
        try:
            d: defer.Deferred[Any] | None = write(arg)
        except BaseException:
            cache.untracked_writes -= 1
            raise

        if d is None or (d.called and not d.paused):
            cache.untracked_writes -= 1
            return d

        def finished(result: Any) -> Any:
            cache.untracked_writes -= 1
            return result

        d.addBoth(finished)
        return d


__all__ = ["MISS", "CachingExecutor", "QueryCache", "cache_key"]
