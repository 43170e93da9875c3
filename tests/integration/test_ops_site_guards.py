"""The ops site against a real ``twistd -n amaters`` (auth off, the default), over raw sockets and
urllib: the admin API's CSRF header, Host allow-list and loopback rule, no CORS on /admin, request
bodies capped and screened before they are read, and a connection cap that keeps probes answering
under a flood of idle connections."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ServerProcess
from rawwire import open_fds, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(
        tmp_path / "server",
        ["tls.enabled=false", 'web.cors.allowed_origins=["*"]', "web.max_connections=64"],
    )
    with s.running():
        yield s


def call(
    server: ServerProcess,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.web_port}{path}", method=method, headers=headers or {}, data=data
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def raw_exchange(server: ServerProcess, head: bytes, body: bytes = b"") -> bytes:
    """Send ``head`` (and ``body``), read until the server closes; the bytes it answered."""
    s = socket.create_connection(("127.0.0.1", server.web_port), timeout=10)
    try:
        s.sendall(head)
        if body:
            try:
                s.sendall(body)
            except OSError:
                pass  # the server closed first: what it answered is still readable
        answer = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        return answer
    finally:
        s.close()


def test_cross_site_admin_requests_are_refused(server: ServerProcess) -> None:
    """A text/plain POST from another origin (what a page can send without a preflight) gets 403
    naming the header it lacks; the same request with X-Amaters-Admin succeeds."""
    page = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    status, _, body = call(server, "POST", "/admin/compact", page, b"x")
    assert status == 403 and b"X-Amaters-Admin" in body
    status, _, _ = call(server, "POST", "/admin/compact", {"X-Amaters-Admin": "1"})
    assert status == 200


def test_dns_rebinding_host_names_are_refused(server: ServerProcess) -> None:
    """A request naming another host (a rebound DNS name) gets 403 naming web.allowed_hosts;
    localhost, 127.0.0.1 and [::1] are accepted."""
    status, _, body = call(
        server, "GET", "/admin/status", {"X-Amaters-Admin": "1", "Host": "evil.example:80"}
    )
    assert status == 403 and b"web.allowed_hosts" in body
    for host in ("localhost", f"127.0.0.1:{server.web_port}", "[::1]:1"):
        status, _, _ = call(server, "GET", "/admin/status", {"X-Amaters-Admin": "1", "Host": host})
        assert status == 200, host


def test_cors_never_applies_to_the_admin_api(server: ServerProcess) -> None:
    """With web.cors.allowed_origins = ["*"], probes carry Access-Control-Allow-Origin but no /admin
    answer does, preflight included."""
    origin = {"Origin": "http://evil.example"}
    _, headers, _ = call(server, "GET", "/readyz", origin)
    assert headers.get("access-control-allow-origin") == "*"
    preflight = {
        **origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-amaters-admin",
    }
    status, headers, _ = call(server, "OPTIONS", "/admin/compact", preflight)
    assert status >= 400 and "access-control-allow-origin" not in headers
    status, headers, _ = call(server, "GET", "/admin/status", {**origin, "X-Amaters-Admin": "1"})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_large_bodies_are_refused_before_they_are_read(server: ServerProcess) -> None:
    """A 512 MB Content-Length gets 413 as soon as the headers are in (on any path and method), and
    an admin request without the CSRF header gets 403 without the server waiting for its body."""
    for request_line in (b"POST /admin/compact HTTP/1.1", b"PUT /readyz HTTP/1.1"):
        head = (
            request_line + b"\r\nHost: localhost\r\nX-Amaters-Admin: 1\r\nContent-Length: 536870912\r\n\r\n"
        )
        answer = raw_exchange(server, head, b"\0" * (1024 * 1024))
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"web.max_request_body_bytes" in answer
    head = b"POST /admin/compact HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n"
    answer = raw_exchange(server, head)  # no body sent at all: the answer cannot wait for it
    assert answer.startswith(b"HTTP/1.1 403") and b"X-Amaters-Admin" in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "auth_insufficient_permissions"


def test_an_idle_connection_flood_leaves_probes_and_admin_answering(server: ServerProcess) -> None:
    """1,100 idle connections to the ops site (web.max_connections = 64): the server never holds more
    than about 64 of them, and /readyz and an admin call are answered within a second."""
    assert server.process is not None
    pid = server.process.pid
    before = open_fds(pid)
    flood: list[socket.socket] = []
    try:
        for _ in range(1100):
            s = socket.socket()
            s.settimeout(10.0)
            s.connect(("127.0.0.1", server.web_port))
            flood.append(s)
        time.sleep(0.5)
        held = open_fds(pid) - before
        started = time.monotonic()
        # Each call fails if it is not answered within a second.
        status, _, _ = call(server, "GET", "/readyz", timeout=1.0)
        admin, _, _ = call(server, "GET", "/admin/status", {"X-Amaters-Admin": "1"}, timeout=1.0)
        elapsed = time.monotonic() - started
        print(
            f"\n/readyz and /admin/status under 1,100 idle ops connections: {elapsed * 1000:.0f} ms, {held} fds held"
        )
        assert status == 200 and admin == 200
        assert held <= 64 + 8
    finally:
        for s in flood:
            s.close()
    assert wait_for(lambda: open_fds(pid) <= before + 2, 10.0)
