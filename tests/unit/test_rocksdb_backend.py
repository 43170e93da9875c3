"""The rocksdb backend beyond the shared contract: restarts, on-disk corruption, durability modes,
cursor snapshots, snapshots (checkpoints), and how RocksDB's errors reach callers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import rocksdict
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from amaters.errors import (
    AlreadyExists,
    Corrupted,
    ErrorCategory,
    Overloaded,
    StorageError,
    StorageFull,
    StorageIOError,
    Unavailable,
)
from amaters.service import ThreadPoolService
from amaters.storage import codec
from amaters.storage.formatfile import FormatMismatch, write_format
from amaters.storage.lock import DataDirLock, DataDirLocked
from amaters.storage.rocksdb import RocksDBBackend, RocksDBSettings, column_family_name, map_error
from amaters.types import CipherBlob, Compression, WriteOp, crc32


class ManualRunner:
    """A BlockingRunner whose calls run only when the test says so."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred[Any]]] = []

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def finish_one(self) -> None:
        f, args, d = self.calls.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def finish_all(self) -> None:
        while self.calls:
            self.finish_one()


def outcome(d: Any) -> Any:
    """The result of a fired Deferred (a Failure when it failed)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def ok(d: Any) -> Any:
    result = outcome(d)
    if isinstance(result, Failure):
        result.raiseException()
    return result


def failed(d: Any, *types: type[BaseException]) -> BaseException:
    result = outcome(d)
    assert isinstance(result, Failure), f"expected a failure, got {result!r}"
    assert result.check(*types), f"expected {types}, got {result.value!r}"
    return result.value


def backend_at(data_dir: Path, runner: Any = None, **settings: Any) -> RocksDBBackend:
    clock = Clock()
    io = runner or ThreadPoolService(clock, "io", synchronous=True)  # type: ignore[arg-type]
    return RocksDBBackend(data_dir / "db", io, clock, RocksDBSettings(**settings), lock_dir=data_dir)


def opened(data_dir: Path, **settings: Any) -> RocksDBBackend:
    backend = backend_at(data_dir, **settings)
    ok(backend.open())
    return backend


def raw_db(data_dir: Path) -> Any:
    """The database opened directly with rocksdict (the backend must be closed)."""
    path = str(data_dir / "db")
    names = rocksdict.Rdict.list_cf(path, rocksdict.Options(raw_mode=True))
    families = {n: rocksdict.Options(raw_mode=True) for n in names if n != "default"}
    return rocksdict.Rdict(path, rocksdict.Options(raw_mode=True), column_families=families or None)


# -- restarts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flush_first", [False, True], ids=["from-wal", "from-sst"])
def test_restart_keeps_collections_values_and_metadata(tmp_path: Path, flush_first: bool) -> None:
    """After close and reopen, every collection, value and metadata field is back (whether the data
    was still only in the WAL or already flushed to SST files); dropped collections stay dropped."""
    backend = opened(tmp_path)
    data = b"\x00\xffciphertext"
    blob = CipherBlob(data, crc32(data), 77, Compression.LZ4, 1_700_000_000, 12)
    for name in ("users", "orders", "gone", "empty"):
        ok(backend.create_collection(name))
    ok(backend.put("users", b"\x00\x01", blob))
    ok(backend.put("orders", b"o1", CipherBlob.wrap(b"", created_at=3)))
    ok(
        backend.write_batch(
            [WriteOp.put("orders", b"o2", CipherBlob.wrap(b"two")), WriteOp.delete("orders", b"o1")]
        )
    )
    ok(backend.put("gone", b"k", CipherBlob.wrap(b"v")))
    ok(backend.drop_collection("gone"))
    if flush_first:
        ok(backend.flush())
    ok(backend.close())

    again = opened(tmp_path)
    assert ok(again.list_collections()) == ["empty", "orders", "users"]
    assert ok(again.get("users", b"\x00\x01")) == blob
    assert ok(again.get("orders", b"o1")) is None
    assert ok(again.get("orders", b"o2")).data == b"two"
    assert not again.has_collection("gone")
    ok(again.create_collection("gone"))
    assert ok(again.get("gone", b"k")) is None
    ok(again.close())


def test_close_releases_everything_even_with_open_cursors(tmp_path: Path) -> None:
    """close() closes cursors left open, so the same process can reopen the database at once."""
    backend = opened(tmp_path)
    ok(backend.create_collection("c"))
    for i in range(10):
        ok(backend.put("c", b"%d" % i, CipherBlob.wrap(b"v")))
    cursor = backend.scan("c", b"", None, None, 3)
    assert len(ok(cursor.next_chunk())) == 3
    backend.scan("c", b"", None, None, 3)  # never read
    ok(backend.close())
    assert ok(cursor.next_chunk()) == []
    again = opened(tmp_path)
    assert len(ok(again.get("c", b"5")).data) == 1
    ok(again.close())


def test_operations_before_open_and_after_close_are_unavailable(tmp_path: Path) -> None:
    """A backend that is not open answers SERVER_UNAVAILABLE (retryable), not a crash."""
    backend = backend_at(tmp_path)
    failed(backend.get("c", b"k"), Unavailable)
    failed(backend.list_collections(), Unavailable)
    ok(backend.open())
    ok(backend.create_collection("c"))
    ok(backend.close())
    error = failed(backend.put("c", b"k", CipherBlob.wrap(b"v")), Unavailable)
    assert isinstance(error, Unavailable) and error.retryable
    failed(backend.create_collection("d"), Unavailable)
    failed(backend.sync(), Unavailable)


# -- corruption and formats --------------------------------------------------------------------


def test_corrupted_value_on_disk_is_reported(tmp_path: Path) -> None:
    """A value damaged on disk reads as Corrupted (get and range); its neighbours still read."""
    backend = opened(tmp_path)
    ok(backend.create_collection("c"))
    for key in (b"a", b"b", b"c"):
        ok(backend.put("c", key, CipherBlob.wrap(b"value " + key)))
    ok(backend.close())
    db = raw_db(tmp_path)
    family = db.get_column_family(column_family_name("c"))
    record = bytearray(family[b"b"])
    record[-1] ^= 0x40  # one bit of the ciphertext
    family[b"b"] = bytes(record)
    family[b"c"] = bytes(family[b"c"])[: codec.HEADER_SIZE - 3]  # a torn record
    del family
    db.close()

    again = opened(tmp_path)
    assert ok(again.get("c", b"a")).data == b"value a"
    error = failed(again.get("c", b"b"), Corrupted)
    assert isinstance(error, Corrupted) and "collection 'c'" in error.message
    failed(again.get("c", b"c"), Corrupted)
    cursor = again.scan("c", b"", None, None, 10)
    failed(cursor.next_chunk(), Corrupted)
    assert ok(cursor.next_chunk()) == []
    ok(again.close())


def test_newer_format_inside_the_database_is_refused(tmp_path: Path) -> None:
    """A database whose stored format version is newer refuses to open, names both versions, and
    releases the data directory lock."""
    ok(opened(tmp_path).close())
    db = raw_db(tmp_path)
    db[b"amaters:format_version"] = b"2"
    db.close()
    error = failed(backend_at(tmp_path).open(), StorageError)
    assert "format 2" in str(error) and "format 1" in str(error)
    lock = DataDirLock(tmp_path)
    lock.acquire()
    lock.release()


def test_newer_format_file_is_refused_before_opening(tmp_path: Path) -> None:
    """<data_dir>/FORMAT newer than this server: the open fails before RocksDB creates anything."""
    write_format(tmp_path, 99)
    failed(backend_at(tmp_path).open(), FormatMismatch)
    assert not (tmp_path / "db").exists()


def test_new_data_dir_is_stamped_with_its_format(tmp_path: Path) -> None:
    """A new data directory gets a FORMAT file naming format 1."""
    ok(opened(tmp_path).close())
    assert '"format": 1' in (tmp_path / "FORMAT").read_text()


# -- durability modes --------------------------------------------------------------------------


def manual_backend(tmp_path: Path, sync: str) -> tuple[RocksDBBackend, ManualRunner]:
    runner = ManualRunner()
    backend = backend_at(tmp_path, runner, sync=sync)
    d = backend.open()
    runner.finish_all()
    ok(d)
    d = backend.create_collection("c")
    runner.finish_all()
    ok(d)
    return backend, runner


def close_manual(backend: RocksDBBackend, runner: ManualRunner) -> None:
    d = backend.close()
    while not d.called:
        runner.finish_all()
    ok(d)


def test_always_acknowledges_only_after_the_wal_sync(tmp_path: Path) -> None:
    """Under sync=always a put is visible at once but acknowledged only after the fsync ran."""
    backend, runner = manual_backend(tmp_path, "always")
    d = backend.put("c", b"k", CipherBlob.wrap(b"v"))
    assert not d.called
    assert [f.__name__ for f, _, _ in runner.calls] == ["_timed_sync"]
    assert ok(backend.get("c", b"k")).data == b"v"  # readable before it is durable
    runner.finish_one()
    assert ok(d) is None
    close_manual(backend, runner)


def test_always_shares_one_sync_among_waiting_writes(tmp_path: Path) -> None:
    """Writes (puts, deletes, batches) arriving during an fsync are acknowledged by the next one;
    those made before the sync thread begins share its fsync."""
    backend, runner = manual_backend(tmp_path, "always")
    first = backend.put("c", b"k0", CipherBlob.wrap(b"v"))
    before_it_began = backend.put("c", b"early", CipherBlob.wrap(b"v"))
    waiting: list[defer.Deferred[Any]] = []
    fsync = backend.group_commit._sync

    def writes_during_the_fsync() -> None:
        waiting.extend(backend.put("c", b"k%d" % i, CipherBlob.wrap(b"v")) for i in range(1, 6))
        waiting.append(backend.delete("c", b"k0"))
        waiting.append(backend.write_batch([WriteOp.put("c", b"b", CipherBlob.wrap(b"b"))]))
        backend.group_commit._sync = fsync
        fsync()

    backend.group_commit._sync = writes_during_the_fsync
    assert len(runner.calls) == 1
    runner.finish_one()
    assert first.called and before_it_began.called
    assert len(waiting) == 7 and not any(d.called for d in waiting)
    runner.finish_one()
    assert all(d.called for d in waiting)
    assert ok(waiting[5]) is True  # the delete saw k0
    stats = ok(backend.stats())["group_commit"]
    assert stats["syncs"] == 2 and stats["synced_writes"] == 9 and stats["max_group_size"] == 7
    close_manual(backend, runner)


def test_sync_at_end_of_turn_groups_the_writes_of_one_turn(tmp_path: Path) -> None:
    """With sync_at_end_of_turn (a server's setting) writes of one reactor turn share one fsync,
    which starts when the turn ends; nothing is acknowledged before that fsync finished."""
    runner = ManualRunner()
    clock = Clock()
    backend = RocksDBBackend(
        tmp_path / "db",
        runner,
        clock,
        RocksDBSettings(sync="always", sync_at_end_of_turn=True),
        lock_dir=tmp_path,
    )
    d = backend.open()
    runner.finish_all()
    ok(d)
    d = backend.create_collection("c")
    runner.finish_all()
    ok(d)
    writes = [backend.put("c", b"k%d" % i, CipherBlob.wrap(b"v")) for i in range(4)]
    assert runner.calls == []
    clock.advance(0)
    assert len(runner.calls) == 1 and not any(w.called for w in writes)
    runner.finish_one()
    assert all(ok(w) is None for w in writes)
    assert ok(backend.stats())["group_commit"]["max_group_size"] == 4
    close_manual(backend, runner)


def test_server_settings_sync_at_end_of_turn() -> None:
    """The server's settings (from the config) start group commits at the end of the turn."""
    from amaters.config import StorageConfig

    assert RocksDBSettings.from_config(StorageConfig()).sync_at_end_of_turn
    assert not RocksDBSettings().sync_at_end_of_turn


def wal_files_reused(data_dir: Path) -> int:
    """How many times RocksDB's info logs under ``data_dir`` say it took a new WAL from the files
    it kept for reuse."""
    logs = sorted((data_dir / "db").glob("LOG*"))
    return sum(path.read_text(errors="replace").count("from recycle list") for path in logs)


def write_until_reused(backend: RocksDBBackend, expected: dict[bytes, bytes], rounds: int) -> None:
    """Synced overwrites of a few hundred keys, each round more than one memtable's worth, so that
    each round rolls the WAL at least once (and the flushes between rounds free the old ones)."""
    for round_number in range(rounds):
        for i in range(300):
            key = b"k%03d" % i
            value = b"%d:%d:" % (round_number, i) + bytes(400)
            ok(backend.put("c", key, CipherBlob.wrap(value)))
            expected[key] = value
        ok(backend.flush())


@pytest.mark.parametrize("kept", [0, 2])
def test_wal_files_are_written_over_rather_than_deleted(tmp_path: Path, kept: int) -> None:
    """With storage.wal_recycle_files, a WAL no longer needed is written over by a later one
    (whose fsyncs then skip the file-size update) instead of being deleted; 0 turns that off.
    Reopening over WAL files that hold an older WAL's records reads back the latest values."""
    backend = opened(tmp_path, sync="always", write_buffer_bytes=64 * 1024, wal_recycle_files=kept)
    ok(backend.create_collection("c"))
    expected: dict[bytes, bytes] = {}
    write_until_reused(backend, expected, rounds=6)
    reused = wal_files_reused(tmp_path)
    if kept:
        assert reused > 0
    else:
        assert reused == 0
    ok(backend.close())

    again = opened(tmp_path, write_buffer_bytes=64 * 1024, wal_recycle_files=kept)
    for key, value in expected.items():
        assert ok(again.get("c", key)).data == value
    ok(again.close())


def test_server_settings_keep_two_wal_files_for_reuse() -> None:
    from amaters.config import StorageConfig

    assert RocksDBSettings.from_config(StorageConfig()).wal_recycle_files == 2
    assert RocksDBSettings.from_config(StorageConfig(wal_recycle_files=0)).wal_recycle_files == 0


@pytest.mark.parametrize("mode", ["interval", "none"])
def test_interval_and_none_acknowledge_without_syncing(tmp_path: Path, mode: str) -> None:
    """Under interval and none a write is acknowledged once applied; only sync() fsyncs."""
    backend, runner = manual_backend(tmp_path, mode)
    assert ok(backend.put("c", b"k", CipherBlob.wrap(b"v"))) is None
    assert ok(backend.delete("c", b"k")) is True
    assert runner.calls == []
    d = backend.sync()
    assert len(runner.calls) == 1 and not d.called
    runner.finish_one()
    assert ok(d) is None
    close_manual(backend, runner)


def test_sync_with_nothing_new_does_not_fsync(tmp_path: Path) -> None:
    """sync() after a completed fsync with no write since returns at once (an idle server under
    sync=interval does not fsync every tick); the next write makes sync() fsync again."""
    backend, runner = manual_backend(tmp_path, "interval")
    assert ok(backend.sync()) is None
    assert runner.calls == []
    ok(backend.put("c", b"k", CipherBlob.wrap(b"v")))
    d = backend.sync()
    runner.finish_one()
    ok(d)
    assert ok(backend.sync()) is None
    assert runner.calls == []
    ok(backend.put("c", b"k2", CipherBlob.wrap(b"v")))
    assert not backend.sync().called
    runner.finish_all()
    close_manual(backend, runner)


def test_close_waits_for_pending_syncs(tmp_path: Path) -> None:
    """close() lets queued group commits finish before closing the database."""
    backend, runner = manual_backend(tmp_path, "always")
    writes = [backend.put("c", b"%d" % i, CipherBlob.wrap(b"v")) for i in range(3)]
    closing = backend.close()
    assert not closing.called
    runner.finish_all()
    runner.finish_all()
    assert all(ok(d) is None for d in writes)
    runner.finish_all()
    assert ok(closing) is None


def test_point_reads_in_pool(tmp_path: Path) -> None:
    """With point_reads_in_pool a get runs in the io pool instead of on the caller's thread."""
    runner = ManualRunner()
    backend = backend_at(tmp_path, runner, sync="none", point_reads_in_pool=True)
    d = backend.open()
    runner.finish_all()
    ok(d)
    d = backend.create_collection("c")
    runner.finish_all()
    ok(d)
    ok(backend.put("c", b"k", CipherBlob.wrap(b"v")))
    got = backend.get("c", b"k")
    assert not got.called
    runner.finish_one()
    assert ok(got).data == b"v"
    close_manual(backend, runner)


# -- cursors -----------------------------------------------------------------------------------


def test_cursor_sees_the_collection_as_of_scan(tmp_path: Path) -> None:
    """Writes, deletes and overwrites after scan() are invisible to the cursor (a snapshot)."""
    backend = opened(tmp_path)
    ok(backend.create_collection("c"))
    for i in range(10):
        ok(backend.put("c", b"k%d" % i, CipherBlob.wrap(b"old")))
    cursor = backend.scan("c", b"", None, None, 4)
    first = ok(cursor.next_chunk())
    ok(backend.put("c", b"k5", CipherBlob.wrap(b"new")))
    ok(backend.delete("c", b"k7"))
    ok(backend.put("c", b"k55", CipherBlob.wrap(b"inserted")))
    rest: list[Any] = []
    while chunk := ok(cursor.next_chunk()):
        rest.extend(chunk)
    entries = first + rest
    assert [k for k, _ in entries] == [b"k%d" % i for i in range(10)]
    assert all(v.data == b"old" for _, v in entries)
    ok(backend.close())


def test_cursor_survives_dropping_its_collection(tmp_path: Path) -> None:
    """A cursor keeps reading its snapshot after the collection is dropped; close still works."""
    backend = opened(tmp_path)
    ok(backend.create_collection("c"))
    for i in range(6):
        ok(backend.put("c", b"%d" % i, CipherBlob.wrap(b"v")))
    cursor = backend.scan("c", b"", None, None, 2)
    assert len(ok(cursor.next_chunk())) == 2
    ok(backend.drop_collection("c"))
    assert len(ok(cursor.next_chunk())) == 2
    ok(backend.close())
    ok(opened(tmp_path).close())


def test_chunks_stop_at_the_byte_budget(tmp_path: Path) -> None:
    """A chunk holds at most range_chunk_bytes (a larger single entry comes alone), so big values
    never make a chunk of chunk_size entries."""
    backend = opened(tmp_path, range_chunk_bytes=2500)
    ok(backend.create_collection("c"))
    for i in range(7):
        ok(backend.put("c", b"%d" % i, CipherBlob.wrap(b"x" * 1000)))
    ok(backend.put("c", b"9", CipherBlob.wrap(b"x" * 10_000)))
    cursor = backend.scan("c", b"", None, None, 100)
    sizes = []
    while chunk := ok(cursor.next_chunk()):
        sizes.append(len(chunk))
    assert sizes == [2, 2, 2, 1, 1]
    ok(backend.close())


def test_a_scan_does_not_fill_the_block_cache(tmp_path: Path) -> None:
    """RANGE reads bypass the block cache (fill_cache=False): a full scan of data on disk leaves the
    cache as it was, while point reads still fill it."""
    backend = opened(tmp_path, sync="none")
    ok(backend.create_collection("c"))
    for i in range(2000):
        ok(backend.put("c", b"%05d" % i, CipherBlob.wrap(b"x" * 1000)))
    ok(backend.flush())
    ok(backend.close())
    backend = opened(tmp_path, sync="none")

    def usage() -> int:
        return int(ok(backend.stats())["block_cache_usage_bytes"])

    before = usage()
    cursor = backend.scan("c", b"", None, None, 256)
    seen = 0
    while chunk := ok(cursor.next_chunk()):
        seen += len(chunk)
    assert seen == 2000
    assert usage() - before < 100_000  # the data is 2 MB
    for i in range(0, 2000, 10):
        assert ok(backend.get("c", b"%05d" % i)) is not None
    assert usage() - before > 500_000
    ok(backend.close())


def test_reading_a_chunk_twice_at_once_is_refused(tmp_path: Path) -> None:
    """next_chunk before the previous chunk arrived fails instead of racing on the iterator."""
    runner = ManualRunner()
    backend = backend_at(tmp_path, runner, sync="none")
    d = backend.open()
    runner.finish_all()
    ok(d)
    d = backend.create_collection("c")
    runner.finish_all()
    ok(d)
    ok(backend.put("c", b"k", CipherBlob.wrap(b"v")))
    cursor = backend.scan("c", b"", None, None, 10)
    first = cursor.next_chunk()
    failed(cursor.next_chunk(), StorageError)
    runner.finish_one()
    assert len(ok(first)) == 1
    close_manual(backend, runner)


# -- snapshots and stats -----------------------------------------------------------------------


def test_snapshot_is_an_openable_copy(tmp_path: Path) -> None:
    """snapshot(dest) writes a checkpoint that opens as a database with the same data; writes
    after the snapshot are not in it; an existing destination is refused."""
    backend = opened(tmp_path / "live")
    ok(backend.create_collection("c"))
    ok(backend.put("c", b"before", CipherBlob.wrap(b"1")))
    ok(backend.snapshot(str(tmp_path / "snap" / "db")))
    ok(backend.put("c", b"after", CipherBlob.wrap(b"2")))
    failed(backend.snapshot(str(tmp_path / "snap" / "db")), AlreadyExists)
    ok(backend.close())

    write_format(tmp_path / "snap", 1)
    copy = opened(tmp_path / "snap")
    assert ok(copy.get("c", b"before")).data == b"1"
    assert ok(copy.get("c", b"after")) is None
    ok(copy.close())


def test_stats_report_storage_gauges(tmp_path: Path) -> None:
    """stats() carries sizes, the block cache, the sync mode and group-commit counters."""
    backend = opened(tmp_path, block_cache_bytes=1 << 20)
    ok(backend.create_collection("c"))
    for i in range(5):
        ok(backend.put("c", b"%d" % i, CipherBlob.wrap(b"v" * 100)))
    ok(backend.flush())
    stats = ok(backend.stats())
    assert stats["keys"] == {"c": 5}
    assert stats["sst_bytes"] > 0 and stats["bytes"] >= stats["sst_bytes"]
    assert stats["block_cache_capacity_bytes"] == 1 << 20
    assert stats["sync_mode"] == "always"
    assert stats["group_commit"]["synced_writes"] >= 5
    assert stats["background_errors"] == 0 and stats["write_stopped"] is False
    ok(backend.close())


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "retryable"),
    [
        ("IO error: No space left on device: While appending to file: /d/000012.log", StorageFull, False),
        ("IO error: While fsync: a file descriptor: Input/output error", StorageIOError, True),
        ("Corruption: block checksum mismatch: stored = 1, computed = 2", Corrupted, False),
        ("Result incomplete: Write stall", Overloaded, True),
        (
            "IO error: lock hold by current process, acquire time 1: /d/LOCK: No locks available",
            DataDirLocked,
            False,
        ),
        ("Invalid argument: Column family not found", StorageError, False),
    ],
)
def test_rocksdb_errors_map_to_wire_errors(text: str, kind: type[StorageError], retryable: bool) -> None:
    """RocksDB's status texts become the matching error class; RocksDB's text (file paths) stays
    out of everything sent to clients and is kept as the cause for the server log."""
    original = Exception(text)
    error = map_error(original, "writing to collection 'c'")
    assert type(error) is kind
    assert error.retryable is retryable
    assert "/d/" not in error.message and error.details is None
    assert error.__cause__ is original
    assert error.message.startswith("writing to collection 'c'")
    if kind is StorageError:
        assert error.category == ErrorCategory.SERVER_ERROR


def test_closed_database_maps_to_unavailable() -> None:
    """rocksdict's DbClosedError becomes SERVER_UNAVAILABLE."""
    assert isinstance(map_error(rocksdict.DbClosedError("closed"), "reading"), Unavailable)


# -- real threads ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_group_commit_with_a_real_pool(tmp_path: Path) -> None:
    """With the real reactor and io pool, 200 concurrent writes are all acknowledged, readable,
    and share fsyncs (fewer syncs than writes; at most one sync at a time by construction)."""
    from twisted.internet import reactor

    io = ThreadPoolService(reactor, "io", 0, 4)  # type: ignore[arg-type]
    io.startService()
    backend = RocksDBBackend(tmp_path / "db", io, reactor, RocksDBSettings(sync="always"), lock_dir=tmp_path)  # type: ignore[arg-type]
    try:
        await backend.open()
        await backend.create_collection("c")
        writes = [backend.put("c", b"%04d" % i, CipherBlob.wrap(b"v%d" % i)) for i in range(200)]
        await defer.gatherResults(writes, consumeErrors=True)
        stats = (await backend.stats())["group_commit"]
        assert stats["synced_writes"] >= 200
        assert stats["syncs"] < 200
        cursor = backend.scan("c", b"", None, None, 64)
        seen = 0
        while chunk := await cursor.next_chunk():
            seen += len(chunk)
        assert seen == 200
    finally:
        await backend.close()
        await io.stopService()


def test_build_backend_puts_rocksdb_under_the_data_dir(tmp_path: Path) -> None:
    """storage.backend=rocksdb (the default) builds a RocksDB backend at <data_dir>/db, locked at
    <data_dir>/LOCK, behind the retry policy of [retry]; nothing is opened yet."""
    from twisted.internet.testing import MemoryReactorClock

    from amaters.config import load_config
    from amaters.storage import build_backend, innermost
    from amaters.storage.retry import RetryingBackend

    config = load_config(None, [f"server.data_dir={tmp_path}", "retry.max_attempts=5"], {})
    assert config.storage.backend == "rocksdb"
    pools = type("Pools", (), {"io": ThreadPoolService(Clock(), "io", synchronous=True)})()  # type: ignore[arg-type]
    backend = build_backend(config, MemoryReactorClock(), pools)
    assert isinstance(backend, RetryingBackend) and backend.policy.max_attempts == 5
    inner = innermost(backend)
    assert isinstance(inner, RocksDBBackend)
    assert inner.path == tmp_path / "db"
    assert inner.settings.sync == "always"
    assert list(tmp_path.iterdir()) == []


def test_mapped_errors_do_not_keep_frames_alive() -> None:
    """The RocksDB exception kept as the cause has no traceback: its frames would hold column
    family handles or iterators, and rocksdict keeps the database open while any of them lives."""
    try:
        raise Exception("IO error: While fsync: Input/output error")
    except Exception as e:
        error = map_error(e, "syncing")
    assert error.__cause__ is not None and error.__cause__.__traceback__ is None


def test_conditional_write_checks_and_writes_at_once_and_waits_only_for_the_sync(tmp_path: Path) -> None:
    """compare_and_write under sync=always: the check and the write happen in the call itself, on
    the calling (reactor) thread, and only the group-commit fsync runs in the pool: it is
    acknowledged once that sync ran, while other writes go on; a conditional write whose check
    fails answers at once, without waiting for a sync."""
    from amaters.types import Expect

    backend, runner = manual_backend(tmp_path, "always")
    old = CipherBlob.wrap(b"old")
    first = backend.put("c", b"k", old)
    runner.finish_all()
    ok(first)
    d = backend.compare_and_write([Expect("c", b"k", old)], [WriteOp.put("c", b"k", CipherBlob.wrap(b"new"))])
    assert ok(backend.get("c", b"k")).data == b"new"  # applied in the call
    assert not d.called and [f.__name__ for f, _, _ in runner.calls] == ["_timed_sync"]
    other = backend.put("c", b"j", CipherBlob.wrap(b"j"))
    stale = backend.compare_and_write(
        [Expect("c", b"k", old)], [WriteOp.put("c", b"k", CipherBlob.wrap(b"x"))]
    )
    assert ok(stale).changed == {("c", b"k")}  # answered at once
    runner.finish_all()
    assert ok(d).applied and ok(other) is None
    assert ok(backend.get("c", b"k")).data == b"new"
    close_manual(backend, runner)


def test_thousands_of_collection_changes_queued_behind_one_all_finish(tmp_path: Path) -> None:
    """Collection changes wait for each other on one lock; a queue of thousands that each finish
    at once (the collection already exists) is worked through without the stack growing with it
    (Twisted's DeferredLock ran out of stack after about 125 of them, and stayed held for good)."""
    backend = opened(tmp_path)
    ok(backend.create_collection("held"))
    gate = backend._ddl.acquire()
    assert gate.called
    queued = [backend.create_collection("a") for _ in range(3000)]
    assert not any(d.called for d in queued)
    backend._ddl.release()
    assert [ok(d) for d in queued] == [True] + [False] * 2999
    assert ok(backend.drop_collection("a")) is True
    assert not backend._ddl.locked
