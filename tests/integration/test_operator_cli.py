"""``amaters start``, ``stop``, ``status`` and ``validate-config`` as an operator runs them: real
subprocesses, daemonized servers, real ports on 127.0.0.1 (below 32768)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ServerProcess, free_port, http_get

pytestmark = pytest.mark.integration


class Operator:
    """Runs ``amaters ...`` in one working directory with its own state directory, and stops
    every server it started at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AMATERS_")}
        self.env["XDG_STATE_HOME"] = str(directory / "state")
        self.pid_files: list[Path] = []

    def __call__(
        self, *args: str, timeout: float = 90, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "amaters.cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.directory,
            env=self.env,
        )

    def config(self, name: str = "server.toml", extra: str = "", data: str = "data") -> tuple[Path, int, int]:
        """A config file with free ports; returns (path, native port, web port)."""
        port, web_port = free_port(), free_port()
        while web_port == port:
            web_port = free_port()
        path = self.directory / name
        path.write_text(
            "[server]\n"
            f'listen = "tcp:{port}:interface=127.0.0.1"\n'
            f'data_dir = "{self.directory / data}"\n'
            "shutdown_timeout = 10\n"
            "[web]\n"
            f'listen = "tcp:{web_port}:interface=127.0.0.1"\n' + extra
        )
        self.pid_files.append(self.directory / data / "amaters.pid")
        return path, port, web_port

    def cleanup(self) -> None:
        for pid_file in self.pid_files:
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, 9)
            except OSError:
                pass


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[Operator]:
    op = Operator(tmp_path)
    yield op
    op.cleanup()


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.cleanup()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
    )


def test_start_does_not_take_another_servers_readyz_for_its_own(
    operator: Operator, servers: list[ServerProcess], tmp_path: Path
) -> None:
    """Another amaters already serves the web port and the data directory: `amaters start` fails
    (exit 1, the log's error line) instead of reporting the other server's readiness as its own."""
    other = ServerProcess(tmp_path / "other")
    servers.append(other)
    other.start().wait_ready()
    config, _, _ = operator.config(data="../other/data")
    text = config.read_text().replace(
        config.read_text().split("[web]\n")[1], f'listen = "tcp:{other.web_port}:interface=127.0.0.1"\n'
    )
    config.write_text(text)
    started = operator("start", "--config", str(config), "--wait", "300")
    assert started.returncode == 1, started.stdout + started.stderr
    assert "failed to start" in started.stderr
    assert "in use" in started.stderr  # the log's error line: data directory (or port) in use
    assert "started" not in started.stdout
    assert other.readyz() == 200  # the other server is untouched


def test_start_reports_a_failed_start_at_once_with_the_log_error(operator: Operator) -> None:
    """The native port is taken: the daemon dies right after starting; `amaters start --wait 300`
    says so (with the log's error line) as soon as it has died, long before its wait is over (the
    subprocess timeout would fail this test otherwise)."""
    config, port, _ = operator.config()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        started = operator("start", "--config", str(config), "--wait", "300", timeout=60)
    assert started.returncode == 1, started.stdout + started.stderr
    assert "failed to start: the server" in started.stderr and "exited" in started.stderr
    assert str(port) in started.stderr and "in use" in started.stderr
    assert "Traceback" not in started.stderr


def test_stop_and_status_find_the_server_started_from_a_config_file(operator: Operator) -> None:
    """`start --config server.toml`, then `status` and `stop` without --config act on that server."""
    config, _, web_port = operator.config()
    started = operator("start", "--config", str(config))
    assert started.returncode == 0, started.stderr
    pid = int((operator.directory / "data" / "amaters.pid").read_text())
    assert f"pid {pid}" in started.stdout

    status = operator("status", "--format", "json")
    assert status.returncode == 0, status.stdout + status.stderr
    shown = json.loads(status.stdout)
    assert shown["running"] is True and shown["ready"] is True and shown["pid"] == pid
    assert str(config) in shown["detail"]

    # /readyz names the server's pid and the instance id start gave it.
    code, body = http_get(f"http://127.0.0.1:{web_port}/readyz")
    assert code == 200 and json.loads(body)["pid"] == pid

    stopped = operator("stop", "--timeout", "30")
    assert stopped.returncode == 0, stopped.stderr
    assert f"amaters stopped (pid {pid})" in stopped.stdout
    assert not _alive(pid)
    after = operator("status")
    assert after.returncode == 1 and "amaters is not running" in after.stdout


def test_status_and_stop_agree_on_a_server_started_by_twistd(
    operator: Operator, servers: list[ServerProcess], tmp_path: Path
) -> None:
    """A server run with `twistd -n amaters` (no pid file): status shows its pid from /readyz and
    stop stops it, instead of "running (pid unknown)" next to "not running"."""
    server = ServerProcess(tmp_path / "fg")
    servers.append(server)
    server.start().wait_ready()
    assert server.process is not None
    config = str(server.config_path)
    status = operator("status", "--config", config, "--format", "json")
    assert status.returncode == 0, status.stdout
    assert json.loads(status.stdout)["pid"] == server.process.pid
    stopped = operator("stop", "--config", config, "--timeout", "30")
    assert stopped.returncode == 0 and f"amaters stopped (pid {server.process.pid})" in stopped.stdout
    assert server.wait_exit(30) == 0


def test_start_with_json_logging_writes_json_lines_to_the_log_file(operator: Operator) -> None:
    """`logging.format = "json"` under `amaters start`: twistd's first lines and the server's events
    are JSON lines in the log file (not lost to the daemon's /dev/null)."""
    config, _, _ = operator.config(extra='[logging]\nformat = "json"\n')
    started = operator("start", "--config", str(config))
    assert started.returncode == 0, started.stderr
    stopped = operator("stop", "--config", str(config), "--timeout", "30")
    assert stopped.returncode == 0, stopped.stderr
    lines = (operator.directory / "data" / "amaters.log").read_text().splitlines()
    assert len(lines) > 3
    events = [json.loads(line) for line in lines]  # every line is JSON
    namespaces = {event.get("namespace", "") for event in events}
    assert any(ns.startswith("amaters") for ns in namespaces), namespaces
    assert any("Server Shut Down" in event.get("message", "") for event in events)


def test_validate_config_lists_every_problem_at_once(operator: Operator) -> None:
    """Parse problems, cross-checks, TLS files and auth material are reported in one run."""
    config, _, _ = operator.config(
        extra=(
            '[logging]\nlevel = "loud"\n'
            "[limits]\nmax_key_bytes = 0\n"
            '[tls]\ncert = "missing-cert.pem"\n'
            "[auth]\nenabled = true\n"
        )
    )
    checked = operator("validate-config", str(config))
    assert checked.returncode == 2
    err = checked.stderr
    assert "logging.level" in err and "limits.max_key_bytes" in err
    assert "tls.cert/tls.key: both must be set" in err
    assert "tls.cert: " in err and "is not a readable file" in err
    assert "auth.enabled: no login method is configured" in err
    assert "Traceback" not in err


def test_validate_config_loads_the_tls_files_as_the_server_would(operator: Operator, tmp_path: Path) -> None:
    """A certificate that is not a certificate, or a key of another certificate, is reported."""
    bogus = tmp_path / "cert.pem"
    bogus.write_text("not a certificate\n")
    key = tmp_path / "key.pem"
    key.write_text("not a key\n")
    config, _, _ = operator.config(extra=f'[tls]\ncert = "{bogus}"\nkey = "{key}"\n')
    checked = operator("validate-config", str(config))
    assert checked.returncode == 2, checked.stdout
    assert (
        "tls.cert/tls.key: cannot be used together" in checked.stderr
        or "no PEM certificate" in checked.stderr
    )
