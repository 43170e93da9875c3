"""Collection creation as a permission, the collection count limit and listings filtered by read
permission: the RBAC stage (given the backend) and the executor over the memory backend."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer

from amaters.auth.principal import Principal
from amaters.auth.rbac import RBACPolicy
from amaters.auth.stage import AuthorizationStage
from amaters.config import LimitsConfig
from amaters.errors import ErrorCode, PermissionDenied, SizeExceeded
from amaters.query import operations as ops
from amaters.query.executor import QueryExecutor
from amaters.query.pipeline import QueryPipeline, RequestContext
from amaters.storage.memory import MemoryBackend
from amaters.types import CipherBlob

BLOB = CipherBlob.wrap(b"ciphertext")
USER = Principal("ulla", "Ulla", ("user",), "api_key")
ADMIN = Principal("ada", "Ada", ("admin",), "mtls")
TENANT = Principal("tia", "Tia", ("tenant_a",), "jwt")

POLICY = RBACPolicy.from_data(
    {
        "roles": {
            "tenant_a": {
                "inherits": [],
                "permissions": [{"resource": "collection:a_*", "permission": "create"}],
            }
        }
    }
)


class Sink:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def emit(self, event: object) -> None:
        self.events.append(event)


def setup(limits: LimitsConfig | None = None) -> tuple[QueryPipeline, MemoryBackend, Sink]:
    backend = MemoryBackend()
    backend.open()
    pipe = QueryPipeline(QueryExecutor(backend), limits or LimitsConfig())
    sink = Sink()
    pipe.add_stage(AuthorizationStage(POLICY, sink, collections=backend))
    return pipe, backend, sink


def run(pipe: QueryPipeline, principal: Principal, op: Any) -> Any:
    d = pipe.execute(RequestContext(1, principal, "127.0.0.1:1"), op)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not answered synchronously"
    return results[0]


def test_a_user_cannot_create_a_collection_by_writing_to_it() -> None:
    """A first SET by a 'user' (write, no create) is refused and audited; nothing is created."""
    pipe, backend, sink = setup()
    failure = run(pipe, USER, ops.Set("new", b"k", BLOB))
    assert isinstance(failure.value, PermissionDenied)
    assert "create permission" in failure.value.message and "collection:new" in failure.value.message
    assert not backend.has_collection("new")
    assert sink.events and sink.events[-1]["result"] == "denied"


def test_a_user_writes_to_collections_that_exist() -> None:
    """Once an admin has created it, a 'user' writes to it."""
    pipe, backend, _ = setup()
    assert run(pipe, ADMIN, ops.CreateCollection("c")) is True
    assert run(pipe, USER, ops.Set("c", b"k", BLOB)) is None
    assert run(pipe, ADMIN, ops.Set("auto", b"k", BLOB)) is None  # admin auto-creates
    assert backend.has_collection("auto")


def test_create_is_granted_per_role_and_pattern() -> None:
    """A role with create on collection:a_* auto-creates a_x but not b_x, nor by a batch."""
    pipe, backend, _ = setup()
    assert run(pipe, TENANT, ops.Set("a_x", b"k", BLOB)) is None
    assert backend.has_collection("a_x")
    failure = run(pipe, TENANT, ops.CreateCollection("b_x"))
    assert isinstance(failure.value, PermissionDenied)
    batch = ops.Batch((ops.Set("a_y", b"k", BLOB), ops.Set("b_y", b"k", BLOB)))
    failure = run(pipe, TENANT, batch)
    assert isinstance(failure.value, PermissionDenied) and "collection:b_y" in failure.value.message
    assert not backend.has_collection("a_y") and not backend.has_collection("b_y")


def test_listing_shows_only_readable_collections() -> None:
    """LIST_COLLECTIONS answers with the collections the caller may read."""
    pipe, _, _ = setup()
    for name in ("a_1", "b_1", "a_2"):
        assert run(pipe, ADMIN, ops.CreateCollection(name)) is True
    reader_a = Principal("r", "R", ("reader_a",), "jwt")
    policy = RBACPolicy.from_data(
        {
            "roles": {
                "reader_a": {
                    "permissions": [
                        {"resource": "collection:a_*", "permission": "read"},
                        {"resource": "server", "permission": "read"},
                    ]
                }
            }
        }
    )
    stage = pipe.stages[0]
    assert isinstance(stage, AuthorizationStage)
    stage.policy = policy
    assert run(pipe, reader_a, ops.ListCollections()) == ["a_1", "a_2"]
    assert run(pipe, ADMIN, ops.ListCollections()) == ["a_1", "a_2", "b_1"]


@pytest.mark.parametrize("how", ["create", "set", "batch"])
def test_the_collection_count_is_limited(how: str) -> None:
    """Past limits.max_collections neither CREATE_COLLECTION, a first SET nor a BATCH creates one."""
    pipe, backend, _ = setup(LimitsConfig(max_collections=2))
    run(pipe, ADMIN, ops.CreateCollection("one"))
    run(pipe, ADMIN, ops.CreateCollection("two"))
    op: Any = {
        "create": ops.CreateCollection("three"),
        "set": ops.Set("three", b"k", BLOB),
        "batch": ops.Batch((ops.Set("one", b"k", BLOB), ops.Set("three", b"k", BLOB))),
    }[how]
    failure = run(pipe, ADMIN, op)
    assert isinstance(failure.value, SizeExceeded)
    assert failure.value.code == ErrorCode.VALIDATION_SIZE_EXCEEDED
    assert "limits.max_collections" in failure.value.message
    assert backend.collection_count() == 2
    assert run(pipe, ADMIN, ops.Set("one", b"k", BLOB)) is None  # existing ones still take writes
    pipe.update_limits(LimitsConfig(max_collections=3))
    assert not isinstance(run(pipe, ADMIN, op), defer.Deferred)
    assert backend.has_collection("three")


def outcome_of(done: bool, result: Any) -> Any:
    if done:
        return ("ok", result)
    failures: list[Any] = []
    result.addErrback(failures.append)
    return ("refused", failures[0].value.message) if failures else ("ok", result.result)


@pytest.mark.parametrize("principal", [USER, TENANT, ADMIN], ids=lambda p: p.name)
def test_the_requests_of_one_read_are_authorized_as_one_by_one(principal: Principal) -> None:
    """The keyed requests of one read (run_many) get the decisions they would get one by one:
    a write that would create a collection is refused for each such request (and each refusal is
    audited), other requests go through; one decision serves the requests alike that follow."""
    requests = [
        ops.Set("new", b"k1", BLOB),
        ops.Set("new", b"k2", BLOB),
        ops.Set("c", b"k", BLOB),
        ops.Get("c", b"k"),
        ops.Set("a_new", b"k", BLOB),
        ops.Delete("c", b"k"),
        ops.Set("new", b"k3", BLOB),
    ]
    one_by_one, _, sink = setup()
    assert run(one_by_one, ADMIN, ops.CreateCollection("c")) is True
    expected = [run(one_by_one, principal, op) for op in requests]
    expected = [("refused", r.value.message) if hasattr(r, "value") else ("ok", r) for r in expected]
    expected_denials = [e for e in sink.events if e["result"] == "denied"]

    together, _, sink = setup()
    assert run(together, ADMIN, ops.CreateCollection("c")) is True
    items = [(RequestContext(i, principal, "127.0.0.1:1"), op) for i, op in enumerate(requests)]
    got = [outcome_of(done, result) for done, result in together.run_many(items, [])]
    assert got == expected
    assert len([e for e in sink.events if e["result"] == "denied"]) == len(expected_denials)
    if principal is USER:
        assert [kind for kind, _ in got] == ["refused", "refused", "ok", "ok", "refused", "ok", "refused"]
