"""Sharding on real etcd: two single-member etcd clusters as shards, virtual shards moved online."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from etcd_helpers import ETCD, EtcdCluster, sharded_backend
from twisted.internet import defer, reactor, task

from amaters.cluster.etcd import EtcdClient, prefix_end
from amaters.errors import AmatersError, InvalidOperation
from amaters.storage.sharded import VSHARDS, ShardMap, vshard_of
from amaters.types import CipherBlob, Expect, WriteOp

pytestmark = pytest.mark.skipif(ETCD is None, reason="etcd is not installed (scripts/install-test-deps)")


@pytest.fixture
def two_clusters(tmp_path: Path) -> Iterator[tuple[EtcdCluster, EtcdCluster]]:
    first = EtcdCluster(tmp_path / "first", size=1).start()
    second = EtcdCluster(tmp_path / "second", size=1).start()
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def test_vshards_spread_keys_and_never_change() -> None:
    """A key's virtual shard is stable and keys spread over all virtual shards."""
    assert vshard_of("c", b"k") == vshard_of("c", b"k")
    assert vshard_of("c", b"k") != vshard_of("d", b"k") or vshard_of("c", b"j") != vshard_of("d", b"j")
    assert len({vshard_of("c", b"%d" % i) for i in range(2000)}) == VSHARDS


def test_shard_map_round_trips() -> None:
    """The shard map's JSON form keeps shards, assignment, epochs and fences."""
    shard_map = ShardMap(
        {"0": ("http://a:1",), "s1": ("http://b:1",)},
        ("0", "s1") * 32,
        {"0": 2},
        frozenset({3}),
        {3: {"to": "s1", "by": "a", "lease": 7}},
    )
    assert ShardMap.from_json(shard_map.to_json()) == shard_map
    assert len(shard_map.owned()["s1"]) == 32


@pytest_twisted.ensureDeferred
async def test_adding_a_shard_under_writes_moves_keys_and_loses_none(
    two_clusters: tuple[EtcdCluster, EtcdCluster],
) -> None:
    """While a writer keeps writing, add-shard moves half the virtual shards to the new etcd cluster;
    afterwards every acknowledged value is read back (also by a second node that had the old map),
    RANGE returns every key once and in order, and the new cluster really holds data."""
    first, second = two_clusters
    node = sharded_backend(first.endpoints, b"/s/")
    other = sharded_backend(first.endpoints, b"/s/")
    await node.open()
    await other.open()
    try:
        await node.create_collection("c")
        keys = [b"key-%03d" % i for i in range(120)]
        acked: dict[bytes, bytes] = {}
        for key in keys:
            await node.put("c", key, CipherBlob.wrap(b"v0-" + key))
            acked[key] = b"v0-" + key
        stop = [False]
        failures: list[str] = []

        async def writer() -> None:
            n = 0
            while not stop[0]:
                n += 1
                key = keys[n % len(keys)]
                value = b"v%d-" % n + key
                try:
                    await other.put("c", key, CipherBlob.wrap(value))
                except AmatersError as e:
                    failures.append(e.code.name)
                    acked.pop(key, None)  # outcome unknown
                    continue
                acked[key] = value

        writing = defer.Deferred.fromCoroutine(writer())
        result = await node.add_shard("s1", second.endpoints)
        await task.deferLater(reactor, 0.3, lambda: None)
        stop[0] = True
        await writing
        assert len(result["moved"]) == VSHARDS // 2
        assert len(node.map.owned()["s1"]) == VSHARDS // 2
        assert set(failures) <= {"SERVER_UNAVAILABLE"}
        for reader in (node, other):
            for key, value in acked.items():
                got = await reader.get("c", key)
                assert got is not None and got.data == value, key
        cursor = node.scan("c", b"", None, None, 7)
        seen: list[bytes] = []
        while chunk := await cursor.next_chunk():
            seen.extend(k for k, _ in chunk)
        assert seen == sorted(keys)
        limited = node.scan("c", b"key-010", b"key-020", 4, 3)
        few: list[bytes] = []
        while chunk := await limited.next_chunk():
            few.extend(k for k, _ in chunk)
        assert few == keys[10:14]
        # The new cluster holds the moved keys; the first no longer does.
        direct = EtcdClient(second.endpoints, reactor)
        base = b"/s/d/" + b"c".hex().encode() + b"/"
        held = await direct.range(base, prefix_end(base), count_only=True)
        await direct.close()
        moved = sum(1 for k in keys if node.map.assign[vshard_of("c", k)] == "s1")
        assert int(held.get("count", 0)) == moved > 0
        home = EtcdClient(first.endpoints, reactor)
        left = await home.range(base, prefix_end(base), count_only=True)
        await home.close()
        assert int(left.get("count", 0)) == len(keys) - moved
        # A batch across shards is refused, not applied in part.
        a = next(k for k in keys if node.map.assign[vshard_of("c", k)] == "0")
        b = next(k for k in keys if node.map.assign[vshard_of("c", k)] == "s1")
        with pytest.raises(InvalidOperation, match="BATCH must keep to one"):
            await node.write_batch([WriteOp.put("c", a, CipherBlob.wrap(b"x")), WriteOp.delete("c", b)])
        assert (await node.get("c", a)).data == acked[a]
        # A conditional write across shards is applied per shard: the part whose expectation
        # failed is not applied, the other shard's part is.
        a2 = next(k for k in keys if node.map.assign[vshard_of("c", k)] == "0" and k != a)
        b2 = next(k for k in keys if node.map.assign[vshard_of("c", k)] == "s1" and k != b)
        current = {k: await node.get("c", k) for k in (a, a2, b, b2)}
        result = await node.compare_and_write(
            [
                Expect("c", a, CipherBlob.wrap(b"stale")),
                Expect("c", a2, current[a2]),
                Expect("c", b, current[b]),
                Expect("c", b2, current[b2]),
            ],
            [WriteOp.put("c", k, CipherBlob.wrap(b"cas-" + k)) for k in (a, a2, b, b2)],
        )
        assert result.changed == {("c", a)}
        assert result.not_applied == {("c", a), ("c", a2)}
        for reader in (node, other):
            assert (await reader.get("c", a)) == current[a] and (await reader.get("c", a2)) == current[a2]
            assert (await reader.get("c", b)).data == b"cas-" + b
            assert (await reader.get("c", b2)).data == b"cas-" + b2
    finally:
        await node.close()
        await other.close()


@pytest_twisted.ensureDeferred
async def test_cluster_snapshot_covers_every_shard_and_restores(
    two_clusters: tuple[EtcdCluster, EtcdCluster], tmp_path: Path
) -> None:
    """A cluster snapshot writes every shard's etcd snapshot with SHA-256 sums in one manifest; a
    changed byte fails verification; a shard restored with etcdctl holds that shard's keys."""
    import json
    import shutil
    import subprocess

    from twisted.internet import threads

    from amaters.cluster.snapshot import SnapshotError, snapshot_cluster, verify_snapshot

    first, second = two_clusters
    node = sharded_backend(first.endpoints, b"/s/")
    await node.open()
    try:
        await node.create_collection("c")
        keys = [b"k%03d" % i for i in range(40)]
        for key in keys:
            await node.put("c", key, CipherBlob.wrap(b"v-" + key))
        await node.add_shard("s1", second.endpoints)
        on_s1 = [k for k in keys if node.map.assign[vshard_of("c", k)] == "s1"]
    finally:
        await node.close()
    target = tmp_path / "snap"
    manifest = await threads.deferToThread(snapshot_cluster, first.endpoints, "/s/", target)
    assert set(manifest["shards"]) == {"0", "s1"}
    assert verify_snapshot(target)["shard_map"]["shards"]["s1"] == second.endpoints
    etcdctl = shutil.which("etcdctl")
    if etcdctl is None:
        pytest.skip("etcdctl is not installed")
    restored = tmp_path / "restored"
    run = subprocess.run(
        [etcdctl, "snapshot", "restore", str(target / "shard-s1.db"), "--data-dir", str(restored)],
        capture_output=True,
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert (restored / "member").is_dir()
    # A flipped byte is caught.
    data = bytearray((target / "shard-0.db").read_bytes())
    data[len(data) // 2] ^= 1
    (target / "shard-0.db").write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=r"shard 0: .* does not match its SHA-256"):
        verify_snapshot(target)
    written = json.loads((target / "manifest.json").read_text())
    assert written["format"] == 2
    assert [m["client_urls"] for m in written["shards"]["s1"]["members"]] == [second.endpoints]
    assert on_s1


@pytest_twisted.ensureDeferred
async def test_a_move_interrupted_by_its_node_is_finished_by_another(
    two_clusters: tuple[EtcdCluster, EtcdCluster],
) -> None:
    """A node dies mid-move (after fencing, during the copy): the virtual shard stays fenced and its
    map entry names the node's lease; while that lease is live nobody else touches it; once it is
    gone another node finishes the move and every key is read back from the new shard.  A second
    move of the same virtual shard elsewhere is refused in one line meanwhile."""
    first, second = two_clusters
    crashing = sharded_backend(first.endpoints, b"/m/")
    survivor = sharded_backend(first.endpoints, b"/m/")
    await crashing.open()
    await survivor.open()
    try:
        crashing.mover = {"by": "a", "lease": 101}
        survivor.mover = {"by": "b", "lease": 202}
        await crashing.create_collection("c")
        values = {b"k%04d" % i: b"v%d" % i for i in range(400)}
        for key, value in values.items():
            await crashing.put("c", key, CipherBlob.wrap(value))
        await crashing.add_shard("s1", second.endpoints, rebalance=False)
        vshard = vshard_of("c", b"k0000")
        target = crashing.backends["s1"]
        real_write = target.write_batch

        def crash(ops: object) -> defer.Deferred[None]:
            return defer.fail(RuntimeError("the node died"))

        target.write_batch = crash  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await crashing.move(vshard, "s1")
        target.write_batch = real_write  # type: ignore[method-assign]
        await survivor.load_map()
        assert vshard in survivor.map.fenced
        assert survivor.map.moving[vshard] == {"to": "s1", "by": "a", "lease": 101}
        with pytest.raises(InvalidOperation, match="being moved to shard 's1'; finish that move first"):
            await survivor.move(vshard, "0")

        assert await survivor.resume_interrupted_moves({101, 202}) == []  # node a still alive
        assert vshard in survivor.map.fenced
        done = await survivor.resume_interrupted_moves({202})  # node a's lease is gone
        assert [d["vshard"] for d in done] == [vshard] and done[0]["to"] == "s1"
        assert vshard not in survivor.map.fenced and survivor.map.moving == {}
        assert survivor.map.assign[vshard] == "s1"
        for key, value in values.items():
            got = await survivor.get("c", key)
            assert got is not None and got.data == value
        assert [k for k, _ in await _all(survivor, "c")] == sorted(values)
    finally:
        await crashing.close()
        await survivor.close()


@pytest_twisted.ensureDeferred
async def test_a_fence_without_a_move_record_is_lifted_in_place(
    two_clusters: tuple[EtcdCluster, EtcdCluster],
) -> None:
    """A fence with no move record (as an earlier release leaves one) is lifted by the resumer; the
    virtual shard stays where it was and serves writes again."""
    first, second = two_clusters
    node = sharded_backend(first.endpoints, b"/f/")
    await node.open()
    try:
        await node.create_collection("c")
        await node.add_shard("s1", second.endpoints, rebalance=False)
        vshard = vshard_of("c", b"key")
        await node._cas_map(
            ShardMap(node.map.shards, node.map.assign, node.map.epochs, node.map.fenced | {vshard})
        )
        assert [d["vshard"] for d in await node.resume_interrupted_moves(set())] == [vshard]
        assert node.map.fenced == frozenset() and node.map.assign[vshard] == "0"
        await node.put("c", b"key", CipherBlob.wrap(b"v"))
        got = await node.get("c", b"key")
        assert got is not None and got.data == b"v"
    finally:
        await node.close()


async def _all(backend: object, collection: str) -> list[tuple[bytes, object]]:
    """Every (key, value) of ``collection`` through the backend's cursor, in order."""
    cursor = backend.scan(collection, b"", None, None, 50)  # type: ignore[attr-defined]
    out: list[tuple[bytes, object]] = []
    while page := await cursor.next_chunk():
        out.extend(page)
    return out


@pytest_twisted.ensureDeferred
async def test_removing_a_shard_moves_everything_off_it(
    two_clusters: tuple[EtcdCluster, EtcdCluster],
) -> None:
    """remove-shard moves every virtual shard of the shard to the others, drops it from the map (and
    another node closes its connection to it); every key is still read back; shard 0 and unknown
    shards are refused in one line."""
    first, second = two_clusters
    node = sharded_backend(first.endpoints, b"/r/")
    other = sharded_backend(first.endpoints, b"/r/")
    await node.open()
    await other.open()
    try:
        await node.create_collection("c")
        values = {b"k%03d" % i: b"v%d" % i for i in range(300)}
        for key, value in values.items():
            await node.put("c", key, CipherBlob.wrap(value))
        await node.add_shard("s1", second.endpoints)
        assert len(node.map.owned()["s1"]) == VSHARDS // 2
        with pytest.raises(InvalidOperation, match="holds the shard map"):
            await node.remove_shard("0")
        with pytest.raises(InvalidOperation, match="does not exist"):
            await node.remove_shard("nope")
        result = await node.remove_shard("s1")
        assert len(result["moved"]) == VSHARDS // 2 and set(node.map.shards) == {"0"}
        assert set(node.map.assign) == {"0"} and "s1" not in node.backends
        await other.load_map()
        assert "s1" not in other.backends
        for key, value in values.items():
            got = await other.get("c", key)
            assert got is not None and got.data == value
        direct = EtcdClient(second.endpoints, reactor)
        try:
            held = await direct.range(b"/r/d/", prefix_end(b"/r/d/"), count_only=True)
            assert int(held.get("count", 0)) == 0  # the removed shard's copies were cleaned up
        finally:
            await direct.close()
    finally:
        await node.close()
        await other.close()


@pytest_twisted.ensureDeferred
async def test_a_get_on_a_collection_this_node_has_not_heard_of_asks_etcd(
    two_clusters: tuple[EtcdCluster, EtcdCluster],
) -> None:
    """A node whose watched collection list lacks a collection another node just created (its
    watch has not caught up) still answers GET and DELETE from etcd, not "absent"."""
    from amaters.query import operations as ops
    from amaters.query.executor import QueryExecutor

    first, _second = two_clusters
    writer = sharded_backend(first.endpoints, b"/w/")
    reader = sharded_backend(first.endpoints, b"/w/")
    await writer.open()
    await reader.open()
    try:
        await writer.create_collection("fresh")
        await writer.put("fresh", b"k", CipherBlob.wrap(b"v"))
        reader.home._collections.discard("fresh")  # as before its watch delivers the creation
        executor = QueryExecutor(reader)
        got = await executor.get(ops.Get("fresh", b"k"))
        assert got is not None and got.data == b"v"
        reader.home._collections.discard("fresh")
        assert await executor.delete(ops.Delete("fresh", b"k")) is True
        assert await executor.get(ops.Get("nowhere", b"k")) is None  # really missing: absent
    finally:
        await writer.close()
        await reader.close()
