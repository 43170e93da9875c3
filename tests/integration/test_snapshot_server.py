"""Snapshots with a real ``twistd -n amaters`` server: the offline CLI on a stopped server's data
directory (restored data served by a second server), and scheduled snapshots on a running one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import ServerProcess

pytestmark = pytest.mark.integration


def amaters(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amaters.cli", *args], capture_output=True, text=True, timeout=120
    )


def client(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return amaters(*args, "--server", f"127.0.0.1:{server.port}", "--ca", str(server.ca_cert))


def test_snapshot_of_a_stopped_server_serves_the_same_data(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """While the server runs, `snapshot create` takes the snapshot through the server's admin API
    (the server holds the data directory); once it stopped, create, list and verify work on the data
    dir directly, and a second server started on the restored directory answers with the same
    values."""
    first = ServerProcess(tmp_path / "first")
    servers.append(first)
    first.start().wait_ready()
    for key, value in [("alice", "ciphertext-a"), ("bob", "ciphertext-b")]:
        assert client(first, "set", "users", key, value).returncode == 0
    assert client(first, "set", "docs", "readme", "ciphertext-r").returncode == 0
    config = str(first.config_path)

    live = amaters("snapshot", "create", "--config", config)
    assert live.returncode == 0, live.stderr
    assert "through its admin API" in live.stderr
    assert "2 collections, 3 keys" in live.stdout
    # Keep the listing below about the offline snapshot.
    live_archive = Path(live.stdout.split(":")[0])
    live_archive.unlink()
    live_archive.with_name(live_archive.name + ".sha256").unlink(missing_ok=True)

    assert first.stop() == 0
    created = amaters("snapshot", "create", "--config", config)
    assert created.returncode == 0, created.stderr
    assert "2 collections, 3 keys" in created.stdout and "packing: 100%" in created.stderr
    archive = created.stdout.split(":")[0]
    listed = amaters("snapshot", "list", "--config", config)
    assert Path(archive).name in listed.stdout and "3 keys" in listed.stdout
    verified = amaters("snapshot", "verify", archive, "--config", config)
    assert verified.returncode == 0 and ": OK (" in verified.stdout

    second = ServerProcess(tmp_path / "second")
    restored = amaters("snapshot", "restore", archive, "--into", str(second.data_dir), "--config", config)
    assert restored.returncode == 0, restored.stderr
    servers.append(second)
    second.start().wait_ready()
    got = client(second, "get", "users", "bob")
    assert got.returncode == 0 and got.stdout == "ciphertext-b"
    assert client(second, "get", "docs", "readme").stdout == "ciphertext-r"


def test_scheduled_snapshots_on_a_running_server(tmp_path: Path, servers: list[ServerProcess]) -> None:
    """With snapshot.interval = 1 and keep = 2 a running server writes verified snapshots every
    second, keeps the newest two, and still stops cleanly."""
    server = ServerProcess(tmp_path / "s", config_text="[snapshot]\ninterval = 1\nkeep = 2\n")
    servers.append(server)
    server.start().wait_ready()
    assert client(server, "set", "users", "carol", "ciphertext-c").returncode == 0
    directory = server.data_dir / "snapshots"
    deadline = time.monotonic() + 30
    while server.log().count("Scheduled snapshot amaters-") < 4:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    assert server.stop() == 0
    archives = sorted(directory.glob("amaters-*.tar.zst"))
    assert len(archives) == 2
    assert "Snapshot retention deleted" in server.log()
    verified = amaters("snapshot", "verify", str(archives[-1]), "--config", str(server.config_path))
    assert verified.returncode == 0, verified.stderr
    listed = amaters("snapshot", "list", "--config", str(server.config_path), "--json")
    assert '"keys": 1' in listed.stdout
