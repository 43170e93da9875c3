"""The open-file limit against a real ``twistd -n amaters`` started with a low RLIMIT_NOFILE
(soft 1,024, hard 4,096, the usual Linux defaults).

- The server raises its soft limit to the hard one at start.
- 1,100 idle native connections (more than the soft limit it was started with, and more than
  ``limits.max_connections``) leave ``/readyz`` answering within a second, and a real client is
  still served once they are gone.
- A configuration whose connection caps and storage files exceed the hard limit is refused at start
  with one line that names the settings.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from harness import ServerProcess, http_get
from rawwire import logged_in, open_fds, wait_for

pytestmark = pytest.mark.integration


def _soft_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open-file limit")


def test_a_flood_of_idle_connections_leaves_readyz_answering(tmp_path: Path) -> None:
    """1,100 idle connections against a server started with a soft limit of 1,024: the limit is
    raised to 4,096, connections past limits.max_connections are closed, and /readyz answers 200
    within one second."""
    server = ServerProcess(
        tmp_path / "server",
        [
            "tls.enabled=false",
            "limits.max_connections=1000",
            "limits.max_connections_per_ip=0",
            "limits.handshake_timeout=120",
        ],
    )
    server.start(open_files=(1024, 4096)).wait_ready()
    flood: list[socket.socket] = []
    try:
        assert server.process is not None
        pid = server.process.pid
        assert _soft_limit(pid) == 4096
        for i in range(1100):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i % 50}", 0))
            s.settimeout(10.0)
            s.connect(("127.0.0.1", server.port))  # done once the kernel queued it for accept
            flood.append(s)
        # Wait (bounded) until the server has accepted what it will keep.
        assert wait_for(lambda: open_fds(pid) >= 1000, 20.0), open_fds(pid)
        time.sleep(0.5)
        started = time.monotonic()
        # Fails (timeout) if /readyz is not answered within a second.
        status, _ = http_get(f"http://127.0.0.1:{server.web_port}/readyz", timeout=1.0)
        elapsed = time.monotonic() - started
        print(
            f"\n/readyz under 1,100 idle connections: {status} in {elapsed * 1000:.0f} ms, {open_fds(pid)} fds"
        )
        assert status == 200
        for s in flood:
            s.close()
        flood.clear()
        assert wait_for(lambda: open_fds(pid) < 200, 20.0)
        logged_in(server.port).close()
    finally:
        for s in flood:
            s.close()
        server.stop()
        server.cleanup()


def test_caps_beyond_the_hard_open_file_limit_are_refused_at_start(tmp_path: Path) -> None:
    """With a hard limit of 1,024, the default caps (10,000 connections) are refused at start with
    one line naming limits.max_connections and the limit."""
    server = ServerProcess(tmp_path / "server")
    server.start(open_files=(1024, 1024))
    try:
        code = server.wait_exit(30)
        assert code != 0
        log = server.log()
        assert "more than the open-file limit of 1024" in log, log
        assert "Traceback" not in log
        lines = [line for line in log.splitlines() if "open-file limit" in line]
        assert len(lines) == 1 and "limits.max_connections" in lines[0]
    finally:
        server.cleanup()
