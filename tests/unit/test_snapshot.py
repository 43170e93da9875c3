"""Snapshots of a real RocksDB store: create, verify, restore, retention and the scheduled service.

Every test writes real data through :class:`RocksDBBackend` in a temporary directory with
synchronous pools and a ``task.Clock``, so each Deferred has fired when its call returns.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zstandard
from storage_helpers import open_backend, result_of, run, sync_pools
from twisted.internet import defer
from twisted.internet.task import Clock

from amaters import __version__
from amaters.config import Config, load_config
from amaters.errors import InvalidOperation
from amaters.storage import formatfile
from amaters.storage.memory import MemoryBackend
from amaters.storage.rocksdb import FORMAT_VERSION, RocksDBBackend
from amaters.storage.snapshot import (
    MANIFEST_NAME,
    SnapshotCorrupted,
    SnapshotError,
    SnapshotInfo,
    SnapshotScheduler,
    apply_retention,
    create_snapshot,
    list_archives,
    pack_blocking,
    read_manifest,
    restore_archive,
    snapshot_dir,
    verify_archive,
)
from amaters.types import CipherBlob, Compression, WriteOp, crc32

# -- helpers -----------------------------------------------------------------------------------


def make_config(data_dir: Path, *settings: str) -> Config:
    return load_config(None, [f"server.data_dir={data_dir}", "grpc.enabled=false", *settings], {})


def blob(data: bytes, **kw: Any) -> CipherBlob:
    return CipherBlob.wrap(data, **kw)


def fill(backend: RocksDBBackend) -> None:
    """Three collections with varied values and metadata, one of them emptied again."""
    for name in ("users", "docs", "empty"):
        result_of(backend.create_collection(name))
    for i in range(300):
        result_of(
            backend.put("users", b"user:%04d" % i, blob(os.urandom(64 + i), created_at=1_700_000_000 + i))
        )
    compressed = zstandard.ZstdCompressor().compress(b"x" * 5000)
    result_of(
        backend.put(
            "docs",
            b"zstd",
            CipherBlob(
                data=compressed,
                checksum=crc32(compressed),
                size=5000,
                compression=Compression.ZSTD,
                created_at=42,
                version=7,
            ),
        )
    )
    result_of(
        backend.write_batch(
            [WriteOp.put("docs", b"doc:%d" % i, blob(b"doc %d" % i, version=i)) for i in range(50)]
        )
    )
    result_of(backend.put("empty", b"gone", blob(b"soon deleted")))
    result_of(backend.delete("empty", b"gone"))
    result_of(backend.delete("users", b"user:0000"))


def dump(backend: RocksDBBackend) -> dict[str, list[tuple[bytes, CipherBlob]]]:
    """Every key and value (with its metadata) of every collection."""
    everything: dict[str, list[tuple[bytes, CipherBlob]]] = {}
    for name in result_of(backend.list_collections()):
        cursor = backend.scan(name, b"", None, None, 1000)
        entries: list[tuple[bytes, CipherBlob]] = []
        while chunk := result_of(cursor.next_chunk()):
            entries.extend(chunk)
        everything[name] = entries
    return everything


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[RocksDBBackend, Config]]:
    """An open RocksDB store with data, and a config for its data dir (no compression)."""
    data_dir = tmp_path / "data"
    backend = open_backend(data_dir)
    fill(backend)
    yield backend, make_config(data_dir, "snapshot.compression=none")
    result_of(backend.close())


def snapshot(backend: RocksDBBackend, config: Config, when: float = 1_750_000_000.0) -> SnapshotInfo:
    info: SnapshotInfo = run(create_snapshot(backend, config, sync_pools(), now=lambda: when))
    return info


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# -- create, verify, restore -------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_snapshot_restores_identical_data(tmp_path: Path, compression: str) -> None:
    """A snapshot restored into a new directory opens as a store with exactly the same collections,
    keys, values and metadata; writes made after the snapshot are not in it."""
    data_dir = tmp_path / "data"
    backend = open_backend(data_dir)
    fill(backend)
    config = make_config(data_dir, f"snapshot.compression={compression}")
    info = snapshot(backend, config)
    expected = dump(backend)
    result_of(backend.put("users", b"after", blob(b"written after the snapshot")))
    result_of(backend.close())

    assert info.path.parent == data_dir / "snapshots"
    assert info.name == "amaters-20250615T150640.000Z" + (".tar.zst" if compression == "zstd" else ".tar")
    verify_archive(info.path)
    restored_dir = tmp_path / "restored"
    manifest = restore_archive(info.path, restored_dir)
    assert manifest.collections == {"users": 299, "docs": 51, "empty": 0}

    restored = open_backend(restored_dir)
    try:
        assert dump(restored) == expected
        assert result_of(restored.get("users", b"after")) is None
    finally:
        result_of(restored.close())
    assert formatfile.read_format(restored_dir) == formatfile.DataDirFormat(
        FORMAT_VERSION, f"amaters {__version__}"
    )


def test_manifest_describes_the_snapshot(store: tuple[RocksDBBackend, Config]) -> None:
    """The manifest is the first member and records format, versions, UTC time, key counts and the
    size and sha256 of every file, which match the files in the archive."""
    backend, config = store
    info = snapshot(backend, config, when=1_750_000_000.25)
    with tarfile.open(info.path) as tar:
        members = tar.getmembers()
        assert members[0].name == MANIFEST_NAME
        raw = json.loads(tar.extractfile(members[0]).read())  # type: ignore[union-attr]
        contents = {m.name: tar.extractfile(m).read() for m in members[1:]}  # type: ignore[union-attr]
    assert raw["kind"] == "amaters-snapshot"
    assert raw["format"] == FORMAT_VERSION
    assert raw["amaters_version"] == __version__
    assert raw["created_at"] == "2025-06-15T15:06:40.250Z"
    assert raw["source"] == "checkpoint"
    assert raw["collections"] == [
        {"name": "docs", "keys": 51},
        {"name": "empty", "keys": 0},
        {"name": "users", "keys": 299},
    ]
    import hashlib

    files = {f["path"]: f for f in raw["files"]}
    assert set(files) == set(contents)
    assert "FORMAT" in files and any(p.startswith("db/") and p.endswith(".sst") for p in files)
    assert not any(p.endswith(("/LOCK", "/LOG")) for p in files)
    for path, data in contents.items():
        assert files[path]["size"] == len(data)
        assert files[path]["sha256"] == hashlib.sha256(data).hexdigest()
    assert info.manifest == read_manifest(info.path)
    sidecar = info.path.with_name(info.path.name + ".sha256").read_text()
    assert sidecar == f"{info.sha256}  {info.name}\n"
    assert hashlib.sha256(info.path.read_bytes()).hexdigest() == info.sha256
    assert info.size == info.path.stat().st_size


def test_snapshots_at_the_same_instant_get_distinct_names(store: tuple[RocksDBBackend, Config]) -> None:
    """Two snapshots taken in the same millisecond never overwrite each other."""
    backend, config = store
    first = snapshot(backend, config, when=1_000.0)
    second = snapshot(backend, config, when=1_000.0)
    assert first.name == "amaters-19700101T001640.000Z.tar"
    assert second.name == "amaters-19700101T001640.001Z.tar"
    assert [s.name for s in list_archives(snapshot_dir(config))] == [first.name, second.name]


def test_memory_backend_cannot_snapshot(tmp_path: Path) -> None:
    """Backends without files refuse with InvalidOperation and leave no work files behind."""
    config = make_config(tmp_path / "data", "storage.backend=memory")
    backend = MemoryBackend()
    result_of(backend.open())
    with pytest.raises(InvalidOperation):
        run(create_snapshot(backend, config, sync_pools()))
    assert list(snapshot_dir(config).iterdir()) == []


def test_progress_is_reported_per_stage(store: tuple[RocksDBBackend, Config]) -> None:
    """Progress callbacks name each stage and end each byte-counted stage at its total."""
    backend, config = store
    seen: list[tuple[int, int, str]] = []
    run(
        create_snapshot(
            backend, config, sync_pools(), lambda d, t, s: seen.append((d, t, s)), now=lambda: 5.0
        )
    )
    stages = [s for _, _, s in seen]
    assert stages[0] == "checkpoint"
    assert {"counting keys", "hashing", "packing"} <= set(stages)
    last_packing = [(d, t) for d, t, s in seen if s == "packing"][-1]
    assert last_packing[0] == last_packing[1] > 0


# -- damage ------------------------------------------------------------------------------------


def test_tampered_file_fails_verify_naming_the_file(store: tuple[RocksDBBackend, Config]) -> None:
    """A flipped byte inside one archived file fails verification with an error naming that file."""
    backend, config = store
    info = snapshot(backend, config)
    with tarfile.open(info.path) as tar:
        victim = next(m for m in tar.getmembers() if m.name.endswith(".sst"))
    flip_byte(info.path, victim.offset_data + victim.size // 2)
    # The checksum file catches it first, naming the archive ...
    with pytest.raises(
        SnapshotCorrupted, match=re.escape(f"does not match its checksum file {info.name}.sha256")
    ):
        verify_archive(info.path)
    # ... and without it, the manifest check names the damaged file.
    info.path.with_name(info.name + ".sha256").unlink()
    with pytest.raises(
        SnapshotCorrupted, match=re.escape(f"{info.path}: {victim.name} fails its sha256 check")
    ):
        verify_archive(info.path)


def test_damaged_zstd_archive_fails_verify(tmp_path: Path) -> None:
    """A damaged compressed archive fails verification with a clear error naming the archive."""
    data_dir = tmp_path / "data"
    backend = open_backend(data_dir)
    fill(backend)
    info = snapshot(backend, make_config(data_dir))
    result_of(backend.close())
    info.path.with_name(info.name + ".sha256").unlink()
    flip_byte(info.path, info.size // 2)
    with pytest.raises(SnapshotCorrupted) as caught:
        verify_archive(info.path)
    assert str(info.path) in caught.value.message
    assert "damaged" in caught.value.message or "sha256" in caught.value.message


def test_truncated_archive_fails_verify(store: tuple[RocksDBBackend, Config]) -> None:
    """An archive cut short is reported as damaged or missing files, never accepted."""
    backend, config = store
    info = snapshot(backend, config)
    info.path.with_name(info.name + ".sha256").unlink()
    with info.path.open("r+b") as f:
        f.truncate(info.size // 2)
    with pytest.raises(SnapshotCorrupted, match=re.escape(str(info.path))):
        verify_archive(info.path)


def test_not_a_snapshot_archive(tmp_path: Path) -> None:
    """A tar whose first member is not the manifest is refused; so is a missing archive."""
    path = tmp_path / "other.tar"
    with tarfile.open(path, "w") as tar:
        data = b"hello"
        member = tarfile.TarInfo("readme.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    with pytest.raises(SnapshotCorrupted, match="not an amaters snapshot"):
        verify_archive(path)
    with pytest.raises(SnapshotError, match="no snapshot archive"):
        verify_archive(tmp_path / "missing.tar")


def test_restore_checks_key_counts(store: tuple[RocksDBBackend, Config], tmp_path: Path) -> None:
    """A manifest whose key counts disagree with the restored database fails the restore, and the
    target directory is not created."""
    backend, config = store
    info = snapshot(backend, config)
    unpacked = tmp_path / "unpacked"
    restore_archive(info.path, unpacked)
    lying = pack_blocking(
        unpacked, tmp_path / "lies", 1.0, "none", FORMAT_VERSION, "checkpoint", {"users": 1}
    )
    target = tmp_path / "target"
    with pytest.raises(SnapshotCorrupted, match="the restored database holds 3 collections, 350 keys"):
        restore_archive(lying.path, target)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if ".restoring-" in p.name] == []


# -- restore targets ---------------------------------------------------------------------------


def test_restore_refuses_a_non_empty_directory(store: tuple[RocksDBBackend, Config], tmp_path: Path) -> None:
    """Restoring into a directory that holds anything is refused and the directory is untouched;
    an existing empty directory is fine."""
    backend, config = store
    info = snapshot(backend, config)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious").write_text("keep me")
    with pytest.raises(SnapshotError, match=r"refusing to restore into .* not empty"):
        restore_archive(info.path, busy)
    assert [p.name for p in busy.iterdir()] == ["precious"]

    empty = tmp_path / "empty"
    empty.mkdir()
    restore_archive(info.path, empty)
    assert sorted(p.name for p in empty.iterdir()) == ["FORMAT", "db"]


def test_failed_restore_leaves_nothing(store: tuple[RocksDBBackend, Config], tmp_path: Path) -> None:
    """A corrupted archive is refused before anything is written: no target, no staging files."""
    backend, config = store
    info = snapshot(backend, config)
    info.path.with_name(info.name + ".sha256").unlink()
    with tarfile.open(info.path) as tar:
        victim = tar.getmembers()[-1]
    flip_byte(info.path, victim.offset_data)
    target = tmp_path / "target"
    with pytest.raises(SnapshotCorrupted):
        restore_archive(info.path, target)
    assert not target.exists()
    assert not any(".restoring-" in p.name for p in tmp_path.iterdir())
    # An existing empty directory (say, a mounted volume) stages inside itself, and stays empty.
    target.mkdir()
    with pytest.raises(SnapshotCorrupted):
        restore_archive(info.path, target)
    assert list(target.iterdir()) == []


# -- listing and retention ---------------------------------------------------------------------


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    """With snapshot.keep = 2 only the two newest archives (and their checksum files) remain."""
    data_dir = tmp_path / "data"
    backend = open_backend(data_dir)
    fill(backend)
    config = make_config(data_dir, "snapshot.keep=2", "snapshot.compression=none")
    made = [snapshot(backend, config, when=1_000.0 + i) for i in range(4)]
    result_of(backend.close())
    remaining = sorted(p.name for p in snapshot_dir(config).iterdir())
    assert remaining == sorted(
        [made[2].name, made[2].name + ".sha256", made[3].name, made[3].name + ".sha256"]
    )
    assert apply_retention(snapshot_dir(config), 0) == []  # 0 keeps everything


def test_list_reports_unreadable_archives(store: tuple[RocksDBBackend, Config]) -> None:
    """Listing shows each archive with its manifest, and an archive it cannot read with the reason."""
    backend, config = store
    good = snapshot(backend, config, when=10.0)
    broken = snapshot_dir(config) / "amaters-19700101T000020.000Z.tar"
    broken.write_bytes(b"not a tar at all" * 100)
    (snapshot_dir(config) / "unrelated.txt").write_text("ignored")
    listed = list_archives(snapshot_dir(config))
    assert [s.name for s in listed] == [good.name, broken.name]
    assert listed[0].manifest == good.manifest and listed[0].sha256 == good.sha256
    assert listed[1].manifest is None and listed[1].problem


# -- the scheduled service ---------------------------------------------------------------------


def test_scheduler_survives_a_failed_snapshot(store: tuple[RocksDBBackend, Config]) -> None:
    """A snapshot that raises is logged and counted; the timer keeps running and the next tick
    writes a real snapshot."""
    backend, base = store
    config = make_config(base.data_dir, "snapshot.interval=60", "snapshot.compression=none")
    clock = Clock()
    calls: list[int] = []

    async def flaky(*args: Any, **kwargs: Any) -> SnapshotInfo:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        result: SnapshotInfo = await create_snapshot(*args, **kwargs)
        return result

    scheduler = SnapshotScheduler(backend, config, sync_pools(), clock, create=flaky)
    result_of(scheduler.startService())
    clock.advance(59)
    assert calls == []
    clock.advance(1)
    assert scheduler.failures == 1 and scheduler.last_error == "disk on fire"
    clock.advance(60)
    assert scheduler.successes == 1 and scheduler.last_error is None and scheduler.last_success_at == 120
    assert scheduler.last_snapshot is not None and scheduler.last_snapshot.path.exists()
    assert scheduler.last_snapshot.name == "amaters-19700101T000200.000Z.tar"
    result_of(scheduler.stopService())
    clock.advance(600)
    assert len(calls) == 2


def test_scheduler_never_overlaps_and_stop_waits(store: tuple[RocksDBBackend, Config]) -> None:
    """While a snapshot runs, due ticks do not start another; stop waits for the running one."""
    backend, base = store
    config = make_config(base.data_dir, "snapshot.interval=10")
    clock = Clock()
    pending: list[defer.Deferred[None]] = []

    def slow(*args: Any, **kwargs: Any) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        pending.append(d)
        return d

    scheduler = SnapshotScheduler(backend, config, sync_pools(), clock, create=slow)
    scheduler.startService()
    clock.advance(10)
    clock.advance(10)
    clock.advance(10)
    assert len(pending) == 1
    stopped = scheduler.stopService()
    assert not stopped.called
    pending[0].callback(None)  # type: ignore[arg-type]
    assert stopped.called
    clock.advance(100)
    assert len(pending) == 1


def test_scheduler_cleans_leftovers_on_start(store: tuple[RocksDBBackend, Config]) -> None:
    """Work directories and partial archives of a crashed snapshot are removed when the service
    starts; finished archives stay."""
    backend, base = store
    config = make_config(base.data_dir, "snapshot.interval=10")
    kept = snapshot(backend, config)
    directory = snapshot_dir(config)
    (directory / ".tmp-crashed" / "db").mkdir(parents=True)
    (directory / "amaters-19700101T000000.000Z.tar.zst.partial").write_bytes(b"half")
    scheduler = SnapshotScheduler(backend, config, sync_pools(), Clock())
    result_of(scheduler.startService())
    result_of(scheduler.stopService())
    assert sorted(p.name for p in directory.iterdir()) == sorted([kept.name, kept.name + ".sha256"])


def test_on_reactor_moves_progress_to_the_reactor_thread() -> None:
    """Progress reported from a pool thread is handed to reactor.callFromThread."""
    import threading

    from amaters.storage.snapshot import on_reactor

    handed: list[tuple[Any, ...]] = []
    called: list[tuple[int, int, str]] = []
    reactor = SimpleNamespace(callFromThread=lambda f, *args: handed.append((f, *args)))
    relay = on_reactor(reactor, lambda d, t, s: called.append((d, t, s)))
    worker = threading.Thread(target=relay, args=(1, 2, "packing"))
    worker.start()
    worker.join()
    assert called == [] and len(handed) == 1
    f, *args = handed[0]
    f(*args)
    assert called == [(1, 2, "packing")]


@pytest.mark.parametrize(
    ("settings", "wired"),
    [
        (("snapshot.interval=3600",), True),
        ((), False),
    ],
)
def test_service_tree_wires_the_scheduler(tmp_path: Path, settings: tuple[str, ...], wired: bool) -> None:
    """The "snapshots" service is in the tree, after the flusher and before the ops site, only for
    the rocksdb backend with snapshot.interval > 0; wiring does no I/O."""
    from twisted.internet.testing import MemoryReactorClock

    from amaters.tap import build_service

    config = make_config(tmp_path / "data", *settings)
    root = build_service(config, MemoryReactorClock(), synchronous_pools=True)
    names = [child.name for child in root]
    assert ("snapshots" in names) is wired
    if wired:
        assert names.index("flusher") < names.index("snapshots") < names.index("web")
        scheduler = root.getServiceNamed("snapshots")
        assert isinstance(scheduler, SnapshotScheduler) and scheduler.interval == 3600
    assert not (tmp_path / "data").exists()


def test_scheduled_snapshots_need_rocksdb(tmp_path: Path) -> None:
    """snapshot.interval with the memory backend is a configuration error, not a silent no-op."""
    from amaters.config import ConfigError

    with pytest.raises(ConfigError, match=r"scheduled snapshots need storage\.backend = rocksdb"):
        make_config(tmp_path / "data", "snapshot.interval=3600", "storage.backend=memory")
