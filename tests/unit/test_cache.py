"""The query cache: LRU by bytes, keying, invalidation, and never a stale value after a write."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from amaters.config import CacheConfig, default_config
from amaters.protect.cache import (
    ENTRY_OVERHEAD,
    MISS,
    SHORT_KEY_BYTES,
    CachingExecutor,
    QueryCache,
    cache_key,
)
from amaters.query import operations as ops
from amaters.types import CipherBlob


def blob(text: bytes) -> CipherBlob:
    return CipherBlob.wrap(text)


class Executor:
    """A fake executor whose every operation waits for the test to release it.

    Reads see storage either when they start or when they are released, and writes reach storage
    either when they start or when they are released: the four orders real storage can produce.
    Every write gets a new version; values name their version (b"v7", or b"deleted:7").
    """

    def __init__(self) -> None:
        self.store: dict[tuple[str, bytes], tuple[int, CipherBlob | None]] = {}
        self.version = 0
        self.pending: list[tuple[defer.Deferred[Any], Any]] = []
        self.calls = 0
        #: Whether operations see or change storage when they start (else when released).
        self.early = True

    def current(self, collection: str, key: bytes) -> tuple[int, CipherBlob | None]:
        return self.store.get((collection, key), (0, None))

    def _apply(self, op: Any) -> Any:
        items = op.ops if isinstance(op, ops.Batch) else (op,)
        self.version += 1
        v = self.version
        if isinstance(op, ops.DropCollection):
            for collection, key in list(self.store):
                if collection == op.collection:
                    self.store[(collection, key)] = (v, blob(b"deleted:%d" % v))
            return True
        for item in items:
            if isinstance(item, ops.Set):
                self.store[(item.collection, item.key)] = (v, blob(b"v%d" % v))
            elif isinstance(item, ops.Delete):
                self.store[(item.collection, item.key)] = (v, blob(b"deleted:%d" % v))
        return None

    def execute(self, op: Any, early: bool | None = None) -> defer.Deferred[Any]:
        if early is None:
            early = self.early
        self.calls += 1
        d: defer.Deferred[Any] = defer.Deferred()
        if isinstance(op, ops.Get):
            seen = self.current(op.collection, op.key)[1] if early else None
            self.pending.append((d, ("get", op, early, seen)))
        else:
            if early:
                self._apply(op)
            self.pending.append((d, ("write", op, early, None)))
        return d

    def set_many(self, writes: list[Any]) -> defer.Deferred[Any]:
        """SETs written together: one write, like a batch of them."""
        return self.execute(ops.Batch(tuple(writes)))

    def release(self, index: int) -> None:
        d, (kind, op, early, seen) = self.pending.pop(index)
        if kind == "get":
            d.callback(seen if early else self.current(op.collection, op.key)[1])
        else:
            if not early:
                self._apply(op)
            d.callback(None)

    def open_range(self, op: Any) -> Any:
        raise NotImplementedError


def version_of(value: CipherBlob | None) -> int:
    if value is None:
        return 0
    return int(value.data.split(b"v" if value.data.startswith(b"v") else b":")[-1])


# -- keys, LRU, sizes ---------------------------------------------------------------------------


def test_keys_are_length_prefixed() -> None:
    """(a, bc) and (ab, c) are different keys; the same pair always hashes the same."""
    assert cache_key("a", b"bc") != cache_key("ab", b"c")
    assert cache_key("c", b"\x00") != cache_key("c\x00", b"")
    assert cache_key("c", b"k") == cache_key("c", b"k")
    long_a, long_b = b"a" * 40, b"b" * 40
    assert cache_key("a", b"b" + long_a) != cache_key("ab", long_a)
    assert cache_key("c", long_a) == cache_key("c", long_a) and len(cache_key("c", long_a)) == 32
    assert cache_key("c", long_a) != cache_key("c", long_b)


def test_short_and_long_keys_never_share_an_entry() -> None:
    """A short key's index is never equal to a long key's digest, whatever the bytes."""
    cache = QueryCache(max_bytes=1 << 20)
    short, long = cache_key("c", b"k" * 32), cache_key("c", b"k" * 33)
    assert short != long
    assert cache.end_read(cache.begin_read(short, "c"), blob(b"short"), True)
    assert cache.lookup(long) is MISS
    assert cache.end_read(cache.begin_read(long, "c"), blob(b"long"), True)
    assert cache.lookup(short) == blob(b"short") and cache.lookup(long) == blob(b"long")


def test_lru_eviction_by_bytes_and_max_entry() -> None:
    """Entries are evicted least recently used first to stay under max_bytes; oversized ones are skipped."""
    entry = ENTRY_OVERHEAD + 1 + 100
    cache = QueryCache(max_bytes=3 * entry, max_entry_bytes=1000)
    keys = [cache_key("c", b"%d" % i) for i in range(4)]
    for k in keys[:3]:
        assert cache.end_read(cache.begin_read(k, "c"), blob(b"x" * 100), True)
    assert cache.lookup(keys[0]) is not MISS  # 0 is now the most recently used
    assert cache.end_read(cache.begin_read(keys[3], "c"), blob(b"y" * 100), True)
    assert cache.lookup(keys[1]) is MISS  # evicted
    assert cache.lookup(keys[0]) is not MISS and cache.lookup(keys[3]) is not MISS
    assert cache.bytes == 3 * entry and cache.evictions == 1
    big = cache_key("c", b"big")
    assert not cache.end_read(cache.begin_read(big, "c"), blob(b"z" * 1001), True)
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 1


def test_missing_keys_are_cached_as_none() -> None:
    """A GET of a missing key caches None, so the next GET does not reach storage."""
    inner = Executor()
    executor = CachingExecutor(inner, QueryCache(1 << 20))
    d = executor.execute(ops.Get("c", b"k"))
    inner.release(0)
    assert d.result is None
    again = executor.execute(ops.Get("c", b"k"))
    assert again.called and again.result is None and inner.calls == 1


def test_write_invalidates_and_drop_invalidates_the_collection() -> None:
    """SET, DELETE and BATCH drop their keys' entries; DROP COLLECTION drops the whole collection."""
    inner = Executor()
    cache = QueryCache(1 << 20)
    executor = CachingExecutor(inner, cache)

    def read(collection: str, key: bytes) -> Any:
        d = executor.execute(ops.Get(collection, key))
        while inner.pending:
            inner.release(0)
        return d.result

    def write(op: Any) -> None:
        executor.execute(op)
        while inner.pending:
            inner.release(0)

    write(ops.Set("a", b"1", blob(b"x")))
    write(ops.Set("a", b"2", blob(b"x")))
    write(ops.Set("b", b"1", blob(b"x")))
    first = {(c, k): read(c, k) for c, k in (("a", b"1"), ("a", b"2"), ("b", b"1"))}
    assert len(cache) == 3
    write(ops.Delete("a", b"1"))
    assert len(cache) == 2 and read("a", b"1") != first[("a", b"1")]
    write(ops.Batch((ops.Get("a", b"2"), ops.Set("a", b"2", blob(b"y")))))
    assert read("a", b"2") != first[("a", b"2")]
    write(ops.DropCollection("a"))
    assert all(entry.collection == "b" for entry in cache._entries.values())
    assert read("b", b"1") == first[("b", b"1")]
    assert cache.invalidations >= 4


@pytest.mark.parametrize("length", [1, SHORT_KEY_BYTES - 1, SHORT_KEY_BYTES, SHORT_KEY_BYTES + 1, 300])
def test_a_write_invalidates_its_key_at_every_key_length(length: int) -> None:
    """A SET or DELETE drops the entry its key's GET cached, on both sides of the short-key limit
    (a write computes a short key's index itself)."""
    inner = Executor()
    cache = QueryCache(1 << 20)
    executor = CachingExecutor(inner, cache)
    key = b"k" * length

    def run(op: Any) -> Any:
        d = executor.execute(op)
        while inner.pending:
            inner.release(0)
        return d.result

    run(ops.Set("a", key, blob(b"x")))
    for write in (ops.Set("a", key, blob(b"y")), ops.Delete("a", key)):
        cached = run(ops.Get("a", key))
        assert len(cache) == 1
        run(write)
        assert len(cache) == 0
        assert version_of(run(ops.Get("a", key))) > version_of(cached)


def test_operations_that_change_nothing_pass_through() -> None:
    """CREATE COLLECTION, LIST, SERVER_INFO, HEALTH and read-only batches do not touch the cache."""
    inner = Executor()
    cache = QueryCache(1 << 20)
    executor = CachingExecutor(inner, cache)
    for op in (ops.CreateCollection("c"), ops.ListCollections(), ops.Batch((ops.Get("c", b"k"),))):
        executor.execute(op)
    assert cache._writing == {} and cache._collections_writing == {} and cache._epoch == 0


def test_turned_on_by_reload_safely() -> None:
    """With max_bytes 0 nothing is cached; after a reload turns it on, a write that started while it
    was off still keeps a concurrent read from caching a value older than that write."""
    inner = Executor()
    cache = QueryCache(0)
    executor = CachingExecutor(inner, cache)
    assert not cache.enabled
    inner.early = False  # storage sees the write only when it is released
    executor.execute(ops.Set("c", b"k", blob(b"x")))
    inner.early = True
    old = attrs.evolve(default_config(), cache=CacheConfig(max_bytes=0))
    new = attrs.evolve(old, cache=CacheConfig(max_bytes=1 << 20))
    commit = cache.prepare_reload(old, new)
    assert commit is not None and not cache.enabled
    commit()
    assert cache.enabled
    read = executor.execute(ops.Get("c", b"k"))
    inner.release(1)  # the read sees storage before the write
    assert read.result is None
    assert len(cache) == 0  # not cached: a write from before was still in flight
    inner.release(0)
    fresh = executor.execute(ops.Get("c", b"k"))
    inner.release(0)
    assert version_of(fresh.result) == 1
    assert cache.prepare_reload(new, new) is None
    off = cache.prepare_reload(new, old)
    assert off is not None
    off()
    assert len(cache) == 0 and not cache.enabled


@pytest.mark.parametrize("together", [False, True])
def test_a_write_finishing_at_once_keeps_a_read_in_flight_from_caching_what_it_read(together: bool) -> None:
    """With nothing cached, a write that finishes during its call (the memory backend) still
    stops a read that started before it, and saw the old value, from caching that value."""
    inner = Executor()
    cache = QueryCache(1 << 20)
    executor = CachingExecutor(inner, cache)
    read = executor.execute(ops.Get("a", b"1"))  # sees storage now: nothing there yet
    assert len(cache) == 0 and cache._reads

    def at_once(op: Any, early: bool | None = None) -> defer.Deferred[Any]:
        inner._apply(op)
        return defer.succeed(None)

    inner.execute = at_once  # type: ignore[method-assign]
    write = ops.Set("a", b"1", blob(b"new"))
    written = executor.set_many([write]) if together else executor.execute(write)
    assert written is not None and written.called
    inner.release(0)
    assert read.result is None  # what the read saw: from before the write
    assert len(cache) == 0, "a value older than an acknowledged write was cached"


# -- the property: never stale ------------------------------------------------------------------

KEYS = [("a", b"1"), ("a", b"2"), ("b", b"1")]

action = st.one_of(
    st.tuples(st.just("get"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("set"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("delete"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("batch"), st.integers(0, 7), st.booleans()),
    # SETs of one read written together (CachingExecutor.set_many).
    st.tuples(st.just("sets"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("drop"), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 1000), st.booleans()),
    # A write that finishes during the call (the memory backend), after finishing a GET that
    # was waiting (a backend whose write fires other requests' callbacks).
    st.tuples(st.just("syncset"), st.integers(0, 2), st.booleans()),
    # The same for SETs of one read written together.
    st.tuples(st.just("syncsets"), st.integers(0, 7), st.booleans()),
    # A SET written at once without a Deferred (set_now: the memory backend), whatever the cache
    # holds or is reading.
    st.tuples(st.just("nowset"), st.integers(0, 2), st.booleans()),
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(action, max_size=24), st.integers(200, 3000))
def test_never_stale_after_a_write(actions: list[tuple[str, int, bool]], max_bytes: int) -> None:
    """Under any interleaving of GETs, SETs, DELETEs, BATCHes and DROPs with delayed storage reads
    and writes, a GET that starts after a write was acknowledged returns that write or a newer one,
    and a cached value is always the stored one once no write to it is in flight."""
    inner = Executor()
    written_now: list[Any] = []

    def set_now(op: Any) -> bool:
        inner.calls += 1
        inner._apply(op)
        written_now.append(op)
        return True

    inner.set_now = set_now  # type: ignore[attr-defined]
    cache = QueryCache(max_bytes)
    executor = CachingExecutor(inner, cache)
    early_flags: list[bool] = []
    acked: dict[tuple[str, bytes], int] = {}  # newest version acknowledged per key
    checks: list[tuple[defer.Deferred[Any], int]] = []

    original = inner.execute

    sync_writes: list[bool] = []

    def execute(op: Any) -> defer.Deferred[Any]:
        if sync_writes and sync_writes.pop() and not isinstance(op, ops.Get):
            reads = [i for i, (_, (kind, *_rest)) in enumerate(inner.pending) if kind == "get"]
            if reads:
                inner.release(reads[0])
            inner.calls += 1
            inner._apply(op)
            return defer.succeed(None)
        return original(op, early_flags.pop() if early_flags else True)

    inner.execute = execute  # type: ignore[method-assign]

    def on_ack(_: object, keys: list[tuple[str, bytes]]) -> None:
        for k in keys:
            acked[k] = max(acked.get(k, 0), inner.current(*k)[0])

    for kind, n, early in actions:
        early_flags[:] = [early]
        if kind == "get":
            collection, key = KEYS[n]
            d = executor.execute(ops.Get(collection, key))
            checks.append((d, acked.get((collection, key), 0)))
        elif kind == "syncset":
            collection, key = KEYS[n]
            sync_writes[:] = [True]
            executor.execute(ops.Set(collection, key, blob(b"new"))).addCallback(on_ack, [(collection, key)])
            sync_writes.clear()
        elif kind == "nowset":
            collection, key = KEYS[n]
            op = ops.Set(collection, key, blob(b"new"))
            assert executor.set_now(op)
            on_ack(None, [(collection, key)])
        elif kind in ("set", "delete"):
            collection, key = KEYS[n]
            op: Any = ops.Set(collection, key, blob(b"new")) if kind == "set" else ops.Delete(collection, key)
            executor.execute(op).addCallback(on_ack, [(collection, key)])
        elif kind == "batch":
            chosen = [KEYS[i] for i in range(3) if n & (1 << i)] or [KEYS[0]]
            items = tuple(ops.Set(c, k, blob(b"new")) for c, k in chosen)
            executor.execute(ops.Batch((ops.Get(*chosen[0]), *items))).addCallback(on_ack, chosen)
        elif kind in ("sets", "syncsets"):
            chosen = [KEYS[i] for i in range(3) if n & (1 << i)] or [KEYS[0]]
            sync_writes[:] = [kind == "syncsets"]
            together = executor.set_many([ops.Set(c, k, blob(b"new")) for c, k in chosen])
            sync_writes.clear()
            assert together is not None
            together.addCallback(on_ack, chosen)
        elif kind == "drop":
            collection = "ab"[n]
            executor.execute(ops.DropCollection(collection)).addCallback(
                on_ack, [k for k in KEYS if k[0] == collection]
            )
        elif inner.pending:
            inner.release(n % len(inner.pending))
        # Every entry of a key with no write in flight is the stored value.
        for collection, key in KEYS:
            hashed = cache_key(collection, key)
            entry = cache._entries.get(hashed)
            if entry is not None and hashed not in cache._writing and not cache._collections_writing:
                assert version_of(entry.value) == inner.current(collection, key)[0]
    while inner.pending:
        inner.release(0)
    for d, newest_acked in checks:
        assert d.called
        assert version_of(d.result) >= newest_acked, "a GET returned a value older than an acknowledged write"
    for collection, key in KEYS:
        d = executor.execute(ops.Get(collection, key))
        while inner.pending:
            inner.release(0)
        assert version_of(d.result) == inner.current(collection, key)[0]
    assert cache._reads == {} and cache._writing == {} and cache._collections_writing == {}
    assert 0 <= cache.bytes <= max_bytes
    assert len(written_now) == sum(1 for kind, _, _ in actions if kind == "nowset")


class _Recorder:
    """A pipeline stage that records the outcome every ``after`` sees."""

    name = "recorder"

    def __init__(self) -> None:
        self.outcomes: list[Any] = []

    def after(self, ctx: Any, op: Any, outcome: object) -> None:
        self.outcomes.append(outcome)


def test_the_pipeline_answers_a_hit_synchronously_and_counts_it_once() -> None:
    """Through the pipeline: a miss reaches storage and counts one miss; the next GET is a hit,
    answered at once, counted once, seen by the stages; a write makes the next GET miss again."""
    from amaters.auth.principal import ANONYMOUS
    from amaters.query.pipeline import PipelineStage, QueryPipeline, RequestContext

    class Inner(Executor):
        def update_limits(self, limits: Any) -> None:
            pass

    class Recorder(_Recorder, PipelineStage):
        pass

    inner = Inner()
    cache = QueryCache(1 << 20)
    recorder = Recorder()
    pipeline = QueryPipeline(CachingExecutor(inner, cache), default_config().limits, [recorder])
    get = ops.Get("c", b"k")
    inner.store[("c", b"k")] = (1, blob(b"v1"))

    done, d = pipeline.run(RequestContext(1, ANONYMOUS), get)
    assert not done and inner.calls == 1
    inner.release(0)
    assert d.result == blob(b"v1") and cache.stats()["misses"] == 1 and cache.stats()["hits"] == 0

    done, result = pipeline.run(RequestContext(2, ANONYMOUS), get)
    assert done and result == blob(b"v1") and inner.calls == 1
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1
    assert recorder.outcomes == [blob(b"v1"), blob(b"v1")]

    pipeline.run(RequestContext(3, ANONYMOUS), ops.Set("c", b"k", blob(b"new")))
    inner.release(0)
    done, d = pipeline.run(RequestContext(4, ANONYMOUS), get)
    assert not done and inner.calls == 3 and cache.stats()["misses"] == 2


def test_a_hit_carries_its_encoded_response_counted_in_the_cache_bytes() -> None:
    """A hit sets ``ctx.response`` to the serialized QueryResponse of the cached value (the
    runtime's own encoding), encoded at the first hit and counted in the cache's bytes from then
    on; a write drops it with the entry, and the next hit encodes the new value."""
    from amaters.auth.principal import ANONYMOUS
    from amaters.proto import aql_pb2
    from amaters.query.pipeline import RequestContext

    inner = Executor()
    cache = QueryCache(1 << 20)
    executor = CachingExecutor(inner, cache)
    get = ops.Get("c", b"k")
    inner.store[("c", b"k")] = (0, blob(b"v0"))
    executor.execute(get)
    inner.release(0)
    before = cache.bytes

    ctx = RequestContext(1, ANONYMOUS)
    assert executor.cached(get, ctx) == blob(b"v0")
    response = ctx.response
    assert response is not None
    decoded = aql_pb2.QueryResponse.FromString(response)
    assert decoded.result.single.value.data == b"v0"
    assert cache.bytes == before + len(response)
    again = RequestContext(2, ANONYMOUS)
    executor.cached(get, again)
    assert again.response is response  # encoded once
    assert cache.bytes == before + len(response)

    executor.execute(ops.Set("c", b"k", blob(b"v2")))
    inner.release(0)
    assert cache.bytes == 0
    executor.execute(get)
    inner.release(0)
    third = RequestContext(3, ANONYMOUS)
    executor.cached(get, third)
    assert third.response is not None
    assert aql_pb2.QueryResponse.FromString(third.response).result.single.value.data == b"v1"


def test_an_absent_key_hit_is_encoded_as_an_empty_single_result() -> None:
    from amaters.auth.principal import ANONYMOUS
    from amaters.proto import aql_pb2
    from amaters.query.pipeline import RequestContext

    inner = Executor()
    executor = CachingExecutor(inner, QueryCache(1 << 20))
    get = ops.Get("c", b"absent")
    executor.execute(get)
    inner.release(0)
    ctx = RequestContext(1, ANONYMOUS)
    assert executor.cached(get, ctx) is None
    assert ctx.response is not None
    decoded = aql_pb2.QueryResponse.FromString(ctx.response)
    assert decoded.result.HasField("single") and not decoded.result.single.HasField("value")


def test_a_large_value_keeps_only_the_bytes_around_it_in_its_answer() -> None:
    """A value over ENCODED_MAX_BYTES is not kept encoded beside itself (that would double the
    entry): the cache keeps the answer's bytes around the value's data, a few dozen, and every hit
    carries the runtime's own encoding, byte for byte, whatever the metadata."""
    from amaters.auth.principal import ANONYMOUS
    from amaters.protect.cache import ENCODED_MAX_BYTES
    from amaters.proto.answers import query_response
    from amaters.query.pipeline import RequestContext
    from amaters.types import CipherBlob, Compression

    values = [
        blob(b"x" * (ENCODED_MAX_BYTES + 1)),
        CipherBlob(b"z" * 5000, checksum=0, size=0),  # metadata all defaults
        CipherBlob(b"y" * 70000, 7, 2**40, Compression.ZSTD, created_at=-5, version=0),
    ]
    inner = Executor()
    cache = QueryCache(1 << 20)
    executor = CachingExecutor(inner, cache)
    for index, value in enumerate(values):
        key = b"big%d" % index
        get = ops.Get("c", key)
        inner.store[("c", key)] = (0, value)
        executor.execute(get)
        inner.release(0)
        before = cache.bytes
        expected = query_response("get", value)
        for request_id in (1, 2, 3):
            ctx = RequestContext(request_id, ANONYMOUS)
            assert executor.cached(get, ctx) == value
            assert ctx.response == expected
        assert 0 < cache.bytes - before < 64
