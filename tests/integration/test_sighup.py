"""SIGHUP reload on a real server: TLS rotation without dropping connections; invalid files refused."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from harness import ServerProcess

from amaters.tls.certs import generate_ca, issue_certificate

pytestmark = pytest.mark.integration


def write_server_cert(directory: Path, ca_key: object, ca_cert: x509.Certificate, cn: str) -> str:
    """Issue a server certificate for 127.0.0.1 into directory/server.{pem,key}; return its fingerprint."""
    key, cert = issue_certificate(
        ca_key,  # type: ignore[arg-type]
        ca_cert,
        cn,
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1",),
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp_key, tmp_cert = directory / "server.key.new", directory / "server.pem.new"
    tmp_key.write_bytes(key_pem)
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # Replace atomically, as a certificate manager would.
    tmp_key.replace(directory / "server.key")
    tmp_cert.replace(directory / "server.pem")
    return cert.fingerprint(hashes.SHA256()).hex()


def served_fingerprint(port: int, ca: Path, alpn: str | None = None) -> str:
    """The SHA-256 fingerprint of the certificate openssl s_client sees on a new connection."""
    extra = ["-alpn", alpn] if alpn else []
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            str(ca),
            "-verify_return_error",
            *extra,
        ],
        input=b"",
        capture_output=True,
        timeout=30,
    )
    assert b"Verify return code: 0 (ok)" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    pem = result.stdout[result.stdout.index(b"-----BEGIN CERTIFICATE-----") :]
    pem = pem[: pem.index(b"-----END CERTIFICATE-----") + len(b"-----END CERTIFICATE-----")]
    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path, object, x509.Certificate]]:
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    ca_key, ca_cert = generate_ca("rotation test CA")
    (tls_dir / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write_server_cert(tls_dir, ca_key, ca_cert, "first")
    server = ServerProcess(
        tmp_path / "srv",
        config_text=(
            f'[tls]\ncert = "{tls_dir / "server.pem"}"\nkey = "{tls_dir / "server.key"}"\n'
            '[storage]\nbackend = "memory"\n'
        ),
    )
    try:
        server.start().wait_ready()
        yield server, tls_dir, ca_key, ca_cert
    finally:
        server.cleanup()


@pytest_twisted.ensureDeferred
async def test_certificate_rotation_on_sighup(
    tls_server: tuple[ServerProcess, Path, object, x509.Certificate],
) -> None:
    """After SIGHUP new connections (native and gRPC) get the new certificate, while a connection
    opened before still answers."""
    from twisted.internet import reactor

    from amaters.client import connect

    server, tls_dir, ca_key, ca_cert = tls_server
    ca = tls_dir / "ca.pem"
    first = served_fingerprint(server.port, ca)
    assert served_fingerprint(server.grpc_port, ca, "h2") == first  # gRPC serves the same certificate
    old = await connect(reactor, "127.0.0.1", server.port, ca_cert=str(ca))
    try:
        await old.set("rotation", b"k", b"before")
        second_expected = write_server_cert(tls_dir, ca_key, ca_cert, "second")
        server.signal(signal.SIGHUP)
        server.wait_for_log("TLS certificate reloaded")
        assert served_fingerprint(server.port, ca) == second_expected != first
        assert served_fingerprint(server.grpc_port, ca, "h2") == second_expected
        # The connection made before the rotation keeps working.
        await old.set("rotation", b"k", b"after")
        assert await old.get("rotation", b"k") == b"after"
        fresh = await connect(reactor, "127.0.0.1", server.port, ca_cert=str(ca))
        try:
            assert await fresh.get("rotation", b"k") == b"after"
        finally:
            await fresh.close()
    finally:
        await old.close()


def test_broken_certificate_keeps_the_old_one(
    tls_server: tuple[ServerProcess, Path, object, x509.Certificate],
) -> None:
    """A new key that does not match the certificate is refused; the old certificate keeps serving."""
    server, tls_dir, _, _ = tls_server
    ca = tls_dir / "ca.pem"
    before = served_fingerprint(server.port, ca)
    other_key, _ = generate_ca("unrelated")
    (tls_dir / "server.key").write_bytes(
        other_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (tls_dir / "server.pem").write_bytes((tls_dir / "server.pem").read_bytes() + b"\n")
    server.signal(signal.SIGHUP)
    server.wait_for_log("Reload refused")
    assert "kept the old one" in server.log()
    assert served_fingerprint(server.port, ca) == before
    assert served_fingerprint(server.grpc_port, ca, "h2") == before


def test_invalid_config_file_is_refused(
    tls_server: tuple[ServerProcess, Path, object, x509.Certificate],
) -> None:
    """An invalid config on SIGHUP is refused with its problems logged; the server keeps serving."""
    server, _tls_dir, _, _ = tls_server
    text = server.config_path.read_text()
    server.config_path.write_text(text + '[logging]\nlevel = "loud"\n')
    server.signal(signal.SIGHUP)
    server.wait_for_log("Reload refused, configuration invalid")
    assert "logging.level: 'loud' is not allowed" in server.log()
    assert server.readyz() == 200


@pytest_twisted.ensureDeferred
async def test_reload_applies_log_level_and_rate_limit(tmp_path: Path) -> None:
    """SIGHUP on a running server applies a new logging level (debug access events appear) and a
    new per-client rate limit (a burst gets retryable SERVER_OVERLOADED with retry_after); a later
    invalid file changes neither."""
    from twisted.internet import reactor

    from amaters.client import connect
    from amaters.errors import Overloaded

    base = '[storage]\nbackend = "memory"\n[tls]\nenabled = false\n'
    server = ServerProcess(tmp_path, config_text=base + '[logging]\nlevel = "info"\n')
    try:
        server.start().wait_ready()
        client = await connect(reactor, "127.0.0.1", server.port, plaintext=True)
        try:
            for i in range(30):
                await client.set("c", b"k%d" % i, b"v")
            assert " set c ok " not in server.log()  # no debug access events at info

            text = server.config_path.read_text().replace(
                '[logging]\nlevel = "info"\n',
                '[logging]\nlevel = "debug"\n[rate_limit]\nper_client_rps = 5\nper_client_burst = 5\n',
            )
            server.config_path.write_text(text)
            server.signal(signal.SIGHUP)
            server.wait_for_log("Reloaded configuration; changed:")
            changed = [line for line in server.log().splitlines() if "Reloaded configuration" in line][-1]
            assert "logging.level" in changed and "rate_limit.per_client_rps" in changed

            refused: list[Overloaded] = []
            for i in range(20):
                try:
                    await client.set("c", b"burst%d" % i, b"v")
                except Overloaded as e:
                    refused.append(e)
            assert refused, "the new rate limit was not applied"
            assert all(e.retryable and e.retry_after_ms for e in refused)
            server.wait_for_log("by anonymous")  # a debug access event: the new level is live

            # An invalid file is refused and the running settings stay as they were.
            server.config_path.write_text(text.replace("per_client_rps = 5", "per_client_rps = -1"))
            server.signal(signal.SIGHUP)
            server.wait_for_log("Reload refused, configuration invalid")
            with pytest.raises(Overloaded):
                for i in range(20):
                    await client.set("c", b"again%d" % i, b"v")
        finally:
            await client.close()
        assert server.stop() == 0
    finally:
        server.cleanup()
