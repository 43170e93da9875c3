"""The zope interfaces that separate amaters' parts.

Every method that may do I/O returns a Deferred; failures are documented per method and are always
:class:`amaters.errors.AmatersError` subclasses, so the pipeline can answer a client without
guessing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from amaters.types import CipherBlob, ConditionalResult, Expect, WriteOp

# Interfaces use zope's convention: methods have no ``self``.
# mypy-zope understands this.


class IRangeCursor(Interface):
    """A forward cursor over ``[start, end)`` of one collection, read in bounded chunks.

    The cursor holds at most one chunk in memory at a time, so a range over millions of keys does not
    load them all.  It sees a consistent point-in-time view where the backend can give one.
    """

    def next_chunk() -> Deferred[list[tuple[bytes, CipherBlob]]]:
        """
        Read the next chunk.

        :return: Deferred firing with a list of ``(key, CipherBlob)`` in ascending key order; an empty
            list means the cursor is exhausted (a shorter chunk does not: a backend may end a chunk
            early, e.g. at a byte budget).  Call it again only after the previous chunk arrived.  Fails with ``Corrupted`` if a stored value's checksum
            does not match, ``StorageIOError`` on I/O failure.
        """

    def close() -> None:
        """Release the cursor's resources.  Safe to call twice and after exhaustion."""


class IStorageBackend(Interface):
    """Where bytes live: collections of ``key -> CipherBlob``.

    Collections are real namespaces: the same key in two collections is two entries.  All methods
    except ``has_collection`` and ``scan`` return Deferreds.  Unknown collections fail with ``NotFound`` (code
    ``STORAGE_NOT_FOUND``) except where noted.  Keys are non-empty bytes compared bytewise.

    A backend whose writes never wait (the memory backend) may also offer ``put_now(collection,
    key, value) -> bool``: ``put`` done during the call, False (nothing done) when the collection
    does not exist.  The executor then answers a lone SET without a Deferred.  (A subclass of
    the memory backend that changes ``put`` has none, so its SETs go through its ``put``.)
    """

    name = Attribute("Short backend name, e.g. 'memory' or 'rocksdb'.")

    def open() -> Deferred[None]:
        """Open (or create) the store.  Deferred firing with None; fails with ``StorageError``."""

    def close() -> Deferred[None]:
        """Flush what is pending and close.  Deferred firing with None.  Safe to call twice."""

    def create_collection(name: str) -> Deferred[bool]:
        """Create a collection.  Deferred firing True if created, False if it already existed."""

    def drop_collection(name: str) -> Deferred[bool]:
        """Drop a collection and all its entries.  Deferred firing True if it existed, else False."""

    def list_collections() -> Deferred[list[str]]:
        """Deferred firing with the sorted list of collection names."""

    def has_collection(name: str) -> bool:
        """Whether the collection exists (answered from memory, no I/O)."""

    def collection_count() -> int:
        """How many collections exist (answered from memory, no I/O)."""

    def get(collection: str, key: bytes) -> Deferred[CipherBlob | None]:
        """Deferred firing with the CipherBlob, or None when the key is absent.

        Fails with ``Corrupted`` if the stored checksum does not match the stored data.
        """

    def put(collection: str, key: bytes, value: CipherBlob) -> Deferred[None]:
        """Store ``value`` (a CipherBlob).  Deferred firing None once durable per the sync mode.

        Fails with ``StorageFull`` or ``StorageIOError``; nothing is acknowledged that was not written.
        """

    def delete(collection: str, key: bytes) -> Deferred[bool]:
        """Delete a key.  Deferred firing True if it existed, else False (durable per sync mode)."""

    def write_batch(ops: Iterable[WriteOp]) -> Deferred[None]:
        """Apply a sequence of ``WriteOp`` atomically: all or none.  Deferred firing None when durable.

        Fails with ``NotFound`` if any op names a missing collection (and then nothing is applied).
        """

    def compare_and_write(expected: Iterable[Expect], ops: Iterable[WriteOp]) -> Deferred[ConditionalResult]:
        """Apply ``ops`` only if every ``Expect`` holds (the key holds exactly that CipherBlob, or is
        absent for None), the check and the writes atomic against every other write.

        One atomic unit in memory, rocksdb and etcd: when any expectation fails nothing is applied
        and the ``ConditionalResult`` names the failed expectations (``changed``) and every write
        (``not_applied``).  The sharded etcd backend checks and applies per shard: an expectation
        always guards the writes to its own key, and the writes to other keys on its shard; the
        parts on other shards are applied or not on their own, and a part that cannot reach its
        shard in time (a virtual shard moving) is reported as not applied with nothing changed.
        Deferred firing with the ``ConditionalResult`` once applied writes are durable per the sync
        mode.  Fails with ``NotFound`` if a collection named is missing (nothing applied); after any
        other failure the writes may or may not have been applied, so callers must not blindly retry.
        """

    def scan(
        collection: str, start: bytes, end: bytes | None, limit: int | None, chunk_size: int
    ) -> IRangeCursor:
        """An ``IRangeCursor`` over ``[start, end)`` (``end`` None: to the end), at most ``limit`` entries.

        Returned synchronously; fails (raises) with ``NotFound`` for a missing collection.
        """

    def sync() -> Deferred[None]:
        """Make every acknowledged write durable (fsync the WAL).  Deferred firing None."""

    def flush() -> Deferred[None]:
        """Persist in-memory state (memtables) and sync.  Deferred firing None."""

    def stats() -> Deferred[dict[str, Any]]:
        """Deferred firing with a dict: ``keys`` per collection (estimate), ``bytes`` total, etc."""

    def snapshot(destination: str) -> Deferred[None]:
        """Write a consistent point-in-time copy into the new directory ``destination``.

        Deferred firing None; fails with ``InvalidOperation`` where the backend cannot.
        """


class IPrincipal(Interface):
    """An authenticated (or anonymous) party: the avatar a cred login returns."""

    id = Attribute("Stable identifier (str).")
    name = Attribute("Display name (str).")
    roles = Attribute("Role names (tuple of str).")
    auth_method = Attribute("How the principal authenticated: 'anonymous', 'jwt', 'api_key', 'mtls'.")


class IAuditSink(Interface):
    """Where audit events go.  Must never raise into the caller and never block the reactor."""

    def emit(event: object) -> None:
        """Record one audit event (a mapping of JSON-serialisable fields)."""


class IServerAdmin(Interface):
    """The server-wide administration the executor runs for admin operations.

    Each method returns a Deferred firing with a JSON-able dict (or list), or failing with an
    ``AmatersError``.  Authorization and audit are the pipeline's business, not this one's.
    """

    def status() -> object:
        """Version, lifecycle state, uptime, backend, open connections, the last reload."""

    def collections() -> object:
        """``{"collections": [{"name", "keys"}, ...]}``."""

    def stats() -> object:
        """The storage backend's statistics."""

    def compact() -> object:
        """Compact the store; ``InvalidOperation`` where the backend has nothing to compact."""

    def reload(requested_by: str) -> object:
        """Reload the configuration (all or nothing); the reload's result as a dict."""

    def list_snapshots(remote: bool) -> object:
        """The snapshots on disk, or in the configured S3 bucket."""

    def create_snapshot(upload: bool) -> object:
        """Take a snapshot now; its manifest as a dict."""

    def verify_snapshot(archive: str) -> object:
        """Check one archive on disk: ``{"archive", "ok", "manifest" | "error"}``; ``NotFound``."""

    def config_view() -> object:
        """The configuration in effect (secrets redacted) and what a reload would change."""

    def audit_tail(limit: int) -> object:
        """The last ``limit`` audit events (oldest first), or none when the audit log is off."""

    def resources() -> object:
        """Data dir usage (bytes used, file system size and free space) and TLS certificates."""

    def cluster_remove_shard(name: str) -> object:
        """Clustered mode: move every virtual shard off shard ``name``, then drop it from the map."""

    def fhe_key_sets() -> object:
        """The stored FHE evaluation key sets and unfinished uploads (``InvalidOperation`` without FHE)."""

    def delete_fhe_key_set(key_set_id: str) -> object:
        """Delete one FHE key set, stored or being uploaded (``NotFound`` when there is neither)."""


class IReconfigurable(Interface):
    """A component whose settings a reload may change (registered with the reloader).

    ``prepare_reload`` builds everything the new config needs (reading files, parsing keys) and
    raises (ideally ``ConfigError``) if it cannot; it must not change the running component.  It
    returns the function that applies what it prepared (which must not fail), or None when there is
    nothing to apply.  It is called on every reload, changed settings or not: files may change in
    place.
    """

    def prepare_reload(old: object, new: object) -> object:
        """A commit callable, or None."""


class IReadScope(Interface):
    """A protocol told where one read from the network begins and ends, when a transport below it
    hands that read over in several pieces (TLS: one record of at most 16 KiB at a time).

    Between the two calls the protocol may hold the pieces, or what it would do at the end of each
    (write its answers, account for them), and handle them once, at :meth:`readFinished`.  No
    reactor turn happens in between, and :meth:`readFinished` is called even when a piece raised.
    """

    def readStarted() -> None:
        """Pieces of one read follow (each through ``dataReceived``)."""

    def readFinished() -> None:
        """The read's last piece has been delivered."""


class IPipelineStage(Interface):
    """One policy step around the executor (auth, RBAC, rate limit, cache, metrics, audit...)."""

    name = Attribute("Short unique name, used to order stages and in logs.")

    def before(ctx: Any, op: Any) -> object:
        """Inspect a request (a ``RequestContext`` and an operation) before it runs.

        Return None to continue (or a Deferred firing None), raise or fail with an AmatersError to
        refuse, or set ``ctx.result`` to answer in place of the executor.

        A stage may also have ``before_many(items)``, for a list of ``(ctx, op)`` pairs of keyed
        requests (GET, SET, DELETE) that arrived together: the same checks as ``before`` on each,
        in order, returning None (all go on), a list of None or an AmatersError per item, or
        ``NotImplemented`` (call ``before`` for each); never a Deferred
        (``QueryPipeline.admit_many`` calls it).  Optional, so not declared here.
        """

    def after(ctx: Any, op: Any, outcome: object) -> None:
        """Observe the outcome: the result, or a Failure wrapping an AmatersError.  Never raises.

        A stage may also have ``after_many(items)``, for a list of ``(ctx, op, outcome)`` triples
        of requests answered together: the same as ``after`` for each of them, in their order
        (``QueryPipeline.settle`` calls it).  Optional, so not declared here.
        """


class IFHEEvaluator(Interface):
    """Homomorphic evaluation on ciphertexts with a client's uploaded public evaluation keys.

    The heavy work runs off the reactor thread (worker processes for concrete, which holds the
    GIL while it evaluates; an I/O thread for the cleartext test evaluator) in pools the
    implementing service owns.  Every method returning a Deferred fails only with AmatersError.
    """

    kind = Attribute("The evaluator: 'concrete' or 'cleartext-insecure'.")

    def unavailable(what: str) -> str | None:
        """One line saying why ``what`` (FILTER, UPDATE, ...) cannot run here, or None."""

    def has_key_set(key_set_id: str) -> bool:
        """Whether evaluation keys with this id (64 hex) are stored on the server."""

    def upload_chunk(chunk: object) -> object:
        """Store one chunk of a key upload (``amaters.fhe.service.KeyUpload``).

        Deferred firing with an ``UploadResult``; on the last chunk the keys are verified against
        their sha256 id and the server's circuit, published and warmed.  Idempotent.
        """

    def evaluate(
        key_set_id: str, action: str, tree: object, updates: object, rows: object, deadline: float
    ) -> object:
        """Deferred firing with, per row (bytes of stored records), the encrypted boolean of
        ``tree`` (``action`` "filter") or the record ``select(tree, updated, old)`` ("update");
        None for rows of another key set or schema.  ``ComputeTimeout`` past ``deadline``."""
