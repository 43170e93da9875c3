"""The real entry points: ``twistd -n amaters``, ``amaters.tac`` and ``amaters start/status/stop``."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import ServerProcess, free_port, http_get

pytestmark = pytest.mark.integration


def test_twistd_serves_probes_and_exits_cleanly(tmp_path: Path, servers: list[ServerProcess]) -> None:
    """twistd -n amaters with a config file becomes ready, answers probes, and exits 0 on SIGTERM."""
    server = ServerProcess(tmp_path)
    servers.append(server)
    server.start().wait_ready()
    code, body = http_get(f"http://127.0.0.1:{server.web_port}/health")
    assert code == 200
    health = json.loads(body)
    assert health["status"] == "healthy"
    assert health["components"]["storage"]["status"] == "healthy"
    assert http_get(f"http://127.0.0.1:{server.web_port}/livez")[0] == 200
    assert server.stop() == 0
    log = server.log()
    assert "Traceback" not in log
    assert "Server Shut Down" in log


def test_tac_builds_the_same_service(tmp_path: Path, servers: list[ServerProcess]) -> None:
    """twistd -ny amaters.tac reads AMATERS_CONFIG and serves like the plugin."""
    server = ServerProcess(tmp_path, tac=True)
    servers.append(server)
    server.start().wait_ready()
    assert server.stop() == 0


def test_sigint_also_stops_gracefully(tmp_path: Path, servers: list[ServerProcess]) -> None:
    server = ServerProcess(tmp_path)
    servers.append(server)
    server.start().wait_ready()
    server.signal(signal.SIGINT)
    assert server.wait_exit() == 0


def test_invalid_config_exits_nonzero_with_every_problem(tmp_path: Path) -> None:
    """twistd refuses to start on an invalid config, listing every problem, without a traceback."""
    server = ServerProcess(tmp_path, settings=["storage.sync=sometimes", "limits.max_key_bytes=0"])
    result = subprocess.run(server.argv(), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "storage.sync" in out and "limits.max_key_bytes" in out
    assert "Traceback" not in out
    # Only the problems: not twistd's usage text first.
    assert "Usage:" not in out and "--reactor" not in out
    assert out.splitlines()[0] == "amaters: invalid configuration:"


def test_port_in_use_fails_start_with_exit_1(tmp_path: Path, servers: list[ServerProcess]) -> None:
    """When a port is taken the server says so and exits 1 instead of running half-started."""
    server = ServerProcess(tmp_path)
    servers.append(server)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", server.web_port))
        blocker.listen()
        server.start()
        assert server.wait_exit(60) == 1
    assert "failed to start" in server.log()


def test_cli_start_status_stop(tmp_path: Path) -> None:
    """amaters start daemonizes with a pid file, status sees it ready, stop ends it."""
    web_port, port = free_port(), free_port()
    data = tmp_path / "data"
    sets = [
        "--set",
        f"server.data_dir={data}",
        "--set",
        "grpc.listen=tcp:0:interface=127.0.0.1",
        "--set",
        f"server.listen=tcp:{port}:interface=127.0.0.1",
        "--set",
        f"web.listen=tcp:{web_port}:interface=127.0.0.1",
    ]
    amaters = [sys.executable, "-m", "amaters.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*amaters, *args, *sets], capture_output=True, text=True, timeout=90, cwd=tmp_path
        )

    started = run("start", "--wait", "30")
    try:
        assert started.returncode == 0, started.stderr
        assert (data / "amaters.pid").exists()
        again = run("start")
        assert again.returncode == 1 and "already running" in again.stderr
        status = run("status", "--format", "json")
        assert status.returncode == 0, status.stdout + status.stderr
        assert json.loads(status.stdout)["ready"] is True
    finally:
        stopped = run("stop", "--timeout", "30", "--force")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and run("status").returncode == 0:
        time.sleep(0.1)
    assert run("status").returncode == 1
    assert (data / "amaters.log").exists()
