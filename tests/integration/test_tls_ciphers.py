"""TLS 1.2 offers only ECDHE key exchange with AEAD suites, on the native listener and on the ops
site: ``openssl s_client -tls1_2 -cipher ...`` against the real ``twistd -n amaters``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from harness import ServerProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

GOOD = "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-CHACHA20-POLY1305"
REFUSED = {
    "CBC with ECDHE": "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES256-SHA384:ECDHE-ECDSA-AES256-SHA384",
    "static RSA key exchange, AEAD": "AES128-GCM-SHA256:AES256-GCM-SHA384",
    "static RSA key exchange, CBC": "AES128-SHA:AES256-SHA256",
    "finite-field DHE": "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES128-SHA",
}


def negotiated(port: int, ciphers: str) -> str | None:
    """The cipher a TLS 1.2 handshake offering only ``ciphers`` settles on (None: it failed)."""
    done = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-tls1_2",
            "-cipher",
            ciphers + ":@SECLEVEL=0",
        ],
        input=b"",
        capture_output=True,
        timeout=20,
    )
    for line in done.stdout.decode(errors="replace").splitlines():
        if "Cipher is" in line:
            cipher = line.rsplit("Cipher is", 1)[1].strip()
            return None if cipher in ("(NONE)", "0000") else cipher
    return None


def test_tls12_accepts_only_ecdhe_with_aead(tmp_path: Path) -> None:
    """A client offering only CBC, static-RSA or DHE suites fails the handshake on both ports; one
    offering ECDHE with AES-GCM or ChaCha20-Poly1305 succeeds."""
    server = ServerProcess(tmp_path / "server", ["storage.backend=memory", "web.tls.enabled=true"])
    server.start()
    try:
        assert server.process is not None
        # /readyz is over HTTPS here: wait for the listener's port with a good handshake instead.
        for _ in range(300):
            if negotiated(server.port, GOOD):
                break
            assert server.process.poll() is None, server.log()
        for port in (server.port, server.web_port):
            good = negotiated(port, GOOD)
            assert good is not None and good.startswith("ECDHE-") and ("GCM" in good or "CHACHA20" in good)
            for what, ciphers in REFUSED.items():
                assert negotiated(port, ciphers) is None, f"{what} was accepted on port {port}"
    finally:
        server.stop()
        server.cleanup()
