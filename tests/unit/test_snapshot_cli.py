"""``amaters snapshot create|list|verify|restore`` and ``amaters migrate`` on a stopped server's
data directory, run in-process (the commands need no reactor)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from storage_helpers import result_of
from twisted.internet.task import Clock

from amaters.cli import main
from amaters.cli.snapshot import ProgressPrinter
from amaters.service import ThreadPoolService
from amaters.storage import formatfile
from amaters.storage.lock import DataDirLock
from amaters.storage.rocksdb import RocksDBBackend, RocksDBSettings
from amaters.types import CipherBlob


def backend_on(data_dir: Path) -> RocksDBBackend:
    clock = Clock()
    pool = ThreadPoolService(clock, "io", synchronous=True)  # type: ignore[arg-type]
    backend = RocksDBBackend(data_dir / "db", pool, clock, RocksDBSettings(sync="none"), lock_dir=data_dir)
    result_of(backend.open())
    return backend


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A stopped server's data directory: two collections written through the RocksDB backend."""
    path = tmp_path / "data"
    backend = backend_on(path)
    for name in ("users", "docs"):
        result_of(backend.create_collection(name))
    for i in range(100):
        result_of(backend.put("users", b"u%03d" % i, CipherBlob.wrap(os.urandom(200), created_at=i)))
    result_of(backend.put("docs", b"readme", CipherBlob.wrap(b"encrypted readme", version=2)))
    result_of(backend.close())
    return path


def amaters(data_dir: Path, *args: str) -> int:
    return main([*args, "--set", f"server.data_dir={data_dir}"])


def test_create_list_verify_restore(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """create writes an archive and reports it; list shows it; verify says OK; restore produces a
    data directory holding the same data."""
    assert amaters(data_dir, "snapshot", "create") == 0
    out, err = capsys.readouterr()
    archives = list((data_dir / "snapshots").glob("amaters-*.tar.zst"))
    assert len(archives) == 1
    archive = archives[0]
    assert out.startswith(f"{archive}: 2 collections, 101 keys,")
    assert "packing: 100%" in err

    assert amaters(data_dir, "snapshot", "list") == 0
    out, _ = capsys.readouterr()
    assert out.startswith(archive.name) and "format 1  101 keys  checkpoint" in out

    assert amaters(data_dir, "snapshot", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["keys"], s["problem"]) for s in listed] == [(archive.name, 101, None)]

    # By name (looked up in snapshot.dir) and by path.
    assert amaters(data_dir, "snapshot", "verify", archive.name, "--quiet") == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{archive}: OK (") and err == ""

    target = tmp_path / "restored"
    assert amaters(data_dir, "snapshot", "restore", str(archive), "--into", str(target)) == 0
    out, _ = capsys.readouterr()
    assert f"into {target}: 2 collections, 101 keys" in out
    original, restored = backend_on(data_dir), backend_on(target)
    try:
        for name in ("users", "docs"):
            a = result_of(original.scan(name, b"", None, None, 1000).next_chunk())
            b = result_of(restored.scan(name, b"", None, None, 1000).next_chunk())
            assert a == b and a
    finally:
        result_of(original.close())
        result_of(restored.close())


def test_create_json(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """create --json prints the snapshot's details."""
    assert amaters(data_dir, "snapshot", "create", "--json", "-q") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["keys"] == 101 and info["collections"] == {"users": 100, "docs": 1}
    assert Path(info["path"]).is_file() and len(info["sha256"]) == 64 and info["remote"] is None


def test_create_on_a_locked_data_dir_asks_the_running_server(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the data directory locked (a running server), create asks that server's admin API; when
    the API cannot be reached it fails with one error line and writes nothing."""
    lock = DataDirLock(data_dir)
    lock.acquire()
    try:
        assert amaters(data_dir, "snapshot", "create", "--set", "web.listen=tcp:1:interface=127.0.0.1") == 1
    finally:
        lock.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "the server is running: taking the snapshot through its admin API"
    assert len(err) == 2 and err[1].startswith("amaters: the data dir is in use by a running server")
    assert "cannot reach the server" in err[1] and "Traceback" not in err[1]
    assert not list((data_dir / "snapshots").glob("amaters-*"))


def test_errors_are_one_line(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged archive, a busy restore target, an unknown archive and a data directory without a
    database each fail with exit 1 and one line on stderr, no traceback."""
    assert amaters(data_dir, "snapshot", "create", "-q", "--set", "snapshot.compression=none") == 0
    archive = next((data_dir / "snapshots").glob("amaters-*.tar"))
    archive.with_name(archive.name + ".sha256").unlink()
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".sst"))
    with archive.open("r+b") as f:
        f.seek(member.offset_data)
        first = f.read(1)
        f.seek(member.offset_data)
        f.write(bytes([first[0] ^ 1]))
    capsys.readouterr()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    cases = [
        (("snapshot", "verify", str(archive)), f"{member.name} fails its sha256 check"),
        (("snapshot", "restore", str(archive), "--into", str(tmp_path / "new")), "fails its sha256 check"),
        (("snapshot", "verify", "amaters-20000101T000000.000Z.tar"), "no snapshot archive"),
    ]
    for args, expected in cases:
        assert amaters(data_dir, *args, "-q") == 1, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "new").exists()

    assert amaters(data_dir, "snapshot", "create", "-q") == 0
    good = sorted((data_dir / "snapshots").glob("amaters-*.tar.zst"))[-1]
    capsys.readouterr()
    assert amaters(data_dir, "snapshot", "restore", str(good), "--into", str(busy), "-q") == 1
    assert "not empty" in capsys.readouterr().err

    assert amaters(tmp_path / "nothing", "snapshot", "create") == 1
    assert "nothing to snapshot" in capsys.readouterr().err
    assert amaters(data_dir, "snapshot", "create", "--set", "storage.backend=memory") == 1
    assert "storage.backend = rocksdb" in capsys.readouterr().err


def test_list_remote_without_bucket(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """list --remote without snapshot.s3.bucket says what to configure."""
    assert amaters(data_dir, "snapshot", "list", "--remote") == 1
    assert "set snapshot.s3.bucket" in capsys.readouterr().err


def test_snapshot_without_action_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snapshot"]) == 2
    assert "create" in capsys.readouterr().err


def test_migrate_command(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """migrate on a current directory has nothing to do; on a format-0 directory --dry-run shows the
    plan and the real run upgrades it, printing the snapshot it took."""
    assert amaters(data_dir, "migrate") == 0
    assert "already at format 1; nothing to do" in capsys.readouterr().out

    formatfile.format_path(data_dir).unlink()  # as written before format files existed
    assert amaters(data_dir, "migrate", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "format 0 -> 1; would run:" in out and "nothing was changed" in out
    assert not formatfile.format_path(data_dir).exists()

    assert amaters(data_dir, "migrate", "-q") == 0
    out = capsys.readouterr().out
    assert "format 0 -> 1; ran:" in out and "snapshot taken before migrating:" in out
    assert formatfile.read_format(data_dir).format == 1  # type: ignore[union-attr]

    lock = DataDirLock(data_dir)
    lock.acquire()
    try:
        assert amaters(data_dir, "migrate") == 1
    finally:
        lock.release()
    assert "stop that server first" in capsys.readouterr().err


def test_progress_printer_lines() -> None:
    """Without a terminal, progress is a line per stage and per 10 % step."""
    stream = io.StringIO()
    printer = ProgressPrinter(stream)
    printer(0, 0, "checkpoint")
    for done in range(0, 101, 5):
        printer(done * 1024, 100 * 1024, "packing")
    printer.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "checkpoint..."
    assert lines[1] == "packing:   0% (0 B of 100.0 KiB)"
    assert lines[-1] == "packing: 100% (100.0 KiB of 100.0 KiB)"
    assert len(lines) == 12
