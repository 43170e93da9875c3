"""``amaters start``, ``stop``, ``status`` and ``validate-config`` as an operator runs them: real
subprocesses, daemonized servers, real ports on 127.0.0.1 (below 32768)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
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
            "[grpc]\n"
            f'listen = "tcp:{free_port()}:interface=127.0.0.1"\n'
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
    # (With --config: without it, once nothing runs from here, status falls back to the built-in
    # defaults, whose ports another server on this machine may be using.)
    after = operator("status", "--config", str(config))
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
    # Reached through its port alone (not the --config it runs with), it is named, not signalled.
    other = operator("stop", "--set", f"web.listen=tcp:{server.web_port}:interface=127.0.0.1")
    assert other.returncode == 1, other.stdout + other.stderr
    assert f"a server (pid {server.process.pid}) answers on" in other.stderr
    assert f"kill {server.process.pid}" in other.stderr
    assert server.readyz() == 200
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


# -- the client's deadline, TLS files and oversize values ------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never says a word."""
    with socket.socket() as listener:
        port = free_port()
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
        yield port


@pytest.mark.parametrize("command", [["ping"], ["get", "people", "alice"]])
def test_timeout_covers_a_tls_handshake_that_never_completes(
    operator: Operator, silent_port: int, tmp_path: Path, command: list[str]
) -> None:
    """`--timeout 2` against a listener that stays silent ends with a timeout (exit 2) instead of
    hanging until killed (the subprocess timeout would fail this test)."""
    from amaters.tls.certs import generate_server_tls

    generate_server_tls(tmp_path / "tls")
    ca = tmp_path / "tls" / "ca.pem"
    ran = operator(
        *command, "--server", f"127.0.0.1:{silent_port}", "--ca", str(ca), "--timeout", "2", timeout=30
    )
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "NETWORK_TIMEOUT" in ran.stderr and "TLS handshake did not complete" in ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1


def test_timeout_covers_a_server_that_is_not_amaters(
    operator: Operator, servers: list[ServerProcess], tmp_path: Path
) -> None:
    """`get --timeout 2` pointed at the ops (HTTP) port gives up within the deadline, whatever the
    HTTP server does with a TLS hello (before: it waited for the ops site's idle timeout)."""
    server = ServerProcess(tmp_path / "srv")
    servers.append(server)
    server.start().wait_ready()
    ran = operator(
        "get",
        "people",
        "alice",
        "--server",
        f"127.0.0.1:{server.web_port}",
        "--ca",
        str(server.ca_cert),
        "--timeout",
        "2",
        timeout=30,
    )
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "NETWORK_" in ran.stderr and "Traceback" not in ran.stderr


def test_a_ca_file_that_is_not_a_certificate_is_a_tls_failure(operator: Operator, silent_port: int) -> None:
    """`--ca server.toml` is a problem with the client's TLS files: NETWORK_TLS_HANDSHAKE, exit 2
    (docs/client.md), not AUTH_INVALID_CERTIFICATE (a code about client certificates)."""
    config, _, _ = operator.config()
    ran = operator(
        "ping", "--server", f"127.0.0.1:{silent_port}", "--ca", str(config), "--timeout", "5", timeout=30
    )
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "NETWORK_TLS_HANDSHAKE" in ran.stderr and "no PEM certificate" in ran.stderr
    assert "AUTH_INVALID_CERTIFICATE" not in ran.stderr


OVERSIZE_SCRIPT = """
import sys
import time
from twisted.internet import task
from amaters.client import connect

async def main(reactor):
    client = await connect(reactor, "127.0.0.1", int(sys.argv[1]), ca_cert=sys.argv[2], timeout=30)
    try:
        await client.set("c", b"big", b"x" * (2 * 1024 * 1024))
    except Exception as e:
        print("set:", type(e).__name__, e.message)
    try:
        await client.get("c", b"big")
    except Exception as e:
        print("get:", type(e).__name__, e.code.name, e.message)
    await client.close()

task.react(lambda reactor: __import__("twisted").internet.defer.ensureDeferred(main(reactor)))
"""


def test_the_request_after_an_oversize_frame_says_the_connection_is_closed(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    """The oversize SET gets the size error; the next request on that connection gets a clear
    "connection closed" (naming why), not the size error again."""
    server = ServerProcess(tmp_path / "srv", settings=["limits.max_frame_bytes=1048576"])
    servers.append(server)
    server.start().wait_ready()
    ran = subprocess.run(
        [sys.executable, "-c", OVERSIZE_SCRIPT, str(server.port), str(server.ca_cert)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    lines = ran.stdout.splitlines()
    assert lines[0].startswith("set: SizeExceeded") and "max_frame_bytes" in lines[0], ran.stdout + ran.stderr
    assert lines[1].startswith("get: NetworkError NETWORK_CONNECTION_RESET the connection to 127.0.0.1:")
    assert " is closed (it ended after: " in lines[1]


MEASURE = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdin=sys.stdin, capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def test_a_large_value_is_not_copied_over_and_over(servers: list[ServerProcess], tmp_path: Path) -> None:
    """`amaters set c k - < 64 MiB` (refused by a 1 MiB frame limit) peaks below the value's size
    twice over on top of a small set's footprint (before: over five times the value)."""
    server = ServerProcess(tmp_path / "srv", settings=["limits.max_frame_bytes=1048576"])
    servers.append(server)
    server.start().wait_ready()
    common = ["--server", f"127.0.0.1:{server.port}", "--ca", str(server.ca_cert), "--timeout", "60"]

    def peak_kib(size: int) -> int:
        value = tmp_path / f"value-{size}"
        value.write_bytes(b"\xa5" * size)
        with value.open("rb") as stdin:
            ran = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    MEASURE,
                    sys.executable,
                    "-m",
                    "amaters.cli",
                    "set",
                    "c",
                    "k",
                    "-",
                    *common,
                ],
                stdin=stdin,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=tmp_path,
            )
        return int(ran.stdout.strip())

    size = 64 * 1024 * 1024
    small, large = peak_kib(1024), peak_kib(size)
    assert (large - small) * 1024 < 2 * size, (small, large)


def test_validate_config_accepts_a_working_certificate_and_key(operator: Operator, tmp_path: Path) -> None:
    """The TLS load check passes a real certificate and key, and catches a key of another pair."""
    from amaters.tls.certs import generate_server_tls

    generate_server_tls(tmp_path / "a")
    generate_server_tls(tmp_path / "b")
    good, _, _ = operator.config(
        "good.toml",
        extra=f'[tls]\ncert = "{tmp_path / "a" / "server.pem"}"\nkey = "{tmp_path / "a" / "server.key"}"\n',
    )
    checked = operator("validate-config", str(good))
    assert checked.returncode == 0, checked.stderr
    mixed, _, _ = operator.config(
        "mixed.toml",
        extra=f'[tls]\ncert = "{tmp_path / "a" / "server.pem"}"\nkey = "{tmp_path / "b" / "server.key"}"\n',
    )
    checked = operator("validate-config", str(mixed))
    assert checked.returncode == 2
    assert "tls.cert/tls.key: cannot be used together" in checked.stderr


def test_stop_finds_a_twistd_server_run_on_the_defaults_from_this_directory(operator: Operator) -> None:
    """`twistd -n amaters` (no config file, settings from the environment) in this directory:
    `amaters status` shows its pid and `amaters stop` stops it, with no --config on either side."""
    port, web_port = free_port(), free_port()
    while web_port == port:
        web_port = free_port()
    operator.env["AMATERS_SERVER__LISTEN"] = f"tcp:{port}:interface=127.0.0.1"
    operator.env["AMATERS_WEB__LISTEN"] = f"tcp:{web_port}:interface=127.0.0.1"
    operator.env["AMATERS_GRPC__LISTEN"] = "tcp:0:interface=127.0.0.1"  # never the shared default port
    log = (operator.directory / "twistd.out").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "amaters",
        ],
        cwd=operator.directory,
        env=operator.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        for _ in range(300):
            try:
                if http_get(f"http://127.0.0.1:{web_port}/readyz", timeout=1.0)[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, (operator.directory / "twistd.out").read_text()
            time.sleep(0.1)
        status = operator("status", "--format", "json")
        assert status.returncode == 0, status.stdout
        assert json.loads(status.stdout)["pid"] == process.pid
        stopped = operator("stop", "--timeout", "30")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert f"amaters stopped (pid {process.pid})" in stopped.stdout
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
