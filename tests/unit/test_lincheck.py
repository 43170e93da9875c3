"""The linearizability checker used by the cluster chaos tests finds injected anomalies.

Histories come from a simulation: clients invoke reads and writes on a few keys of a real
``MemoryBackend`` with random latencies; each operation takes effect at a random instant inside its
interval.  A correct backend gives linearizable histories; a backend that acknowledges but drops
every 100th write, or serves a stale value now and then, gives histories the checker rejects.
"""

from __future__ import annotations

import heapq
import random
from typing import Any

import pytest
from lincheck import INFINITY, Op, check, check_register
from storage_helpers import result_of

from amaters.storage.memory import MemoryBackend
from amaters.types import CipherBlob


class DroppingBackend:
    """Acknowledges every write but drops every ``every``-th one."""

    def __init__(self, inner: Any, every: int = 100) -> None:
        self.inner = inner
        self.every = every
        self.writes = 0

    def put(self, collection: str, key: bytes, value: CipherBlob) -> Any:
        self.writes += 1
        if self.writes % self.every == 0:
            from twisted.internet import defer

            return defer.succeed(None)
        return self.inner.put(collection, key, value)

    def get(self, collection: str, key: bytes) -> Any:
        return self.inner.get(collection, key)


class StaleBackend:
    """Serves the previous value of a key on every ``every``-th read."""

    def __init__(self, inner: Any, every: int = 50) -> None:
        self.inner = inner
        self.every = every
        self.reads = 0
        self.previous: dict[bytes, CipherBlob | None] = {}

    def put(self, collection: str, key: bytes, value: CipherBlob) -> Any:
        self.previous[key] = result_of(self.inner.get(collection, key))
        return self.inner.put(collection, key, value)

    def get(self, collection: str, key: bytes) -> Any:
        from twisted.internet import defer

        self.reads += 1
        if self.reads % self.every == 0 and key in self.previous:
            return defer.succeed(self.previous[key])
        return self.inner.get(collection, key)


def simulate(backend: Any, *, clients: int = 8, ops_per_client: int = 150, seed: int = 1) -> list[Op]:
    """A concurrent history on 16 keys, applied to ``backend`` at random instants.

    Like the chaos tests' writers, each client reads a key back after writing it (so a lost write is
    observable) and otherwise reads or writes a random key.
    """
    rng = random.Random(seed)
    events: list[tuple[float, int, str, Any]] = []
    counter = 0
    history: list[Op] = []
    for client in range(clients):
        heapq.heappush(events, (rng.random() * 0.01, counter, "invoke", (client, 0, None)))
        counter += 1
    while events:
        now, _, what, payload = heapq.heappop(events)
        if what == "invoke":
            client, n, last_write = payload
            if n >= ops_per_client:
                continue
            if last_write is not None:
                key, kind = last_write, "read"
            else:
                key = b"k%d" % rng.randrange(16)
                kind = "write" if rng.random() < 0.5 else "read"
            value = b"c%d-%d" % (client, n) if kind == "write" else None
            effect = now + rng.random() * 0.01
            done = effect + rng.random() * 0.01
            heapq.heappush(events, (effect, counter, "effect", (client, n, key, kind, value, now, done)))
            counter += 1
        elif what == "effect":
            client, n, key, kind, value, call, done = payload
            if kind == "write":
                result_of(backend.put("c", key, CipherBlob.wrap(value)))
                history.append(Op(key, "write", value, call, done))
            else:
                blob = result_of(backend.get("c", key))
                history.append(Op(key, "read", None if blob is None else blob.data, call, done))
            follow = key if kind == "write" else None
            heapq.heappush(events, (done + rng.random() * 0.002, counter, "invoke", (client, n + 1, follow)))
            counter += 1
    return history


def memory() -> MemoryBackend:
    backend = MemoryBackend()
    result_of(backend.create_collection("c"))
    return backend


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_correct_backend_histories_are_linearizable(seed: int) -> None:
    """Histories of a backend that applies every write at one instant pass the check."""
    assert check(simulate(memory(), seed=seed)) == []


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_dropping_every_100th_write_is_found(seed: int) -> None:
    """Acknowledged writes that were dropped make at least one key's history fail the check."""
    backend = DroppingBackend(memory(), every=100)
    history = simulate(backend, seed=seed)
    assert backend.writes >= 200
    anomalies = check(history)
    assert anomalies, "a dropped acknowledged write went unnoticed"
    assert "not linearizable" in anomalies[0].describe()


def test_stale_reads_are_found() -> None:
    """A read that returns an overwritten value is found."""
    assert check(simulate(StaleBackend(memory(), every=50)))


def test_unknown_writes_may_or_may_not_apply() -> None:
    """A write whose outcome is unknown may be seen later, or never."""
    seen = [Op(b"k", "write", b"a", 0, INFINITY, ok=False), Op(b"k", "read", b"a", 5, 6)]
    unseen = [Op(b"k", "write", b"a", 0, INFINITY, ok=False), Op(b"k", "read", None, 5, 6)]
    assert check_register(seen) and check_register(unseen)
    # But it cannot take effect before it was invoked.
    early = [Op(b"k", "read", b"a", 0, 1), Op(b"k", "write", b"a", 2, INFINITY, ok=False)]
    assert not check_register(early)


def test_real_time_order_is_respected() -> None:
    """A read that starts after a write returned must see it (or a later write)."""
    history = [Op(b"k", "write", b"a", 0, 1), Op(b"k", "write", b"b", 2, 3), Op(b"k", "read", b"a", 4, 5)]
    assert not check_register(history)
    overlapping = [Op(b"k", "write", b"a", 0, 1), Op(b"k", "write", b"b", 2, 6), Op(b"k", "read", b"a", 4, 5)]
    assert check_register(overlapping)
