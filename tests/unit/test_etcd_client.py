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
