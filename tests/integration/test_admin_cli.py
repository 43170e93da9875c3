"""``amaters admin ...`` and ``amaters snapshot create`` against a running ``twistd -n amaters``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ServerProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(
        tmp_path, config_text='[storage]\nbackend = "rocksdb"\n[snapshot]\ncompression = "none"\n'
    )
    try:
        yield s.start().wait_ready()
    finally:
        s.cleanup()


def amaters(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amaters.cli", *args, "--config", str(server.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_admin_commands_on_a_running_server(server: ServerProcess) -> None:
    """Status, stats, compact and reload through the admin API (loopback, auth off)."""
    status = amaters(server, "admin", "status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["ready"] is True
    assert amaters(server, "admin", "compact").returncode == 0
    reload = amaters(server, "admin", "reload")
    assert reload.returncode == 0 and json.loads(reload.stdout)["ok"] is True


def test_snapshot_create_goes_through_the_running_server(server: ServerProcess) -> None:
    """With the server holding the data dir, `amaters snapshot create` asks its admin API, and the
    archive verifies."""
    created = amaters(server, "snapshot", "create", "--json")
    assert created.returncode == 0, created.stderr
    assert "through its admin API" in created.stderr
    archive = json.loads(created.stdout)["path"]
    verified = amaters(server, "snapshot", "verify", archive)
    assert verified.returncode == 0, verified.stderr
    listed = amaters(server, "admin", "snapshots")
    assert Path(archive).name in listed.stdout


def test_admin_errors_are_one_line(tmp_path: Path) -> None:
    """No server: one clear line, exit 1, no traceback."""
    s = ServerProcess(tmp_path)
    result = amaters(s, "admin", "status")
    assert result.returncode == 1
    assert "cannot reach the server" in result.stderr and "Traceback" not in result.stderr
