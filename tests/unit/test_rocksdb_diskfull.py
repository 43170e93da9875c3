"""A real full disk (a 4 MiB tmpfs): writes fail with STORAGE_FULL, reads are still served, and
after space is freed a restart has every acknowledged write.

Needs permission to mount a tmpfs (root); skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from amaters.errors import Overloaded, StorageFull
from amaters.service import ThreadPoolService
from amaters.storage.rocksdb import RocksDBBackend, RocksDBSettings
from amaters.types import CipherBlob

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def outcome(d: object) -> object:
    results: list[object] = []
    d.addBoth(results.append)  # type: ignore[attr-defined]
    assert results
    return results[0]


def ok(d: object) -> object:
    result = outcome(d)
    if isinstance(result, Failure):
        result.raiseException()
    return result


def backend_on(disk: Path) -> RocksDBBackend:
    clock = Clock()
    io = ThreadPoolService(clock, "io", synchronous=True)  # type: ignore[arg-type]
    settings = RocksDBSettings(write_buffer_bytes=256 * 1024, block_cache_bytes=1 << 20)
    return RocksDBBackend(disk / "db", io, clock, settings, lock_dir=disk)


def put_retrying_stalls(backend: RocksDBBackend, key: bytes, data: bytes) -> object:
    """A put, retried like a client would while RocksDB reports a transient write stall (its
    background flush has not caught up yet); bounded, so a stall that never ends fails the test."""
    for _ in range(500):
        result = outcome(backend.put("c", key, CipherBlob.wrap(data)))
        if not (isinstance(result, Failure) and result.check(Overloaded)):
            return result
        time.sleep(0.01)
    return result


def test_full_disk(small_disk: Path) -> None:
    """Filling the disk fails a write with StorageFull (never a hang, never a silent loss); gets
    and ranges still work; after freeing space and restarting, every acknowledged write is there."""
    backend = backend_on(small_disk)
    ok(backend.open())
    ok(backend.create_collection("c"))
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024))
    acknowledged: dict[bytes, bytes] = {}
    error: object = None
    for i in range(10_000):
        key, data = b"k%05d" % i, os.urandom(8000)
        result = put_retrying_stalls(backend, key, data)
        if isinstance(result, Failure):
            error = result
            break
        acknowledged[key] = data
    assert isinstance(error, Failure), "the disk never filled up"
    assert error.check(StorageFull), error
    assert "disk is full" in str(error.value)
    assert acknowledged

    # Reads are still served.
    some_key = next(iter(acknowledged))
    got = ok(backend.get("c", some_key))
    assert got.data == acknowledged[some_key]  # type: ignore[attr-defined]
    cursor = backend.scan("c", b"", None, None, 50)
    assert len(ok(cursor.next_chunk())) == 50  # type: ignore[arg-type]
    cursor.close()
    assert ok(backend.stats())["backend"] == "rocksdb"  # type: ignore[index]
    more = outcome(backend.put("c", b"more", CipherBlob.wrap(b"x")))
    assert isinstance(more, Failure) and more.check(StorageFull)

    # Free space, restart: everything acknowledged is there and writes work again.
    filler.unlink()
    outcome(backend.close())  # may report the earlier I/O error
    again = backend_on(small_disk)
    ok(again.open())
    for key, data in acknowledged.items():
        assert ok(again.get("c", key)).data == data  # type: ignore[attr-defined]
    ok(again.put("c", b"after", CipherBlob.wrap(b"ok")))
    ok(again.close())
