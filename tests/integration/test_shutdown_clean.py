"""A shutdown that runs out of time ends with one clear error line and exit status 1, never a
traceback (``ReactorNotRunning`` or a cancelled stop): the real ``twistd -n amaters``."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import ServerProcess
from rawwire import logged_in

pytestmark = pytest.mark.integration


def test_a_timed_out_shutdown_logs_no_traceback(tmp_path: Path) -> None:
    """With server.shutdown_timeout = 0.001 and five connections open, SIGTERM stops the server with
    exit status 1, the log names the service still stopping and holds no traceback."""
    server = ServerProcess(tmp_path / "server", ["tls.enabled=false", "server.shutdown_timeout=0.001"])
    server.start().wait_ready()
    sockets = [logged_in(server.port) for _ in range(5)]
    try:
        code = server.stop()
        log = server.log()
        assert code == 1, log
        assert "Traceback" not in log and "ReactorNotRunning" not in log, log
        assert "was still stopping when the shutdown timed out" in log
        assert "Shutdown failed: listener: still stopping when the shutdown timed out" in log
    finally:
        for s in sockets:
            s.close()
        server.cleanup()
