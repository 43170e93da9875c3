"""Real etcd clusters on loopback for tests: members are subprocesses stopped by pid.

Ports come from ``free_port()`` (20000-32000, below the ephemeral range); data dirs live under the
test's temporary directory.  Heartbeat and election timings are shortened (50 ms / 500 ms) so a
3-member cluster starts in well under a second and elects a new leader quickly.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from ports import free_port
from twisted.python.failure import Failure

ETCD = shutil.which("etcd")


def post(url: str, body: dict[str, Any], timeout: float = 1.0) -> dict[str, Any]:
    """POST JSON to an etcd gateway URL and return the answer (raises OSError on failure)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


class EtcdMember:
    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.directory = directory
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped = False

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class EtcdCluster:
    """``size`` etcd members on loopback, started together."""

    def __init__(
        self, directory: Path, size: int = 3, *, heartbeat_ms: int = 50, election_ms: int = 500
    ) -> None:
        self.directory = directory
        self.members = [EtcdMember(f"m{i}", directory / f"m{i}") for i in range(size)]
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def _argv(self, member: EtcdMember, state: str) -> list[str]:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        assert ETCD is not None
        return [
            ETCD,
            "--name",
            member.name,
            "--data-dir",
            str(member.directory),
            "--listen-client-urls",
            member.client_url,
            "--advertise-client-urls",
            member.client_url,
            "--listen-peer-urls",
            member.peer_url,
            "--initial-advertise-peer-urls",
            member.peer_url,
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            f"amaters-test-{id(self)}",
            "--heartbeat-interval",
            str(self.heartbeat_ms),
            "--election-timeout",
            str(self.election_ms),
            "--max-txn-ops",
            "10000",
            "--logger",
            "zap",
            "--log-outputs",
            str(member.directory) + ".log",
        ]

    def start(self, timeout: float = 20.0) -> EtcdCluster:
        self.directory.mkdir(parents=True, exist_ok=True)
        for member in self.members:
            self.start_member(member, state="new")
        self.wait_leader(timeout)
        return self

    def start_member(self, member: EtcdMember, state: str = "existing") -> None:
        member.process = subprocess.Popen(
            self._argv(member, state), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        member.stopped = False

    def status(self, member: EtcdMember, timeout: float = 0.5) -> dict[str, Any] | None:
        try:
            return post(member.client_url + "/v3/maintenance/status", {}, timeout)
        except (OSError, ValueError):
            return None

    def leader(self, timeout: float = 10.0) -> EtcdMember:
        """The member that is leader now (waits for one to be elected)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids: dict[str, EtcdMember] = {}
            leader_id = None
            for member in self.members:
                if not member.alive() or member.stopped:
                    continue
                status = self.status(member)
                if status is None:
                    continue
                ids[status["header"]["member_id"]] = member
                if status.get("leader") and status["leader"] != "0":
                    leader_id = status["leader"]
            if leader_id in ids:
                return ids[leader_id]
            time.sleep(0.05)
        raise AssertionError(f"no etcd leader after {timeout}s")

    def wait_leader(self, timeout: float = 20.0) -> EtcdMember:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for member in self.members:
                if member.process is not None and member.process.poll() is not None:
                    raise AssertionError(f"etcd member {member.name} exited with {member.process.returncode}")
            try:
                leader = self.leader(timeout=0.5)
                post(leader.client_url + "/v3/kv/range", {"key": "AA=="}, 1.0)
                return leader
            except (AssertionError, OSError):
                continue
        raise AssertionError(f"etcd cluster not ready after {timeout}s")

    def kill(self, member: EtcdMember) -> None:
        """kill -9 one member (restart it with :meth:`start_member`)."""
        assert member.process is not None
        member.process.send_signal(signal.SIGKILL)
        member.process.wait(10)

    def pause(self, member: EtcdMember) -> None:
        assert member.process is not None
        member.process.send_signal(signal.SIGSTOP)
        member.stopped = True

    def resume(self, member: EtcdMember) -> None:
        assert member.process is not None
        member.process.send_signal(signal.SIGCONT)
        member.stopped = False

    def stop(self) -> None:
        for member in self.members:
            if member.process is None or member.process.poll() is not None:
                continue
            if member.stopped:
                member.process.send_signal(signal.SIGCONT)
            member.process.terminate()
        for member in self.members:
            if member.process is None:
                continue
            try:
                member.process.wait(10)
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait(5)


# -- blocking views of the async etcd backend, for the synchronous storage contract suite ----------


def _settled(d: Any) -> Any:
    """A Deferred already fired with what ``d`` fires with.

    pytest-twisted calls synchronous tests from inside the reactor, so the reactor is turned here
    (``iterate``) until ``d`` has fired, bounded by 60 s.
    """
    from twisted.internet import defer, reactor

    results: list[Any] = []
    d.addBoth(results.append)
    deadline = time.monotonic() + 60
    while not results:
        assert time.monotonic() < deadline, "an etcd backend call did not finish within 60 s"
        reactor.iterate(0.002)  # type: ignore[attr-defined]
    if isinstance(results[0], Failure):
        return defer.fail(results[0])
    return defer.succeed(results[0])


class BlockingCursor:
    """An IRangeCursor whose Deferreds have fired by the time they are returned."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def next_chunk(self) -> Any:
        return _settled(self.inner.next_chunk())

    def close(self) -> None:
        self.inner.close()


class BlockingBackend:
    """An IStorageBackend over a real, asynchronous backend whose Deferreds have fired on return.

    Tests written for synchronous backends (``result_of``) run unchanged against etcd this way.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name

    def open(self) -> Any:
        return _settled(self.inner.open())

    def close(self) -> Any:
        return _settled(self.inner.close())

    def create_collection(self, name: str) -> Any:
        return _settled(self.inner.create_collection(name))

    def drop_collection(self, name: str) -> Any:
        return _settled(self.inner.drop_collection(name))

    def list_collections(self) -> Any:
        return _settled(self.inner.list_collections())

    def has_collection(self, name: str) -> bool:
        return bool(self.inner.has_collection(name))

    def collection_count(self) -> int:
        return int(self.inner.collection_count())

    def get(self, collection: str, key: bytes) -> Any:
        return _settled(self.inner.get(collection, key))

    def put(self, collection: str, key: bytes, value: Any) -> Any:
        return _settled(self.inner.put(collection, key, value))

    def delete(self, collection: str, key: bytes) -> Any:
        return _settled(self.inner.delete(collection, key))

    def write_batch(self, ops: Any) -> Any:
        return _settled(self.inner.write_batch(ops))

    def compare_and_write(self, expected: Any, ops: Any) -> Any:
        return _settled(self.inner.compare_and_write(expected, ops))

    def scan(
        self, collection: str, start: bytes, end: bytes | None, limit: int | None, chunk_size: int
    ) -> Any:
        return BlockingCursor(self.inner.scan(collection, start, end, limit, chunk_size))

    def sync(self) -> Any:
        return _settled(self.inner.sync())

    def flush(self) -> Any:
        return _settled(self.inner.flush())

    def stats(self) -> Any:
        return _settled(self.inner.stats())

    def snapshot(self, destination: str) -> Any:
        return _settled(self.inner.snapshot(destination))


def etcd_backend(endpoints: list[str], prefix: bytes) -> Any:
    """A blocking view of an EtcdBackend on the global reactor (not opened)."""
    from twisted.internet import reactor
    from zope.interface import classImplements

    from amaters.cluster.etcd import EtcdClient
    from amaters.interfaces import IRangeCursor, IStorageBackend
    from amaters.storage.etcd import EtcdBackend

    classImplements(BlockingBackend, IStorageBackend)
    classImplements(BlockingCursor, IRangeCursor)
    return BlockingBackend(EtcdBackend(EtcdClient(endpoints, reactor), reactor, prefix=prefix))


def sharded_backend(endpoints: list[str], prefix: bytes) -> Any:
    """A ShardedBackend (not blocking, not opened) whose shards all use ``prefix`` on their etcd."""
    from twisted.internet import reactor

    from amaters.cluster.etcd import EtcdClient
    from amaters.storage.etcd import EtcdBackend
    from amaters.storage.sharded import ShardedBackend

    def make(name: str, shard_endpoints: list[str]) -> EtcdBackend:
        return EtcdBackend(EtcdClient(shard_endpoints, reactor), reactor, prefix=prefix, shard=name)

    return ShardedBackend(make("0", endpoints), reactor, make)


def sharded_etcd_backend(endpoints: list[str], prefix: bytes) -> Any:
    """A blocking view of a single-shard ShardedBackend (the clustered store as nodes build it)."""
    from zope.interface import classImplements

    from amaters.interfaces import IRangeCursor, IStorageBackend

    classImplements(BlockingBackend, IStorageBackend)
    classImplements(BlockingCursor, IRangeCursor)
    return BlockingBackend(sharded_backend(endpoints, prefix))
