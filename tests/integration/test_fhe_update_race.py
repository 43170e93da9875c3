"""UPDATE against concurrent writes, through the real server (``twistd -n amaters``).

An UPDATE reads the encrypted rows, evaluates them for seconds to minutes (concrete), then writes
them back.  These tests check that a SET or DELETE acknowledged while it evaluates is never lost:
afterwards each row holds the last acknowledged value, updated or not, a deleted row stays deleted,
and the count is the rows the UPDATE really wrote.  The cleartext evaluator keeps them fast and
deterministic; ``update_gate/sitecustomize.py`` (test support loaded through ``PYTHONPATH``) holds
the evaluation while the test writes, so the writes land between the UPDATE's read and its
write-back by construction, not by timing.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from etcd_helpers import ETCD, EtcdCluster
from harness import ServerProcess
from twisted.internet import defer, reactor, task

from amaters.client import connect
from amaters.errors import AmatersError
from amaters.fhe import FheKeys, add, field

pytestmark = pytest.mark.integration

GATE_CODE = Path(__file__).resolve().parent / "update_gate"
#: The UPDATE of these tests: add 1000 to every row's balance (writers only store balances < 1000,
#: so an updated value is told apart from a written one).
BUMP = 1000


def gate_env(gate: Path) -> dict[str, str]:
    gate.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(GATE_CODE), os.environ.get("PYTHONPATH", "")) if p)
    return {"OMP_NUM_THREADS": "1", "PYTHONPATH": path, "AMATERS_TEST_UPDATE_GATE": str(gate)}


def fhe_config(backend: str) -> str:
    return (
        f'[storage]\nbackend = "{backend}"\n[fhe]\nevaluator = "cleartext-insecure"\nallow_insecure = true\n'
    )


@pytest.fixture
def keys() -> FheKeys:
    return FheKeys.generate("age:8,balance:16", evaluator="cleartext-insecure")


async def wait_for_file(path: Path, what: str, limit: float = 60.0) -> None:
    """Poll (without blocking the reactor) until ``path`` exists; bounded."""
    for _ in range(int(limit / 0.02)):
        if path.exists():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"{what} did not happen within {limit} s")


async def gated_race(client: Any, keys: FheKeys, gate: Path, log: Any) -> None:
    """40 rows; while the UPDATE that adds BUMP to every balance is held after reading them:
    rows 0-9 are SET to new values, 10-14 DELETEd, 15-16 DELETEd and SET again, three new rows
    SET; rows 17-39 are left alone.  Every one of those writes is acknowledged before the UPDATE
    writes back."""
    records = {b"k%02d" % i: {"age": 20 + i, "balance": i} for i in range(40)}
    for key, record in records.items():
        await client.set_record("people", key, keys, record)
    (gate / "hold").touch()
    update = client.update("people", field("age") >= 0, [add("balance", BUMP)], keys=keys)
    await wait_for_file(gate / "entered", "the UPDATE's evaluation")
    assert not update.called
    expected: dict[bytes, dict[str, int] | None] = {}
    for i in range(10):
        record = {"age": 1, "balance": 500 + i}
        await client.set_record("people", b"k%02d" % i, keys, record)
        expected[b"k%02d" % i] = {"age": 1, "balance": 500 + i + BUMP}
    for i in range(10, 15):
        assert await client.delete("people", b"k%02d" % i) is True
        expected[b"k%02d" % i] = None
    for i in (15, 16):
        assert await client.delete("people", b"k%02d" % i) is True
        await client.set_record("people", b"k%02d" % i, keys, {"age": 2, "balance": 600 + i})
        expected[b"k%02d" % i] = {"age": 2, "balance": 600 + i + BUMP}
    for i in range(17, 40):
        expected[b"k%02d" % i] = {"age": 20 + i, "balance": i + BUMP}
    for i in range(3):
        await client.set_record("people", b"new%d" % i, keys, {"age": 3, "balance": 700 + i})
        expected[b"new%d" % i] = {"age": 3, "balance": 700 + i}  # created after the UPDATE read
    (gate / "hold").unlink()
    written = await update
    assert written == 40 - 5  # the five deleted rows are not written back
    for key, want in expected.items():
        assert await client.get_record("people", key, keys) == want, key
    listed = {k for k, _ in await client.range("people", b"", None)}
    assert listed == {k for k, v in expected.items() if v is not None}
    assert "changed while they were evaluated" in log()


@pytest.mark.parametrize("backend", ["memory", "rocksdb"])
@pytest_twisted.ensureDeferred
async def test_update_keeps_the_writes_that_land_while_it_evaluates(
    tmp_path: Path, servers: list[Any], keys: FheKeys, backend: str
) -> None:
    """SET, DELETE and DELETE-then-SET on rows an UPDATE is evaluating (held by the test gate)
    are all preserved: the rows written meanwhile are evaluated again from their new values,
    deleted rows stay deleted, rows created meanwhile are not touched, and the UPDATE answers the
    number of rows it wrote."""
    gate = tmp_path / "gate"
    server = ServerProcess(tmp_path / "server", config_text=fhe_config(backend))
    servers.append(server)
    server.start(env=gate_env(gate)).wait_ready(60)
    client = await connect(reactor, "127.0.0.1", server.port, ca_cert=str(server.ca_cert), timeout=120)
    try:
        assert await client.upload_keys(keys) is True
        await gated_race(client, keys, gate, server.log)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_update_under_concurrent_writers_loses_nothing(
    tmp_path: Path, servers: list[Any], keys: FheKeys
) -> None:
    """Two clients SET and DELETE their own rows in a loop for as long as an UPDATE over 300 rows
    runs (RocksDB, sync=always).  Afterwards every row holds its last acknowledged value, updated
    (+BUMP) or not, every row last deleted is absent, and the count is at least the rows that hold
    an updated value; if the UPDATE gave up (rows kept changing), it updated nothing."""
    server = ServerProcess(tmp_path / "server", config_text=fhe_config("rocksdb"))
    servers.append(server)
    server.start(env={"OMP_NUM_THREADS": "1"}).wait_ready(60)
    options: dict[str, Any] = {"ca_cert": str(server.ca_cert), "timeout": 120}
    main = await connect(reactor, "127.0.0.1", server.port, **options)
    writers = [await connect(reactor, "127.0.0.1", server.port, **options) for _ in range(2)]
    try:
        assert await main.upload_keys(keys) is True
        last: dict[bytes, dict[str, int] | None] = {}
        for i in range(300):
            last[b"r%03d" % i] = {"age": i % 256, "balance": i}
            await main.set_record("people", b"r%03d" % i, keys, last[b"r%03d" % i])
        update = main.update("people", field("age") >= 0, [add("balance", BUMP)], keys=keys)
        done: list[Any] = []

        def finished(outcome: Any) -> Any:
            done.append(outcome)
            return outcome

        update.addBoth(finished)
        acknowledged = [0]

        async def writer(client: Any, mine: list[bytes], seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(3000):  # bounded; normally ends when the UPDATE does
                if done:
                    return
                key = rng.choice(mine)
                if rng.random() < 0.25:
                    await client.delete("people", key)
                    last[key] = None
                else:
                    record = {"age": rng.randrange(256), "balance": rng.randrange(BUMP)}
                    await client.set_record("people", key, keys, record)
                    last[key] = record
                acknowledged[0] += 1

        everything = sorted(last)
        await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(writer(writers[0], everything[0::2], 1)),
                defer.Deferred.fromCoroutine(writer(writers[1], everything[1::2], 2)),
            ]
        )
        try:
            written = await update
        except AmatersError as e:
            assert e.retryable and "nothing was written" in e.message, e
            written = None
        assert acknowledged[0] > 0
        updated = 0
        for key, want in last.items():
            got = await main.get_record("people", key, keys)
            if want is None:
                assert got is None, key
                continue
            bumped = {**want, "balance": want["balance"] + BUMP}
            assert got in (want, bumped), (key, got, want)
            updated += got == bumped
        if written is None:
            assert updated == 0
        else:
            assert updated <= written <= len(last)
    finally:
        for client in [main, *writers]:
            await client.close()


@pytest.mark.skipif(ETCD is None, reason="etcd is not installed (scripts/install-test-deps)")
@pytest_twisted.ensureDeferred
async def test_update_over_two_shards_in_clustered_mode(
    tmp_path: Path, servers: list[Any], keys: FheKeys
) -> None:
    """Clustered mode with two shards (a single-member etcd each, half the virtual shards moved to
    the second by `amaters cluster add-shard`): an UPDATE over rows on both shards is written back
    per shard, and writes landing while it evaluates are kept as on one node."""
    first = EtcdCluster(tmp_path / "etcd0", 1).start()
    second = EtcdCluster(tmp_path / "etcd1", 1).start()
    gate = tmp_path / "gate"
    try:
        settings = [
            "storage.backend=etcd",
            f"cluster.endpoints={json.dumps(first.endpoints)}",
            "cluster.node_name=a",
            "tls.enabled=false",
            "server.shutdown_timeout=2",
            "cluster.lease_ttl=2",
            "fhe.evaluator=cleartext-insecure",
            "fhe.allow_insecure=true",
        ]
        server = ServerProcess(tmp_path / "node", settings=settings)
        servers.append(server)
        server.start(env=gate_env(gate)).wait_ready(60)
        client = await connect(reactor, "127.0.0.1", server.port, plaintext=True, timeout=120)
        try:
            assert await client.upload_keys(keys) is True
            await client.create_collection("people")
            argv = [sys.executable, "-m", "amaters.cli", "cluster", "add-shard", "s1", *second.endpoints]
            argv += ["--config", str(server.config_path)]
            for item in settings:
                argv += ["--set", item]
            added = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            assert added.returncode == 0, added.stderr
            assert len(json.loads(added.stdout)["moved"]) == 32
            await gated_race(client, keys, gate, server.log)
            # Both shards hold rows the UPDATE wrote.
            for shard in (first, second):
                found = json.loads(
                    subprocess.run(
                        [
                            "etcdctl",
                            "--endpoints",
                            shard.endpoints[0],
                            "get",
                            "--prefix",
                            "/amaters/d/",
                            "--keys-only",
                            "-w",
                            "json",
                        ],
                        capture_output=True,
                        text=True,
                        timeout=30,
                        env={**os.environ, "ETCDCTL_API": "3"},
                    ).stdout
                )
                assert found.get("count", 0) > 5
        finally:
            await client.close()
        server.stop(timeout=15)
    finally:
        first.stop()
        second.stop()
