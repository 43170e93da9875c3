"""A node that dies in the middle of moving a virtual shard: the cluster leader finishes the move.

Real processes: 3 etcd members (shard 0), a 1-member etcd cluster added as shard ``s1`` with
``amaters cluster add-shard`` through node a, and node a frozen (SIGSTOP) at a moment the shard map
shows a virtual shard fenced for its move, then killed with SIGKILL.  Node b, the leader once a's
lease expires, must finish that move; clients keep working through b, nothing acknowledged is lost
and every key is read back in order.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cluster_workload import Cluster, Workload, clients, run_workload, wait_for, wait_until
from etcd_helpers import ETCD, EtcdCluster, post
from twisted.internet import reactor, threads

from amaters.client import BatchOp, connect
from amaters.storage.sharded import vshard_of

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(ETCD is None, reason="etcd is not installed (scripts/install-test-deps)"),
]


def shard_map(endpoints: list[str]) -> dict[str, Any]:
    key = base64.b64encode(b"/amaters/shardmap").decode()
    kvs = post(endpoints[0] + "/v3/kv/range", {"key": key}, 2.0).get("kvs") or []
    return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else {"fenced": [], "moving": {}}


def freeze_mid_move(cluster: Cluster, adding: subprocess.Popen[str], timeout: float = 60.0) -> int:
    """SIGSTOP node a while the map shows one of its moves fenced, then SIGKILL it; the vshard."""
    node = cluster.nodes[0]
    assert node.process is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and adding.poll() is None:
        if shard_map(cluster.etcd.endpoints).get("fenced"):
            node.signal(signal.SIGSTOP)
            fenced = shard_map(cluster.etcd.endpoints)
            if fenced.get("fenced"):  # still mid-move, and now it cannot go on
                node.kill9()
                return int(fenced["fenced"][0])
            node.signal(signal.SIGCONT)  # that move finished meanwhile: catch the next one
        time.sleep(0.005)
    raise AssertionError("never caught node a in the middle of a move")


@pytest_twisted.ensureDeferred
async def test_the_leader_finishes_a_move_whose_node_died(tmp_path: Path) -> None:
    """kill -9 of node a mid-move during add-shard under 4 writers: node b finishes the move (the
    virtual shard ends on s1, unfenced), keys of that virtual shard accept writes again, nothing
    acknowledged is lost, histories stay linearizable, RANGE returns every key once and in order.
    Then `amaters cluster remove-shard s1` through node b moves everything back to shard 0."""
    cluster = Cluster(tmp_path)
    await threads.deferToThread(cluster.start)
    second = await threads.deferToThread(EtcdCluster(tmp_path / "second", 1).start)
    adding: subprocess.Popen[str] | None = None
    try:
        loader = await connect(reactor, "127.0.0.1", cluster.nodes[1].port, plaintext=True)
        preload = {b"pre-%05d" % i: b"v%d" % i for i in range(3000)}  # copies take a while
        try:
            items = list(preload.items())
            for start in range(0, len(items), 250):
                await loader.batch([BatchOp.set("moving", k, v) for k, v in items[start : start + 250]])
        finally:
            await loader.close()

        workload = Workload("moving")
        made = await clients(cluster, 4)
        caught: dict[str, Any] = {}

        async def chaos() -> None:
            nonlocal adding
            await wait_for(0.5)
            argv = [sys.executable, "-m", "amaters.cli", "cluster", "add-shard", "s1", *second.endpoints]
            argv += ["--config", str(cluster.nodes[0].config_path)]
            adding = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            caught["vshard"] = await threads.deferToThread(freeze_mid_move, cluster, adding)
            caught["killed_at"] = time.monotonic()
            caught["map"] = await threads.deferToThread(
                wait_until,
                lambda: (lambda m: m if caught["vshard"] not in m["fenced"] else None)(
                    shard_map(cluster.etcd.endpoints)
                ),
                30,
                "node b finished the interrupted move",
            )
            caught["resumed_at"] = time.monotonic()
            workload.stop_at = time.monotonic() + 1.5

        try:
            await run_workload(workload, made, operations=20000, seconds=60.0, chaos=chaos)
            vshard = caught["vshard"]
            finished = caught["map"]
            assert finished["assign"][vshard] == "s1" and finished.get("moving", {}) == {}
            print(
                f"\nvirtual shard {vshard}: move finished by node b"
                f" {caught['resumed_at'] - caught['killed_at']:.2f}s after kill -9 of node a"
            )
            await workload.final_reads(made[0])
            workload.check()
        finally:
            for client in made:
                await client.close()

        survivor = await connect(reactor, "127.0.0.1", cluster.nodes[1].port, plaintext=True)
        try:
            in_moved = next(k for k in preload if vshard_of("moving", k) == vshard)
            await survivor.set("moving", in_moved, b"after the move")
            assert await survivor.get("moving", in_moved) == b"after the move"
            listed = [k for k, _ in await survivor.range("moving", b"pre-", b"pre.")]
            assert listed == sorted(preload)
            argv = [sys.executable, "-m", "amaters.cli", "cluster", "remove-shard", "s1"]
            argv += ["--config", str(cluster.nodes[1].config_path)]
            removed = await threads.deferToThread(
                subprocess.run, argv, capture_output=True, text=True, timeout=120
            )
            assert removed.returncode == 0, removed.stderr
            assert set(json.loads(removed.stdout)["shards"]) == {"0"}
            assert set(shard_map(cluster.etcd.endpoints)["assign"]) == {"0"}
            assert [k for k, _ in await survivor.range("moving", b"pre-", b"pre.")] == sorted(preload)
            assert await survivor.get("moving", in_moved) == b"after the move"
            again = await threads.deferToThread(
                subprocess.run, argv, capture_output=True, text=True, timeout=60
            )
            assert (
                again.returncode == 1 and "does not exist" in again.stderr and "Traceback" not in again.stderr
            )
        finally:
            await survivor.close()
    finally:
        if adding is not None:
            adding.kill()
            adding.communicate(timeout=10)
        await threads.deferToThread(cluster.stop)
        await threads.deferToThread(second.stop)
