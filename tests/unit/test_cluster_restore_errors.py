"""``amaters cluster restore``'s refusals and its use of etcdctl, without etcd.

Each bad input (a tampered shard file, no etcdctl, a non-empty ``--into``, a manifest that records
no members, a bad ``--member``) is one line on stderr, a non-zero exit status, no traceback and
nothing written.  A stand-in ``etcdctl`` on PATH records how it is called, so the arguments each
member is restored with (name, initial cluster, one fresh token per shard, peer URLs) are checked
here; tests/integration/test_cluster_restore.py restores real etcd clusters with the real etcdctl.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from amaters.cli import main

SHARD0 = [
    {
        "name": f"m{i}",
        "peer_urls": [f"http://127.0.0.1:{2380 + i}"],
        "client_urls": [f"http://127.0.0.1:{2480 + i}"],
    }
    for i in range(3)
]
SHARD1 = [{"name": "s1a", "peer_urls": ["http://127.0.0.1:2600"], "client_urls": ["http://127.0.0.1:2700"]}]


def make_snapshot(directory: Path, *, fmt: int = 2, members: bool = True) -> dict[str, Any]:
    """A cluster snapshot directory with two shards (the files' content does not matter here)."""
    directory.mkdir(parents=True)
    shards: dict[str, Any] = {}
    for name, listed in (("0", SHARD0), ("s1", SHARD1)):
        data = f"snapshot of shard {name} ".encode() * 1000
        (directory / f"shard-{name}.db").write_bytes(data)
        endpoints = [m["client_urls"][0] for m in listed]
        shards[name] = {
            "file": f"shard-{name}.db",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "endpoints": endpoints,
            "taken_from": endpoints[0],
        }
        if members:
            shards[name]["members"] = listed
    manifest = {
        "format": fmt,
        "created_at": 0.0,
        "shard_map": {"shards": {"0": shards["0"]["endpoints"], "s1": shards["s1"]["endpoints"]}},
        "shards": shards,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def fake_etcdctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``etcdctl`` first on PATH that logs its arguments (one JSON list a line) to the returned
    file and creates the data directory; it fails like etcdctl when FAKE_ETCDCTL_FAIL is set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "etcdctl-calls.jsonl"
    script = bin_dir / "etcdctl"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps([os.environ.get('ETCDCTL_API'), *sys.argv[1:]]) + '\\n')\n"
        "if os.environ.get('FAKE_ETCDCTL_FAIL'):\n"
        '    sys.stderr.write(\'{"level":"info","msg":"restoring snapshot"}\\n\')\n'
        "    sys.stderr.write('Error: snapshot file integrity check failed\\n')\n"
        "    sys.exit(1)\n"
        "d = sys.argv[sys.argv.index('--data-dir') + 1]\n"
        "os.makedirs(os.path.join(d, 'member', 'snap'))\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}")
    monkeypatch.delenv("AMATERS_CONFIG", raising=False)
    monkeypatch.delenv("FAKE_ETCDCTL_FAIL", raising=False)
    return log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["cluster", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_restore_runs_etcdctl_per_member_and_prints_start_commands(
    tmp_path: Path, fake_etcdctl: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every member is restored with its name, its shard's initial cluster and peer URL and one
    fresh token per shard; stdout has the etcd command that starts each on its data directory."""
    make_snapshot(tmp_path / "snap")
    into = tmp_path / "restored"
    status, out, err = run(capsys, "restore", str(tmp_path / "snap"), "--into", str(into))
    assert status == 0, err
    made = calls(fake_etcdctl)
    assert len(made) == 4
    assert all(
        call[0] == "3" and call[1:4] == ["snapshot", "restore", str(tmp_path / "snap" / f"shard-{s}.db")]
        for call, s in zip(made, ["0", "0", "0", "s1"], strict=True)
    )

    def option(call: list[str], name: str) -> str:
        return call[call.index(name) + 1]

    assert [option(c, "--name") for c in made] == ["m0", "m1", "m2", "s1a"]
    assert [option(c, "--data-dir") for c in made] == [
        str(into / "shard-0" / f"{m}.etcd") for m in ("m0", "m1", "m2")
    ] + [str(into / "shard-s1" / "s1a.etcd")]
    initial = "m0=http://127.0.0.1:2380,m1=http://127.0.0.1:2381,m2=http://127.0.0.1:2382"
    assert {option(c, "--initial-cluster") for c in made[:3]} == {initial}
    assert option(made[3], "--initial-cluster") == "s1a=http://127.0.0.1:2600"
    tokens = [option(c, "--initial-cluster-token") for c in made]
    assert len(set(tokens[:3])) == 1 and tokens[3] != tokens[0]
    assert option(made[1], "--initial-advertise-peer-urls") == "http://127.0.0.1:2381"
    # A second restore gets fresh tokens.
    run(capsys, "restore", str(tmp_path / "snap"), "--into", str(tmp_path / "again"))
    assert option(calls(fake_etcdctl)[4], "--initial-cluster-token") not in tokens

    commands = [shlex.split(line) for line in out.splitlines() if line.startswith("etcd ")]
    assert len(commands) == 4
    first = commands[0]
    assert option(first, "--name") == "m0"
    assert option(first, "--data-dir") == str((into / "shard-0" / "m0.etcd").resolve())
    assert (
        option(first, "--listen-client-urls")
        == option(first, "--advertise-client-urls")
        == "http://127.0.0.1:2480"
    )
    assert option(first, "--listen-peer-urls") == "http://127.0.0.1:2380"
    assert '# then start the nodes with cluster.endpoints = ["http://127.0.0.1:2480"' in out
    assert "shard s1: member s1a restored into" in err


def test_a_tampered_file_is_refused_before_anything_is_written(
    tmp_path: Path, fake_etcdctl: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_snapshot(tmp_path / "snap")
    path = tmp_path / "snap" / "shard-s1.db"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    status, _, err = run(capsys, "restore", str(tmp_path / "snap"), "--into", str(tmp_path / "restored"))
    assert_one_line_error(status, err, "shard s1:", "does not match its SHA-256")
    assert not (tmp_path / "restored").exists() and calls(fake_etcdctl) == []
    # A file that is missing or shorter is refused the same way.
    path.write_bytes(bytes(data[:50]))
    status, _, err = run(capsys, "verify-snapshot", str(tmp_path / "snap"))
    assert_one_line_error(status, err, "does not match its SHA-256")


def test_no_etcdctl_on_path_is_one_line(
    tmp_path: Path, fake_etcdctl: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_snapshot(tmp_path / "snap")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    status, _, err = run(capsys, "restore", str(tmp_path / "snap"), "--into", str(tmp_path / "restored"))
    assert_one_line_error(status, err, "etcdctl is not on PATH")
    assert not (tmp_path / "restored").exists()


def test_a_non_empty_target_is_refused(
    tmp_path: Path, fake_etcdctl: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_snapshot(tmp_path / "snap")
    into = tmp_path / "restored"
    into.mkdir()
    (into / "precious").write_text("keep me")
    status, _, err = run(capsys, "restore", str(tmp_path / "snap"), "--into", str(into))
    assert_one_line_error(status, err, "exists and is not empty")
    assert [p.name for p in into.iterdir()] == ["precious"] and calls(fake_etcdctl) == []
    # An empty directory is a fine target.
    (into / "precious").unlink()
    status, _, err = run(capsys, "restore", str(tmp_path / "snap"), "--into", str(into))
    assert status == 0, err


def test_a_manifest_without_members_needs_member_options(
    tmp_path: Path, fake_etcdctl: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A format-1 manifest (no member lists) is refused with a pointer to --member and a new
    snapshot; with --member for every shard it restores."""
    make_snapshot(tmp_path / "snap", fmt=1, members=False)
    into = tmp_path / "restored"
    status, _, err = run(capsys, "restore", str(tmp_path / "snap"), "--into", str(into))
    assert_one_line_error(status, err, "records no etcd members", "new snapshot", "--member SHARD/NAME=")
    assert not into.exists() and calls(fake_etcdctl) == []
    # Shard 0 moves to other ports; shard s1 keeps the client URL its shard map gives.
    status, out, err = run(
        capsys,
        "restore",
        str(tmp_path / "snap"),
        "--into",
        str(into),
        "--member",
        "0/a=http://127.0.0.1:3380,http://127.0.0.1:3379",
        "--member",
        "0/b=http://127.0.0.1:3390,http://127.0.0.1:3389",
        "--member",
        "s1/x=http://127.0.0.1:3400,http://127.0.0.1:2700",
    )
    assert status == 0, err
    names = [c[c.index("--name") + 1] for c in calls(fake_etcdctl)]
    assert names == ["a", "b", "x"]
    assert (
        '# then start the nodes with cluster.endpoints = ["http://127.0.0.1:3379", "http://127.0.0.1:3389"]'
        in out
    )


def test_bad_member_options_are_refused(
    tmp_path: Path, fake_etcdctl: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_snapshot(tmp_path / "snap")
    into = str(tmp_path / "restored")
    for spec, fragment in [
        ("0/m0=http://127.0.0.1:1", "expected SHARD/NAME=PEER_URL,CLIENT_URL"),
        ("m0=http://127.0.0.1:1,http://127.0.0.1:2", "expected SHARD/NAME=PEER_URL,CLIENT_URL"),
        ("s9/m0=http://127.0.0.1:1,http://127.0.0.1:2", "not in this snapshot"),
        ("s1/m0=http://127.0.0.1:1,http://127.0.0.1:2", "its members must keep those client URLs"),
        ("0/../x=http://127.0.0.1:1,http://127.0.0.1:2", "not a plain file name"),
    ]:
        status, _, err = run(capsys, "restore", str(tmp_path / "snap"), "--into", into, "--member", spec)
        assert_one_line_error(status, err, fragment)
    assert not (tmp_path / "restored").exists() and calls(fake_etcdctl) == []


def test_a_failing_etcdctl_is_one_line_and_leaves_nothing(
    tmp_path: Path, fake_etcdctl: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_snapshot(tmp_path / "snap")
    monkeypatch.setenv("FAKE_ETCDCTL_FAIL", "1")
    status, _, err = run(capsys, "restore", str(tmp_path / "snap"), "--into", str(tmp_path / "restored"))
    assert status != 0 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert (
        "shard 0: etcdctl snapshot restore for member m0 failed: Error: snapshot file integrity check failed"
        in last
    )
    assert not (tmp_path / "restored").exists()


def test_bad_manifests_and_usage(
    tmp_path: Path, fake_etcdctl: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = make_snapshot(tmp_path / "snap")
    into = str(tmp_path / "restored")
    path = tmp_path / "snap" / "manifest.json"
    for broken, fragment in [
        ("{not json", "cannot read"),
        (json.dumps({**manifest, "format": 99}), "manifest format 99"),
        (
            json.dumps({**manifest, "shards": {"0": {**manifest["shards"]["0"], "file": "../x.db"}}}),
            "no valid file",
        ),
        (json.dumps({"format": 2}), "no shards"),
    ]:
        path.write_text(broken)
        status, _, err = run(capsys, "restore", str(tmp_path / "snap"), "--into", into)
        assert_one_line_error(status, err, fragment)
    status, _, err = run(capsys, "restore", str(tmp_path / "snap"))
    assert status == 2 and "usage: amaters cluster restore SOURCE --into DIR" in err
    status, _, err = run(capsys, "verify-snapshot", str(tmp_path / "snap"), "--into", into)
    assert status == 2 and "--into and --member are options of restore" in err
    assert calls(fake_etcdctl) == [] and not (tmp_path / "restored").exists()
