"""The RBAC and audit pipeline stages around the real executor over the memory backend."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from amaters.auth.principal import Principal
from amaters.auth.rbac import RBACPolicy
from amaters.auth.stage import AuditStage, AuthorizationStage
from amaters.config import AuditConfig, LimitsConfig
from amaters.errors import ErrorCode, PermissionDenied, StorageIOError
from amaters.query import operations as ops
from amaters.query.executor import QueryExecutor
from amaters.query.pipeline import PipelineStage, QueryPipeline, RequestContext
from amaters.storage.memory import MemoryBackend
from amaters.types import CipherBlob

BLOB = CipherBlob.wrap(b"ciphertext-bytes")
READER = Principal("rita", "Rita", ("reader",), "jwt")
USER = Principal("ulla", "Ulla", ("user",), "api_key")
ADMIN = Principal("ada", "Ada", ("admin",), "mtls")
NOBODY = Principal("nemo", "Nemo", (), "jwt")


class Sink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: object) -> None:
        assert isinstance(event, dict)
        self.events.append(event)


class Cache(PipelineStage):
    """A stage that answers every GET itself (as a cache hit would)."""

    name = "cache"

    def before(self, ctx: RequestContext, op: Any) -> object:
        if isinstance(op, ops.Get):
            ctx.result = BLOB
        return None


def pipeline(
    audit_settings: AuditConfig | None = None, cache: bool = False, backend: MemoryBackend | None = None
) -> tuple[QueryPipeline, Sink]:
    if backend is None:
        backend = MemoryBackend()
        backend.open()
    pipe = QueryPipeline(QueryExecutor(backend), LimitsConfig())
    if cache:
        pipe.add_stage(Cache())
    sink = Sink()
    first = pipe.stages[0].name if pipe.stages else None
    pipe.add_stage(AuthorizationStage(RBACPolicy(), sink), before=first)
    pipe.add_stage(AuditStage(sink, audit_settings or AuditConfig(enabled=True)))
    return pipe, sink


def run(pipe: QueryPipeline, principal: Principal, op: Any) -> Any:
    return SynchronousTestCase().successResultOf(pipe.execute(RequestContext(1, principal, "10.1.1.1:7"), op))


def refused(pipe: QueryPipeline, principal: Principal, op: Any) -> PermissionDenied:
    d = pipe.execute(RequestContext(1, principal, "10.1.1.1:7"), op)
    failure = SynchronousTestCase().failureResultOf(d, PermissionDenied)
    assert isinstance(failure.value, PermissionDenied)
    return failure.value


def test_reader_can_get_but_not_set() -> None:
    """A reader's GET runs; its SET is refused with AUTH_INSUFFICIENT_PERMISSIONS naming op and resource."""
    pipe, sink = pipeline()
    run(pipe, USER, ops.Set("orders", b"k", BLOB))
    assert run(pipe, READER, ops.Get("orders", b"k")) == BLOB
    error = refused(pipe, READER, ops.Set("orders", b"k", BLOB))
    assert error.code == ErrorCode.AUTH_INSUFFICIENT_PERMISSIONS
    assert "set" in error.message and "collection:orders" in error.message and "write" in error.message
    denial = sink.events[-1]
    assert denial == {
        "event_type": "authorization",
        "result": "denied",
        "principal": "rita",
        "auth_method": "jwt",
        "action": "set",
        "resource": "collection:orders",
        "source": "10.1.1.1:7",
        "error": denial["error"],
    }
    assert denial["error"].startswith("AUTH_INSUFFICIENT_PERMISSIONS")


def test_denied_requests_never_reach_the_executor() -> None:
    """A refused write changes nothing in storage."""
    pipe, _ = pipeline()
    refused(pipe, READER, ops.Set("orders", b"k", BLOB))
    assert run(pipe, ADMIN, ops.Get("orders", b"k")) is None


def test_user_cannot_drop_a_collection_but_admin_can() -> None:
    """Dropping a collection needs admin: a user is refused, an admin succeeds and is audited."""
    pipe, sink = pipeline()
    run(pipe, USER, ops.Set("orders", b"k", BLOB))
    error = refused(pipe, USER, ops.DropCollection("orders"))
    assert "drop_collection" in error.message and "admin" in error.message
    assert run(pipe, ADMIN, ops.DropCollection("orders")) is True
    admin_event = sink.events[-1]
    assert (admin_event["event_type"], admin_event["result"], admin_event["action"]) == (
        "admin",
        "success",
        "drop_collection",
    )


def test_principal_without_roles_is_denied_everything() -> None:
    """Deny by default: no roles, no operation (even listing collections or server info)."""
    pipe, _ = pipeline()
    for op in (ops.Get("c", b"k"), ops.ListCollections(), ops.ServerInfo(), ops.HealthCheck()):
        refused(pipe, NOBODY, op)


def test_rbac_runs_before_a_cache() -> None:
    """A cached answer is never served to a principal who may not read it."""
    pipe, _ = pipeline(cache=True)
    assert [s.name for s in pipe.stages][:2] == ["rbac", "cache"]
    refused(pipe, NOBODY, ops.Get("c", b"k"))
    assert run(pipe, READER, ops.Get("c", b"k")) == BLOB


def test_successful_reads_are_audited_only_with_log_reads() -> None:
    """Reads are not audited by default; with audit.log_reads they are."""
    pipe, sink = pipeline(AuditConfig(enabled=True))
    run(pipe, READER, ops.Get("c", b"k"))
    assert sink.events == []
    pipe, sink = pipeline(AuditConfig(enabled=True, log_reads=True))
    run(pipe, READER, ops.Get("c", b"k"))
    assert [(e["action"], e["result"]) for e in sink.events] == [("get", "success")]


def test_writes_are_audited_unless_turned_off() -> None:
    """Successful writes are audited by default (audit.log_writes), never with the key or value."""
    pipe, sink = pipeline()
    run(pipe, USER, ops.Set("c", b"secret-key", BLOB))
    (event,) = sink.events
    assert (event["event_type"], event["action"], event["resource"]) == (
        "authorization",
        "set",
        "collection:c",
    )
    assert "secret-key" not in repr(sink.events) and "ciphertext" not in repr(sink.events)
    pipe, sink = pipeline(AuditConfig(enabled=True, log_writes=False))
    run(pipe, USER, ops.Set("c", b"k", BLOB))
    assert sink.events == []


def test_failed_requests_are_always_audited() -> None:
    """A request that fails after authorization is audited as a failure with its error code."""

    class BrokenDisk(MemoryBackend):
        def get(self, collection: str, key: bytes) -> defer.Deferred[Any]:
            return defer.fail(StorageIOError("read failed"))

    broken = BrokenDisk()
    broken.open()
    broken.create_collection("c")
    pipe, sink = pipeline(AuditConfig(enabled=True, log_reads=False), backend=broken)
    d = pipe.execute(RequestContext(1, READER, "10.1.1.1:7"), ops.Get("c", b"k"))
    SynchronousTestCase().failureResultOf(d, StorageIOError)
    (event,) = sink.events
    assert (event["action"], event["result"]) == ("get", "failure")
    assert event["error"] == "STORAGE_IO: read failed"


def test_a_batch_is_checked_item_by_item() -> None:
    """A batch mixing collections needs each item's permission; the denial names the item."""
    pipe, _ = pipeline()
    batch = ops.Batch((ops.Get("a", b"k"), ops.Set("b", b"k", BLOB)))
    error = refused(pipe, READER, batch)
    assert "batch (set)" in error.message and "collection:b" in error.message
    assert run(pipe, USER, batch) == [None, None]


@pytest.mark.parametrize("principal", [READER, USER, ADMIN])
def test_server_information_is_readable_by_every_builtin_role(principal: Principal) -> None:
    """Server info, health and listing collections need read on server, which all built-ins have."""
    pipe, _ = pipeline()
    for op in (ops.ListCollections(), ops.ServerInfo(), ops.HealthCheck()):
        run(pipe, principal, op)


def test_needed_permission_matches_required_access() -> None:
    """The audit stage's shortcut for what an operation needs agrees with required_access for every
    operation type, a batch (mixed, read-only, empty) and an operation of unknown kind."""
    from amaters.auth.rbac import Permission, required_access
    from amaters.auth.stage import _needed_permission

    class Odd:
        name = "odd"
        kind = "READ"  # not a kind operations use: the general path decides
        collection = "c"

    class Unknown:
        name = "unknown"
        kind = "sideways"
        collection = None

    value = CipherBlob.wrap(b"v")
    operations: list[Any] = [
        ops.Get("c", b"k"),
        ops.Set("c", b"k", value),
        ops.Delete("c", b"k"),
        ops.Range("c", b"a", b"z"),
        ops.Batch((ops.Get("c", b"k"), ops.Set("d", b"k", value))),
        ops.Batch((ops.Get("c", b"k"),)),
        ops.Batch(()),
        ops.CreateCollection("c"),
        ops.DropCollection("c"),
        ops.ListCollections(),
        ops.ServerInfo(),
        ops.HealthCheck(),
        Odd(),
        Unknown(),
    ]
    for op in operations:
        expected = max((a.permission for a in required_access(op)), default=Permission.ADMIN)
        assert _needed_permission(op) is expected, op
