"""Names a client chooses reach the server log with their control characters escaped: the real
``twistd -n amaters`` subprocess, a raw handshake carrying ESC, NUL and a newline in its client name."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import ServerProcess
from rawwire import connect, handshake_frame, read_frame, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_control_characters_from_a_client_are_escaped_in_the_log(tmp_path: Path, log_format: str) -> None:
    """The client name "evil<ESC>[31m<NUL>\\nFORGED LINE" is logged as one line with \\x1b, \\x00
    and \\x0a escapes; no raw control byte reaches the log file."""
    log_file = tmp_path / "amaters.log"
    server = ServerProcess(
        tmp_path / "server",
        [
            "tls.enabled=false",
            "storage.backend=memory",
            f"logging.file={log_file}",
            f"logging.format={log_format}",
        ],
    )
    server.start().wait_ready()
    try:
        s = connect(server.port)
        s.sendall(handshake_frame(name="evil\x1b[31m\x00\nFORGED LINE"))
        answer = read_frame(s)
        assert answer is not None and answer.WhichOneof("body") == "handshake_response"
        s.close()
        assert wait_for(
            lambda: log_file.exists() and "FORGED LINE" in log_file.read_text(errors="replace"), 10
        )
        raw = log_file.read_bytes()
        assert b"\x1b" not in raw and b"\x00" not in raw
        (line,) = [text for text in raw.decode().splitlines() if "FORGED LINE" in text]
        assert "evil\\x1b[31m\\x00\\x0aFORGED LINE" in line.replace("\\\\", "\\")
    finally:
        server.stop()
        server.cleanup()
