"""The reference server on RocksDB: a write is answered only after a WAL sync that started after it
(``--sync always``), writes that arrive during a sync share the next one, and without sync the
answer goes out at once.  What the durable block's floor measures depends on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport

from bench.micro import _check_answers, _frames
from bench.reference_server import RocksDBReferenceFactory


class CountingDB:
    """The factory's RocksDB, with its WAL syncs counted and the first one held until released."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.syncs = 0
        self.release: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def flush_wal(self, sync: bool) -> None:
        if self.release is not None:
            self.release.wait(10)
        self._db.flush_wal(sync)
        self.syncs += 1


def connected(tmp_path: Path, sync: bool) -> tuple[RocksDBReferenceFactory, CountingDB, Any, StringTransport]:
    factory = RocksDBReferenceFactory(tmp_path / "db", sync, reactor)
    db = CountingDB(factory.db)
    factory.db = db
    if factory.syncer is not None:
        factory.syncer._db = db
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return factory, db, protocol, transport


async def until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("timed out")


@pytest_twisted.ensureDeferred
async def test_synced_writes_are_answered_after_a_sync_and_share_the_next(tmp_path: Path) -> None:
    import threading

    factory, db, protocol, transport = connected(tmp_path, sync=True)
    try:
        db.release = threading.Event()
        first, second, third = _frames("set", 3, 100, 10, 1)
        protocol.dataReceived(first)
        await until(lambda: factory.syncer is not None and factory.syncer._running)
        assert transport.value() == b""  # held by the running sync
        protocol.dataReceived(second)
        protocol.dataReceived(third)
        db.release.set()
        await until(lambda: len(transport.value()) > 0 and not factory.syncer._running)  # type: ignore[union-attr]
        _check_answers(transport.value(), 3)
        assert db.syncs == 2  # one for the first write, one shared by the two that waited
        assert protocol._db.get(b"micro\0k000000001") is not None
    finally:
        protocol.connectionLost(None)
        factory.db._db.close()


@pytest_twisted.ensureDeferred
async def test_unsynced_writes_are_answered_at_once(tmp_path: Path) -> None:
    factory, db, protocol, transport = connected(tmp_path, sync=False)
    try:
        protocol.dataReceived(b"".join(_frames("set", 2, 100, 10, 1)) + b"".join(_frames("get", 1, 0, 10, 3)))
        _check_answers(transport.value(), 3)
        assert db.syncs == 0
    finally:
        protocol.connectionLost(None)
        factory.db._db.close()
    await defer.succeed(None)
