"""Storage backends (memory, rocksdb, etcd) behind :class:`amaters.interfaces.IStorageBackend`."""

from __future__ import annotations

from typing import Any

from amaters.config import Config
from amaters.interfaces import IStorageBackend


def build_backend(config: Config, reactor: Any, pools: Any) -> IStorageBackend:
    """The backend ``storage.backend`` names, built without I/O (``open`` does the I/O).

    ``rocksdb`` keeps its database in ``<data_dir>/db`` and locks ``<data_dir>/LOCK``; its blocking
    work runs in ``pools.io``, its group-commit fsyncs in ``pools.wal`` when there is one.  The backend is wrapped in a
    :class:`~amaters.storage.retry.RetryingBackend` that retries transient errors of idempotent
    operations per ``[retry]``; :func:`innermost` unwraps it (e.g. for group-commit counters).
    """
    from amaters.storage.retry import RetryingBackend, RetryPolicy

    backend: IStorageBackend
    if config.storage.backend == "memory":
        from amaters.storage.memory import MemoryBackend

        backend = MemoryBackend()
    elif config.storage.backend == "rocksdb":
        from amaters.storage.rocksdb import RocksDBBackend, RocksDBSettings

        backend = RocksDBBackend(
            config.data_dir / "db",
            pools.io,
            reactor,
            RocksDBSettings.from_config(config.storage),
            lock_dir=config.data_dir,
            sync_runner=getattr(pools, "wal", None),
        )
    elif config.storage.backend == "etcd":
        from amaters.storage.sharded import build_sharded_backend

        backend = build_sharded_backend(config.cluster, reactor)
    else:
        raise NotImplementedError(f"storage backend {config.storage.backend!r} is not available")
    return RetryingBackend(backend, RetryPolicy.from_config(config.retry), reactor)


def innermost(backend: Any) -> Any:
    """The backend under any wrappers (retry, fault injection): follows ``.inner``."""
    while hasattr(backend, "inner"):
        backend = backend.inner
    return backend
