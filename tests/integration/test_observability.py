"""Observability of a real ``twistd -n amaters`` subprocess: metrics that follow real requests made
with the real client over TLS, promtool on the live /metrics, readiness through start and drain,
JSON logs with the access events, and the ops site over HTTPS."""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
import treq
from harness import ServerProcess, http_get, scrape, value
from twisted.internet import reactor, task

from amaters import __version__
from amaters.client import AmatersClient, connect
from amaters.errors import InvalidCollection

pytestmark = pytest.mark.integration


def launch(directory: Path, servers: list[ServerProcess], *settings: str) -> ServerProcess:
    server = ServerProcess(
        directory,
        settings=["storage.backend=memory", "storage.flush_interval_s=0.1", *settings],
    )
    servers.append(server)
    return server


async def client_for(server: ServerProcess) -> AmatersClient:
    return await connect(reactor, "127.0.0.1", server.port, ca_cert=str(server.ca_cert), timeout=30)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def readyz(server: ServerProcess) -> int | None:
    try:
        response = await treq.get(f"http://127.0.0.1:{server.web_port}/readyz", timeout=2, persistent=False)
        await treq.content(response)
    except Exception:
        return None
    code: int = response.code
    return code


@pytest_twisted.ensureDeferred
async def test_metrics_follow_real_requests(tmp_path: Path, servers: list[ServerProcess]) -> None:
    """After SETs, GETs and a refused request over the native protocol, /metrics shows them by
    operation and status, the error by code, the connection, the bytes both ways, the storage key
    count, and it never contains a key or a value."""
    server = launch(tmp_path, servers)
    server.start().wait_ready()
    before = scrape(server)
    assert value(before, "amaters_connections_total") == 0.0
    client = await client_for(server)
    try:
        for i in range(3):
            await client.set("users", b"secret-key-%d" % i, b"secret-value-%d" % i)
        assert await client.get("users", b"secret-key-0") == b"secret-value-0"
        with pytest.raises(InvalidCollection):
            await client.get("bad collection name", b"k")
        during = scrape(server)
        assert value(during, "amaters_connections_active") == 1.0
    finally:
        await client.close()
    await sleep(0.3)  # a flusher tick (storage.flush_interval_s = 0.1) refreshes the storage gauges
    after = scrape(server)
    assert value(after, "amaters_requests_total", op="set", status="ok") == 3.0
    assert value(after, "amaters_requests_total", op="get", status="ok") == 1.0
    assert value(after, "amaters_requests_total", op="get", status="error") == 1.0
    assert value(after, "amaters_errors_total", code="validation_invalid_collection") == 1.0
    assert value(after, "amaters_request_duration_seconds_count", op="set") == 3.0
    assert value(after, "amaters_connections_total") == 1.0
    assert value(after, "amaters_connections_active") == 0.0
    assert value(after, "amaters_bytes_received_total") > 3 * len(b"secret-value-0")
    assert value(after, "amaters_bytes_sent_total") > 0
    assert value(after, "amaters_storage_keys", collection="users") == 3.0
    assert value(after, "amaters_reactor_lag_seconds") < 5.0
    builds = [
        dict(labels)["build"]
        for (name, labels), v in after.items()
        if name == "amaters_build_info" and dict(labels).get("version") == __version__ and v == 1.0
    ]
    assert builds in (["compiled"], ["interpreted"])
    body = http_get(f"http://127.0.0.1:{server.web_port}/metrics")[1]
    assert b"secret" not in body
    assert server.stop() == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) missing")
@pytest_twisted.ensureDeferred
async def test_live_metrics_pass_promtool(tmp_path: Path, servers: list[ServerProcess]) -> None:
    """`promtool check metrics` reports no problems on a live server's /metrics after traffic."""
    server = launch(tmp_path, servers)
    server.start().wait_ready()
    client = await client_for(server)
    try:
        await client.set("c", b"k", b"v")
        await client.get("c", b"k")
    finally:
        await client.close()
    body = http_get(f"http://127.0.0.1:{server.web_port}/metrics")[1]
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""
    assert server.stop() == 0


@pytest_twisted.ensureDeferred
async def test_readiness_through_start_and_drain(tmp_path: Path, servers: list[ServerProcess]) -> None:
    """While starting, /readyz is refused or 503 until the native port takes connections, then
    200; from SIGTERM, while a stream is still being drained, it is 503 though the process is up;
    the process exits 0 once the client lets go."""
    server = launch(tmp_path, servers, "storage.range_chunk_size=1", "server.shutdown_timeout=20")
    server.start()
    seen: list[int | None] = []
    for _ in range(3000):
        code = await readyz(server)
        if not seen or seen[-1] != code:
            seen.append(code)
        if code == 200:
            break
        assert server.process is not None and server.process.poll() is None, server.log()
        await sleep(0.01)
    assert seen[-1] == 200, seen
    assert set(seen[:-1]) <= {None, 503}, seen

    client = await client_for(server)
    # 48 MB behind a RANGE the client stops reading: the server's writes back up and its stream
    # waits, so the connection stays busy through the drain.
    value_ = b"x" * (1024 * 1024)
    for i in range(48):
        await client.set("big", b"%03d" % i, value_)
    stream = client.scan("big")
    first = await stream.__anext__()
    assert first
    await sleep(0.5)
    server.signal(signal.SIGTERM)
    draining: list[int | None] = []
    for _ in range(200):
        code = await readyz(server)
        draining.append(code)
        if code == 503:
            break
        await sleep(0.02)
    assert draining[-1] == 503, draining
    assert server.process is not None and server.process.poll() is None
    code, body = http_get(f"http://127.0.0.1:{server.web_port}/readyz")
    answer = json.loads(body)
    assert (code, answer["status"], answer["reason"]) == (503, "not_ready", "draining")
    assert server.process is not None and answer["pid"] == server.process.pid  # the one draining
    await stream.cancel()
    await client.close()
    assert server.wait_exit(30) == 0
    assert "Traceback" not in server.log()


def test_json_logs_with_access_events(tmp_path: Path, servers: list[ServerProcess]) -> None:
    """With logging.format = json and level debug, every line our observer writes is a JSON object;
    each request gives an access event with op, collection, status, duration and principal, and no
    key or value; twisted.web's own access lines do not appear."""
    server = launch(tmp_path, servers, "logging.format=json", "logging.level=debug")
    server.start().wait_ready()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "amaters.cli",
            "set",
            "users",
            "secret-key",
            "secret-value",
            "--server",
            f"127.0.0.1:{server.port}",
            "--ca",
            str(server.ca_cert),
        ],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    http_get(f"http://127.0.0.1:{server.web_port}/health")
    assert server.stop() == 0
    records = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
        else:
            # Only twistd's own lines, before the logging service starts and after it stops.
            assert "[twisted.scripts._twistd_unix." in line or "[twisted.internet.base#" in line, line
    assert records, server.log()
    for record in records:
        assert {"time", "level", "namespace", "message"} <= record.keys()
    access = [r for r in records if r["namespace"] == "amaters.access"]
    assert len(access) == 1, access
    (event,) = access
    assert event["level"] == "debug"
    assert (event["op"], event["collection"], event["status"]) == ("set", "users", "ok")
    assert event["principal"] == "anonymous" and event["duration_ms"] >= 0
    assert "secret" not in server.log()
    assert not any('"GET /health' in r["message"] for r in records)
    assert any(r["message"] == "Storage backend memory closed" for r in records), (
        "shutdown lines are JSON too"
    )


def test_log_file_with_rotation_settings(tmp_path: Path, servers: list[ServerProcess]) -> None:
    """With logging.file the server's lines go to that file (rotated by size) instead of stdout."""
    log_file = tmp_path / "logs" / "amaters.log"
    server = launch(tmp_path, servers, f"logging.file={log_file}", "logging.max_files=2")
    server.start().wait_ready()
    assert server.stop() == 0
    written = log_file.read_text()
    assert "Listening for the native protocol" in written
    assert "Listening for the native protocol" not in server.log()


def test_ops_site_over_https(tmp_path: Path, servers: list[ServerProcess]) -> None:
    """With web.tls.enabled the probes answer over HTTPS with the server's generated certificate."""
    server = launch(tmp_path, servers, "web.tls.enabled=true")
    server.start()
    context = ssl.create_default_context()
    url = f"https://127.0.0.1:{server.web_port}/readyz"
    code = None
    for _ in range(600):
        assert server.process is not None and server.process.poll() is None, server.log()
        if server.ca_cert.exists():
            context = ssl.create_default_context(cafile=str(server.ca_cert))
            context.check_hostname = False
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as response:
                    code = response.status
                    break
            except (OSError, ssl.SSLError):
                pass
        time.sleep(0.05)
    assert code == 200, server.log()
    assert server.stop() == 0


class JSONFromTheStart(ServerProcess):
    """twistd with ``--logger=amaters.ops.logging.twistd_json_observer``."""

    def argv(self) -> list[str]:
        argv = super().argv()
        return [*argv[:3], "--logger=amaters.ops.logging.twistd_json_observer", *argv[3:]]


def test_twistd_logger_option_makes_every_line_json(tmp_path: Path, servers: list[ServerProcess]) -> None:
    """With twistd's --logger set to our JSON observer, even twistd's first and last lines are JSON."""
    server = JSONFromTheStart(tmp_path, settings=["storage.backend=memory", "logging.format=json"])
    servers.append(server)
    server.start().wait_ready()
    assert server.stop() == 0
    lines = server.log().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0]["namespace"].startswith("twisted.scripts")
    assert records[-1]["message"] == "Server Shut Down."
