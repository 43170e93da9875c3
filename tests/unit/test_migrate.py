"""The data directory's format file and ``amaters migrate`` on real RocksDB fixtures.

The format-0 fixture is built here the way amaters wrote data directories before the format file
existed: ``<data_dir>/db`` with a ``c:<collection>`` column family per collection holding codec
records, no ``FORMAT`` file and no in-database format marker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import rocksdict
from storage_helpers import open_backend, result_of, run, sync_pools

from amaters import __version__
from amaters.config import Config, load_config
from amaters.errors import Corrupted
from amaters.storage import codec, formatfile
from amaters.storage.formatfile import FormatMismatch
from amaters.storage.lock import DataDirLock, DataDirLocked
from amaters.storage.migrate import (
    CURRENT_FORMAT,
    MIGRATIONS,
    Migration,
    MigrationError,
    describe,
    migrate_data_dir,
    plan,
)
from amaters.storage.rocksdb import FORMAT_VERSION, RocksDBBackend
from amaters.storage.snapshot import read_manifest, restore_archive, snapshot_dir
from amaters.types import CipherBlob

FIXTURE: dict[str, dict[bytes, CipherBlob]] = {
    "users": {
        b"user:%03d" % i: CipherBlob.wrap(b"ciphertext %d" % i, created_at=1000 + i) for i in range(40)
    },
    "docs": {b"doc:1": CipherBlob.wrap(os.urandom(300), version=3), b"doc:2": CipherBlob.wrap(b"")},
    "empty": {},
}


def make_config(data_dir: Path) -> Config:
    return load_config(None, [f"server.data_dir={data_dir}"], {})


def write_format_0(data_dir: Path, extra_families: tuple[str, ...] = (), bad_record: bool = False) -> None:
    """A format-0 data directory: collections as column families, codec records, no FORMAT file,
    no format marker."""
    db_path = data_dir / "db"
    db_path.mkdir(parents=True)
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    db = rocksdict.Rdict(str(db_path), options)
    for name in [*(f"c:{c}" for c in FIXTURE), *extra_families]:
        family = db.create_column_family(name, rocksdict.Options(raw_mode=True))
        for key, value in FIXTURE.get(name[2:], {}).items():
            family.put(key, codec.encode(value))
        if bad_record and name == "c:docs":
            family.put(b"doc:broken", codec.encode(CipherBlob.wrap(b"fine"))[:-1] + b"X")
        del family
    db.close()


def read_everything(backend: RocksDBBackend) -> dict[str, dict[bytes, CipherBlob]]:
    everything: dict[str, dict[bytes, CipherBlob]] = {}
    for name in result_of(backend.list_collections()):
        cursor = backend.scan(name, b"", None, None, 1000)
        entries: dict[bytes, CipherBlob] = {}
        while chunk := result_of(cursor.next_chunk()):
            entries.update(chunk)
        everything[name] = entries
    return everything


# -- the format file ---------------------------------------------------------------------------


def test_server_refuses_a_format_0_directory(tmp_path: Path) -> None:
    """A database without a FORMAT file is format 0: the backend refuses it and says to migrate."""
    write_format_0(tmp_path)
    with pytest.raises(FormatMismatch, match=r"format 0 .*older than format 1.*amaters migrate"):
        open_backend(tmp_path)
    assert not formatfile.format_path(tmp_path).exists()


def test_server_refuses_a_newer_format_naming_both(tmp_path: Path) -> None:
    """A FORMAT newer than this amaters reads is refused before the database is touched, naming
    both formats, the version that wrote it and the way forward."""
    backend = open_backend(tmp_path)
    result_of(backend.close())
    formatfile.format_path(tmp_path).write_text('{"format": 7, "written_by": "amaters 9.0.0"}\n')
    before = sorted(p.name for p in (tmp_path / "db").iterdir())
    with pytest.raises(FormatMismatch) as caught:
        open_backend(tmp_path)
    message = caught.value.message
    assert "on-disk format 7 (written by amaters 9.0.0)" in message
    assert f"format {FORMAT_VERSION} that amaters {__version__} reads" in message
    assert "restore a snapshot taken before that upgrade" in message
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == before


def test_new_data_dir_is_stamped(tmp_path: Path) -> None:
    """A new data directory gets FORMAT with the current format and this version."""
    result_of(open_backend(tmp_path).close())
    assert formatfile.read_format(tmp_path) == formatfile.DataDirFormat(
        FORMAT_VERSION, f"amaters {__version__}"
    )


def test_unreadable_format_file_is_reported(tmp_path: Path) -> None:
    """A FORMAT file that is not the expected JSON is reported by name."""
    formatfile.format_path(tmp_path).write_text("one\n")
    with pytest.raises(Corrupted, match="FORMAT' is not valid"):
        formatfile.read_format(tmp_path)


# -- migrate -----------------------------------------------------------------------------------


def test_migrate_brings_format_0_to_current_and_the_server_opens_it(tmp_path: Path) -> None:
    """migrate snapshots the format-0 directory, upgrades it in place to the current format, and
    a server then opens it with every key and value intact."""
    data_dir = tmp_path / "data"
    write_format_0(data_dir)
    config = make_config(data_dir)
    result = run(migrate_data_dir(config, sync_pools(), now=lambda: 2_000_000_000.0))
    assert (result.from_format, result.to_format, result.changed) == (0, CURRENT_FORMAT, True)
    assert [s.source for s in result.steps] == [0]
    assert formatfile.read_format(data_dir) == formatfile.DataDirFormat(
        CURRENT_FORMAT, f"amaters {__version__}"
    )

    backend = open_backend(data_dir)
    try:
        assert read_everything(backend) == FIXTURE
    finally:
        result_of(backend.close())

    # The snapshot taken first holds the directory as it was: format 0, every key counted.
    assert result.snapshot is not None
    assert result.snapshot.path.parent == snapshot_dir(config)
    manifest = read_manifest(result.snapshot.path)
    assert (manifest.format, manifest.source) == (0, "offline")
    assert manifest.collections == {name: len(entries) for name, entries in FIXTURE.items()}
    assert "FORMAT" not in {f.path for f in manifest.files}
    lines = describe(result)
    assert lines[0].endswith("format 0 -> 1; ran:")
    assert str(result.snapshot.path) in lines[-1]

    again = run(migrate_data_dir(config, sync_pools()))
    assert not again.steps and not again.changed
    assert describe(again) == [f"{data_dir}: already at format {CURRENT_FORMAT}; nothing to do"]


def test_pre_migration_snapshot_restores_the_old_format(tmp_path: Path) -> None:
    """Restoring the snapshot migrate took gives back the format-0 directory, which migrates again."""
    data_dir = tmp_path / "data"
    write_format_0(data_dir)
    result = run(migrate_data_dir(make_config(data_dir), sync_pools()))
    old = tmp_path / "old"
    restore_archive(result.snapshot.path, old)
    assert formatfile.effective_format(old, old / "db") == 0
    run(migrate_data_dir(make_config(old), sync_pools()))
    backend = open_backend(old)
    try:
        assert read_everything(backend) == FIXTURE
    finally:
        result_of(backend.close())


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    """--dry-run reports the plan and writes nothing: no FORMAT, no snapshot, no marker."""
    data_dir = tmp_path / "data"
    write_format_0(data_dir)
    before = sorted(p.name for p in (data_dir / "db").iterdir())
    result = run(migrate_data_dir(make_config(data_dir), sync_pools(), dry_run=True))
    assert result.dry_run and result.snapshot is None and [s.source for s in result.steps] == [0]
    assert not formatfile.format_path(data_dir).exists()
    assert not (data_dir / "snapshots").exists()
    assert sorted(p.name for p in (data_dir / "db").iterdir()) == before
    assert describe(result)[-1] == "a snapshot of the directory would be taken first; nothing was changed"


def test_migrate_refuses_while_a_server_holds_the_lock(tmp_path: Path) -> None:
    """While another holder (a running server) has the data directory lock, migrate refuses and
    changes nothing."""
    data_dir = tmp_path / "data"
    write_format_0(data_dir)
    held = DataDirLock(data_dir)
    held.acquire()
    try:
        with pytest.raises(DataDirLocked, match=f"is in use by process {os.getpid()}"):
            run(migrate_data_dir(make_config(data_dir), sync_pools()))
    finally:
        held.release()
    assert not formatfile.format_path(data_dir).exists()
    assert not (data_dir / "snapshots").exists()


def test_migrate_refuses_a_newer_format(tmp_path: Path) -> None:
    """A directory newer than this amaters is refused with the server's message."""
    data_dir = tmp_path / "data"
    result_of(open_backend(data_dir).close())
    formatfile.write_format(data_dir, CURRENT_FORMAT + 1)
    with pytest.raises(
        FormatMismatch, match=f"format {CURRENT_FORMAT + 1}.*newer than format {CURRENT_FORMAT}"
    ):
        run(migrate_data_dir(make_config(data_dir), sync_pools()))


def test_migrate_without_a_database(tmp_path: Path) -> None:
    """An empty or absent data directory has nothing to migrate."""
    with pytest.raises(MigrationError, match="does not exist"):
        run(migrate_data_dir(make_config(tmp_path / "absent"), sync_pools()))
    with pytest.raises(MigrationError, match="holds no database"):
        run(migrate_data_dir(make_config(tmp_path), sync_pools()))


def test_corrupted_record_stops_the_migration(tmp_path: Path) -> None:
    """A record that does not decode stops step 0 -> 1 with an error naming the collection; the
    directory stays format 0 (no FORMAT file, no marker) and its snapshot is kept."""
    data_dir = tmp_path / "data"
    write_format_0(data_dir, bad_record=True)
    with pytest.raises(Corrupted, match="collection 'docs'"):
        run(migrate_data_dir(make_config(data_dir), sync_pools()))
    assert formatfile.effective_format(data_dir, data_dir / "db") == 0
    db = rocksdict.Rdict(
        str(data_dir / "db"),
        rocksdict.Options(raw_mode=True),
        column_families={f"c:{c}": rocksdict.Options(raw_mode=True) for c in FIXTURE},
        access_type=rocksdict.AccessType.read_only(),
    )
    try:
        assert db.get(b"amaters:format_version") is None
    finally:
        db.close()
    assert len(list((data_dir / "snapshots").glob("amaters-*.tar.zst"))) == 1


def test_foreign_database_is_not_stamped(tmp_path: Path) -> None:
    """A database with column families amaters never creates is not an amaters database: refused."""
    data_dir = tmp_path / "data"
    write_format_0(data_dir, extra_families=("somebody-else",))
    with pytest.raises(MigrationError, match="somebody-else"):
        run(migrate_data_dir(make_config(data_dir), sync_pools()))
    assert not formatfile.format_path(data_dir).exists()


def test_steps_chain_and_resume(tmp_path: Path) -> None:
    """Steps run in order, FORMAT advances after each, and a failed step leaves FORMAT at the last
    finished one so a second run resumes there; a missing step is refused before anything runs."""
    data_dir = tmp_path / "data"
    write_format_0(data_dir)
    journal: list[str] = []
    fail = [True]

    def step_1_to_2(data_dir: Path, db_path: Path, progress: Any) -> None:
        journal.append(f"1->2 at format {formatfile.read_format(data_dir).format}")  # type: ignore[union-attr]
        if fail[0]:
            raise RuntimeError("power cut")

    registry = {**MIGRATIONS, 1: Migration(1, "test step", step_1_to_2)}
    config = make_config(data_dir)
    with pytest.raises(RuntimeError, match="power cut"):
        run(migrate_data_dir(config, sync_pools(), registry=registry, current=2))
    assert formatfile.read_format(data_dir).format == 1  # type: ignore[union-attr]
    fail[0] = False
    result = run(migrate_data_dir(config, sync_pools(), registry=registry, current=2))
    assert [s.source for s in result.steps] == [1]
    assert journal == ["1->2 at format 1", "1->2 at format 1"]
    assert formatfile.read_format(data_dir).format == 2  # type: ignore[union-attr]

    with pytest.raises(MigrationError, match="no migration from format 2 to 3"):
        plan(0, 4, registry)
