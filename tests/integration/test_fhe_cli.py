"""The FHE walk-through of docs/fhe.md, typed as a user would, against a real server over TLS."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ServerProcess

pytestmark = pytest.mark.integration
HAVE_CONCRETE = importlib.util.find_spec("concrete") is not None


def amaters(server: ServerProcess, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "amaters.cli", "--server", f"127.0.0.1:{server.port}"]
    argv += ["--ca", str(server.ca_cert), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize(
    "evaluator",
    [
        "cleartext-insecure",
        pytest.param(
            "concrete",
            # About 4 minutes of CLI processes each loading the keys: run with -m slow.
            marks=[pytest.mark.slow, pytest.mark.skipif(not HAVE_CONCRETE, reason="needs amaters[fhe]")],
        ),
    ],
)
def test_fhe_walkthrough_from_the_shell(tmp_path: Path, evaluator: str) -> None:
    """keygen, upload, set records, filter, update, filter and get: the docs' commands work and
    print what the docs show; mistakes get one line and exit 2."""
    text = f'[storage]\nbackend = "memory"\n[fhe]\nevaluator = "{evaluator}"\n'
    if evaluator != "concrete":
        text += "allow_insecure = true\n"
    server = ServerProcess(tmp_path / "server", config_text=text)
    server.start(env={"OMP_NUM_THREADS": "1"}).wait_ready(60)
    try:
        keygen = subprocess.run(
            [
                sys.executable,
                "-m",
                "amaters.cli",
                "fhe",
                "keygen",
                "--schema",
                "age:8,balance:16",
                "--out",
                "my.fhe",
                "--evaluator",
                evaluator,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert keygen.returncode == 0, keygen.stderr
        assert (tmp_path / "my.fhe").stat().st_mode & 0o777 == 0o600
        up = amaters(server, tmp_path, "--fhe-keys", "my.fhe", "fhe", "upload")
        assert up.returncode == 0 and "uploaded key set" in up.stdout, up.stderr
        again = amaters(server, tmp_path, "--fhe-keys", "my.fhe", "fhe", "upload")
        assert again.returncode == 0 and "already on the server" in again.stdout
        people = {"alice": "age=42,balance=1000", "bob": "age=17,balance=0", "carol": "age=65,balance=0"}
        for name, record in people.items():
            done = amaters(server, tmp_path, "--fhe-keys", "my.fhe", "set", "people", name, record)
            assert done.returncode == 0, done.stderr
        found = amaters(
            server, tmp_path, "--fhe-keys", "my.fhe", "filter", "people", "age > 30 and not balance == 0"
        )
        assert found.returncode == 0, found.stderr
        assert found.stdout == "alice\tage=42,balance=1000\n"
        updated = amaters(
            server, tmp_path, "--fhe-keys", "my.fhe", "update", "people", "balance == 0", "balance+=5"
        )
        assert updated.returncode == 0 and updated.stdout == "3 encrypted rows rewritten\n", updated.stderr
        found = amaters(
            server, tmp_path, "--fhe-keys", "my.fhe", "filter", "people", "balance < 10 or age <= 17"
        )
        assert found.stdout.splitlines() == ["bob\tage=17,balance=5", "carol\tage=65,balance=5"]
        got = amaters(server, tmp_path, "--fhe-keys", "my.fhe", "get", "people", "alice")
        assert got.stdout == "age=42,balance=1000\n"
        bad = amaters(server, tmp_path, "--fhe-keys", "my.fhe", "filter", "people", "age >> 3")
        assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "Traceback" not in bad.stderr
        bad = amaters(server, tmp_path, "--fhe-keys", "my.fhe", "set", "people", "dave", "age=300,balance=1")
        assert bad.returncode == 2 and "outside 0..255" in bad.stderr
        nokeys = amaters(server, tmp_path, "filter", "people", "age > 1")
        assert nokeys.returncode == 2 and "--fhe-keys" in nokeys.stderr
    finally:
        server.stop()
