"""The operations a client can ask for, as validated values (no keys or values in their repr).

:mod:`amaters.query.validation` builds these from protobuf requests (and is the only place that
decides what is acceptable); :class:`~amaters.query.executor.QueryExecutor` runs them; pipeline
stages see them (``op.name``, ``op.collection``, ``op.kind``) to authorize, count and audit.
Keys and values never appear in ``repr`` output, so an operation can be logged safely.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import attrs

from amaters.types import CipherBlob, value_class

#: What an operation needs, for RBAC: read < write < create < admin.
Access = Literal["read", "write", "create", "admin"]


def _hidden(value: object) -> str:
    return "<hidden>"


@value_class
class Get:
    """Read one key; the result is the CipherBlob or None."""

    name: ClassVar[str] = "get"
    kind: ClassVar[Access] = "read"
    collection: str
    key: bytes = attrs.field(repr=_hidden)


@value_class
class Set:
    """Store one value (replacing any previous one)."""

    name: ClassVar[str] = "set"
    kind: ClassVar[Access] = "write"
    collection: str
    key: bytes = attrs.field(repr=_hidden)
    value: CipherBlob = attrs.field(repr=_hidden)


@value_class
class Delete:
    """Delete one key; the result says whether it existed."""

    name: ClassVar[str] = "delete"
    kind: ClassVar[Access] = "write"
    collection: str
    key: bytes = attrs.field(repr=_hidden)


@value_class
class Range:
    """Keys in ``[start, end)`` ascending, at most ``limit``; the result is an IRangeCursor.

    ``end`` None means to the end of the collection.
    """

    name: ClassVar[str] = "range"
    kind: ClassVar[Access] = "read"
    collection: str
    start: bytes = attrs.field(repr=_hidden)
    end: bytes | None = attrs.field(repr=_hidden)
    limit: int | None = None


BatchItem = Get | Set | Delete


@value_class
class Batch:
    """Reads and writes applied atomically: every write or none; reads see earlier writes."""

    name: ClassVar[str] = "batch"
    ops: tuple[BatchItem, ...]

    @property
    def kind(self) -> Access:
        return "write" if any(op.kind == "write" for op in self.ops) else "read"

    @property
    def collection(self) -> str | None:
        names = {op.collection for op in self.ops}
        return names.pop() if len(names) == 1 else None

    @property
    def collections(self) -> frozenset[str]:
        return frozenset(op.collection for op in self.ops)


@value_class
class CreateCollection:
    name: ClassVar[str] = "create_collection"
    kind: ClassVar[Access] = "create"
    collection: str


@value_class
class DropCollection:
    name: ClassVar[str] = "drop_collection"
    kind: ClassVar[Access] = "admin"
    collection: str


@value_class
class ListCollections:
    name: ClassVar[str] = "list_collections"
    kind: ClassVar[Access] = "read"
    collection: ClassVar[None] = None


@value_class
class ServerInfo:
    name: ClassVar[str] = "server_info"
    kind: ClassVar[Access] = "read"
    collection: ClassVar[None] = None


@value_class
class HealthCheck:
    name: ClassVar[str] = "health_check"
    kind: ClassVar[Access] = "read"
    collection: ClassVar[None] = None
    service: str | None = None


@value_class
class Filter:
    """Evaluate an encrypted predicate on every encrypted row of the collection (at most
    ``fhe.max_rows_per_query``; ``offset`` rows skipped, at most ``limit`` examined).  The result
    is a list of ``(key, blob, encrypted boolean)``: only the client can tell which rows match."""

    name: ClassVar[str] = "filter"
    kind: ClassVar[Access] = "read"
    collection: str
    key_set_id: str
    predicate: object = attrs.field(repr=_hidden)
    limit: int | None = None
    offset: int = 0


@value_class
class Update:
    """Replace every encrypted row by ``select(predicate, updated, old)``; the result is the number
    of rows rewritten (the server does not learn which changed)."""

    name: ClassVar[str] = "update"
    kind: ClassVar[Access] = "write"
    collection: str
    key_set_id: str
    predicate: object = attrs.field(repr=_hidden)
    updates: object = attrs.field(repr=_hidden)


@value_class
class UploadKeys:
    """One chunk of a client's public evaluation keys (see amaters.fhe.service.KeyUpload).

    Needs read on the server, like FILTER, which is of no use without uploaded keys: a role that
    may filter may upload the keys to do it.
    """

    name: ClassVar[str] = "upload_keys"
    kind: ClassVar[Access] = "read"
    collection: ClassVar[None] = None
    chunk: object = attrs.field(repr=_hidden)


# -- administration: the admin API's operations, through the same pipeline as every query ---------
# Each needs admin on server; their names are what the audit log and the metrics show.


@value_class
class ServerStatus:
    """Version, state, uptime, backend, connections, the last reload."""

    name: ClassVar[str] = "admin status"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None


@value_class
class CollectionStats:
    """Every collection with its (estimated) key count."""

    name: ClassVar[str] = "admin collections"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None


@value_class
class StorageStats:
    """The backend's statistics."""

    name: ClassVar[str] = "admin stats"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None


@value_class
class Compact:
    """Compact the whole store (where the backend can)."""

    name: ClassVar[str] = "admin compact"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None


@value_class
class ListKeySets:
    """The FHE evaluation key sets the server stores, and uploads in progress."""

    name: ClassVar[str] = "admin fhe keys"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None


@value_class
class DeleteKeySet:
    """Delete one stored FHE evaluation key set (or an unfinished upload of it)."""

    name: ClassVar[str] = "admin fhe keys delete"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None
    key_set_id: str


@value_class
class ReloadConfig:
    """Reload the configuration now, as a SIGHUP would; ``requested_by`` names who asked."""

    name: ClassVar[str] = "admin reload"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None
    requested_by: str = "operator"


@value_class
class ListSnapshots:
    """The snapshots on disk, or in the configured S3 bucket with ``remote``."""

    name: ClassVar[str] = "admin snapshot list"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None
    remote: bool = False


@value_class
class CreateSnapshot:
    """Take a snapshot now (and upload it with ``upload``)."""

    name: ClassVar[str] = "admin snapshot create"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None
    upload: bool = False


@value_class
class VerifySnapshot:
    """Check one snapshot archive on disk (every file against its manifest checksum)."""

    name: ClassVar[str] = "admin snapshot verify"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None
    archive: str


@value_class
class ConfigView:
    """The configuration in effect (secrets redacted) and what a reload would change now."""

    name: ClassVar[str] = "admin config"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None


@value_class
class AuditTail:
    """The last ``limit`` events of the audit log."""

    name: ClassVar[str] = "admin audit tail"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None
    limit: int = 100


@value_class
class ServerResources:
    """Data dir usage and the TLS certificates served (subject, issuer, expiry)."""

    name: ClassVar[str] = "admin resources"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None


@value_class
class ClusterStatus:
    """Clustered mode: the shards with their etcd members and leader, the nodes, the leading node."""

    name: ClassVar[str] = "admin cluster status"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None


@value_class
class ClusterAddShard:
    """Clustered mode: add an etcd cluster as a shard and move it its share of virtual shards."""

    name: ClassVar[str] = "admin cluster add-shard"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None
    shard: str = ""
    endpoints: tuple[str, ...] = ()


@value_class
class ClusterRemoveShard:
    """Clustered mode: move every virtual shard off a shard, then drop it from the shard map."""

    name: ClassVar[str] = "admin cluster remove-shard"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None
    shard: str = ""


@value_class
class ClusterMove:
    """Clustered mode: move one virtual shard to another shard, online."""

    name: ClassVar[str] = "admin cluster move"
    kind: ClassVar[Access] = "admin"
    collection: ClassVar[None] = None
    vshard: int = 0
    to: str = ""


AdminOperation = (
    ServerStatus
    | CollectionStats
    | StorageStats
    | Compact
    | ReloadConfig
    | ListSnapshots
    | CreateSnapshot
    | ClusterStatus
    | ClusterAddShard
    | ClusterRemoveShard
    | ClusterMove
    | VerifySnapshot
    | ConfigView
    | AuditTail
    | ServerResources
    | ListKeySets
    | DeleteKeySet
)

Operation = (
    Get
    | Set
    | Delete
    | Range
    | Batch
    | CreateCollection
    | DropCollection
    | ListCollections
    | ServerInfo
    | HealthCheck
    | Filter
    | Update
    | UploadKeys
    | AdminOperation
)


@attrs.frozen
class ServerInfoResult:
    version: tuple[int, int, int]
    supported_versions: tuple[tuple[int, int, int], ...]
    capabilities: tuple[str, ...]
    uptime_seconds: int


@attrs.frozen
class HealthResult:
    serving: bool
    message: str
