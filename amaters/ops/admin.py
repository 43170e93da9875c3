"""Server administration: what the executor runs for the admin operations.

The admin HTTP API (and any other front end) turns a request into an operation such as
:class:`amaters.query.operations.Compact`; the pipeline authorizes, limits, counts and audits it
like any query; the executor hands it to :class:`ServerAdmin`, which does the work.  Nothing here
checks who asked: that was the pipeline's job.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from amaters import __version__
from amaters.compiled import build_name
from amaters.config import Config, LiveConfig, to_dict
from amaters.errors import InvalidOperation, NotFound, ValidationError
from amaters.interfaces import IServerAdmin, IStorageBackend
from amaters.ops.reload import Reloader
from amaters.service import Lifecycle
from amaters.storage import innermost
from amaters.storage.s3 import S3Store
from amaters.storage.snapshot import (
    SnapshotError,
    create_snapshot,
    is_archive_name,
    list_archives,
    snapshot_dir,
    verify_archive,
)

#: The most audit events one call returns, and the bytes read back from the end of the file for them.
MAX_AUDIT_TAIL = 1000
_AUDIT_TAIL_BYTES = 4 * 1024 * 1024


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
        backend: IStorageBackend,
        pools: Any,
        reloader: Reloader,
        connections: Callable[[], int],
        cluster: Any = None,
        fhe: Any = None,
    ) -> None:
        self.live = live
        self.lifecycle = lifecycle
        self.backend = backend
        self.pools = pools
        self.reloader = reloader
        self.connections = connections
        #: Clustered mode: the node's ClusterService (None on a single node).
        self.cluster = cluster
        #: The FHE service (FILTER/UPDATE), reported in the status when the server has one.
        self.fhe = fhe

    def cluster_status(self) -> defer.Deferred[dict[str, Any]]:
        """The cluster as this node sees it (fails with InvalidOperation on a single node)."""
        if self.cluster is None:
            from amaters.errors import InvalidOperation

            return defer.fail(InvalidOperation("this server is not clustered (storage.backend is not etcd)"))
        return defer.succeed(self.cluster.health())

    def cluster_add_shard(self, name: str, endpoints: list[str]) -> defer.Deferred[Any]:
        """Add an etcd cluster as a shard and rebalance onto it (see amaters.storage.sharded)."""
        return self._sharded(lambda store: store.add_shard(name, endpoints))

    def cluster_remove_shard(self, name: str) -> defer.Deferred[Any]:
        """Move every virtual shard off shard ``name`` and drop it from the shard map."""
        return self._sharded(lambda store: store.remove_shard(name))

    def cluster_move(self, vshard: int, to: str) -> defer.Deferred[Any]:
        """Move one virtual shard to shard ``to``."""
        return self._sharded(lambda store: store.move(vshard, to))

    def _sharded(self, action: Callable[[Any], Any]) -> defer.Deferred[Any]:
        from amaters.errors import InvalidOperation

        store = getattr(self.cluster, "backend", None)
        if store is None or not hasattr(store, "add_shard"):
            return defer.fail(InvalidOperation("this server is not clustered (storage.backend is not etcd)"))
        return defer.Deferred.fromCoroutine(action(store))

    def fhe_key_sets(self) -> defer.Deferred[dict[str, Any]]:
        """The stored FHE evaluation key sets and unfinished uploads, with the limits on them."""
        if self.fhe is None:
            return defer.fail(InvalidOperation("this server has no FHE evaluator"))
        return self.fhe.key_sets()

    def delete_fhe_key_set(self, key_set_id: str) -> defer.Deferred[dict[str, Any]]:
        """Delete one key set (stored or being uploaded); NotFound when the server has neither."""
        if self.fhe is None:
            return defer.fail(InvalidOperation("this server has no FHE evaluator"))
        return self.fhe.delete_key_set(key_set_id)

    def status(self) -> defer.Deferred[dict[str, Any]]:
        return defer.Deferred.fromCoroutine(self._status())

    async def _status(self) -> dict[str, Any]:
        config = self.live.current
        last = self.reloader.last
        found = {
            "version": __version__,
            "build": build_name(),
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
        if self.fhe is not None:
            found["fhe"] = await self.fhe.status()
        return found

    def collections(self) -> defer.Deferred[dict[str, Any]]:
        return defer.Deferred.fromCoroutine(self._collections())

    async def _collections(self) -> dict[str, Any]:
        names = await self.backend.list_collections()
        stats = await self.backend.stats()
        keys = stats.get("keys", {})
        sizes = stats.get("collection_bytes", {})
        return {
            "collections": [
                {"name": name, "keys": keys.get(name), "bytes": sizes.get(name)} for name in names
            ]
        }

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

    def verify_snapshot(self, archive: str) -> defer.Deferred[dict[str, Any]]:
        return defer.Deferred.fromCoroutine(self._verify_snapshot(archive))

    async def _verify_snapshot(self, archive: str) -> dict[str, Any]:
        if not is_archive_name(archive):
            raise ValidationError(f"{archive[:80]!r} is not a snapshot archive name")
        path = snapshot_dir(self.live.current) / archive
        if not await self.pools.io.run(path.is_file):
            raise NotFound(f"no snapshot named {archive!r}")
        try:
            manifest = await self.pools.cpu.run(verify_archive, path)
        except SnapshotError as e:
            return {"archive": archive, "ok": False, "error": e.message}
        return {"archive": archive, "ok": True, "manifest": manifest.to_dict()}

    def config_view(self) -> defer.Deferred[dict[str, Any]]:
        return defer.Deferred.fromCoroutine(self._config_view())

    async def _config_view(self) -> dict[str, Any]:
        config = self.live.current
        preview = await self.reloader.preview()
        last = self.reloader.last
        return {
            "config": to_dict(config),
            "config_file": config.source or None,
            "reload_preview": preview,
            "last_reload": last.to_dict() if last else None,
        }

    def audit_tail(self, limit: int) -> defer.Deferred[dict[str, Any]]:
        config = self.live.current
        settings = config.audit
        if not settings.enabled:
            return defer.succeed({"enabled": False, "path": None, "events": []})
        path = Path(settings.path) if settings.path else config.data_dir / "audit.log"
        count = max(1, min(limit, MAX_AUDIT_TAIL))
        d = self.pools.io.run(_read_audit_tail, path, count)
        return d.addCallback(lambda events: {"enabled": True, "path": str(path), "events": events})

    def resources(self) -> defer.Deferred[dict[str, Any]]:
        return self.pools.io.run(_resources_blocking, self.live.current)


def _read_audit_tail(path: Path, count: int) -> list[Any]:
    """The last ``count`` JSON lines of ``path`` (blocking); unreadable lines are skipped."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - _AUDIT_TAIL_BYTES)
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first line is probably cut
    events: list[Any] = []
    for line in lines[-(count + 1) :]:
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events[-count:]


def _directory_bytes(root: Path) -> tuple[int, int]:
    """(bytes, files) under ``root``, not following symbolic links; vanished files are skipped."""
    total = files = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
            files += 1
    return total, files


def _certificate(path: Path, use: str) -> dict[str, Any]:
    """Subject, issuer and validity of the first certificate in a PEM file (never the key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    found: dict[str, Any] = {"use": use, "path": str(path)}
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        found["error"] = f"cannot read the certificate: {getattr(e, 'strerror', None) or e}"
        return found
    not_after = cert.not_valid_after_utc
    found.update(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc.astimezone(UTC).isoformat(),
        not_after=not_after.astimezone(UTC).isoformat(),
        not_after_epoch=not_after.timestamp(),
        sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )
    return found


def _resources_blocking(config: Config) -> dict[str, Any]:
    """Data dir usage and the certificates the listeners serve (blocking file I/O)."""
    data_dir = config.data_dir
    used, files = _directory_bytes(data_dir)
    usage: dict[str, Any] = {"path": str(data_dir), "bytes": used, "files": files}
    try:
        disk = shutil.disk_usage(data_dir)
    except OSError:
        pass
    else:
        usage.update(filesystem_bytes=disk.total, filesystem_free_bytes=disk.free)
    certificates: list[dict[str, Any]] = []
    native = Path(config.tls.cert) if config.tls.cert else data_dir / "tls" / "server.pem"
    if config.tls.enabled:
        certificates.append(_certificate(native, "native protocol"))
    if config.web.tls.enabled:
        web = Path(config.web.tls.cert) if config.web.tls.cert else native
        certificates.append(_certificate(web, "ops site"))
    return {"data_dir": usage, "tls": {"enabled": config.tls.enabled, "certificates": certificates}}


__all__ = ["ServerAdmin"]
