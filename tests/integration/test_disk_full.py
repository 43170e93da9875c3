"""A full disk under the real ``twistd -n amaters`` (RocksDB on a small tmpfs; needs root to mount
it, skipped otherwise): health tells the truth while writes fail, writes resume by themselves once
space is freed, and a restart on a nearly full disk opens read-only and says so."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from harness import ServerProcess, http_get
from twisted.internet import reactor, task

from amaters.client import AmatersClient, connect
from amaters.errors import AmatersError, ErrorCode

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "server" / "data"
    data.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(data)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def _server(tmp_path: Path) -> ServerProcess:
    return ServerProcess(
        tmp_path / "server",
        [
            "tls.enabled=false",
            "storage.write_buffer_bytes=262144",
            "storage.block_cache_bytes=1048576",
            "storage.sync=always",
            "retry.max_attempts=1",
        ],
    )


def _fill(disk: Path, leave: int) -> Path:
    """A file taking all but about ``leave`` bytes of the disk."""
    fs = os.statvfs(disk)
    free = fs.f_bavail * fs.f_frsize
    filler = disk / "filler"
    with filler.open("ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def _health(server: ServerProcess) -> tuple[int | None, dict[str, object]]:
    status, body = http_get(f"http://127.0.0.1:{server.web_port}/health", timeout=5)
    return status, json.loads(body)


async def _sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def _write_until_full(client: AmatersClient) -> tuple[int, AmatersError]:
    written = 0
    for i in range(2000):
        try:
            await client.set("c", b"k%05d" % i, b"v" * 8000)
            written += 1
        except AmatersError as e:
            if e.code == ErrorCode.SERVER_OVERLOADED:
                await _sleep(0.05)  # a write stall while a flush runs: retry like a client would
                continue
            return written, e
    raise AssertionError("the disk never filled up")


@pytest_twisted.ensureDeferred
async def test_full_disk_health_recovery_and_read_only_restart(tmp_path: Path, small_disk: Path) -> None:
    """Writes fail with STORAGE_FULL while the disk is full: /readyz 503 storage_full, /health
    degraded naming it.  Freeing space makes writes work again without a restart, and /readyz 200.
    A restart with the write-ahead log unflushed and the disk nearly full opens read-only (every
    acknowledged value readable), logs it and reports it; freeing space makes it writable."""
    server = _server(tmp_path).start().wait_ready()
    try:
        client = await connect(reactor, "127.0.0.1", server.port, plaintext=True, timeout=20)
        await client.set("c", b"first", b"1")
        filler = _fill(small_disk, 512 * 1024)
        written, error = await _write_until_full(client)
        assert written > 0
        assert error.code == ErrorCode.STORAGE_FULL, error
        assert server.readyz() == 503
        status, body = http_get(f"http://127.0.0.1:{server.web_port}/readyz", timeout=5)
        assert json.loads(body)["reason"] == "storage_full"
        status, health = _health(server)
        assert status == 200 and health["status"] == "degraded"
        storage = health["components"]["storage"]  # type: ignore[index]
        assert storage["status"] == "degraded" and "full" in storage["message"]
        assert await client.get("c", b"first") == b"1"  # reads still served

        filler.unlink()
        deadline = time.monotonic() + 30
        while True:
            try:
                await client.set("c", b"after", b"2")
                break
            except AmatersError as e:
                assert e.code in (
                    ErrorCode.STORAGE_FULL,
                    ErrorCode.SERVER_UNAVAILABLE,
                    ErrorCode.SERVER_OVERLOADED,
                ), e
                assert time.monotonic() < deadline, "writes did not resume after space was freed"
                await _sleep(0.2)
        assert await client.get("c", b"after") == b"2"
        assert server.readyz() == 200
        assert "Storage writable again" in server.log()

        # Unflushed writes in the WAL, then a restart with almost no space left.
        wal = {b"wal%02d" % i: os.urandom(8000) for i in range(40)}  # incompressible
        for key, value in wal.items():
            await client.set("c", key, value)
        await client.close()
        server.signal(9)
        server.wait_exit(30)
        filler = _fill(small_disk, 16 * 1024)
        server.start()
        deadline = time.monotonic() + 30
        while "read-only: the disk is full" not in server.log():
            assert server.process is not None and server.process.poll() is None, server.log()
            assert time.monotonic() < deadline, server.log()
            await _sleep(0.1)
        status, health = _health(server)
        assert health["components"]["storage"]["status"] == "degraded"  # type: ignore[index]
        assert server.readyz() == 503
        client = await connect(reactor, "127.0.0.1", server.port, plaintext=True, timeout=20)
        for key, value in wal.items():
            assert await client.get("c", key) == value
        assert await client.get("c", b"after") == b"2"
        try:
            await client.set("c", b"x", b"y")
            raise AssertionError("a write succeeded on a read-only database")
        except AmatersError as e:
            assert e.code == ErrorCode.STORAGE_FULL
        filler.unlink()
        deadline = time.monotonic() + 30
        while server.readyz() != 200:
            assert time.monotonic() < deadline, server.log()
            await _sleep(0.2)
        await client.set("c", b"x", b"y")
        await client.close()
        assert "Traceback" not in server.log()
    finally:
        server.stop()
        server.cleanup()
