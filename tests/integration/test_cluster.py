"""Clustered mode end to end: 3 real etcd members and 2 ``twistd -n amaters`` nodes on loopback.

Every chaos test runs bounded load (several writers, a bounded number of operations and seconds),
records each operation's interval and outcome, reads every key back at the end, and checks the
per-key histories for linearizability (``tests/lincheck.py``): an acknowledged write that was lost,
or a read of a value older than an acknowledged write, fails the test.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from etcd_helpers import ETCD, EtcdCluster
from harness import ServerProcess
from lincheck import INFINITY, Op, check
from twisted.internet import defer, reactor

from amaters.client import ClusterClient, connect, connect_cluster
from amaters.errors import AmatersError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(ETCD is None, reason="etcd is not installed (scripts/install-test-deps)"),
]


def node_settings(endpoints: list[str], name: str) -> list[str]:
    return [
        "storage.backend=etcd",
        f"cluster.endpoints={json.dumps(endpoints)}",
        f"cluster.node_name={name}",
        "tls.enabled=false",
        "server.shutdown_timeout=2",
    ]


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.etcd = EtcdCluster(directory / "etcd", 3)
        self.nodes: list[ServerProcess] = []
        self.directory = directory

    def start(self) -> Cluster:
        self.etcd.start()
        for name in ("a", "b"):
            node = ServerProcess(self.directory / name, settings=node_settings(self.etcd.endpoints, name))
            self.nodes.append(node)
            node.start()
        for node in self.nodes:
            node.wait_ready()
        return self

    def restart_node(self, index: int) -> None:
        node = self.nodes[index]
        node.start()
        node.wait_ready()

    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            try:
                node.stop(timeout=10)
            except AssertionError:
                pass
            node.cleanup()
        self.etcd.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    made = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        made.start()
        yield made
    finally:
        made.stop()


def wait_for(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class Workload:
    """Writers doing reads and writes on shared keys through cluster clients, with a history."""

    def __init__(self, collection: str, keys: int = 16) -> None:
        self.collection = collection
        self.keys = [b"key-%02d" % i for i in range(keys)]
        self.history: list[Op] = []
        self.failures: list[str] = []
        self.acked_writes: list[tuple[float, float]] = []  # (call, ret)
        self.stop_at = 0.0

    async def writer(self, client: ClusterClient, number: int, operations: int) -> None:
        rng = random.Random(number)
        last_write: bytes | None = None
        for n in range(operations):
            if time.monotonic() > self.stop_at:
                return
            if last_write is not None:
                key, kind = last_write, "read"
            else:
                key = rng.choice(self.keys)
                kind = "write" if rng.random() < 0.6 else "read"
            call = time.monotonic()
            if kind == "write":
                value = b"w%d-%d" % (number, n)
                try:
                    await client.set(self.collection, key, value, timeout=5)
                except AmatersError as e:
                    self.history.append(Op(key, "write", value, call, INFINITY, ok=False))
                    self.failures.append(e.code.name)
                    last_write = None
                    await wait_for(0.05)
                    continue
                ret = time.monotonic()
                self.history.append(Op(key, "write", value, call, ret))
                self.acked_writes.append((call, ret))
                last_write = key
            else:
                last_write = None
                try:
                    got = await client.get(self.collection, key, timeout=5)
                except AmatersError as e:
                    self.failures.append(e.code.name)
                    await wait_for(0.05)
                    continue
                self.history.append(Op(key, "read", got, call, time.monotonic()))

    async def final_reads(self, client: ClusterClient) -> None:
        for key in self.keys:
            call = time.monotonic()
            got = await client.get(self.collection, key, timeout=10)
            self.history.append(Op(key, "read", got, call, time.monotonic()))

    def check(self) -> None:
        anomalies = check(self.history)
        assert not anomalies, "\n".join(a.describe() for a in anomalies[:3])


async def clients(cluster: Cluster, count: int) -> list[ClusterClient]:
    addresses = cluster.addresses()
    made = []
    for i in range(count):
        # Half start on node A, half on node B.
        order = addresses[i % 2 :] + addresses[: i % 2]
        made.append(await connect_cluster(reactor, order, plaintext=True, timeout=5))
    return made


async def run_workload(
    workload: Workload, made: list[ClusterClient], operations: int, seconds: float, chaos: Any
) -> None:
    workload.stop_at = time.monotonic() + seconds
    writers = [
        defer.Deferred.fromCoroutine(workload.writer(client, i, operations)) for i, client in enumerate(made)
    ]
    await chaos()
    await defer.gatherResults(writers, consumeErrors=True)


@pytest_twisted.ensureDeferred
async def test_write_through_one_node_is_read_through_the_other(cluster: Cluster) -> None:
    """A value set through node A is read through node B; a collection created on A is known to B."""
    a = await connect(reactor, "127.0.0.1", cluster.nodes[0].port, plaintext=True)
    b = await connect(reactor, "127.0.0.1", cluster.nodes[1].port, plaintext=True)
    try:
        await a.set("shared", b"k", b"from A")
        assert await b.get("shared", b"k") == b"from A"
        await b.set("shared", b"k", b"from B")
        assert await a.get("shared", b"k") == b"from B"
        big = bytes(range(256)) * 8192  # 2 MiB: stored in chunks, made visible at once
        await a.set("shared", b"big", big)
        assert await b.get("shared", b"big") == big
        assert await a.create_collection("made-on-a") is True
        for _ in range(50):
            if "made-on-a" in await b.list_collections():
                break
            await wait_for(0.05)
        await b.set("made-on-a", b"x", b"1")
        assert [k for k, _ in await a.range("shared", b"", None)] == [b"big", b"k"]
    finally:
        await a.close()
        await b.close()


@pytest_twisted.ensureDeferred
async def test_killing_the_etcd_leader_loses_no_acknowledged_write(cluster: Cluster) -> None:
    """kill -9 of the etcd leader under 8 writers: writes resume within 5 s, histories linearizable."""
    workload = Workload("leaderkill")
    made = await clients(cluster, 8)
    killed: dict[str, Any] = {}

    async def chaos() -> None:
        await wait_for(1.5)
        leader = cluster.etcd.leader()
        killed["at"] = time.monotonic()
        cluster.etcd.kill(leader)
        killed["member"] = leader

    try:
        await run_workload(workload, made, operations=400, seconds=9.0, chaos=chaos)
        resumed = [ret for call, ret in workload.acked_writes if call > killed["at"]]
        assert resumed, f"no write succeeded after the leader was killed ({workload.failures[-5:]})"
        recovery = min(resumed) - killed["at"]
        print(f"\nwrites resumed {recovery:.2f}s after the etcd leader was killed")
        assert recovery < 5.0
        await workload.final_reads(made[0])
        workload.check()
    finally:
        for client in made:
            await client.close()
        cluster.etcd.start_member(killed["member"])
        cluster.etcd.wait_leader()


@pytest_twisted.ensureDeferred
async def test_killing_a_node_mid_request_clients_fail_over(cluster: Cluster) -> None:
    """kill -9 of amaters node A under load: clients move to B, nothing acknowledged is lost."""
    workload = Workload("nodekill")
    made = await clients(cluster, 6)

    async def chaos() -> None:
        await wait_for(1.0)
        cluster.nodes[0].kill9()

    try:
        await run_workload(workload, made, operations=300, seconds=5.0, chaos=chaos)
        assert all(client.current_address == cluster.addresses()[1] for client in made)
        assert len(workload.acked_writes) > 20
        await workload.final_reads(made[0])
        workload.check()
    finally:
        for client in made:
            await client.close()
        cluster.restart_node(0)
