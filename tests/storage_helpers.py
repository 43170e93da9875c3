"""Helpers shared by the storage, snapshot and migration tests (no reactor needed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from amaters.service import ThreadPoolService
from amaters.storage.rocksdb import RocksDBBackend, RocksDBSettings


def result_of(d: Any) -> Any:
    """The result of a Deferred that has already fired (raises its failure; fails if it has not)."""
    assert isinstance(d, defer.Deferred)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def run(coroutine: Any) -> Any:
    """Run a coroutine that completes synchronously and return its result."""
    return result_of(defer.Deferred.fromCoroutine(coroutine))


def sync_pools() -> Any:
    """``io`` and ``cpu`` pools that run their work inline."""
    clock = Clock()
    return SimpleNamespace(
        io=ThreadPoolService(clock, "io", synchronous=True),  # type: ignore[arg-type]
        cpu=ThreadPoolService(clock, "cpu", synchronous=True),  # type: ignore[arg-type]
    )


def open_backend(data_dir: Path) -> RocksDBBackend:
    """An open RocksDB backend on ``data_dir`` (sync "none": the tests need no fsync per write)."""
    clock = Clock()
    io_pool = ThreadPoolService(clock, "io", synchronous=True)  # type: ignore[arg-type]
    backend = RocksDBBackend(data_dir / "db", io_pool, clock, RocksDBSettings(sync="none"), lock_dir=data_dir)
    result_of(backend.open())
    return backend
