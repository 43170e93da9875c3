"""A whole cluster restored in one command: ``amaters cluster snapshot`` then ``cluster restore``.

Shard 0 is 3 real etcd members and shard ``s1`` one more, on loopback, behind one
``twistd -n amaters`` node.  After ~200 keys and a chunked value are written across both shards and
the cluster is snapshotted (to a directory, or to a real S3-compatible server), every etcd member
and the node are stopped by pid and their data directories deleted.  ``amaters cluster restore``
rebuilds the members; each is started from the exact command the restore printed (same ports), a
new node starts on them, and every key, the big value and an ordered RANGE across shards are
checked.
"""

from __future__ import annotations

import base64
import itertools
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from etcd_helpers import ETCD, EtcdCluster, EtcdMember, post
from harness import ServerProcess, http_get
from twisted.internet import reactor, threads

from amaters.client import connect

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        ETCD is None or shutil.which("etcdctl") is None,
        reason="etcd and etcdctl are not installed (scripts/install-test-deps)",
    ),
]

BIG = bytes(range(256)) * 6144  # 1.5 MiB: written in chunks
USERS = [b"user-%03d" % i for i in range(150)]
ORDERS = [b"order-%02d" % i for i in range(50)]


def value_of(key: bytes) -> bytes:
    return b"value of " + key + b" " + bytes(range(64))


def node_config(endpoints: list[str], name: str, extra: str) -> str:
    """The clustered part of a node's config file (appended to the harness's listeners)."""
    return (
        '[tls]\nenabled = false\n[storage]\nbackend = "etcd"\n'
        f'[cluster]\nendpoints = {json.dumps(endpoints)}\nnode_name = "{name}"\nlease_ttl = 2\n' + extra
    )


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "amaters.cli", "cluster", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def data_key_count(endpoints: list[str]) -> int:
    """Keys under the data prefix (``/amaters/d/``) of one etcd cluster."""
    start = b"/amaters/d/"
    end = start[:-1] + bytes([start[-1] + 1])
    answer = post(
        endpoints[0] + "/v3/kv/range",
        {
            "key": base64.b64encode(start).decode(),
            "range_end": base64.b64encode(end).decode(),
            "count_only": True,
        },
        5.0,
    )
    return int(answer.get("count", 0))


class Deployment:
    """Shard 0 (3 members), shard s1 (1 member) and the amaters nodes started on them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.shard0 = EtcdCluster(directory / "shard0", 3)
        self.shard1 = EtcdCluster(directory / "shard1", 1)
        self.nodes: list[ServerProcess] = []
        self.restored_logs = directory / "restored-logs"

    def start_node(self, name: str, extra: str = "") -> ServerProcess:
        node = ServerProcess(
            self.directory / f"node-{name}",
            settings=["server.shutdown_timeout=2"],
            config_text=node_config(self.shard0.endpoints, name, extra),
        )
        self.nodes.append(node)
        node.start()
        return node.wait_ready()

    def members(self) -> dict[tuple[str, str], tuple[EtcdCluster, EtcdMember]]:
        found = {("0", m.name): (self.shard0, m) for m in self.shard0.members}
        found.update({("s1", m.name): (self.shard1, m) for m in self.shard1.members})
        return found

    def stop_all_and_delete_data(self) -> None:
        for node in self.nodes:
            node.stop(timeout=15)
        self.shard0.stop()
        self.shard1.stop()
        for _, member in self.members().values():
            assert not member.alive()
            shutil.rmtree(member.directory)

    def start_from(self, commands: list[tuple[str, str, list[str]]]) -> None:
        """Start each restored member from its printed command (its ports must be the old ones)."""
        self.restored_logs.mkdir(exist_ok=True)
        members = self.members()
        assert {(shard, name) for shard, name, _ in commands} == set(members)
        for shard, name, argv in commands:
            _, member = members[(shard, name)]
            assert argv[argv.index("--listen-client-urls") + 1] == member.client_url
            assert argv[argv.index("--listen-peer-urls") + 1] == member.peer_url
            with (self.restored_logs / f"{shard}-{name}.log").open("wb") as log:
                member.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.shard0.wait_leader(30)
        self.shard1.wait_leader(30)

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()
        self.shard0.stop()
        self.shard1.stop()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    made = Deployment(tmp_path / "cluster")
    try:
        made.shard0.start()
        made.shard1.start()
        yield made
    finally:
        made.cleanup()


async def write_data(port: int) -> None:
    client = await connect(reactor, "127.0.0.1", port, plaintext=True)
    try:
        for key in USERS:
            await client.set("users", key, value_of(key))
        for key in ORDERS:
            await client.set("orders", key, value_of(key))
        await client.set("orders", b"big", BIG)
    finally:
        await client.close()


async def check_data(port: int) -> None:
    client = await connect(reactor, "127.0.0.1", port, plaintext=True)
    try:
        for key in USERS:
            assert await client.get("users", key) == value_of(key), key
        for key in ORDERS:
            assert await client.get("orders", key) == value_of(key), key
        assert await client.get("orders", b"big") == BIG
        listed = await client.range("users", b"user-020", b"user-120")
        assert [k for k, _ in listed] == USERS[20:120]
        assert all(v == value_of(k) for k, v in listed)
        everything = await client.range("orders", b"", None)
        assert [k for k, _ in everything] == sorted([*ORDERS, b"big"])
    finally:
        await client.close()


def parse_restore(stdout: str) -> list[tuple[str, str, list[str]]]:
    """(shard, member, argv) of each ``etcd`` command the restore printed, from its comment line."""
    commands: list[tuple[str, str, list[str]]] = []
    lines = stdout.splitlines()
    for comment, command in itertools.pairwise(lines):
        if comment.startswith("# shard ") and command.startswith("etcd "):
            shard, member = comment[len("# shard ") :].split(", member ")
            commands.append((shard, member, shlex.split(command)))
    return commands


@pytest.mark.parametrize("where", ["disk", "s3"])
@pytest_twisted.ensureDeferred
async def test_a_whole_cluster_is_restored_from_its_snapshot(
    deployment: Deployment, where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Snapshot a 2-shard cluster (3 + 1 etcd members) to disk or S3, destroy every member's data,
    restore it with one command, start the members from the printed commands and a new node: every
    key, the chunked value and ordered RANGEs across both shards are back."""
    env: dict[str, str] | None = None
    s3_settings = ""
    if where == "s3":
        s3: Any = request.getfixturevalue("s3_server")
        bucket = s3.new_bucket()
        env = s3.environment()
        s3_settings = f'[snapshot.s3]\nendpoint_url = "{s3.endpoint}"\nregion = "us-east-1"\n'
        source = f"s3://{bucket}/cluster/nightly"
    else:
        source = str(tmp_path / "backup")

    node = await threads.deferToThread(deployment.start_node, "a", s3_settings)
    config = ["--config", str(node.config_path)]
    added = await threads.deferToThread(cli, "add-shard", "s1", *deployment.shard1.endpoints, *config)
    assert added.returncode == 0, added.stderr
    await write_data(node.port)
    on_s1 = data_key_count(deployment.shard1.endpoints)
    assert on_s1 > 0 and data_key_count(deployment.shard0.endpoints) > 0

    started = time.monotonic()
    taken = await threads.deferToThread(cli, "snapshot", source, *config, env=env)
    snapshot_took = time.monotonic() - started
    assert taken.returncode == 0, taken.stderr
    lines = taken.stdout.splitlines()
    assert lines[0].startswith("0\tshard-0.db\t") and lines[1].startswith("s1\tshard-s1.db\t"), taken.stdout
    sizes = {line.split("\t")[0]: int(line.split("\t")[2].split()[0]) for line in lines[:2]}
    if where == "disk":
        manifest = json.loads((Path(source) / "manifest.json").read_text())
        members = manifest["shards"]["0"]["members"]
        assert sorted(m["name"] for m in members) == ["m0", "m1", "m2"]
        assert sorted(m["peer_urls"][0] for m in members) == sorted(
            m.peer_url for m in deployment.shard0.members
        )
        assert [m["name"] for m in manifest["shards"]["s1"]["members"]] == ["m0"]
    else:
        listing = s3.client().list_objects_v2(Bucket=bucket)
        keys = sorted(o["Key"] for o in listing["Contents"])
        assert keys == [
            "cluster/nightly/manifest.json",
            "cluster/nightly/shard-0.db",
            "cluster/nightly/shard-s1.db",
        ]
        head = s3.client().head_object(Bucket=bucket, Key="cluster/nightly/shard-0.db")
        assert head["ContentLength"] == sizes["0"] and len(head["Metadata"]["sha256"]) == 64
        again = await threads.deferToThread(cli, "snapshot", source, *config, env=env)
        assert again.returncode == 1 and "already holds a cluster snapshot" in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1
    verified = await threads.deferToThread(cli, "verify-snapshot", source, *config, env=env)
    assert verified.returncode == 0 and verified.stdout.strip().endswith("verified"), verified.stderr

    await threads.deferToThread(deployment.stop_all_and_delete_data)

    into = tmp_path / "restored"
    started = time.monotonic()
    restored = await threads.deferToThread(cli, "restore", source, "--into", str(into), *config, env=env)
    took = time.monotonic() - started
    assert restored.returncode == 0, restored.stderr
    assert "shard 0: member m1 restored into" in restored.stderr
    commands = parse_restore(restored.stdout)
    assert len(commands) == 4, restored.stdout
    assert all(Path(argv[argv.index("--data-dir") + 1]).parent.parent == into for _, _, argv in commands)
    print(
        f"\nsnapshot to {where}: {snapshot_took:.2f} s; restore from {where}: {took:.2f} s;"
        f" shard snapshot sizes {sizes}; {on_s1} keys on s1\n{restored.stdout}"
    )

    await threads.deferToThread(deployment.start_from, commands)
    fresh = await threads.deferToThread(deployment.start_node, "b", s3_settings)
    await check_data(fresh.port)
    assert data_key_count(deployment.shard1.endpoints) == on_s1
    status, body = http_get(f"http://127.0.0.1:{fresh.web_port}/health")
    shards = {s["name"]: len(s["vshards"]) for s in json.loads(body)["cluster"]["shards"]}
    assert status == 200 and shards == {"0": 32, "s1": 32}
    # The old node's registry entry came back with shard 0 and expires: nothing renews its lease.
    deadline = time.monotonic() + 20
    while True:
        nodes = json.loads(http_get(f"http://127.0.0.1:{fresh.web_port}/health")[1])["cluster"]["nodes"]
        if [n["name"] for n in nodes] == ["b"]:
            break
        assert time.monotonic() < deadline, nodes
        await threads.deferToThread(time.sleep, 0.2)


def test_a_tampered_s3_snapshot_is_refused_before_anything_is_written(s3_server: Any, tmp_path: Path) -> None:
    """From S3, a shard object whose bytes differ from the SHA-256 in its metadata, or whose
    metadata and bytes agree but differ from the manifest, refuses the restore in one line; the
    target is never created.  A prefix without a snapshot is named as such."""
    import hashlib

    bucket = s3_server.new_bucket()
    client = s3_server.client()
    data = {"0": b"shard zero " * 500, "s1": b"shard one " * 500}
    manifest = {
        "format": 2,
        "created_at": 0.0,
        "shard_map": {"shards": {"0": ["http://127.0.0.1:2479"], "s1": ["http://127.0.0.1:2579"]}},
        "shards": {
            name: {
                "file": f"shard-{name}.db",
                "bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
                "endpoints": [f"http://127.0.0.1:{2479 if name == '0' else 2579}"],
                "members": [
                    {
                        "name": "m0",
                        "peer_urls": [f"http://127.0.0.1:{2480 if name == '0' else 2580}"],
                        "client_urls": [f"http://127.0.0.1:{2479 if name == '0' else 2579}"],
                    }
                ],
            }
            for name, blob in data.items()
        },
    }

    def put(key: str, body: bytes, sha256: str | None = None) -> None:
        digest = sha256 or hashlib.sha256(body).hexdigest()
        client.put_object(Bucket=bucket, Key=f"snap/{key}", Body=body, Metadata={"sha256": digest})

    manifest_bytes = json.dumps(manifest).encode()
    put("manifest.json", manifest_bytes)
    put("shard-0.db", data["0"])
    config = tmp_path / "admin.toml"
    config.write_text(f'[snapshot.s3]\nendpoint_url = "{s3_server.endpoint}"\nregion = "us-east-1"\n')
    into = tmp_path / "restored"

    def restore(source: str) -> subprocess.CompletedProcess[str]:
        return cli(
            "restore", source, "--into", str(into), "--config", str(config), env=s3_server.environment()
        )

    cases = [
        (data["s1"][:-1] + b"!", hashlib.sha256(data["s1"]).hexdigest(), "fails its sha256 check"),
        (data["s1"][:-1] + b"!", None, "shard s1: "),
    ]
    for body, sha256, fragment in cases:
        put("shard-s1.db", body, sha256)
        refused = restore(f"s3://{bucket}/snap")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith("amaters: ") and fragment in last, refused.stderr
        assert not into.exists()
    missing = restore(f"s3://{bucket}/elsewhere")
    assert missing.returncode == 1 and "no cluster snapshot at s3://" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
