"""The etcd client and backend against a real single-member etcd: failover, errors, shutdown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from etcd_helpers import ETCD, EtcdCluster
from twisted.internet import reactor, task

from amaters.cluster.etcd import EtcdAmbiguous, EtcdClient, EtcdError, EtcdUnavailable, b64, prefix_end
from amaters.errors import Unavailable
from amaters.storage.etcd import EtcdBackend
from amaters.types import CipherBlob

pytestmark = pytest.mark.skipif(ETCD is None, reason="etcd is not installed (scripts/install-test-deps)")


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd", size=1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def dead_endpoint() -> str:
    from ports import free_port as _free_port

    return f"http://127.0.0.1:{_free_port()}"


def test_prefix_end() -> None:
    """prefix_end is the first key after every key with the prefix."""
    assert prefix_end(b"a/") == b"a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\x00"


@pytest_twisted.ensureDeferred
async def test_requests_fail_over_to_a_live_member(etcd: EtcdCluster) -> None:
    """A member that refuses connections is skipped, for writes too (they never reached it)."""
    client = EtcdClient([dead_endpoint(), *etcd.endpoints], reactor)
    try:
        await client.call("/v3/kv/put", {"key": b64(b"k"), "value": b64(b"v")}, idempotent=False)
        answer = await client.range(b"k")
        assert answer["kvs"][0]["value"] == b64(b"v")
        assert client.current_endpoint == etcd.endpoints[0]
        assert client.revision >= 2
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_no_member_answering_is_unavailable(etcd: EtcdCluster) -> None:
    """With no member reachable, a request fails with EtcdUnavailable after its attempts."""
    client = EtcdClient([dead_endpoint(), dead_endpoint()], reactor, request_timeout=0.2)
    try:
        with pytest.raises(EtcdUnavailable):
            await client.range(b"k")
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_paused_member_makes_a_plain_write_ambiguous(etcd: EtcdCluster) -> None:
    """A write whose member does not answer in time may have been applied: EtcdAmbiguous, not a retry;
    the backend turns that into the retryable Unavailable when it cannot read its write back."""
    client = EtcdClient(etcd.endpoints, reactor, request_timeout=0.3)
    backend = EtcdBackend(client, reactor, prefix=b"/amb/")
    await backend.open()
    await backend.create_collection("c")
    etcd.pause(etcd.members[0])
    try:
        with pytest.raises(EtcdAmbiguous):
            await client.call("/v3/kv/put", {"key": b64(b"x"), "value": b64(b"1")}, idempotent=False)
        with pytest.raises(Unavailable, match="may or may not be applied"):
            await backend.put("c", b"k", CipherBlob.wrap(b"v"))
    finally:
        etcd.resume(etcd.members[0])
        await backend.close()
        # Requests cut at their deadline abort their connections; let those closes complete.
        await task.deferLater(reactor, 0.2, lambda: None)


@pytest_twisted.ensureDeferred
async def test_request_errors_are_not_retried(etcd: EtcdCluster) -> None:
    """A request etcd refuses as wrong (a key twice in one transaction) fails at once."""
    client = EtcdClient(etcd.endpoints, reactor)
    put = {"request_put": {"key": b64(b"k"), "value": b64(b"v")}}
    try:
        with pytest.raises(EtcdError, match="duplicate key"):
            await client.txn([], [put, put])
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_backend_closes_promptly_after_etcd_is_gone(etcd: EtcdCluster) -> None:
    """With every member dead, close() still finishes: the collection watch stops retrying."""
    backend = EtcdBackend(EtcdClient(etcd.endpoints, reactor), reactor, prefix=b"/gone/")
    await backend.open()
    etcd.kill(etcd.members[0])
    await task.deferLater(reactor, 0.5, lambda: None)
    closing = backend.close()
    timer = reactor.callLater(5, closing.cancel)
    await closing
    assert timer.active()
    timer.cancel()


@pytest_twisted.ensureDeferred
async def test_another_nodes_collections_reach_has_collection(etcd: EtcdCluster) -> None:
    """A collection created through one backend appears in another's has_collection (etcd watch)."""
    one = EtcdBackend(EtcdClient(etcd.endpoints, reactor), reactor, prefix=b"/w/")
    two = EtcdBackend(EtcdClient(etcd.endpoints, reactor), reactor, prefix=b"/w/")
    await one.open()
    await two.open()
    try:
        await one.create_collection("made")
        for _ in range(100):
            if two.has_collection("made"):
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        assert two.has_collection("made")
        await one.drop_collection("made")
        for _ in range(100):
            if not two.has_collection("made"):
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        assert not two.has_collection("made")
    finally:
        await one.close()
        await two.close()


@pytest_twisted.ensureDeferred
async def test_orphaned_chunks_are_cleaned_and_live_ones_kept(etcd: EtcdCluster) -> None:
    """Chunks of a replaced large value are deleted at once; chunks nothing points to (a writer that
    died before its pointer was written) are deleted by clean_orphans; live values keep theirs."""
    client = EtcdClient(etcd.endpoints, reactor)
    backend = EtcdBackend(client, reactor, prefix=b"/o/")
    await backend.open()
    try:
        await backend.create_collection("c")
        big = bytes(range(256)) * 8192
        await backend.put("c", b"big", CipherBlob.wrap(big))
        await backend.put("c", b"big", CipherBlob.wrap(big[::-1]))

        async def chunk_groups() -> set[bytes]:
            answer = await client.range(b"/o/k/", prefix_end(b"/o/k/"), keys_only=True)
            from amaters.cluster.etcd import kv_of

            return {kv_of(item)[0].rsplit(b"/", 1)[0] for item in answer.get("kvs", [])}

        assert len(await chunk_groups()) == 1  # the replaced value's chunks are gone
        # A writer that died after writing chunks: no pending marker, no pointer.
        orphan = backend._chunk_prefix("c", b"big") + b"00000000deadbeef/"
        await client.txn([], [{"request_put": {"key": b64(orphan + b"000000"), "value": b64(b"x")}}])
        assert len(await chunk_groups()) == 2
        assert await backend.clean_orphans() == 1
        assert len(await chunk_groups()) == 1
        assert (await backend.get("c", b"big")).data == big[::-1]
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_leader_duties_compact_history_and_a_range_survives_it(etcd: EtcdCluster) -> None:
    """The elected node's duties compact etcd's history to the revision seen one duty round earlier;
    a RANGE cursor pinned to a compacted revision continues from the current data."""
    import attrs

    from amaters.cluster.service import ClusterService
    from amaters.config import ClusterConfig

    backend = EtcdBackend(EtcdClient(etcd.endpoints, reactor), reactor, prefix=b"/duty/")
    await backend.open()
    config = attrs.evolve(ClusterConfig(), endpoints=etcd.endpoints, prefix="/duty/")
    service = ClusterService(
        EtcdClient(etcd.endpoints, reactor),
        config,
        reactor,
        node_name="n1",
        advertise="127.0.0.1:1",
        backend=backend,
    )
    try:
        await backend.create_collection("c")
        for i in range(6):
            await backend.put("c", b"k%d" % i, CipherBlob.wrap(b"old"))
        cursor = backend.scan("c", b"", None, None, 2)
        first = await cursor.next_chunk()
        assert [k for k, _ in first] == [b"k0", b"k1"]
        await service.tick()
        assert service.is_leader
        await service.run_duties()  # remembers the current revision
        for i in range(6):
            await backend.put("c", b"k%d" % i, CipherBlob.wrap(b"new"))
        await service.tick()  # sees the newer revision
        await service.run_duties()  # compacts to the one remembered
        with pytest.raises(EtcdError, match="compacted"):
            await backend.client.range(b"/duty/", revision=2)
        rest = []
        while chunk := await cursor.next_chunk():
            rest.extend(chunk)
        assert [k for k, _ in rest] == [b"k2", b"k3", b"k4", b"k5"]
        assert all(v.data == b"new" for _, v in rest)
        assert service.duties_run >= 2
    finally:
        await service.stopService()
        await backend.close()
