"""Session tokens: parsing, revision scopes, and the etcd backend's read-your-writes fallback."""

from __future__ import annotations

from typing import Any

import pytest
from storage_helpers import result_of
from twisted.internet import defer
from twisted.internet.task import Clock

from amaters.cluster import session
from amaters.cluster.etcd import b64
from amaters.storage.etcd import EtcdBackend
from amaters.types import CipherBlob


def test_tokens_round_trip_and_keep_the_newest() -> None:
    """A token lists shard:revision pairs; parsing keeps the highest revision per shard."""
    assert session.format_token({"1": 7, "0": 12}) == "0:12,1:7"
    assert session.parse_token("0:12,1:7,0:3") == {"0": 12, "1": 7}
    assert session.parse_token("") == {}


@pytest.mark.parametrize("bad", ["12", "0:x", ":5", "0:-1"])
def test_malformed_tokens_are_one_line_errors(bad: str) -> None:
    """A malformed token is refused with a message naming the bad part."""
    with pytest.raises(ValueError, match="is not shard:revision"):
        session.parse_token(bad)


def test_scope_collects_observed_revisions_only_while_current() -> None:
    """observe() records into the current scope only; wanted() reads the client's revisions."""
    scope = session.RevisionScope({"0": 40})
    session.observe("0", 99)  # no scope: ignored
    token = session.enter(scope)
    try:
        assert session.wanted("0") == 40 and session.wanted("1") == 0
        session.observe("0", 41)
        session.observe("0", 39)
    finally:
        session.leave(token)
    assert scope.seen == {"0": 41}
    assert session.wanted("0") == 0


class FakeEtcd:
    """Answers transactions like an etcd whose member lags: serializable reads see revision 10,
    quorum reads revision 20."""

    def __init__(self) -> None:
        self.calls: list[bool] = []
        self.revision = 0

    def txn(self, compare: Any, success: Any, failure: Any = None, idempotent: bool = False) -> Any:
        serializable = bool(success[0]["request_range"].get("serializable"))
        self.calls.append(serializable)
        revision = 10 if serializable else 20
        kv = {"key": success[0]["request_range"]["key"], "value": b64(b""), "mod_revision": "5"}
        answer = {
            "header": {"revision": str(revision)},
            "succeeded": True,
            "responses": [{"response_range": {"kvs": [] if serializable else [kv]}}],
        }
        return defer.succeed(answer)


def read_with_token(want: int) -> tuple[list[bool], dict[str, int]]:
    fake = FakeEtcd()
    backend = EtcdBackend(fake, Clock(), serializable_reads=True)  # type: ignore[arg-type]
    scope = session.RevisionScope({"0": want})
    token = session.enter(scope)
    try:
        d = backend.get("c", b"k")
    finally:
        session.leave(token)
    d.addErrback(lambda f: None)  # the fake's empty value is not a valid record; only calls matter
    result_of(d)
    return fake.calls, scope.seen


def test_serializable_read_behind_the_session_goes_through_the_quorum() -> None:
    """A serializable read at a revision older than the session token is repeated linearizably."""
    calls, seen = read_with_token(15)
    assert calls == [True, False]
    assert seen == {"0": 20}


def test_serializable_read_as_new_as_the_session_is_served_locally() -> None:
    """A serializable read already at or past the token is answered without a quorum round."""
    calls, seen = read_with_token(10)
    assert calls == [True]
    assert seen == {"0": 10}


class SharedCollections:
    """A memory store whose has_collection cache never saw another server's collections."""

    collections_remote = True

    def __init__(self) -> None:
        from amaters.storage.memory import MemoryBackend

        self.memory = MemoryBackend()

    def has_collection(self, name: str) -> bool:
        return False

    def get(self, collection: str, key: bytes) -> Any:
        return self.memory.get(collection, key)

    def delete(self, collection: str, key: bytes) -> Any:
        return self.memory.delete(collection, key)


@pytest.mark.parametrize("auto_create", [True, False])
def test_executor_asks_a_clustered_store_when_its_collection_cache_misses(auto_create: bool) -> None:
    """A collection another node created (not yet in this node's cache) is read, not reported empty;
    a collection that really is missing reads as absent (auto-create) or NotFound."""
    from amaters.errors import NotFound
    from amaters.query import operations as ops
    from amaters.query.executor import QueryExecutor

    store = SharedCollections()
    result_of(store.memory.create_collection("elsewhere"))
    result_of(store.memory.put("elsewhere", b"k", CipherBlob.wrap(b"v")))
    executor = QueryExecutor(store, auto_create_collections=auto_create)  # type: ignore[arg-type]
    assert result_of(executor.get(ops.Get("elsewhere", b"k"))).data == b"v"
    missing = executor.get(ops.Get("nowhere", b"k"))
    if auto_create:
        assert result_of(missing) is None
        assert result_of(executor.delete(ops.Delete("nowhere", b"k"))) is False
    else:
        with pytest.raises(NotFound):
            result_of(missing)
