"""The ``amaters`` client commands against a real ``twistd -n amaters`` subprocess over TLS."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ServerProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "server", settings=["storage.backend=memory"])
    with process.running():
        yield process


def amaters(
    server: ServerProcess, *args: str, stdin: bytes = b"", cwd: Path | None = None, connect: bool = True
) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "amaters.cli", *args]
    if connect:
        argv += ["--server", f"127.0.0.1:{server.port}", "--ca", str(server.ca_cert)]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60, cwd=cwd)


def test_set_get_delete_from_the_shell(server: ServerProcess) -> None:
    """set stores, get prints the raw value, delete removes; a missing key is exit 1 with a message."""
    assert amaters(server, "set", "users", "alice", "hello world").returncode == 0
    got = amaters(server, "get", "users", "alice")
    assert got.returncode == 0 and got.stdout == b"hello world"
    deleted = amaters(server, "delete", "users", "alice")
    assert deleted.returncode == 0 and b"deleted" in deleted.stdout
    missing = amaters(server, "get", "users", "alice")
    assert missing.returncode == 1
    assert missing.stdout == b""
    assert b"not found" in missing.stderr and b"Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_value_from_stdin_and_binary_keys(server: ServerProcess) -> None:
    """`set C K -` reads the value from stdin byte for byte; --hex takes binary keys."""
    payload = bytes(range(256)) * 10
    assert amaters(server, "set", "bin", "00ff7f80", "-", "--hex", stdin=payload).returncode == 0
    got = amaters(server, "get", "bin", "00ff7f80", "--hex")
    assert got.returncode == 0 and got.stdout == payload


def test_range_collections_info_ping(server: ServerProcess) -> None:
    """range lists [START, END) with --limit and --keys-only; collections, info and ping answer."""
    for i in range(20):
        assert amaters(server, "set", "r", f"{i:04d}", f"v{i}").returncode == 0
    listed = amaters(server, "range", "r", "0005", "0015", "--keys-only")
    assert listed.returncode == 0
    assert listed.stdout.decode().split() == [f"{i:04d}" for i in range(5, 15)]
    limited = amaters(server, "range", "r", "0005", "", "--limit", "2")
    assert limited.stdout.decode().splitlines() == ["0005\tv5", "0006\tv6"]
    assert amaters(server, "range", "r", "0015", "0005").stdout == b""
    assert amaters(server, "collections", "create", "extra").stdout.strip() == b"created"
    assert amaters(server, "collections").stdout.decode().split() == ["extra", "r"]
    assert amaters(server, "collections", "drop", "extra").returncode == 0
    info = amaters(server, "info")
    assert info.returncode == 0 and b"protocol:     1.0.0" in info.stdout and b"anonymous" in info.stdout
    ping = amaters(server, "ping")
    assert ping.returncode == 0 and ping.stdout.startswith(b"pong from")


def test_keygen_and_encrypted_values(server: ServerProcess, tmp_path: Path) -> None:
    """keygen writes a key file; with --key-file the server stores ciphertext and get decrypts it."""
    key_file = tmp_path / "me.key"
    made = amaters(server, "keygen", str(key_file), connect=False)
    assert made.returncode == 0 and key_file.exists()
    again = amaters(server, "keygen", str(key_file), connect=False)
    assert again.returncode != 0 and b"refusing" in again.stderr
    assert amaters(server, "set", "s", "k", "top secret", "--key-file", str(key_file)).returncode == 0
    raw = amaters(server, "get", "s", "k")
    assert raw.returncode == 0 and b"top secret" not in raw.stdout
    clear = amaters(server, "get", "s", "k", "--key-file", str(key_file))
    assert clear.stdout == b"top secret"


def test_errors_are_one_line_without_traceback(server: ServerProcess, tmp_path: Path) -> None:
    """Bad input, an untrusted server and a closed port each print one line and exit non-zero."""
    bad = amaters(server, "get", "bad name", "k")
    assert bad.returncode == 1 and b"VALIDATION_INVALID_COLLECTION" in bad.stderr
    untrusted = subprocess.run(
        [sys.executable, "-m", "amaters.cli", "ping", "--server", f"127.0.0.1:{server.port}"],
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert untrusted.returncode == 2 and b"NETWORK_TLS_HANDSHAKE" in untrusted.stderr
    closed = amaters(server, "ping", "--server", "127.0.0.1:1", "--ca", str(server.ca_cert), connect=False)
    assert closed.returncode == 2 and b"refused" in closed.stderr
    for result in (bad, untrusted, closed):
        assert b"Traceback" not in result.stderr


def test_default_ca_is_found_in_the_working_directory(server: ServerProcess) -> None:
    """Run from the server's directory, the CLI trusts ./amaters-data/tls/ca.pem without --ca."""
    workdir = server.directory / "client"
    (workdir / "amaters-data" / "tls").mkdir(parents=True)
    (workdir / "amaters-data" / "tls" / "ca.pem").write_bytes(server.ca_cert.read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "amaters.cli", "ping", "--server", f"127.0.0.1:{server.port}"],
        capture_output=True,
        timeout=60,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
