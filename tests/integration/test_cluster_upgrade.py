"""Mixed versions in one cluster: a rolling upgrade from an earlier amaters release, under load.

The earlier release is a real one, not a simulation: the source of amaters 0.1.0 (the first release
with sharded clustered mode, before FILTER/UPDATE on FHE) is taken from this repository's history
with ``git archive`` and its nodes run from it (``PYTHONPATH``), next to nodes of this tree, on the
same etcd cluster.  The test fails if either release cannot read what the other wrote (plain and
chunked values, collections, the shard map, session tokens, the node registry), if clients lose an
acknowledged write or read a stale value while the nodes are replaced one by one, or if the
cluster's data-format record is not written.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cluster_workload import Cluster, Workload, clients, health, run_workload, wait_for, wait_until
from etcd_helpers import ETCD, EtcdCluster, post
from harness import ServerProcess
from twisted.internet import reactor, threads

from amaters import __version__
from amaters.client import connect
from amaters.storage.sharded import CLUSTER_FORMAT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(ETCD is None, reason="etcd is not installed (scripts/install-test-deps)"),
]

#: amaters 0.1.0 in this repository's history (the merge that completed sharded clustered mode).
EARLIER = "8e46b69928c4cf7c7d92f6add4565643cd76b421"
EARLIER_VERSION = "0.1.0"
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def earlier_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The earlier release's ``amaters`` package and twistd plugin, unpacked from git history."""
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", EARLIER, "amaters", "twisted"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        pytest.fail(
            f"cannot read amaters {EARLIER_VERSION} (commit {EARLIER}) from this repository's history:"
            f" {archive.stderr.decode(errors='replace').strip()} (a shallow clone needs `git fetch --unshallow`)"
        )
    target = tmp_path_factory.mktemp("amaters-" + EARLIER_VERSION)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    assert 'version__ = "' + EARLIER_VERSION + '"' in (target / "amaters" / "__init__.py").read_text()
    return target


def registered_versions(node: ServerProcess) -> dict[str, str]:
    return {n["name"]: n.get("version") for n in health(node)["cluster"]["nodes"]}


def format_record(endpoints: list[str], prefix: bytes = b"/amaters/") -> dict[str, Any] | None:
    key = base64.b64encode(prefix + b"format").decode()
    kvs = post(endpoints[0] + "/v3/kv/range", {"key": key}, 2.0).get("kvs") or []
    return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None


async def cross_version_reads(old: ServerProcess, new: ServerProcess, big: bytes) -> None:
    """Each release reads what the other wrote: small and chunked values, a new collection, and the
    other's session token."""
    on_old = await connect(reactor, "127.0.0.1", old.port, plaintext=True)
    on_new = await connect(reactor, "127.0.0.1", new.port, plaintext=True)
    try:
        assert await on_new.get("before", b"big") == big  # chunked, written by the earlier release
        assert [k for k, _ in await on_new.range("before", b"k-", b"k-~")] == [
            b"k-%03d" % i for i in range(50)
        ]
        await on_new.set("mixed", b"from-new", b"n" * 10)
        await on_new.set("mixed", b"big-from-new", big[::-1])
        for _ in range(100):  # the earlier node hears of the new collection from its watch
            if "mixed" in await on_old.list_collections():
                break
            await wait_for(0.05)
        assert await on_old.get("mixed", b"from-new") == b"n" * 10
        assert await on_old.get("mixed", b"big-from-new") == big[::-1]
        await on_old.set("mixed", b"from-old", b"o" * 10)
        carried = await connect(
            reactor, "127.0.0.1", new.port, plaintext=True, session_token=on_old.session_token
        )
        try:
            assert await carried.get("mixed", b"from-old") == b"o" * 10
        finally:
            await carried.close()
    finally:
        await on_old.close()
        await on_new.close()


@pytest_twisted.ensureDeferred
async def test_a_rolling_upgrade_from_the_earlier_release_keeps_serving(
    earlier_release: Path, tmp_path: Path
) -> None:
    """Two nodes of amaters 0.1.0 serve 4 writers; node a, then node b, is stopped and started again
    on this release. Both releases serve together in between (the node registry shows both
    versions), each reads what the other wrote, writes succeed during each restart, every
    acknowledged write survives and the per-key histories stay linearizable."""
    assert __version__ != EARLIER_VERSION
    cluster = Cluster(tmp_path, env={"PYTHONPATH": str(earlier_release)})
    await threads.deferToThread(cluster.start)
    try:
        versions = await threads.deferToThread(
            wait_until,
            lambda: (lambda v: v if len(v) == 2 else None)(registered_versions(cluster.nodes[1])),
            10,
            "both nodes registered",
        )
        assert versions == {"a": EARLIER_VERSION, "b": EARLIER_VERSION}
        assert format_record(cluster.etcd.endpoints) is None  # the earlier release records no format

        big = bytes(range(256)) * 8192  # 2 MiB: stored as chunks behind one pointer key
        first = await connect(reactor, "127.0.0.1", cluster.nodes[0].port, plaintext=True)
        try:
            await first.set("before", b"big", big)
            for i in range(50):
                await first.set("before", b"k-%03d" % i, b"v%d" % i)
        finally:
            await first.close()

        workload = Workload("upgrade")
        made = await clients(cluster, 4)
        windows: list[tuple[float, float]] = []
        mixed: dict[str, Any] = {}

        async def upgrade() -> None:
            for index in (0, 1):
                await wait_for(0.5)
                started = time.monotonic()
                await threads.deferToThread(cluster.nodes[index].stop, 15)
                await threads.deferToThread(cluster.restart_node, index, {})
                windows.append((started, time.monotonic()))
                if index == 0:
                    mixed["versions"] = await threads.deferToThread(
                        wait_until,
                        lambda: (lambda v: v if v.get("a") == __version__ and len(v) == 2 else None)(
                            registered_versions(cluster.nodes[1])
                        ),
                        10,
                        "node a registered with the new version",
                    )
                    await cross_version_reads(cluster.nodes[1], cluster.nodes[0], big)
            workload.stop_at = time.monotonic() + 1.0

        try:
            await run_workload(workload, made, operations=5000, seconds=60.0, chaos=upgrade)
            assert mixed["versions"] == {"a": __version__, "b": EARLIER_VERSION}
            workload.assert_writes_within(windows, "a node was upgraded")
            await workload.final_reads(made[0])
            workload.check()
        finally:
            for client in made:
                await client.close()

        assert registered_versions(cluster.nodes[0]) == {"a": __version__, "b": __version__}
        recorded = format_record(cluster.etcd.endpoints)
        assert recorded == {"format": CLUSTER_FORMAT, "written_by": f"amaters {__version__}"}
        last = await connect(reactor, "127.0.0.1", cluster.nodes[1].port, plaintext=True)
        try:
            assert await last.get("before", b"big") == big
            assert await last.get("mixed", b"from-old") == b"o" * 10
            assert len(await last.range("before", b"k-", b"k-~")) == 50
        finally:
            await last.close()
    finally:
        await threads.deferToThread(cluster.stop)


def test_a_node_refuses_a_cluster_format_newer_than_its_own(tmp_path: Path) -> None:
    """A node records the cluster format on first start; given a cluster whose record says a newer
    release changed the layout, it exits with one line naming both formats and touches nothing."""
    from cluster_workload import node_settings

    etcd = EtcdCluster(tmp_path / "etcd", 1).start()
    node = ServerProcess(tmp_path / "node", settings=node_settings(etcd.endpoints, "a"))
    try:
        node.start().wait_ready()
        node.stop(timeout=10)
        assert format_record(etcd.endpoints) == {
            "format": CLUSTER_FORMAT,
            "written_by": f"amaters {__version__}",
        }
        newer = {"format": CLUSTER_FORMAT + 1, "written_by": "amaters 9.0.0"}
        key = base64.b64encode(b"/amaters/format").decode()
        post(
            etcd.endpoints[0] + "/v3/kv/put",
            {"key": key, "value": base64.b64encode(json.dumps(newer).encode()).decode()},
            2.0,
        )
        node.start()
        assert node.process is not None
        assert node.process.wait(timeout=30) != 0
        log = node.log()
        expected = (
            f"the cluster has data format {CLUSTER_FORMAT + 1} (written by amaters 9.0.0), newer than"
            f" format {CLUSTER_FORMAT} that amaters {__version__} reads"
        )
        assert expected in log, log[-2000:]
        assert "Traceback" not in log
        assert format_record(etcd.endpoints) == newer
    finally:
        node.cleanup()
        etcd.stop()
