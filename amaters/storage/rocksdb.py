"""The ``rocksdb`` backend: durable storage on RocksDB through ``rocksdict``.

Layout and mapping:

- the database lives in ``<data_dir>/db``; ``<data_dir>/LOCK`` (see :mod:`amaters.storage.lock`)
  keeps a second server off it;
- each collection is a column family named ``c:<collection>``; the ``default`` column family holds
  internal metadata (the on-disk format version), so no collection name is reserved;
- values are :mod:`amaters.storage.codec` records (CipherBlob metadata, data, two CRCs);
- ``<data_dir>/FORMAT`` (:mod:`amaters.storage.formatfile`) is checked before the database opens,
  and the format version is stored again inside it.

Threads (measured on this machine, see ``docs/storage.md``): RocksDB reads and unsynced writes from
the memtable or block cache take about 1-3 µs, while a hop to a pool thread and back costs about
100 µs, so point gets, puts, deletes and batches run on the reactor thread.  rocksdict holds the GIL
during reads and writes, so moving them to a thread would not unblock the reactor anyway.  Anything
that can wait for the disk for long runs in the ``io`` pool: open and close, WAL fsync (group
commit; on ``sync_runner``, a serial thread of its own, when given), memtable flush, collection create/drop (a MANIFEST fsync each), range chunks, checkpoints.
``storage.point_reads_in_pool`` moves gets to the pool for data sets far larger than memory.

Durability follows ``storage.sync``: ``always`` acknowledges a write after a WAL fsync shared with
every write that arrived meanwhile (:mod:`amaters.storage.groupcommit`); ``interval`` and ``none``
acknowledge once the write is in the memtable and its WAL record has been handed to the OS (it
survives a process crash; the flusher fsyncs every ``sync_interval_ms`` under ``interval``).

A full disk (``docs/storage.md``): a write that fails for lack of space sets :attr:`write_problem`
(readiness turns 503, health degraded) and starts a probe of the free space every
:data:`RECOVERY_INTERVAL` seconds.  RocksDB keeps refusing writes after such an error, so once
there is room again (:meth:`RocksDBBackend._room`) the backend closes and reopens the database by
itself and writes resume; requests arriving during the reopen get a retryable SERVER_UNAVAILABLE.
Opening a database whose write-ahead log cannot be flushed for lack of space falls back to opening
it read-only (every acknowledged write is readable), says so in the log and in
:attr:`write_problem`, and reopens it writable once space returns.

Range cursors keep one RocksDB iterator open.  A RocksDB iterator reads from the implicit snapshot
taken when it was created, so a cursor sees the collection as it was when ``scan`` was called.
(rocksdict 0.3.29's ``Snapshot.iter`` does not apply its snapshot, so it is not used.)

rocksdict keeps the database open while any of its objects (column family handles, iterators)
lives, so :meth:`RocksDBBackend.close` drops every one of them before closing.  Never call
``next()`` on an invalid rocksdict iterator: it crashes the process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import rocksdict
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from amaters.errors import (
    AlreadyExists,
    AmatersError,
    Corrupted,
    ErrorCategory,
    InvalidValue,
    NotFound,
    Overloaded,
    StorageError,
    StorageFull,
    StorageIOError,
    Unavailable,
)
from amaters.interfaces import IRangeCursor, IStorageBackend
from amaters.service import SerialLock
from amaters.storage import codec
from amaters.storage.formatfile import check_data_dir, stamp_data_dir
from amaters.storage.groupcommit import BlockingRunner, GroupCommitter
from amaters.storage.lock import DataDirLock, DataDirLocked
from amaters.types import CipherBlob, ConditionalResult, Expect, KeyValue, WriteKind, WriteOp

T = TypeVar("T")

SyncMode = Literal["always", "interval", "none"]

#: The on-disk layout version (column family naming, metadata keys, record format).
FORMAT_VERSION = 1
FORMAT_KEY = b"amaters:format_version"
_COLLECTION_PREFIX = "c:"
_DEFAULT_CF = "default"
#: Seconds between two looks at the free space while writes fail for lack of it.
RECOVERY_INTERVAL = 2.0


def column_family_name(collection: str) -> str:
    """The RocksDB column family holding ``collection``."""
    return _COLLECTION_PREFIX + collection


def map_error(error: BaseException, action: str) -> AmatersError:
    """The :class:`AmatersError` for an exception rocksdict raised while doing ``action``.

    rocksdict raises plain ``Exception`` with RocksDB's status text ("IO error: No space left on
    device: ...", "Corruption: ...").  The client sees ``action`` and a short cause, never RocksDB's
    text (it names files); the original exception becomes the error's ``__cause__``, which the
    server log shows.
    """
    if isinstance(error, AmatersError):
        return error
    mapped = _map(str(error), error, action)
    # Only the text is wanted: the traceback's frames would keep column family handles and
    # iterators alive, and rocksdict does not close a database while any of them lives.
    error.__traceback__ = None
    mapped.__cause__ = error
    return mapped


def _map(text: str, error: BaseException, action: str) -> AmatersError:
    if isinstance(error, rocksdict.DbClosedError):
        return Unavailable(f"{action}: the storage is closed")
    if "No space left" in text or "ENOSPC" in text:
        return StorageFull(f"{action}: the disk is full; the write was not applied")
    if "Write stall" in text or text.startswith("Result incomplete"):
        # WriteOptions.no_slowdown: RocksDB would have blocked this write until flushes or
        # compactions catch up (or forever, while they fail on a full disk).
        return Overloaded(
            f"{action}: storage is stalled waiting for flushes or compaction; retry shortly",
            retry_after_ms=100,
        )
    if text.startswith("Corruption"):
        return Corrupted(f"{action}: RocksDB reports corrupted data")
    if "lock hold by current process" in text or ("LOCK" in text and "unavailable" in text.lower()):
        return DataDirLocked(f"{action}: the database is already open (RocksDB LOCK is held)")
    if text.startswith("IO error") or isinstance(error, OSError):
        return StorageIOError(f"{action}: I/O error")
    return StorageError(f"{action}: storage error", category=ErrorCategory.SERVER_ERROR)


@attrs.define
class _Collection:
    name: str
    rdict: Any  # rocksdict.Rdict of the column family
    handle: Any  # rocksdict.ColumnFamily, for write batches


@attrs.frozen
class RocksDBSettings:
    """What the backend needs from ``StorageConfig`` (kept small so tests can build one)."""

    sync: SyncMode = "always"
    block_cache_bytes: int = 64 * 1024 * 1024
    write_buffer_bytes: int = 64 * 1024 * 1024
    range_chunk_bytes: int = 4 * 1024 * 1024
    point_reads_in_pool: bool = False
    #: Table files kept open at once (RocksDB's max_open_files; -1 would keep every one open).
    max_open_files: int = 512
    #: WAL files kept for reuse (RocksDB's recycle_log_file_num; see StorageConfig).
    wal_recycle_files: int = 2
    #: Start a group commit from idle at the end of the reactor turn rather than at once (see
    #: :mod:`amaters.storage.groupcommit`).  On in a server (``from_config``); off by default so that
    #: tests driving a ``task.Clock`` by hand see a sync start with the first write.
    sync_at_end_of_turn: bool = False
    #: Hold a WAL sync back this long while several writers are at work (seconds; see
    #: :mod:`amaters.storage.groupcommit`).
    group_commit_delay: float = 0.0
    #: Writers at work from which a sync holds back for that delay.
    group_commit_min_writers: int = 2

    @classmethod
    def from_config(cls, storage: Any) -> RocksDBSettings:
        return cls(
            sync=storage.sync,
            block_cache_bytes=storage.block_cache_bytes,
            write_buffer_bytes=storage.write_buffer_bytes,
            range_chunk_bytes=storage.range_chunk_bytes,
            point_reads_in_pool=storage.point_reads_in_pool,
            max_open_files=storage.max_open_files,
            wal_recycle_files=storage.wal_recycle_files,
            sync_at_end_of_turn=True,
            group_commit_delay=storage.group_commit_delay_us / 1e6,
            group_commit_min_writers=storage.group_commit_delay_min_writers,
        )


@implementer(IRangeCursor)
class RocksDBCursor:
    """Reads ``[start, end)`` of one column family in chunks, from the iterator's snapshot.

    Each chunk is read and CRC-checked in the io pool.  A chunk holds at most ``chunk_size``
    entries and at most ``chunk_bytes`` of keys and records, except that a single larger entry
    makes a chunk of its own; so a chunk may be short, and only an empty chunk means the end.  Calling ``next_chunk`` again before the previous
    chunk arrived is an error.
    """

    def __init__(
        self,
        backend: RocksDBBackend,
        collection: str,
        iterator: Any,
        start: bytes,
        limit: int | None,
        chunk_size: int,
        chunk_bytes: int,
    ) -> None:
        self._backend = backend
        self._collection = collection
        self._iterator: Any = iterator
        self._start = start
        self._remaining = limit
        self._chunk_size = max(1, chunk_size)
        self._chunk_bytes = max(1, chunk_bytes)
        self._positioned = False
        self._reading = False
        self._done = limit is not None and limit <= 0
        self._idle_waiters: list[defer.Deferred[None]] = []
        if self._done:
            self._release()

    def next_chunk(self) -> defer.Deferred[list[KeyValue]]:
        if self._done:
            return defer.succeed([])
        if self._reading:
            return defer.fail(
                StorageError(
                    "next_chunk called before the previous chunk arrived",
                    category=ErrorCategory.SERVER_ERROR,
                )
            )
        want = self._chunk_size
        if self._remaining is not None:
            want = min(want, self._remaining)
        self._reading = True
        return self._backend._io.run(self._read_blocking, want).addBoth(self._chunk_read)

    def close(self) -> None:
        self._done = True
        if not self._reading:
            self._release()

    def when_idle(self) -> defer.Deferred[None]:
        """Fires once no chunk is being read (used by the backend's close)."""
        if not self._reading:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _read_blocking(self, want: int) -> tuple[list[KeyValue], bool]:
        # Runs in the io pool; only this thread touches the iterator while _reading is set.
        it = self._iterator
        where = f"a stored value in collection {self._collection!r}"
        try:
            if not self._positioned:
                it.seek(self._start)
                self._positioned = True
            chunk: list[KeyValue] = []
            size = 0
            while it.valid():
                key: bytes = it.key()
                record: bytes = it.value()
                if chunk and size + len(key) + len(record) > self._chunk_bytes:
                    break  # this entry starts the next chunk
                chunk.append((key, codec.decode(record, where=where)))
                size += len(key) + len(record)
                it.next()
                if len(chunk) >= want:
                    break
            exhausted = not it.valid()
            if exhausted:
                it.status()  # raises if the iterator stopped on an error rather than at the end
        except Exception as e:
            raise map_error(e, f"range over collection {self._collection!r}") from e
        return chunk, exhausted

    def _chunk_read(self, result: tuple[list[KeyValue], bool] | Failure) -> list[KeyValue]:
        self._reading = False
        if isinstance(result, Failure):
            self._done = True
            self._release()
            self._notify_idle()
            result.raiseException()
        chunk, exhausted = result
        if self._remaining is not None:
            self._remaining -= len(chunk)
            if self._remaining <= 0:
                exhausted = True
        if exhausted or self._done:
            self._done = True
            self._release()
        self._notify_idle()
        return chunk

    def _notify_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _release(self) -> None:
        # Dropping the iterator releases its snapshot (and lets the database close).
        self._iterator = None
        self._backend._cursors.discard(self)


@implementer(IStorageBackend)
class RocksDBBackend:
    """Collections as RocksDB column families under ``path``, locked by ``<lock_dir>/LOCK``.

    ``io`` runs blocking calls (a :class:`~amaters.service.ThreadPoolService`); ``clock`` is the
    reactor (used to rate-limit error logs).
    """

    name = "rocksdb"
    #: ``write_batch`` is one RocksDB write (one WAL record, one sync to wait for): cheaper than
    #: a put per write.
    local_batches = True
    _log = Logger()

    def __init__(
        self,
        path: str | os.PathLike[str],
        io: BlockingRunner,
        clock: IReactorTime,
        settings: RocksDBSettings | None = None,
        lock_dir: str | os.PathLike[str] | None = None,
        sync_runner: BlockingRunner | None = None,
    ) -> None:
        self.path = Path(path)
        self.settings = settings or RocksDBSettings()
        self._io = io
        self._clock = clock
        self._lock = DataDirLock(lock_dir if lock_dir is not None else self.path.parent)
        self._db: Any = None
        self._cache: Any = None
        self._collections: dict[str, _Collection] = {}
        self._cursors: set[RocksDBCursor] = set()
        self._ddl = SerialLock()
        self._state = "new"  # new | opening | open | closing | closed
        self._close_d: defer.Deferred[None] | None = None
        self._write_opts = rocksdict.WriteOptions()
        self._write_opts.sync = False
        # A write that would stall (memtables full while flushes fail or lag) fails at once instead
        # of blocking the reactor thread; see map_error.
        self._write_opts.no_slowdown = True
        #: Every WAL sync (per-write group commit, the flusher's interval syncs, ``sync()``).
        # ``sync_runner`` (a serial thread of its own) when given: cheaper per fsync than a pool.
        self.group_commit = GroupCommitter(
            self._sync_blocking,
            sync_runner if sync_runner is not None else io,
            clock=clock if self.settings.sync_at_end_of_turn else None,
            on_error=self._sync_failed,
            delay=self.settings.group_commit_delay if self.settings.sync == "always" else 0.0,
            min_writers=self.settings.group_commit_min_writers,
        )
        self._last_error_log = float("-inf")
        #: Writes applied so far, and how many of them the last completed fsync covered.
        self._writes_applied = 0
        self._writes_synced = 0
        self._errors_not_logged = 0
        #: Why writes fail right now (a full disk), or None; readiness and health report it.
        self.write_problem: str | None = None
        self._read_only = False
        self._probe: Any = None
        self._reopening = False
        #: Collection names while the database is being reopened (their handles are gone).
        self._names_while_reopening: frozenset[str] = frozenset()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    def open(self) -> defer.Deferred[None]:
        if self._state != "new":
            return defer.fail(StorageError(f"cannot open a backend that is {self._state}"))
        self._state = "opening"
        d = self._io.run(self._open_or_read_only)

        def opened(result: tuple[Any, Any, dict[str, _Collection]]) -> None:
            self._db, self._cache, self._collections = result
            self._state = "open"
            self._log.info(
                "RocksDB open at {path} with {count} collections, sync={sync}{mode}",
                path=str(self.path),
                count=len(self._collections),
                sync=self.settings.sync,
                mode=" (read-only: the disk is full)" if self._read_only else "",
            )
            if self._read_only:
                self._disk_full(
                    "the disk is full: the database was opened read-only; writes fail until space is freed"
                )

        def failed(failure: Failure) -> None:
            self._state = "new"
            failure.raiseException()

        return d.addCallbacks(opened, failed)

    def _options(self, cache: Any) -> Any:
        options = rocksdict.Options(raw_mode=True)
        table = rocksdict.BlockBasedOptions()
        table.set_block_cache(cache)
        table.set_bloom_filter(10, False)
        table.set_cache_index_and_filter_blocks(True)
        options.set_block_based_table_factory(table)
        options.set_write_buffer_size(self.settings.write_buffer_bytes)
        # A third memtable absorbs bursts while one is being flushed (writes never wait: see
        # no_slowdown in map_error).
        options.set_max_write_buffer_number(3)
        options.set_max_open_files(self.settings.max_open_files)
        return options

    def _open_or_read_only(self) -> tuple[Any, Any, dict[str, _Collection]]:
        """Open writable; when that fails for lack of space (the WAL must be flushed on open), open
        read-only instead (sets ``_read_only``)."""
        try:
            opened = self._open_blocking()
        except StorageFull:
            opened = self._open_blocking(read_only=True)
            self._read_only = True
            return opened
        self._read_only = False
        return opened

    def _open_blocking(self, read_only: bool = False) -> tuple[Any, Any, dict[str, _Collection]]:
        self._lock.acquire()
        db: Any = None
        try:
            # <data_dir>/FORMAT: refuse an older or newer layout before RocksDB touches it.  A new
            # directory is stamped before its database exists, so a crash in between leaves a
            # directory that still opens.
            check_data_dir(self._lock.data_dir, self.path, FORMAT_VERSION)
            if not read_only:
                stamp_data_dir(self._lock.data_dir, FORMAT_VERSION)
            self.path.mkdir(parents=True, exist_ok=True)
            cache = rocksdict.Cache(max(self.settings.block_cache_bytes, 1))
            options = self._options(cache)
            options.create_if_missing(True)
            options.set_max_background_jobs(2)
            options.set_keep_log_file_num(5)
            options.set_max_log_file_size(16 * 1024 * 1024)
            # Many column families share one WAL; without a cap, one idle collection would keep
            # every WAL file alive (and restarts would replay them all).
            options.set_max_total_wal_size(max(4 * self.settings.write_buffer_bytes, 64 * 1024 * 1024))
            options.set_wal_recovery_mode(rocksdict.DBRecoveryMode.point_in_time())
            # A WAL file no longer needed is kept and written over by a later WAL rather than
            # deleted: an fdatasync of blocks already written need not journal a new file size,
            # which cuts the CPU and the wait of every synced write by about a third.  Records
            # carry their WAL's number, so recovery stops at the old contents' first record (the
            # point-in-time mode above is the one RocksDB allows with it).
            options.set_recycle_log_file_num(self.settings.wal_recycle_files)
            # One memory budget for the memtables of all collections together.
            options.set_db_write_buffer_size(4 * self.settings.write_buffer_bytes)
            names: list[str] = [_DEFAULT_CF]
            if (self.path / "CURRENT").exists():
                names = rocksdict.Rdict.list_cf(str(self.path), rocksdict.Options(raw_mode=True))
            families = {name: self._options(cache) for name in names if name != _DEFAULT_CF}
            if read_only:
                db = rocksdict.Rdict(
                    str(self.path),
                    options,
                    column_families=families or None,
                    access_type=rocksdict.AccessType.read_only(),
                )
            else:
                db = rocksdict.Rdict(str(self.path), options, column_families=families or None)
                self._check_format(db, has_collections=bool(families))
            collections = {}
            for name in families:
                if name.startswith(_COLLECTION_PREFIX):
                    collection = name[len(_COLLECTION_PREFIX) :]
                    collections[collection] = _Collection(
                        collection, db.get_column_family(name), db.get_column_family_handle(name)
                    )
            return db, cache, collections
        except BaseException as e:
            if db is not None:
                try:
                    db.close()
                except Exception:
                    pass
            self._lock.release()
            raise map_error(e, f"opening the database at {str(self.path)!r}") from e

    def _check_format(self, db: Any, has_collections: bool) -> None:
        stored = db.get(FORMAT_KEY)
        if stored is None:
            if has_collections:
                raise StorageError(
                    f"{str(self.path)!r} holds column families but no amaters format version;"
                    " it is not an amaters database",
                    category=ErrorCategory.SERVER_ERROR,
                )
            synced = rocksdict.WriteOptions()
            synced.sync = True
            db.put(FORMAT_KEY, str(FORMAT_VERSION).encode(), synced)
            # Into an SST file now: an unflushed default column family would keep every WAL file
            # alive until max_total_wal_size forces a flush.
            db.flush(True)
            return
        try:
            version = int(stored)
        except ValueError:
            raise Corrupted(f"the database at {str(self.path)!r} has an unreadable format version") from None
        if version != FORMAT_VERSION:
            raise StorageError(
                f"the database at {str(self.path)!r} has on-disk format {version}; this server reads"
                f" format {FORMAT_VERSION} (run `amaters migrate`, or use a matching server version)",
                category=ErrorCategory.SERVER_ERROR,
            )

    def close(self) -> defer.Deferred[None]:
        if self._state in ("new", "closed"):
            return defer.succeed(None)
        if self._close_d is None:
            self._close_d = defer.Deferred.fromCoroutine(self._close())
        # Every caller gets its own Deferred; they all fire when the one close finishes.
        mine: defer.Deferred[None] = defer.Deferred()
        self._close_d.addBoth(_fan_out, mine)
        return mine

    async def _close(self) -> None:
        if self._state == "opening":
            raise StorageError("cannot close while opening", category=ErrorCategory.SERVER_ERROR)
        self._state = "closing"
        probe, self._probe = self._probe, None
        if probe is not None and probe.active():
            probe.cancel()
        await self.group_commit.idle()
        for cursor in list(self._cursors):
            cursor.close()
            await cursor.when_idle()
        self._cursors.clear()
        await self._ddl.acquire()
        try:
            db, self._db = self._db, None
            self._collections = {}
            self._cache = None
            await self._io.run(self._close_blocking, db)
        finally:
            self._ddl.release()
            self._state = "closed"
        self._log.info("RocksDB at {path} closed", path=str(self.path))

    def _close_blocking(self, db: Any) -> None:
        try:
            db.close()
        except Exception as e:
            raise map_error(e, "closing the database") from e
        finally:
            self._lock.release()

    # -- helpers ------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._state != "open":
            if self._reopening:
                raise Unavailable(
                    "the storage is being reopened after the disk was full; retry shortly",
                    retry_after_ms=500,
                )
            raise Unavailable(f"the storage is {self._state}, not open")

    def _require_writable(self, action: str) -> None:
        if self._read_only:
            raise StorageFull(f"{action}: the disk is full; the database is read-only until space is freed")

    # -- a full disk --------------------------------------------------------------------------

    def _disk_full(self, problem: str) -> None:
        """Writes fail for lack of space: report it and watch for space to come back."""
        if self.write_problem is None:
            self._log.warn(
                "Storage: {problem}; writes resume by themselves once space is freed", problem=problem
            )
        self.write_problem = problem
        if self._probe is None and self._state == "open":
            self._probe = self._clock.callLater(RECOVERY_INTERVAL, self._look_for_space)

    def _room(self) -> bool:
        """Whether the disk has room for the memtables to be flushed again (runs in the io pool)."""
        fs = os.statvfs(self.path)
        return fs.f_bavail * fs.f_frsize >= max(2 * self.settings.write_buffer_bytes, 1024 * 1024)

    def _look_for_space(self) -> None:
        self._probe = None
        if self._state != "open" or self.write_problem is None:
            return
        d = self._io.run(self._room)

        def checked(room: bool) -> Any:
            if room:
                return defer.Deferred.fromCoroutine(self._reopen())
            return None

        def failed(failure: Failure) -> None:
            self._log.failure("Reopening the storage after a full disk failed", failure)

        def again(_: object) -> None:
            if self.write_problem is not None and self._state == "open" and self._probe is None:
                self._probe = self._clock.callLater(RECOVERY_INTERVAL, self._look_for_space)

        d.addCallback(checked).addErrback(failed).addBoth(again)

    async def _reopen(self) -> None:
        """Close the database and open it again (writable if there is room): RocksDB refuses every
        write after one failed for lack of space, until it is reopened."""
        await self._ddl.acquire()
        try:
            if self._state != "open":
                return
            self._state = "reopening"
            self._reopening = True
            self._names_while_reopening = frozenset(self._collections)
            try:
                await self.group_commit.idle()
                for cursor in list(self._cursors):
                    cursor.close()
                    await cursor.when_idle()
                self._cursors.clear()
                db, self._db = self._db, None
                self._collections = {}
                self._cache = None
                try:
                    await self._io.run(self._close_blocking, db)
                except StorageError:
                    pass  # closing reports the failed write that got us here; the database is closed
                self._db, self._cache, self._collections = await self._io.run(self._open_or_read_only)
            except BaseException:
                self._state = "closed"
                self._log.error(
                    "The storage could not be reopened after the disk was full: restart the server"
                )
                raise
            finally:
                self._reopening = False
                self._names_while_reopening = frozenset()
            self._state = "open"
        finally:
            self._ddl.release()
        if self._read_only:
            self._log.info("Storage reopened read-only: the disk is still too full for the write-ahead log")
            return
        self.write_problem = None
        self._log.info("Storage writable again: there is free space on the disk")

    def _collection(self, name: str) -> _Collection:
        self._require_open()
        try:
            return self._collections[name]
        except KeyError:
            raise NotFound(f"collection {name!r} does not exist") from None

    def _failed(self, error: BaseException, action: str) -> defer.Deferred[Any]:
        mapped = map_error(error, action)
        if isinstance(mapped, Overloaded):
            mapped = self._stall_cause(mapped, action)
        if self._read_only and not isinstance(mapped, (NotFound, Unavailable, InvalidValue)):
            full = StorageFull(f"{action}: the disk is full; the database is read-only until space is freed")
            full.__cause__ = mapped.__cause__
            mapped = full
        if isinstance(mapped, StorageFull):
            self._disk_full(mapped.message.split(": ", 1)[-1])
        if not isinstance(mapped, (NotFound, Unavailable, InvalidValue)):
            self._log_storage_error(mapped)
        return defer.fail(mapped)

    def _stall_cause(self, stalled: AmatersError, action: str) -> AmatersError:
        """A write stall on a (nearly) full disk is a full disk: flushes fail for lack of space, the
        memtables fill up, and RocksDB stops writes rather than failing them."""
        try:
            fs = os.statvfs(self.path)
        except OSError:
            return stalled
        free = fs.f_bavail * fs.f_frsize
        if free >= 2 * self.settings.write_buffer_bytes:
            return stalled
        full = StorageFull(f"{action}: the disk is full ({free} bytes free); the write was not applied")
        full.__cause__ = stalled.__cause__
        return full

    def _log_storage_error(self, error: AmatersError) -> None:
        # A full disk fails every write; one line per second is enough.
        now = self._clock.seconds()
        if now - self._last_error_log < 1.0:
            self._errors_not_logged += 1
            return
        self._log.warn(
            "Storage error {code}: {message} ({cause}); {suppressed} similar errors not logged",
            code=error.code.name,
            message=error.message,
            cause=str(error.__cause__) if error.__cause__ is not None else "",
            suppressed=self._errors_not_logged,
        )
        self._last_error_log = now
        self._errors_not_logged = 0

    def _durable(self) -> defer.Deferred[None]:
        """Fires when what has been written so far is as durable as ``storage.sync`` promises."""
        self._writes_applied += 1
        if self.settings.sync != "always":
            return defer.succeed(None)
        return self.group_commit.request()

    def _sync_failed(self, failure: Failure) -> None:
        # Called by the group committer once per failed sync (not once per waiting write).
        if isinstance(failure.value, AmatersError):
            if isinstance(failure.value, StorageFull):
                self._disk_full(failure.value.message.split(": ", 1)[-1])
            self._log_storage_error(failure.value)

    def _sync_blocking(self) -> None:
        db = self._db
        if db is None:
            raise Unavailable("the storage is closed")
        # Writes counted so far have all been applied (the reactor thread counts a write after
        # RocksDB took it), so this fsync covers them.
        covered = self._writes_applied
        try:
            db.flush_wal(True)
        except Exception as e:
            raise map_error(e, "syncing the write-ahead log") from e
        self._writes_synced = covered

    # -- collections --------------------------------------------------------------------------

    def has_collection(self, name: str) -> bool:
        return name in self._collections or name in self._names_while_reopening

    def collection_count(self) -> int:
        return len(self._collections) or len(self._names_while_reopening)

    def list_collections(self) -> defer.Deferred[list[str]]:
        try:
            self._require_open()
        except AmatersError:
            return defer.fail()
        return defer.succeed(sorted(self._collections))

    def create_collection(self, name: str) -> defer.Deferred[bool]:
        return self._ddl.run(self._create_collection, name)

    def _create_collection(self, name: str) -> defer.Deferred[bool]:
        try:
            self._require_open()
            self._require_writable(f"creating collection {name!r}")
        except AmatersError:
            return defer.fail()
        if name in self._collections:
            return defer.succeed(False)
        d = self._io.run(self._create_blocking, self._db, name)

        def created(collection: _Collection) -> bool:
            self._collections[name] = collection
            return True

        return d.addCallback(created)

    def _create_blocking(self, db: Any, name: str) -> _Collection:
        cf_name = column_family_name(name)
        try:
            try:
                rdict = db.create_column_family(cf_name, self._options(self._cache))
            except Exception as e:
                if "already exists" not in str(e):
                    raise
                rdict = db.get_column_family(cf_name)
            return _Collection(name, rdict, db.get_column_family_handle(cf_name))
        except Exception as e:
            raise map_error(e, f"creating collection {name!r}") from e

    def drop_collection(self, name: str) -> defer.Deferred[bool]:
        return self._ddl.run(self._drop_collection, name)

    def _drop_collection(self, name: str) -> defer.Deferred[bool]:
        try:
            self._require_open()
            self._require_writable(f"dropping collection {name!r}")
        except AmatersError:
            return defer.fail()
        collection = self._collections.pop(name, None)
        if collection is None:
            return defer.succeed(False)
        # Removed first, on the reactor thread: no write can target the family while it is dropped.
        d = self._io.run(self._drop_blocking, self._db, name)

        def dropped(_: None) -> bool:
            return True

        def failed(failure: Failure) -> bool:
            self._collections[name] = collection
            failure.raiseException()

        return d.addCallbacks(dropped, failed)

    def _drop_blocking(self, db: Any, name: str) -> None:
        try:
            db.drop_column_family(column_family_name(name))
        except Exception as e:
            raise map_error(e, f"dropping collection {name!r}") from e

    # -- keys ---------------------------------------------------------------------------------

    def get(self, collection: str, key: bytes) -> defer.Deferred[CipherBlob | None]:
        try:
            target = self._collection(collection)
        except AmatersError:
            return defer.fail()
        if self.settings.point_reads_in_pool:
            return self._io.run(self._get_blocking, target, key)
        try:
            return defer.succeed(self._get_blocking(target, key))
        except AmatersError as e:
            return self._failed(e, f"reading from collection {collection!r}")

    def _get_blocking(self, target: _Collection, key: bytes) -> CipherBlob | None:
        try:
            record = target.rdict.get(key)
        except Exception as e:
            raise map_error(e, f"reading from collection {target.name!r}") from e
        if record is None:
            return None
        return codec.decode(record, where=f"a stored value in collection {target.name!r}")

    def put(self, collection: str, key: bytes, value: CipherBlob) -> defer.Deferred[None]:
        try:
            target = self._collection(collection)
            record = codec.encode(value)
        except AmatersError:
            return defer.fail()
        try:
            target.rdict.put(key, record, self._write_opts)
        except Exception as e:
            return self._failed(e, f"writing to collection {collection!r}")
        return self._durable()

    def delete(self, collection: str, key: bytes) -> defer.Deferred[bool]:
        try:
            target = self._collection(collection)
        except AmatersError:
            return defer.fail()
        try:
            existed = key in target.rdict  # a pinned lookup: the value is not copied out
            if existed:
                target.rdict.delete(key, self._write_opts)
        except Exception as e:
            return self._failed(e, f"deleting from collection {collection!r}")
        # Even when nothing was deleted, wait for the sync: the absence this answer reports may come
        # from another writer's delete that is not durable yet.
        return self._durable().addCallback(lambda _: existed)

    def _batch(self, ops: list[WriteOp]) -> Any:
        """The rocksdict WriteBatch of ``ops`` (raises AmatersError: a missing collection, ...)."""
        self._require_open()
        batch = rocksdict.WriteBatch(raw_mode=True)
        for op in ops:
            target = self._collection(op.collection)
            if op.kind is WriteKind.PUT:
                if op.value is None:
                    raise InvalidValue("a put in a batch has no value")
                batch.put(op.key, codec.encode(op.value), target.handle)
            else:
                batch.delete(op.key, target.handle)
        return batch

    def write_batch(self, ops: Iterable[WriteOp]) -> defer.Deferred[None]:
        ops = list(ops)
        try:
            batch = self._batch(ops)
        except AmatersError:
            return defer.fail()
        if not ops:
            return defer.succeed(None)
        try:
            self._db.write(batch, self._write_opts)
        except Exception as e:
            return self._failed(e, "writing a batch")
        return self._durable()

    def compare_and_write(
        self, expected: Iterable[Expect], ops: Iterable[WriteOp]
    ) -> defer.Deferred[ConditionalResult]:
        """Check and write in one synchronous step on the reactor thread, then wait for the sync.

        Every write of this backend (put, delete, write_batch, this) is applied on the reactor
        thread, so no other write can land between the check and the write; the check reads
        each expected key from the memtable or block cache (about 1 µs for a small record and
        10 µs for 50 KB, measured here) and compares the stored record bytes with the expected
        CipherBlob's encoding.  Only the WAL fsync is waited for, off the reactor (group commit),
        and a failed check answers at once: nothing was written.  All or nothing.
        """
        expected, ops = list(expected), list(ops)
        try:
            batch = self._batch(ops)
            checks = [
                (self._collection(e.collection), e, None if e.value is None else codec.encode(e.value))
                for e in expected
            ]
        except AmatersError:
            return defer.fail()
        try:
            changed = frozenset(
                (e.collection, e.key) for target, e, record in checks if target.rdict.get(e.key) != record
            )
        except Exception as e:
            return self._failed(e, "reading the rows a conditional write checks")
        if changed:
            return defer.succeed(ConditionalResult(changed, frozenset((op.collection, op.key) for op in ops)))
        if not ops:
            return defer.succeed(ConditionalResult())
        try:
            self._db.write(batch, self._write_opts)
        except Exception as e:
            return self._failed(e, "writing a batch")
        return self._durable().addCallback(lambda _: ConditionalResult())

    def scan(
        self,
        collection: str,
        start: bytes,
        end: bytes | None,
        limit: int | None,
        chunk_size: int,
    ) -> RocksDBCursor:
        target = self._collection(collection)
        options = rocksdict.ReadOptions()
        # A scan reads each block once: keep it out of the block cache, so a RANGE over a large
        # collection neither grows the server's memory by the cache size nor evicts the blocks
        # point reads keep hot.  Blocks already cached are still used.
        options.fill_cache(False)  # type: ignore[call-arg]  # the stub omits its argument
        if end is not None:
            if end <= start:
                limit = 0
            else:
                options.set_iterate_upper_bound(end)
        # The iterator is created now, so the cursor sees the collection as of this call.
        iterator = target.rdict.iter(options) if limit != 0 else None
        cursor = RocksDBCursor(
            self, collection, iterator, start, limit, chunk_size, self.settings.range_chunk_bytes
        )
        if iterator is not None:
            self._cursors.add(cursor)
        return cursor

    # -- durability, maintenance --------------------------------------------------------------

    def sync(self) -> defer.Deferred[None]:
        try:
            self._require_open()
        except AmatersError:
            return defer.fail()
        if self._writes_synced == self._writes_applied:
            # Nothing written since the last completed fsync (an idle server under
            # sync=interval would otherwise fsync ten times a second for nothing).
            return defer.succeed(None)
        return self.group_commit.request()

    def flush(self) -> defer.Deferred[None]:
        try:
            self._require_open()
        except AmatersError:
            return defer.fail()
        targets = [c.rdict for c in self._collections.values()]
        d = self._io.run(self._flush_blocking, self._db, targets)
        d.addCallback(lambda _: self.sync())
        return d

    def _flush_blocking(self, db: Any, targets: list[Any]) -> None:
        try:
            for rdict in [db, *targets]:
                rdict.flush(True)
        except Exception as e:
            raise map_error(e, "flushing memtables") from e

    def compact(self) -> defer.Deferred[None]:
        """Compact every collection's whole key range (in the io pool; reads and writes go on)."""
        try:
            self._require_open()
        except AmatersError:
            return defer.fail()
        targets = [c.rdict for c in self._collections.values()]
        return self._io.run(self._compact_blocking, self._db, targets)

    def _compact_blocking(self, db: Any, targets: list[Any]) -> None:
        try:
            for rdict in [db, *targets]:
                rdict.compact_range(None, None)
        except Exception as e:
            raise map_error(e, "compacting") from e

    def stats(self) -> defer.Deferred[dict[str, Any]]:
        try:
            self._require_open()
            return defer.succeed(self._stats())
        except Exception as e:
            return self._failed(e, "reading storage statistics")

    def _stats(self) -> dict[str, Any]:
        keys: dict[str, int] = {}
        sizes: dict[str, int] = {}
        sst = memtables = live = 0
        for name, collection in self._collections.items():
            prop = collection.rdict.property_int_value
            keys[name] = prop("rocksdb.estimate-num-keys") or 0
            files = prop("rocksdb.total-sst-files-size") or 0
            memory = prop("rocksdb.cur-size-all-mem-tables") or 0
            sizes[name] = files + memory
            sst += files
            memtables += memory
            live += prop("rocksdb.estimate-live-data-size") or 0
        db_prop = self._db.property_int_value
        return {
            "backend": self.name,
            "keys": keys,
            "collection_bytes": sizes,
            "bytes": sst + memtables,
            "sst_bytes": sst,
            "memtable_bytes": memtables,
            "live_data_bytes": live,
            "block_cache_capacity_bytes": self.settings.block_cache_bytes,
            "block_cache_usage_bytes": self._cache.get_usage() if self._cache is not None else 0,
            "background_errors": db_prop("rocksdb.background-errors") or 0,
            "write_stopped": bool(db_prop("rocksdb.is-write-stopped")),
            "pending_compaction_bytes": db_prop("rocksdb.estimate-pending-compaction-bytes") or 0,
            "sync_mode": self.settings.sync,
            "group_commit": self.group_commit.stats(),
        }

    def snapshot(self, destination: str) -> defer.Deferred[None]:
        try:
            self._require_open()
        except AmatersError:
            return defer.fail()
        if os.path.lexists(destination):
            return defer.fail(AlreadyExists(f"snapshot destination {destination!r} already exists"))
        targets = [c.rdict for c in self._collections.values()]
        return self._io.run(self._snapshot_blocking, self._db, targets, destination)

    def _snapshot_blocking(self, db: Any, targets: list[Any], destination: str) -> None:
        try:
            # Flush first (rocksdict releases the GIL while flushing); the checkpoint itself holds
            # the GIL, and with empty memtables it only hard-links files.
            for rdict in [db, *targets]:
                rdict.flush(True)
            Path(destination).parent.mkdir(parents=True, exist_ok=True)
            rocksdict.Checkpoint(db).create_checkpoint(destination)
        except Exception as e:
            raise map_error(e, "writing a snapshot") from e


def _fan_out(result: object, target: defer.Deferred[None]) -> None:
    """Pass the shared close result on to one caller's Deferred (and consume it here)."""
    if isinstance(result, Failure):
        target.errback(result)
    else:
        target.callback(None)
