"""The IStorageBackend contract, run against every backend.

Backends: ``memory``; ``rocksdb`` on a temporary directory with a synchronous io pool (every
Deferred has fired when the call returns); the fault-injecting wrapper in pass-through mode over
rocksdb; the retrying wrapper over memory; and ``etcd`` on a real single-member etcd started once for
the module, alone and behind the shard router as nodes build it (each test under its own key prefix; its Deferreds are waited for with the reactor
running, see ``tests/etcd_helpers.py``).  A backend that passes here can stand behind the
query executor.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from etcd_helpers import ETCD, EtcdCluster, etcd_backend, sharded_etcd_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_helpers import result_of
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from amaters.errors import AmatersError, Corrupted, NotFound
from amaters.interfaces import IRangeCursor, IStorageBackend
from amaters.service import ThreadPoolService
from amaters.storage.faults import FaultInjectingBackend
from amaters.storage.memory import MemoryBackend
from amaters.storage.retry import RetryingBackend, RetryPolicy
from amaters.storage.rocksdb import RocksDBBackend, RocksDBSettings
from amaters.types import CipherBlob, Compression, ConditionalResult, Expect, WriteOp, crc32

BACKENDS = ["memory", "rocksdb", "faults-rocksdb", "retrying-memory", "etcd", "etcd-sharded"]
_etcd: dict[str, Any] = {}
_prefixes = itertools.count()


def failure_of(d: Any, *types: type[BaseException]) -> Failure:
    """The Failure of a Deferred that has already failed with one of ``types``."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    failure = results[0]
    assert isinstance(failure, Failure), f"expected a failure, got {failure!r}"
    assert failure.check(*types), f"expected {types}, got {failure.value!r}"
    return failure


def make_rocksdb(path: Path, **settings: Any) -> RocksDBBackend:
    clock = Clock()
    io = ThreadPoolService(clock, "io", synchronous=True)  # type: ignore[arg-type]
    return RocksDBBackend(path / "db", io, clock, RocksDBSettings(**settings), lock_dir=path)


def etcd_endpoints(path: Path) -> list[str]:
    """The module's single-member etcd, started on first use (stopped by ``stop_etcd``)."""
    if "cluster" not in _etcd:
        if ETCD is None:
            pytest.skip("etcd is not installed (scripts/install-test-deps installs etcd-server)")
        _etcd["cluster"] = EtcdCluster(path.parent / "etcd-contract", size=1).start()
    return list(_etcd["cluster"].endpoints)


@pytest.fixture(scope="module", autouse=True)
def stop_etcd() -> Iterator[None]:
    yield
    cluster = _etcd.pop("cluster", None)
    if cluster is not None:
        cluster.stop()


def make_backend(kind: str, path: Path) -> Any:
    if kind == "etcd":
        return etcd_backend(etcd_endpoints(path), b"/t%d/" % next(_prefixes))
    if kind == "etcd-sharded":
        return sharded_etcd_backend(etcd_endpoints(path), b"/t%d/" % next(_prefixes))
    if kind == "memory":
        return MemoryBackend()
    if kind == "rocksdb":
        return make_rocksdb(path)
    if kind == "faults-rocksdb":
        return FaultInjectingBackend(make_rocksdb(path))
    assert kind == "retrying-memory"
    return RetryingBackend(MemoryBackend(), RetryPolicy(), Clock())


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    made = make_backend(request.param, tmp_path)
    result_of(made.open())
    yield made
    result_of(made.close())


def blob(data: bytes, **kw: Any) -> CipherBlob:
    return CipherBlob.wrap(data, **kw)


def read_all(cursor: Any) -> tuple[list[tuple[bytes, CipherBlob]], list[int]]:
    """Every entry of a cursor and the size of each non-empty chunk."""
    entries: list[tuple[bytes, CipherBlob]] = []
    sizes: list[int] = []
    while True:
        chunk = result_of(cursor.next_chunk())
        if not chunk:
            return entries, sizes
        sizes.append(len(chunk))
        entries.extend(chunk)


def fill(backend: Any, collection: str, keys: list[bytes]) -> None:
    result_of(backend.create_collection(collection))
    for key in keys:
        result_of(backend.put(collection, key, blob(b"value of " + key)))


# -- interface ---------------------------------------------------------------------------------


def test_provides_interfaces(backend: Any) -> None:
    """The backend and its cursors provide IStorageBackend and IRangeCursor completely."""
    assert verifyObject(IStorageBackend, backend)
    assert isinstance(backend.name, str) and backend.name
    result_of(backend.create_collection("c"))
    cursor = backend.scan("c", b"", None, None, 10)
    assert verifyObject(IRangeCursor, cursor)
    cursor.close()


# -- collections -------------------------------------------------------------------------------


def test_create_list_drop_collections(backend: Any) -> None:
    """Collections are created once, listed sorted, and dropped once."""
    assert result_of(backend.list_collections()) == []
    assert result_of(backend.create_collection("b")) is True
    assert result_of(backend.create_collection("a")) is True
    assert result_of(backend.create_collection("b")) is False
    assert result_of(backend.list_collections()) == ["a", "b"]
    assert backend.has_collection("a") and not backend.has_collection("zz")
    assert result_of(backend.drop_collection("a")) is True
    assert result_of(backend.drop_collection("a")) is False
    assert result_of(backend.list_collections()) == ["b"]
    assert not backend.has_collection("a")


def test_collections_are_namespaces(backend: Any) -> None:
    """The same key in two collections is two independent entries."""
    result_of(backend.create_collection("one"))
    result_of(backend.create_collection("two"))
    result_of(backend.put("one", b"k", blob(b"1")))
    result_of(backend.put("two", b"k", blob(b"2")))
    assert result_of(backend.get("one", b"k")).data == b"1"
    assert result_of(backend.get("two", b"k")).data == b"2"
    assert result_of(backend.delete("one", b"k")) is True
    assert result_of(backend.get("one", b"k")) is None
    assert result_of(backend.get("two", b"k")).data == b"2"
    entries, _ = read_all(backend.scan("two", b"", None, None, 10))
    assert [k for k, _ in entries] == [b"k"]


def test_dropping_a_collection_drops_its_entries(backend: Any) -> None:
    """A collection dropped and created again is empty."""
    fill(backend, "c", [b"a", b"b"])
    result_of(backend.drop_collection("c"))
    result_of(backend.create_collection("c"))
    assert result_of(backend.get("c", b"a")) is None
    assert read_all(backend.scan("c", b"", None, None, 10))[0] == []


@pytest.mark.parametrize("name", ["default", "c:x", "with space", "ünïcode", "a/b"])
def test_unusual_collection_names(backend: Any, name: str) -> None:
    """Collection names are opaque: internal-looking names such as 'default' are ordinary."""
    assert result_of(backend.create_collection(name)) is True
    result_of(backend.put(name, b"k", blob(b"v")))
    assert result_of(backend.get(name, b"k")).data == b"v"
    assert result_of(backend.list_collections()) == [name]


def test_missing_collection_fails_with_not_found(backend: Any) -> None:
    """Every keyed operation on a collection that does not exist fails with NotFound."""
    failure_of(backend.get("nope", b"k"), NotFound)
    failure_of(backend.put("nope", b"k", blob(b"v")), NotFound)
    failure_of(backend.delete("nope", b"k"), NotFound)
    with pytest.raises(NotFound):
        backend.scan("nope", b"", None, None, 10)


# -- keys --------------------------------------------------------------------------------------


def test_put_get_keeps_metadata(backend: Any) -> None:
    """A value comes back with its data and every metadata field."""
    result_of(backend.create_collection("c"))
    data = b"\x00ciphertext\xff" * 10
    stored = CipherBlob(
        data=data,
        checksum=crc32(data),
        size=4096,
        compression=Compression.ZSTD,
        created_at=1_700_000_000_123,
        version=7,
    )
    result_of(backend.put("c", b"k", stored))
    assert result_of(backend.get("c", b"k")) == stored
    no_version = CipherBlob.wrap(b"x", created_at=5)
    result_of(backend.put("c", b"k2", no_version))
    assert result_of(backend.get("c", b"k2")) == no_version


def test_overwrite_and_delete(backend: Any) -> None:
    """A put replaces the value; delete says whether the key existed."""
    result_of(backend.create_collection("c"))
    assert result_of(backend.get("c", b"k")) is None
    result_of(backend.put("c", b"k", blob(b"old")))
    result_of(backend.put("c", b"k", blob(b"new")))
    assert result_of(backend.get("c", b"k")).data == b"new"
    assert result_of(backend.delete("c", b"k")) is True
    assert result_of(backend.delete("c", b"k")) is False
    assert result_of(backend.get("c", b"k")) is None


def test_empty_value(backend: Any) -> None:
    """An empty value is stored and is distinct from an absent key."""
    result_of(backend.create_collection("c"))
    result_of(backend.put("c", b"k", blob(b"")))
    got = result_of(backend.get("c", b"k"))
    assert got is not None and got.data == b"" and got.checksum_ok()
    assert result_of(backend.delete("c", b"k")) is True


def test_binary_keys_are_exact_and_ordered_bytewise(backend: Any) -> None:
    """Keys are arbitrary bytes, compared bytewise (unsigned), prefixes first."""
    keys = [b"\x00\xff\x7f\x80", b"\x00", b"\xff", b"\x7f", b"\x80", b"a", b"a\x00", b"b", b"\x00\x00"]
    fill(backend, "c", keys)
    for key in keys:
        assert result_of(backend.get("c", key)).data == b"value of " + key
    entries, _ = read_all(backend.scan("c", b"", None, None, 3))
    assert [k for k, _ in entries] == sorted(keys)


def test_large_value(backend: Any) -> None:
    """A 2 MiB value round-trips unchanged."""
    result_of(backend.create_collection("c"))
    data = bytes(range(256)) * 8192
    result_of(backend.put("c", b"big", blob(data)))
    assert result_of(backend.get("c", b"big")).data == data


def test_corrupted_value_is_reported_not_returned(backend: Any) -> None:
    """A value whose CRC32 does not match its data reads as Corrupted, by get and by range."""
    result_of(backend.create_collection("c"))
    bad = CipherBlob(data=b"ciphertext", checksum=crc32(b"ciphertext") ^ 1, size=10)
    result_of(backend.put("c", b"bad", bad))
    failure_of(backend.get("c", b"bad"), Corrupted)
    cursor = backend.scan("c", b"", None, None, 10)
    failure_of(cursor.next_chunk(), Corrupted)
    assert result_of(cursor.next_chunk()) == []
    cursor.close()


# -- ranges ------------------------------------------------------------------------------------

KEYS = [b"k%02d" % i for i in range(20)]


def test_range_bounds_are_start_inclusive_end_exclusive(backend: Any) -> None:
    """scan(start, end) returns keys with start <= key < end, in order."""
    fill(backend, "c", KEYS)
    entries, _ = read_all(backend.scan("c", b"k05", b"k10", None, 100))
    assert [k for k, _ in entries] == KEYS[5:10]
    assert all(v.data == b"value of " + k for k, v in entries)
    entries, _ = read_all(backend.scan("c", b"k05\x00", b"k07", None, 100))
    assert [k for k, _ in entries] == [b"k06"]


def test_range_without_end_runs_to_the_last_key(backend: Any) -> None:
    """An end of None means to the end of the collection."""
    fill(backend, "c", KEYS)
    entries, _ = read_all(backend.scan("c", b"k15", None, None, 100))
    assert [k for k, _ in entries] == KEYS[15:]
    entries, _ = read_all(backend.scan("c", b"", None, None, 100))
    assert [k for k, _ in entries] == KEYS


def test_range_limit(backend: Any) -> None:
    """At most ``limit`` entries are returned, across chunks."""
    fill(backend, "c", KEYS)
    entries, sizes = read_all(backend.scan("c", b"", None, 7, 3))
    assert [k for k, _ in entries] == KEYS[:7]
    assert sizes == [3, 3, 1]
    entries, _ = read_all(backend.scan("c", b"k18", None, 7, 3))
    assert [k for k, _ in entries] == KEYS[18:]


def test_range_limit_zero(backend: Any) -> None:
    """A limit of 0 returns nothing."""
    fill(backend, "c", KEYS)
    assert read_all(backend.scan("c", b"", None, 0, 3))[0] == []


@pytest.mark.parametrize(("start", "end"), [(b"k10", b"k10"), (b"k10", b"k05"), (b"z", None)])
def test_empty_ranges(backend: Any, start: bytes, end: bytes | None) -> None:
    """A range with start >= end, or past the last key, is empty."""
    fill(backend, "c", KEYS)
    assert read_all(backend.scan("c", start, end, None, 5))[0] == []


def test_chunked_iteration(backend: Any) -> None:
    """A cursor returns bounded chunks in order, then empty chunks for good."""
    fill(backend, "c", KEYS)
    cursor = backend.scan("c", b"", None, None, 6)
    first = result_of(cursor.next_chunk())
    assert [k for k, _ in first] == KEYS[:6]
    entries, sizes = read_all(cursor)
    assert [k for k, _ in first + entries] == KEYS
    assert all(0 < size <= 6 for size in sizes)
    assert result_of(cursor.next_chunk()) == []
    assert result_of(cursor.next_chunk()) == []
    cursor.close()


def test_cursor_close_is_idempotent_and_final(backend: Any) -> None:
    """After close, next_chunk returns an empty chunk; closing twice is safe."""
    fill(backend, "c", KEYS)
    cursor = backend.scan("c", b"", None, None, 5)
    assert len(result_of(cursor.next_chunk())) == 5
    cursor.close()
    cursor.close()
    assert result_of(cursor.next_chunk()) == []


_model_ids = itertools.count()


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[Any]:
    """``opened(kind)``: one open backend of that kind for the whole test (closed afterwards)."""
    made: dict[str, Any] = {}

    def get(kind: str) -> Any:
        if kind not in made:
            made[kind] = make_backend(kind, tmp_path / kind)
            result_of(made[kind].open())
        return made[kind]

    yield get
    for b in made.values():
        result_of(b.close())


def _range_model_test(kind: str) -> Any:
    # One function object per backend: pytest-twisted rewraps a hypothesis test each time it is
    # called, so a parametrized hypothesis test would nest its wrappers.
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        keys=st.sets(st.binary(min_size=1, max_size=4), max_size=30),
        start=st.binary(max_size=3),
        end=st.one_of(st.none(), st.binary(max_size=3)),
        limit=st.one_of(st.none(), st.integers(min_value=1, max_value=40)),
        chunk_size=st.integers(min_value=1, max_value=8),
    )
    def test(
        opened: Any,
        keys: set[bytes],
        start: bytes,
        end: bytes | None,
        limit: int | None,
        chunk_size: int,
    ) -> None:
        """For any keys and bounds, a range equals the sorted, filtered, truncated key list."""
        backend = opened(kind)
        name = f"model{next(_model_ids)}"
        fill(backend, name, sorted(keys))
        expected = [k for k in sorted(keys) if k >= start and (end is None or k < end)]
        if limit is not None:
            expected = expected[:limit]
        entries, sizes = read_all(backend.scan(name, start, end, limit, chunk_size))
        assert [k for k, _ in entries] == expected
        assert all(size <= chunk_size for size in sizes)
        result_of(backend.drop_collection(name))

    return test


test_range_matches_a_sorted_model_memory = _range_model_test("memory")
test_range_matches_a_sorted_model_rocksdb = _range_model_test("rocksdb")
test_range_matches_a_sorted_model_faults_rocksdb = _range_model_test("faults-rocksdb")
test_range_matches_a_sorted_model_retrying_memory = _range_model_test("retrying-memory")
test_range_matches_a_sorted_model_etcd = _range_model_test("etcd")
test_range_matches_a_sorted_model_etcd_sharded = _range_model_test("etcd-sharded")


# -- batches -----------------------------------------------------------------------------------


def test_write_batch_applies_everything(backend: Any) -> None:
    """A batch of puts and deletes across collections is applied in full."""
    fill(backend, "a", [b"gone", b"kept"])
    result_of(backend.create_collection("b"))
    result_of(
        backend.write_batch(
            [
                WriteOp.put("a", b"new", blob(b"1")),
                WriteOp.delete("a", b"gone"),
                WriteOp.put("b", b"x", blob(b"2")),
                WriteOp.put("b", b"x", blob(b"3")),
            ]
        )
    )
    assert result_of(backend.get("a", b"new")).data == b"1"
    assert result_of(backend.get("a", b"gone")) is None
    assert result_of(backend.get("a", b"kept")) is not None
    assert result_of(backend.get("b", b"x")).data == b"3"


def test_write_batch_naming_a_missing_collection_applies_nothing(backend: Any) -> None:
    """If any op names a missing collection the batch fails with NotFound and changes nothing."""
    fill(backend, "a", [b"old"])
    failure_of(
        backend.write_batch(
            [
                WriteOp.put("a", b"new", blob(b"1")),
                WriteOp.delete("a", b"old"),
                WriteOp.put("missing", b"x", blob(b"2")),
            ]
        ),
        NotFound,
    )
    assert result_of(backend.get("a", b"new")) is None
    assert result_of(backend.get("a", b"old")) is not None
    assert not backend.has_collection("missing")


def test_empty_write_batch(backend: Any) -> None:
    """An empty batch succeeds and changes nothing."""
    result_of(backend.write_batch([]))
    assert result_of(backend.list_collections()) == []


# -- conditional writes ------------------------------------------------------------------------


def test_compare_and_write_applies_when_every_expectation_holds(backend: Any) -> None:
    """Expectations on present keys (equal blobs) and absent keys hold: every write is applied."""
    fill(backend, "a", [b"k1", b"k2", b"gone"])
    old = result_of(backend.get("a", b"k1"))
    result = result_of(
        backend.compare_and_write(
            [
                Expect("a", b"k1", blob(b"value of k1")),
                Expect("a", b"k2", blob(b"value of k2")),
                Expect("a", b"new", None),
            ],
            [
                WriteOp.put("a", b"k1", blob(b"v1", created_at=7, version=3)),
                WriteOp.put("a", b"new", blob(b"n")),
                WriteOp.delete("a", b"gone"),
            ],
        )
    )
    assert result == ConditionalResult() and result.applied
    assert old == blob(b"value of k1")
    assert result_of(backend.get("a", b"k1")) == blob(b"v1", created_at=7, version=3)
    assert result_of(backend.get("a", b"new")).data == b"n"
    assert result_of(backend.get("a", b"gone")) is None
    assert result_of(backend.get("a", b"k2")).data == b"value of k2"


def test_compare_and_write_applies_nothing_when_one_expectation_fails(backend: Any) -> None:
    """One key that no longer holds the expected value (another value, other metadata, deleted,
    or present where absence was expected): nothing is applied, and the result names it."""
    fill(backend, "a", [b"k1", b"k2", b"k3"])
    result_of(backend.put("a", b"k2", blob(b"value of k2", created_at=5)))  # same data, new metadata
    result_of(backend.delete("a", b"k3"))
    result = result_of(
        backend.compare_and_write(
            [
                Expect("a", b"k1", blob(b"value of k1")),
                Expect("a", b"k2", blob(b"value of k2")),
                Expect("a", b"k3", blob(b"value of k3")),
                Expect("a", b"k1x", None),
            ],
            [WriteOp.put("a", k, blob(b"new")) for k in (b"k1", b"k2", b"k3")],
        )
    )
    assert result.changed == {("a", b"k2"), ("a", b"k3")}
    assert result.not_applied == {("a", b"k1"), ("a", b"k2"), ("a", b"k3")} and not result.applied
    assert result_of(backend.get("a", b"k1")).data == b"value of k1"
    assert result_of(backend.get("a", b"k2")) == blob(b"value of k2", created_at=5)
    assert result_of(backend.get("a", b"k3")) is None
    # Present where absence was expected.
    result = result_of(backend.compare_and_write([Expect("a", b"k1", None)], [WriteOp.delete("a", b"k1")]))
    assert result.changed == {("a", b"k1")} and result_of(backend.get("a", b"k1")) is not None


def test_compare_and_write_sees_every_earlier_write(backend: Any) -> None:
    """A write that lands after a value was read makes the conditional write on it fail; a check
    against the newest value then succeeds (the read-modify-write loop of UPDATE)."""
    fill(backend, "a", [b"k"])
    read = result_of(backend.get("a", b"k"))
    result_of(backend.put("a", b"k", blob(b"concurrent")))
    first = result_of(
        backend.compare_and_write([Expect("a", b"k", read)], [WriteOp.put("a", b"k", blob(b"x"))])
    )
    assert first.changed == {("a", b"k")}
    assert result_of(backend.get("a", b"k")).data == b"concurrent"
    read = result_of(backend.get("a", b"k"))
    second = result_of(
        backend.compare_and_write([Expect("a", b"k", read)], [WriteOp.put("a", b"k", blob(b"y"))])
    )
    assert second.applied and result_of(backend.get("a", b"k")).data == b"y"


def test_compare_and_write_on_large_values(backend: Any) -> None:
    """Values larger than one storage request (chunked on etcd) compare and replace exactly."""
    big = bytes(range(256)) * 8192  # 2 MiB
    result_of(backend.create_collection("a"))
    result_of(backend.put("a", b"big", blob(big)))
    changed = result_of(
        backend.compare_and_write(
            [Expect("a", b"big", blob(big[:-1] + b"x"))], [WriteOp.put("a", b"big", blob(b"s"))]
        )
    )
    assert changed.changed == {("a", b"big")}
    result = result_of(
        backend.compare_and_write(
            [Expect("a", b"big", blob(big))], [WriteOp.put("a", b"big", blob(big[::-1]))]
        )
    )
    assert result.applied and result_of(backend.get("a", b"big")).data == big[::-1]


def test_compare_and_write_without_writes_or_expectations(backend: Any) -> None:
    """Expectations alone only check; writes alone are applied like a batch; neither: nothing."""
    fill(backend, "a", [b"k"])
    assert result_of(backend.compare_and_write([Expect("a", b"k", blob(b"value of k"))], [])).applied
    assert result_of(backend.compare_and_write([Expect("a", b"k", None)], [])).changed == {("a", b"k")}
    assert result_of(backend.compare_and_write([], [WriteOp.put("a", b"j", blob(b"j"))])).applied
    assert result_of(backend.get("a", b"j")).data == b"j"
    assert result_of(backend.compare_and_write([], [])) == ConditionalResult()


def test_compare_and_write_naming_a_missing_collection_applies_nothing(backend: Any) -> None:
    """An expectation or a write on a missing collection: NotFound, nothing applied."""
    fill(backend, "a", [b"k"])
    failure_of(
        backend.compare_and_write(
            [Expect("a", b"k", blob(b"value of k"))],
            [WriteOp.put("a", b"k", blob(b"x")), WriteOp.put("missing", b"k", blob(b"x"))],
        ),
        NotFound,
    )
    failure_of(
        backend.compare_and_write([Expect("missing", b"k", None)], [WriteOp.put("a", b"k", blob(b"x"))]),
        NotFound,
    )
    assert result_of(backend.get("a", b"k")).data == b"value of k"
    assert not backend.has_collection("missing")


# -- maintenance -------------------------------------------------------------------------------


def test_stats(backend: Any) -> None:
    """stats() names the backend and counts keys per collection and bytes."""
    fill(backend, "a", [b"1", b"2", b"3"])
    result_of(backend.create_collection("empty"))
    stats = result_of(backend.stats())
    assert stats["backend"] == backend.name
    assert stats["keys"]["a"] == 3
    assert stats["keys"]["empty"] == 0
    assert isinstance(stats["bytes"], int) and stats["bytes"] >= 0


def test_sync_and_flush_keep_data(backend: Any) -> None:
    """sync() and flush() succeed and every value is still readable afterwards."""
    fill(backend, "c", KEYS)
    assert result_of(backend.sync()) is None
    assert result_of(backend.flush()) is None
    entries, _ = read_all(backend.scan("c", b"", None, None, 100))
    assert [k for k, _ in entries] == KEYS
    assert result_of(backend.get("c", b"k03")).data == b"value of k03"


def test_close_twice(backend: Any) -> None:
    """close() may be called again (the fixture closes a third time)."""
    result_of(backend.close())
    result_of(backend.close())


def test_errors_are_amaters_errors(backend: Any) -> None:
    """Failures carry a wire error code (AmatersError), so the pipeline can answer the client."""
    failure = failure_of(backend.get("nope", b"k"), NotFound)
    assert isinstance(failure.value, AmatersError)
    assert failure.value.code.name == "STORAGE_NOT_FOUND"


@pytest.mark.parametrize("same_value", [True, False])
def test_etcd_conditional_write_reads_again_when_its_guard_fails(tmp_path: Path, same_value: bool) -> None:
    """etcd checks values it read, then writes guarded by their mod revisions: a write landing in
    between makes the guard fail and the backend read again.  Rewritten with the same value, the
    key still holds what was expected, so the conditional write is applied; with another value it
    is reported changed and nothing is applied."""
    made = make_backend("etcd", tmp_path)
    result_of(made.open())
    try:
        fill(made, "a", [b"k"])
        inner = made.inner
        original = inner._read_in_collections
        reads: list[int] = []

        async def read_then_race(*args: Any) -> Any:
            answer = await original(*args)
            reads.append(1)
            if len(reads) == 1:
                await inner.put("a", b"k", blob(b"value of k" if same_value else b"raced"))
            return answer

        inner._read_in_collections = read_then_race
        result = result_of(
            made.compare_and_write(
                [Expect("a", b"k", blob(b"value of k"))], [WriteOp.put("a", b"k", blob(b"x"))]
            )
        )
        assert len(reads) == 2
        if same_value:
            assert result.applied and result_of(made.get("a", b"k")).data == b"x"
        else:
            assert result.changed == {("a", b"k")} and result_of(made.get("a", b"k")).data == b"raced"
    finally:
        result_of(made.close())
