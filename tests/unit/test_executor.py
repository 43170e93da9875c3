"""QueryExecutor, QueryPipeline stages and the input rules, over the memory backend."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from amaters.config import LimitsConfig
from amaters.errors import (
    AmatersError,
    ErrorCode,
    InvalidCollection,
    InvalidKey,
    InvalidOperation,
    InvalidValue,
    MissingField,
    NotFound,
    PermissionDenied,
    ProtocolError,
    ServerError,
    SizeExceeded,
    StorageFull,
    Unavailable,
)
from amaters.proto import aql_pb2, query_pb2, types_pb2
from amaters.protocols.server import ANONYMOUS
from amaters.query import operations as ops
from amaters.query.executor import QueryExecutor
from amaters.query.pipeline import PipelineStage, QueryPipeline, RequestContext
from amaters.query.validation import Validator
from amaters.storage.memory import MemoryBackend
from amaters.types import CipherBlob, WriteOp, crc32


class FailingWrites(MemoryBackend):
    """A memory backend whose write_batch fails like a full disk."""

    def write_batch(self, ops: Any) -> defer.Deferred[None]:
        return defer.fail(StorageFull("disk full"))


def value(data: bytes) -> CipherBlob:
    return CipherBlob.wrap(data)


def run(d: defer.Deferred[Any]) -> Any:
    """The result of an already-fired Deferred (the memory backend answers synchronously)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred did not fire"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def executor(backend: MemoryBackend | None = None, auto_create: bool = True) -> QueryExecutor:
    backend = backend or MemoryBackend()
    backend.open()
    return QueryExecutor(backend, auto_create_collections=auto_create, range_chunk_size=2)


# -- executor ----------------------------------------------------------------------------------


def test_get_of_a_missing_key_is_none() -> None:
    """GET of a key (or collection) never written is None, not an error."""
    ex = executor()
    assert run(ex.execute(ops.Get("c", b"k"))) is None
    run(ex.execute(ops.Set("c", b"other", value(b"v"))))
    assert run(ex.execute(ops.Get("c", b"k"))) is None


def test_set_creates_the_collection_and_overwrites() -> None:
    """The first SET creates the collection; a second SET replaces the value."""
    ex = executor()
    run(ex.execute(ops.Set("c", b"k", value(b"1"))))
    run(ex.execute(ops.Set("c", b"k", value(b"2"))))
    assert run(ex.execute(ops.ListCollections())) == ["c"]
    assert run(ex.execute(ops.Get("c", b"k"))).data == b"2"


def test_a_set_is_written_at_once_only_where_nothing_waits() -> None:
    """set_now writes a SET into an existing collection of the memory backend (behind the retry
    layer too) at once; into a missing collection it does nothing, and execute creates it; over a
    backend that has no put_now it never writes."""
    import random

    from amaters.storage.retry import RetryingBackend, RetryPolicy

    memory = MemoryBackend()
    memory.open()
    ex = QueryExecutor(RetryingBackend(memory, RetryPolicy(), Clock(), random.Random(1)))
    first = ops.Set("c", b"k", value(b"1"))
    assert ex.writes_now
    assert not ex.set_now(first)
    assert run(ex.execute(ops.ListCollections())) == []
    run(ex.execute(first))
    assert ex.set_now(ops.Set("c", b"k", value(b"2")))
    assert ex.set_now(ops.Set("c", b"new", value(b"3")))
    assert run(ex.execute(ops.Get("c", b"k"))).data == b"2"
    assert run(ex.execute(ops.Range("c", b"", None))) == [(b"k", value(b"2")), (b"new", value(b"3"))]

    class Deferring(MemoryBackend):
        """A backend whose writes may wait (RocksDB, etcd): a changed put turns put_now off."""

        def put(self, collection: str, key: bytes, value: CipherBlob) -> defer.Deferred[None]:
            return super().put(collection, key, value)

    later = QueryExecutor(RetryingBackend(Deferring(), RetryPolicy(), Clock(), random.Random(1)))
    later.backend.open()
    run(later.execute(first))
    assert not later.writes_now  # the pipeline does not ask it
    assert not later.set_now(ops.Set("c", b"k", value(b"2")))
    assert run(later.execute(ops.Get("c", b"k"))).data == b"1"


def test_without_auto_create_missing_collections_are_not_found() -> None:
    """With auto-create off, every operation on a missing collection fails with STORAGE_NOT_FOUND."""
    ex = executor(auto_create=False)
    for op in (ops.Get("c", b"k"), ops.Set("c", b"k", value(b"v")), ops.Delete("c", b"k")):
        with pytest.raises(NotFound):
            run(ex.execute(op))
    with pytest.raises(NotFound):
        ex.open_range(ops.Range("c", b"", None))
    run(ex.execute(ops.CreateCollection("c")))
    run(ex.execute(ops.Set("c", b"k", value(b"v"))))


def test_delete_reports_whether_the_key_existed() -> None:
    """DELETE is True for an existing key and False after it is gone."""
    ex = executor()
    run(ex.execute(ops.Set("c", b"k", value(b"v"))))
    assert run(ex.execute(ops.Delete("c", b"k"))) is True
    assert run(ex.execute(ops.Delete("c", b"k"))) is False


def test_range_is_half_open_ascending_and_limited() -> None:
    """RANGE [0005, 0015) over 20 keys gives 0005..0014 in order; limit cuts it; start > end is empty."""
    ex = executor()
    for i in range(20):
        run(ex.execute(ops.Set("c", b"%04d" % i, value(b"%d" % i))))
    keys = [k for k, _ in run(ex.execute(ops.Range("c", b"0005", b"0015")))]
    assert keys == [b"%04d" % i for i in range(5, 15)]
    assert len(run(ex.execute(ops.Range("c", b"0005", b"0015", 3)))) == 3
    assert run(ex.execute(ops.Range("c", b"0015", b"0005"))) == []
    assert run(ex.execute(ops.Range("c", b"", None, 0))) == []
    assert len(run(ex.execute(ops.Range("c", b"", None)))) == 20


def test_batch_reads_see_earlier_writes_of_the_batch() -> None:
    """Inside a batch, GET after SET sees the new value and GET after DELETE sees nothing."""
    ex = executor()
    run(ex.execute(ops.Set("c", b"a", value(b"old"))))
    batch = ops.Batch(
        (
            ops.Get("c", b"a"),
            ops.Set("c", b"a", value(b"new")),
            ops.Get("c", b"a"),
            ops.Delete("c", b"a"),
            ops.Get("c", b"a"),
            ops.Delete("c", b"a"),
            ops.Set("d", b"x", value(b"in a new collection")),
        )
    )
    results = run(ex.execute(batch))
    assert results[0].data == b"old"
    assert results[1] is None
    assert results[2].data == b"new"
    assert results[3] is True
    assert results[4] is None
    assert results[5] is False
    assert run(ex.execute(ops.Get("c", b"a"))) is None
    assert run(ex.execute(ops.Get("d", b"x"))).data == b"in a new collection"


def test_failed_batch_applies_nothing_and_creates_no_collection() -> None:
    """When the atomic write fails, no write is visible and auto-created collections are dropped."""
    backend = FailingWrites()
    ex = executor(backend)
    run(ex.execute(ops.CreateCollection("c")))
    batch = ops.Batch((ops.Set("c", b"a", value(b"1")), ops.Set("new", b"b", value(b"2"))))
    with pytest.raises(StorageFull):
        run(ex.execute(batch))
    assert run(ex.execute(ops.ListCollections())) == ["c"]
    assert run(ex.execute(ops.Get("c", b"a"))) is None


def test_batch_uses_one_atomic_backend_write() -> None:
    """All writes of a batch reach the backend as one write_batch call."""
    calls: list[list[WriteOp]] = []

    class Recording(MemoryBackend):
        def write_batch(self, ops: Any) -> defer.Deferred[None]:
            calls.append(list(ops))
            return super().write_batch(ops)

    ex = executor(Recording())
    run(ex.execute(ops.Batch(tuple(ops.Set("c", b"%d" % i, value(b"v")) for i in range(5)))))
    assert len(calls) == 1 and len(calls[0]) == 5


def test_operations_hide_keys_and_values_in_repr() -> None:
    """An operation can be logged: its repr shows the collection but not the key or the value."""
    text = repr(ops.Set("users", b"alice-secret-key", value(b"secret value")))
    assert "users" in text and "alice" not in text and "secret value" not in text


# -- validation --------------------------------------------------------------------------------


@given(st.from_regex(r"[A-Za-z0-9_.\-]{1,128}", fullmatch=True))
def test_valid_collection_names_pass(name: str) -> None:
    """Every name of 1 to 128 characters from [A-Za-z0-9_.-] is accepted."""
    assert Validator(LimitsConfig()).collection(name) == name


@pytest.mark.parametrize("name", ["", "a b", "a/b", "é", "x" * 129, "semi;colon", "new\nline"])
def test_invalid_collection_names_are_refused(name: str) -> None:
    """Names outside the rule get VALIDATION_INVALID_COLLECTION."""
    with pytest.raises(InvalidCollection):
        Validator(LimitsConfig()).collection(name)


def get_query(collection: str, key: bytes) -> query_pb2.Query:
    return query_pb2.Query(get=query_pb2.GetQuery(collection=collection, key=types_pb2.Key(data=key)))


def set_query(collection: str, key: bytes, data: bytes, checksum: int | None = None) -> query_pb2.Query:
    blob = types_pb2.CipherBlob(
        data=data, metadata=types_pb2.CipherMetadata(checksum=crc32(data) if checksum is None else checksum)
    )
    return query_pb2.Query(
        set=query_pb2.SetQuery(collection=collection, key=types_pb2.Key(data=key), value=blob)
    )


def test_key_and_value_limits() -> None:
    """Keys must be 1..max_key_bytes; values at most max_value_bytes with a matching CRC32."""
    v = Validator(LimitsConfig(max_key_bytes=4, max_value_bytes=10))
    assert v.query(get_query("c", b"1234")) == ops.Get("c", b"1234")
    with pytest.raises(InvalidKey):
        v.query(get_query("c", b""))
    with pytest.raises(SizeExceeded):
        v.query(get_query("c", b"12345"))
    assert v.query(set_query("c", b"k", b"")).value.data == b""
    with pytest.raises(SizeExceeded):
        v.query(set_query("c", b"k", b"x" * 11))
    with pytest.raises(InvalidValue):
        v.query(set_query("c", b"k", b"abc", checksum=crc32(b"abd")))
    with pytest.raises(MissingField):
        v.query(query_pb2.Query(set=query_pb2.SetQuery(collection="c", key=types_pb2.Key(data=b"k"))))
    with pytest.raises(MissingField):
        v.query(query_pb2.Query())


def test_filter_and_update_name_the_missing_evaluator() -> None:
    """FILTER and UPDATE are refused with COMPUTE_INVALID_OPERATION naming the FHE evaluator."""
    v = Validator(LimitsConfig())
    for q in (
        query_pb2.Query(filter=query_pb2.FilterQuery(collection="c")),
        query_pb2.Query(update=query_pb2.UpdateQuery(collection="c")),
    ):
        with pytest.raises(InvalidOperation, match="FHE evaluator"):
            v.query(q)


def test_batch_rules() -> None:
    """A batch needs 1..max_batch_ops items, only GET/SET/DELETE, and names the bad item."""
    v = Validator(LimitsConfig(max_batch_ops=2))
    with pytest.raises(MissingField):
        v.batch(aql_pb2.BatchRequest())
    with pytest.raises(SizeExceeded):
        v.batch(aql_pb2.BatchRequest(queries=[get_query("c", b"k")] * 3))
    ranged = query_pb2.Query(range=query_pb2.RangeQuery(collection="c"))
    with pytest.raises(ProtocolError, match="batch query 1"):
        v.batch(aql_pb2.BatchRequest(queries=[get_query("c", b"k"), ranged]))
    with pytest.raises(InvalidKey, match="batch query 0"):
        v.batch(aql_pb2.BatchRequest(queries=[get_query("c", b"")]))


# -- pipeline stages ---------------------------------------------------------------------------


def pipeline(*stages: Any) -> QueryPipeline:
    return QueryPipeline(executor(), LimitsConfig(), stages)


def ctx() -> RequestContext:
    return RequestContext(1, ANONYMOUS, "127.0.0.1:1")


def test_stage_can_refuse_before_the_executor_runs() -> None:
    """A stage raising an AmatersError refuses the request; the executor never runs."""

    class DenyWrites(PipelineStage):
        name = "rbac"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            if op.kind == "write":
                raise PermissionDenied(f"{ctx.principal.name} may not write")
            return None

    p = pipeline(DenyWrites())
    with pytest.raises(PermissionDenied):
        run(p.execute(ctx(), ops.Set("c", b"k", value(b"v"))))
    assert run(p.execute(ctx(), ops.Get("c", b"k"))) is None
    assert run(p.execute(ctx(), ops.ListCollections())) == []


def test_stage_can_answer_in_place_of_the_executor() -> None:
    """A stage that sets ctx.result (a cache hit) answers; later stages' before() do not run."""
    seen: list[str] = []

    class Cache(PipelineStage):
        name = "cache"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            ctx.result = value(b"cached")
            return None

    class Later(PipelineStage):
        name = "later"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            seen.append("later")
            return None

    p = pipeline(Cache(), Later())
    assert run(p.execute(ctx(), ops.Get("c", b"k"))).data == b"cached"
    assert seen == []


def test_asynchronous_stage_and_after_hooks_see_every_outcome() -> None:
    """A stage may wait (Deferred); after() sees results and failures; a crashing after() is contained."""
    gate: defer.Deferred[None] = defer.Deferred()
    outcomes: list[Any] = []

    class Slow(PipelineStage):
        name = "slow"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            return gate

    class Observe(PipelineStage):
        name = "metrics"

        def after(self, ctx: RequestContext, op: ops.Operation, outcome: object) -> None:
            outcomes.append(outcome)

    class Broken(PipelineStage):
        name = "broken"

        def after(self, ctx: RequestContext, op: ops.Operation, outcome: object) -> None:
            raise RuntimeError("metrics bug")

    class NoDrops(PipelineStage):
        name = "no-drops"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            if op.name == "drop_collection":
                raise PermissionDenied("no")
            return None

    p = pipeline(Slow(), NoDrops(), Observe(), Broken())
    d = p.execute(ctx(), ops.Set("c", b"k", value(b"v")))
    assert not d.called
    gate.callback(None)
    assert run(d) is None
    with pytest.raises(PermissionDenied):
        run(p.execute(ctx(), ops.DropCollection("c")))
    assert outcomes[0] is None
    assert isinstance(outcomes[1], Failure) and outcomes[1].check(PermissionDenied)


def test_unexpected_errors_become_server_internal() -> None:
    """A non-AmatersError from a stage becomes SERVER_INTERNAL with a generic message."""

    class Buggy(PipelineStage):
        name = "buggy"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            raise KeyError("internal detail")

    p = pipeline(Buggy())
    with pytest.raises(ServerError) as info:
        run(p.execute(ctx(), ops.Get("c", b"k")))
    assert "internal detail" not in info.value.message
    assert isinstance(info.value, AmatersError)


def test_stages_are_ordered_by_name() -> None:
    """add_stage inserts at the end or before/after a named stage; duplicates are refused."""

    def stage(n: str) -> PipelineStage:
        s = PipelineStage()
        s.name = n
        return s

    p = pipeline(stage("auth"), stage("metrics"))
    p.add_stage(stage("rbac"), after="auth")
    p.add_stage(stage("rate"), before="rbac")
    assert [s.name for s in p.stages] == ["auth", "rate", "rbac", "metrics"]
    with pytest.raises(ValueError):
        p.add_stage(stage("auth"))
    p.remove_stage("rate")
    assert [s.name for s in p.stages] == ["auth", "rbac", "metrics"]


def test_reloaded_limits_apply_to_new_requests() -> None:
    """update_limits changes what the next request is validated against."""
    p = pipeline()
    assert p.decode_query(get_query("c", b"12345"))
    p.update_limits(LimitsConfig(max_key_bytes=4))
    with pytest.raises(SizeExceeded):
        p.decode_query(get_query("c", b"12345"))


class GatedEvaluator:
    """An FHE evaluator whose evaluations finish when the test says (each call's rows recorded)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], defer.Deferred[list[bytes | None]]]] = []

    def has_key_set(self, key_set_id: str) -> bool:
        return True

    def evaluate(
        self, key_set_id: str, action: str, tree: object, updates: object, rows: list[bytes], deadline: float
    ) -> defer.Deferred[list[bytes | None]]:
        d: defer.Deferred[list[bytes | None]] = defer.Deferred()
        self.calls.append((rows, d))
        return d

    def finish(self, index: int) -> None:
        rows, d = self.calls[index]
        d.callback([b"flag:" + row for row in rows])


def test_filter_rows_are_evaluated_and_returned_chunk_by_chunk_and_stop_when_closed() -> None:
    """A FILTER over 20 encrypted rows is evaluated 8 rows at a time: each chunk answers with its
    rows' encrypted booleans as soon as they are evaluated, and once the cursor is closed (the
    stream cancelled or its connection gone) no further row is evaluated."""
    from amaters.fhe.records import MAGIC
    from amaters.query.executor import FILTER_CHUNK_ROWS

    backend = MemoryBackend()
    backend.open()
    backend.create_collection("people")
    for i in range(20):
        backend.put("people", b"k%02d" % i, CipherBlob.wrap(MAGIC + b"row%02d" % i))
    backend.put("people", b"plain", CipherBlob.wrap(b"not a record"))
    fhe = GatedEvaluator()
    executor = QueryExecutor(backend, fhe=fhe, clock=Clock())
    cursor = executor.open_filter(ops.Filter("people", "a" * 64, object()))

    first = cursor.next_chunk()
    assert not first.called and [len(rows) for rows, _ in fhe.calls] == [FILTER_CHUNK_ROWS]
    fhe.finish(0)
    chunk = SynchronousTestCase().successResultOf(first)
    assert [key for key, _, _ in chunk] == [b"k%02d" % i for i in range(8)]
    assert chunk[0][2] == b"flag:" + MAGIC + b"row00"

    second = cursor.next_chunk()
    fhe.finish(1)
    assert len(SynchronousTestCase().successResultOf(second)) == 8
    cursor.close()
    assert SynchronousTestCase().successResultOf(cursor.next_chunk()) == []
    assert len(fhe.calls) == 2  # the last 4 rows were never evaluated


def _update_setup(rows: int) -> tuple[MemoryBackend, GatedEvaluator, QueryExecutor, Any]:
    from amaters.fhe.records import MAGIC

    backend = MemoryBackend()
    backend.open()
    backend.create_collection("people")
    for i in range(rows):
        backend.put("people", b"k%d" % i, CipherBlob.wrap(MAGIC + b"v0"))
    fhe = GatedEvaluator()
    executor = QueryExecutor(backend, fhe=fhe, clock=Clock())
    return backend, fhe, executor, MAGIC


def test_update_keeps_writes_that_land_while_it_evaluates() -> None:
    """A SET, a DELETE and a DELETE-then-SET on rows an UPDATE is evaluating are not lost: the
    changed rows are read and evaluated again from their new values, the deleted row stays
    deleted, and the count is the rows really written."""
    backend, fhe, executor, magic = _update_setup(5)
    d = executor.execute(ops.Update("people", "a" * 64, object(), ()))
    assert [len(rows) for rows, _ in fhe.calls] == [5]
    backend.put("people", b"k1", CipherBlob.wrap(magic + b"v1"))  # acknowledged meanwhile
    backend.delete("people", b"k2")
    backend.delete("people", b"k3")
    backend.put("people", b"k3", CipherBlob.wrap(magic + b"v3"))
    backend.put("people", b"k9", CipherBlob.wrap(magic + b"new"))  # a new row: not examined
    fhe.finish(0)
    assert not d.called
    assert sorted(fhe.calls[1][0]) == [magic + b"v1", magic + b"v3"]
    fhe.finish(1)
    assert SynchronousTestCase().successResultOf(d) == 4
    got = {k: v.data for k, v in run(executor.execute(ops.Range("people", b"", None, None)))}
    assert got == {
        b"k0": b"flag:" + magic + b"v0",
        b"k1": b"flag:" + magic + b"v1",
        b"k3": b"flag:" + magic + b"v3",
        b"k4": b"flag:" + magic + b"v0",
        b"k9": magic + b"new",
    }


def test_update_writes_nothing_when_rows_keep_changing() -> None:
    """A row rewritten during every evaluation: after UPDATE_ATTEMPTS write-backs the UPDATE
    fails with a retryable error, and (one atomic write-back) no row was changed by it."""
    from amaters.query.executor import UPDATE_ATTEMPTS

    backend, fhe, executor, magic = _update_setup(3)
    d = executor.execute(ops.Update("people", "a" * 64, object(), ()))
    for attempt in range(UPDATE_ATTEMPTS):
        backend.put("people", b"k0", CipherBlob.wrap(magic + b"w%d" % attempt))
        fhe.finish(attempt)
    failure = SynchronousTestCase().failureResultOf(d, Unavailable)
    assert failure.value.retryable and "nothing was written" in failure.value.message
    assert len(fhe.calls) == UPDATE_ATTEMPTS
    got = {k: v.data for k, v in run(executor.execute(ops.Range("people", b"", None, None)))}
    assert got == {b"k0": magic + b"w%d" % (UPDATE_ATTEMPTS - 1), b"k1": magic + b"v0", b"k2": magic + b"v0"}


def test_update_on_a_backend_that_applies_in_parts_counts_what_was_written() -> None:
    """A backend that applies a conditional write in parts (the sharded one, per shard): the rows
    of a part that was applied are counted once, the others are retried."""

    class PerKey(MemoryBackend):
        def compare_and_write(self, expected: Any, ops_: Any) -> defer.Deferred[Any]:
            from amaters.types import ConditionalResult

            changed: set[tuple[str, bytes]] = set()
            for e, op in zip(expected, ops_, strict=True):
                result = run(super().compare_and_write([e], [op]))
                changed |= result.changed
            return defer.succeed(ConditionalResult(frozenset(changed), frozenset(changed)))

    from amaters.fhe.records import MAGIC

    backend = PerKey()
    backend.create_collection("people")
    for i in range(4):
        backend.put("people", b"k%d" % i, CipherBlob.wrap(MAGIC + b"v0"))
    fhe = GatedEvaluator()
    executor = QueryExecutor(backend, fhe=fhe, clock=Clock())
    d = executor.execute(ops.Update("people", "a" * 64, object(), ()))
    backend.put("people", b"k2", CipherBlob.wrap(MAGIC + b"v2"))
    fhe.finish(0)
    assert fhe.calls[1][0] == [MAGIC + b"v2"]
    fhe.finish(1)
    assert SynchronousTestCase().successResultOf(d) == 4
    assert run(backend.get("people", b"k2")).data == b"flag:" + MAGIC + b"v2"


def test_afters_collected_by_run_are_run_by_settle_stage_by_stage() -> None:
    """With a list, run() leaves the afters of a request answered at once to settle(): stage by
    stage, each for every request in order, through after_many where a stage has one; an after
    that raises for one request does not keep it from the others.  Alone in the list, a request's
    afters run as run() would have run them; a request still waiting is not collected."""
    calls: list[tuple[str, Any]] = []

    class Each(PipelineStage):
        name = "each"

        def after(self, ctx: RequestContext, op: ops.Operation, outcome: object) -> None:
            calls.append(("each", ctx.request_id))

    class Broken(PipelineStage):
        name = "broken"

        def after(self, ctx: RequestContext, op: ops.Operation, outcome: object) -> None:
            if ctx.request_id == 1:
                raise RuntimeError("after bug")
            calls.append(("broken", ctx.request_id))

    class Many(PipelineStage):
        name = "many"

        def after(self, ctx: RequestContext, op: ops.Operation, outcome: object) -> None:
            calls.append(("many, one", ctx.request_id))

        def after_many(self, items: list[Any]) -> None:
            calls.append(("many", [(c.request_id, outcome) for c, _, outcome in items]))

    gate: defer.Deferred[None] = defer.Deferred()

    class Gate(PipelineStage):
        name = "gate"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            return gate if ctx.request_id == 9 else None

    p = pipeline(Gate(), Each(), Broken(), Many())
    run(p.execute(ctx(), ops.Set("c", b"k", value(b"v"))))
    calls.clear()
    finished: list[Any] = []
    for request_id in (1, 2):
        done, result = p.run(RequestContext(request_id, ANONYMOUS), ops.Get("c", b"k"), finished)
        assert done and result.data == b"v"
    done, waiting = p.run(RequestContext(9, ANONYMOUS), ops.Get("c", b"k"), finished)
    assert not done and len(finished) == 2 and calls == []
    p.settle(finished)
    assert calls == [
        ("each", 1),
        ("each", 2),
        ("broken", 2),
        ("many", [(1, value(b"v")), (2, value(b"v"))]),
    ]

    calls.clear()
    gate.callback(None)
    assert run(waiting).data == b"v"
    assert calls == [("each", 9), ("broken", 9), ("many, one", 9)]

    calls.clear()
    finished = []
    p.run(RequestContext(3, ANONYMOUS), ops.Get("c", b"k"), finished)
    p.settle(finished)
    p.run(RequestContext(4, ANONYMOUS), ops.Get("c", b"k"))
    assert calls == [
        ("each", 3),
        ("broken", 3),
        ("many, one", 3),
        ("each", 4),
        ("broken", 4),
        ("many, one", 4),
    ]


def test_run_many_runs_each_stage_for_every_request_then_the_executor_in_order() -> None:
    """run_many: each stage sees every request still going (before_many once where a stage has
    one, else before for each), then the executor runs them in order (a GET sees the SET before
    it), each outcome as run() would give it; a refusal, an answer in place of the executor or a
    Deferred takes that request out of the later stages without holding up the others."""
    calls: list[Any] = []
    gate: defer.Deferred[None] = defer.Deferred()

    class Each(PipelineStage):
        name = "each"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            calls.append(("each", ctx.request_id))
            if ctx.request_id == 2:
                raise PermissionDenied("no")
            if ctx.request_id == 3:
                ctx.result = "from the stage"
            if ctx.request_id == 4:
                return gate
            return None

    class Many(PipelineStage):
        name = "many"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            calls.append(("many, one", ctx.request_id))
            return None

        def before_many(self, items: list[Any]) -> object:
            ids = [c.request_id for c, _ in items]
            calls.append(("many", ids))
            return [InvalidKey("refused together") if i == 6 else None for i in ids]

    class Declines(PipelineStage):
        name = "declines"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            calls.append(("declines, one", ctx.request_id))
            return None

        def before_many(self, items: list[Any]) -> object:
            calls.append(("declines", len(items)))
            return NotImplemented

    p = pipeline(Each(), Many(), Declines())
    requests = [
        (1, ops.Set("c", b"k", value(b"new"))),
        (2, ops.Get("c", b"k")),
        (3, ops.Get("c", b"k")),
        (4, ops.Get("c", b"k")),
        (5, ops.Get("c", b"k")),
        (6, ops.Delete("c", b"k")),
    ]
    items = [(RequestContext(i, ANONYMOUS), op) for i, op in requests]
    finished: list[Any] = []
    outcomes = p.run_many(items, finished)
    assert calls == [
        ("each", 1),
        ("each", 2),
        ("each", 3),
        ("each", 4),
        ("each", 5),
        ("each", 6),
        ("many", [1, 5, 6]),
        ("declines", 2),
        ("declines, one", 1),
        ("declines, one", 5),
    ]
    assert outcomes[0] == (True, None)
    done, failed = outcomes[1]
    assert not done and failed.called and isinstance(failed.result, Failure)
    assert failed.result.check(PermissionDenied)
    failed.addErrback(lambda _: None)
    assert outcomes[2] == (True, "from the stage")
    done, waiting = outcomes[3]
    assert not done and not waiting.called
    assert outcomes[4][0] and outcomes[4][1].data == b"new"  # after the SET of the same read
    done, refused = outcomes[5]
    assert not done and refused.result.check(InvalidKey)
    refused.addErrback(lambda _: None)
    assert [(c.request_id, outcome) for c, _, outcome in finished] == [
        (3, "from the stage"),
        (1, None),
        (5, outcomes[4][1]),
    ]
    gate.callback(None)
    assert waiting.result.data == b"new"
    assert ("many, one", 4) in calls and ("declines, one", 4) in calls


def test_run_many_fails_every_request_when_a_before_many_raises() -> None:
    """A stage's before_many that raises is a server bug: every request it was given fails with
    SERVER_INTERNAL (the traceback goes to the log only), as one raising before would."""

    class Broken(PipelineStage):
        name = "broken"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            return None

        def before_many(self, items: list[Any]) -> object:
            raise RuntimeError("stage bug")

    p = pipeline(Broken())
    items = [(RequestContext(i, ANONYMOUS), ops.Get("c", b"k")) for i in (1, 2)]
    for done, failed in p.run_many(items, []):
        assert not done
        assert failed.result.value.code == ErrorCode.SERVER_INTERNAL
        failed.addErrback(lambda _: None)


# -- SETs that arrive together -----------------------------------------------------------------


class RecordingBatches(MemoryBackend):
    """A memory backend that records its write_batch calls and can hold them until released."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[WriteOp]] = []
        self.creations: list[str] = []
        self.hold: list[defer.Deferred[None]] | None = None

    def write_batch(self, ops: Any) -> defer.Deferred[None]:
        ops = list(ops)
        self.batches.append(ops)
        if self.hold is None:
            return super().write_batch(ops)
        waiting: defer.Deferred[None] = defer.Deferred()
        self.hold.append(waiting)
        return waiting.addCallback(lambda _: super(RecordingBatches, self).write_batch(ops))

    def create_collection(self, name: str) -> defer.Deferred[bool]:
        self.creations.append(name)
        if self.hold is None:
            return super().create_collection(name)
        waiting: defer.Deferred[None] = defer.Deferred()
        self.hold.append(waiting)
        return waiting.addCallback(lambda _: super(RecordingBatches, self).create_collection(name))


def sets(count: int, collection: str = "c") -> list[tuple[RequestContext, Any]]:
    return [
        (RequestContext(i, ANONYMOUS), ops.Set(collection, b"k%d" % (i % 3), value(b"v%d" % i)))
        for i in range(count)
    ]


def test_consecutive_sets_are_written_as_one_batch_in_order() -> None:
    """run_many writes a read's consecutive SETs with one write_batch, in the order sent (the
    last SET of a key wins, as one by one); the afters of each request are collected."""
    backend = RecordingBatches()
    ex = executor(backend)
    run(ex.execute(ops.Set("c", b"x", value(b"first"))))
    p = QueryPipeline(ex, LimitsConfig())
    items = sets(7)
    finished: list[Any] = []
    outcomes = p.run_many(items, finished)
    assert outcomes == [(True, None)] * 7
    assert len(backend.batches) == 1 and [w.key for w in backend.batches[0]] == [op.key for _, op in items]
    assert [c for c, _, _ in finished] == [c for c, _ in items]
    for key, last in ((b"k0", b"v6"), (b"k1", b"v4"), (b"k2", b"v5")):
        assert run(ex.execute(ops.Get("c", key))).data == last


def test_sets_to_a_collection_not_created_yet_run_one_by_one() -> None:
    backend = RecordingBatches()
    p = QueryPipeline(executor(backend), LimitsConfig())
    outcomes = p.run_many(sets(4, "new"), [])
    assert [done for done, _ in outcomes] == [True] * 4
    assert backend.batches == [] and backend.creations == ["new"]


def test_sets_written_together_all_fail_when_their_write_fails() -> None:
    """One failed write: every SET of it gets the error, and nothing is applied."""
    backend = FailingWrites()
    ex = executor(backend)
    run(ex.execute(ops.CreateCollection("c")))
    p = QueryPipeline(ex, LimitsConfig())
    seen: list[Any] = []

    class Afters(PipelineStage):
        name = "afters"

        def after(self, ctx: RequestContext, op: ops.Operation, outcome: object) -> None:
            seen.append(outcome)

    p.add_stage(Afters())
    outcomes = p.run_many(sets(3), [])
    for done, d in outcomes:
        assert not done
        failure = d.result
        d.addErrback(lambda _: None)
        assert failure.value.code == ErrorCode.STORAGE_FULL
    assert len(seen) == 3 and all(isinstance(o, Failure) for o in seen)
    assert run(ex.execute(ops.Get("c", b"k0"))) is None


def test_sets_written_together_are_answered_each_when_the_write_ends() -> None:
    backend = RecordingBatches()
    ex = executor(backend)
    run(ex.execute(ops.CreateCollection("c")))
    backend.hold = []
    p = QueryPipeline(ex, LimitsConfig())
    together, outcomes = p.run_admitted_sets(sets(3), None)
    assert together
    answers: list[Any] = []
    for done, d in outcomes:
        assert not done
        d.addBoth(answers.append)
    assert answers == []
    backend.hold.pop().callback(None)
    assert answers == [None, None, None]


def test_first_sets_of_a_new_collection_create_it_once_and_all_wait_for_it() -> None:
    """Thousands of SETs pipelined to a collection that does not exist yet wait for one creation
    (not one each, queued behind each other), and all are answered when it is made, with no
    stack growing with their number."""
    backend = RecordingBatches()
    backend.hold = []
    ex = executor(backend)
    pending = [ex.execute(ops.Set("new", b"k%d" % i, value(b"v"))) for i in range(3000)]
    assert backend.creations == ["new"]
    assert not any(d.called for d in pending)
    backend.hold.pop().callback(None)
    assert all(run(d) is None for d in pending)
    assert len(run(ex.execute(ops.Range("new", b"", None, None)))) == 3000
