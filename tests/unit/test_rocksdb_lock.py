"""One server per data directory: the LOCK file refuses a second one with a clear message."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from amaters.service import ThreadPoolService
from amaters.storage.formatfile import write_format
from amaters.storage.lock import DataDirLock, DataDirLocked
from amaters.storage.rocksdb import RocksDBBackend


def backend_at(data_dir: Path, db_dir: Path | None = None) -> RocksDBBackend:
    clock = Clock()
    io = ThreadPoolService(clock, "io", synchronous=True)  # type: ignore[arg-type]
    return RocksDBBackend(db_dir or data_dir / "db", io, clock, lock_dir=data_dir)


def outcome(d: object) -> object:
    results: list[object] = []
    d.addBoth(results.append)  # type: ignore[attr-defined]
    assert results
    return results[0]


def test_second_backend_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    """A second open of the same data_dir fails with DataDirLocked naming the directory and the
    holder; once the first closes, the second can open."""
    first = backend_at(tmp_path)
    assert outcome(first.open()) is None
    second = backend_at(tmp_path)
    result = outcome(second.open())
    assert isinstance(result, Failure) and result.check(DataDirLocked)
    message = str(result.value)
    assert str(tmp_path) in message
    assert "in use by process" in message and "server.data_dir" in message
    assert outcome(first.close()) is None
    assert outcome(second.open()) is None
    assert outcome(second.close()) is None


def test_rocksdb_own_lock_gives_a_clear_error_too(tmp_path: Path) -> None:
    """Two backends on one database with different lock directories still cannot both open:
    RocksDB's LOCK refuses, and the error says the database is already open."""
    first = backend_at(tmp_path / "a", tmp_path / "db")
    assert outcome(first.open()) is None
    (tmp_path / "b").mkdir()
    write_format(tmp_path / "b", 1)  # so the format check passes and RocksDB's lock is reached
    second = backend_at(tmp_path / "b", tmp_path / "db")
    result = outcome(second.open())
    assert isinstance(result, Failure) and result.check(DataDirLocked)
    assert "already open" in str(result.value)
    assert outcome(first.close()) is None
    # The failed open released its own data-dir lock.
    lock = DataDirLock(tmp_path / "b")
    lock.acquire()
    lock.release()


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding tmp_path's lock (killed with SIGKILL afterwards)."""
    code = (
        "import sys, time\n"
        "from amaters.storage.lock import DataDirLock\n"
        "DataDirLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready and proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_lock_held_by_another_process_names_its_pid(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    """The refusal names the process holding the lock; after that process is killed (even with
    SIGKILL, no cleanup) the lock is free again."""
    with pytest.raises(DataDirLocked, match=f"in use by process {holder.pid}"):
        DataDirLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    lock = DataDirLock(tmp_path)
    lock.acquire()
    assert lock.held
    assert (tmp_path / "LOCK").read_text().strip() == str(os.getpid())
    lock.release()


def test_release_is_idempotent_and_keeps_the_file(tmp_path: Path) -> None:
    """Releasing twice is safe; the LOCK file stays (deleting it would allow two lock inodes)."""
    lock = DataDirLock(tmp_path / "new")
    lock.acquire()
    lock.acquire()
    lock.release()
    lock.release()
    assert (tmp_path / "new" / "LOCK").exists()
    assert not lock.held
