"""A clustered deployment for tests (3 real etcd members, 2 ``twistd -n amaters`` nodes) and a
bounded workload through cluster clients that records every operation for the linearizability
checker (``tests/lincheck.py``)."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from etcd_helpers import EtcdCluster
from harness import ServerProcess, http_get
from lincheck import INFINITY, Op, check
from twisted.internet import defer, reactor

from amaters.client import ClusterClient, connect_cluster
from amaters.errors import AmatersError


def node_settings(endpoints: list[str], name: str) -> list[str]:
    return [
        "storage.backend=etcd",
        f"cluster.endpoints={json.dumps(endpoints)}",
        f"cluster.node_name={name}",
        "tls.enabled=false",
        "server.shutdown_timeout=2",
        "cluster.lease_ttl=2",
    ]


class Cluster:
    """3 etcd members and nodes ``a`` and ``b``; ``env`` is each new node process's extra environment
    (e.g. ``PYTHONPATH`` of another amaters release)."""

    def __init__(self, directory: Path, env: Mapping[str, str] | None = None) -> None:
        self.etcd = EtcdCluster(directory / "etcd", 3)
        self.nodes: list[ServerProcess] = []
        self.directory = directory
        self.env = dict(env or {})

    def start(self) -> Cluster:
        self.etcd.start()
        for name in ("a", "b"):
            node = ServerProcess(self.directory / name, settings=node_settings(self.etcd.endpoints, name))
            self.nodes.append(node)
            node.start(env=self.env)
        for node in self.nodes:
            node.wait_ready()
        return self

    def restart_node(self, index: int, env: Mapping[str, str] | None = None) -> None:
        """Start node ``index`` again (after a stop), with ``env`` instead of the cluster's if given."""
        node = self.nodes[index]
        node.start(env=dict(self.env if env is None else env))
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

    def assert_writes_within(self, windows: list[tuple[float, float]], what: str) -> None:
        """At least one write was called and acknowledged inside each ``(start, end)`` window."""
        for started, ended in windows:
            during = [ret for call, ret in self.acked_writes if started < call and ret < ended]
            assert during, f"no write succeeded while {what} ({self.failures[-5:]})"

    def check(self) -> None:
        anomalies = check(self.history)
        if anomalies and os.environ.get("AMATERS_HISTORY_DUMP"):
            with open(os.environ["AMATERS_HISTORY_DUMP"], "w") as out:
                for anomaly in anomalies:
                    for op in sorted(anomaly.ops, key=lambda o: o.call):
                        out.write(f"{anomaly.key!r} {op}\n")
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


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    """Poll ``predicate`` every 0.1 s until it returns something true (returned), at most
    ``timeout`` seconds (then AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout}s")


def health(node: ServerProcess) -> dict[str, Any]:
    """The node's ``/health`` document."""
    _status, body = http_get(f"http://127.0.0.1:{node.web_port}/health")
    return json.loads(body)  # type: ignore[no-any-return]
