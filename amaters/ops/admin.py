"""Server administration: what the executor runs for the admin operations.

The admin HTTP API (and any other front end) turns a request into an operation such as
:class:`amaters.query.operations.Compact`; the pipeline authorizes, limits, counts and audits it
like any query; the executor hands it to :class:`ServerAdmin`, which does the work.  Nothing here
checks who asked: that was the pipeline's job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from amaters import __version__
from amaters.config import LiveConfig
from amaters.errors import InvalidOperation
from amaters.interfaces import IServerAdmin
from amaters.ops.reload import Reloader
from amaters.service import Lifecycle
from amaters.storage import innermost
from amaters.storage.s3 import S3Store
from amaters.storage.snapshot import create_snapshot, list_archives, snapshot_dir


@implementer(IServerAdmin)
class ServerAdmin:
    """Status, statistics, compaction, reload and snapshots of the running server.

    ``connections`` counts the open native-protocol connections; ``pools`` has the ``io`` and
    ``cpu`` thread pools that snapshots and S3 listing run in.
    """

    def __init__(
        self,
        live: LiveConfig,
        lifecycle: Lifecycle,
        backend: Any,
        pools: Any,
        reloader: Reloader,
        connections: Callable[[], int],
        cluster: Any = None,
    ) -> None:
        self.live = live
        self.lifecycle = lifecycle
        self.backend = backend
        self.pools = pools
        self.reloader = reloader
        self.connections = connections
        #: Clustered mode: the node's ClusterService (None on a single node).
        self.cluster = cluster

    def cluster_status(self) -> defer.Deferred[dict[str, Any]]:
        """The cluster as this node sees it (fails with InvalidOperation on a single node)."""
        if self.cluster is None:
            from amaters.errors import InvalidOperation

            return defer.fail(InvalidOperation("this server is not clustered (storage.backend is not etcd)"))
        return defer.succeed(self.cluster.health())

    def cluster_add_shard(self, name: str, endpoints: list[str]) -> defer.Deferred[Any]:
        """Add an etcd cluster as a shard and rebalance onto it (see amaters.storage.sharded)."""
        return self._sharded(lambda store: store.add_shard(name, endpoints))

    def cluster_move(self, vshard: int, to: str) -> defer.Deferred[Any]:
        """Move one virtual shard to shard ``to``."""
        return self._sharded(lambda store: store.move(vshard, to))

    def _sharded(self, action: Callable[[Any], Any]) -> defer.Deferred[Any]:
        from amaters.errors import InvalidOperation

        store = getattr(self.cluster, "backend", None)
        if store is None or not hasattr(store, "add_shard"):
            return defer.fail(InvalidOperation("this server is not clustered (storage.backend is not etcd)"))
        return defer.Deferred.fromCoroutine(action(store))

    def status(self) -> defer.Deferred[dict[str, Any]]:
        config = self.live.current
        last = self.reloader.last
        return defer.succeed(
            {
                "version": __version__,
                "state": self.lifecycle.state,
                "ready": self.lifecycle.ready,
                "uptime_seconds": round(self.lifecycle.uptime(), 3),
                "config_file": config.source or None,
                "backend": config.storage.backend,
                "sync": config.storage.sync,
                "connections": self.connections(),
                "auth_enabled": config.auth.enabled,
                "last_reload": last.to_dict() if last else None,
            }
        )

    def collections(self) -> defer.Deferred[dict[str, Any]]:
        return defer.Deferred.fromCoroutine(self._collections())

    async def _collections(self) -> dict[str, Any]:
        names = await self.backend.list_collections()
        stats = await self.backend.stats()
        keys = stats.get("keys", {})
        return {"collections": [{"name": name, "keys": keys.get(name)} for name in names]}

    def stats(self) -> defer.Deferred[dict[str, Any]]:
        return defer.maybeDeferred(self.backend.stats)

    def compact(self) -> defer.Deferred[dict[str, Any]]:
        return defer.Deferred.fromCoroutine(self._compact())

    async def _compact(self) -> dict[str, Any]:
        backend = innermost(self.backend)
        compact = getattr(backend, "compact", None)
        if compact is None:
            raise InvalidOperation(f"the {backend.name} backend has nothing to compact")
        before = await backend.stats()
        await compact()
        after = await backend.stats()
        return {"compacted": True, "bytes_before": before.get("bytes"), "bytes_after": after.get("bytes")}

    def reload(self, requested_by: str) -> defer.Deferred[dict[str, Any]]:
        d = self.reloader.reload(principal=requested_by)
        return d.addCallback(lambda result: result.to_dict())

    def list_snapshots(self, remote: bool) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._list_snapshots(remote))

    async def _list_snapshots(self, remote: bool) -> dict[str, Any]:
        config = self.live.current
        if remote:
            store = S3Store.from_config(config.snapshot.s3)
            return {"remote": await self.pools.io.run(store.list_blocking)}
        return {"snapshots": await self.pools.io.run(list_archives, snapshot_dir(config))}

    def create_snapshot(self, upload: bool) -> defer.Deferred[Any]:
        config = self.live.current
        s3 = S3Store.from_config(config.snapshot.s3) if upload else None
        return defer.Deferred.fromCoroutine(
            create_snapshot(self.backend, config, self.pools, upload=upload, s3=s3)
        )


__all__ = ["ServerAdmin"]
