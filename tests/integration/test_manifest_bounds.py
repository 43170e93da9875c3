"""Snapshot archives whose manifest is deeply nested or holds numbers out of range are listed with
one clear line saying why, by the running server's admin API and by ``amaters snapshot list``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest
from harness import ServerProcess

pytestmark = pytest.mark.integration


def _archive(path: Path, manifest: bytes) -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))


def test_hostile_manifests_are_refused_with_one_line(tmp_path: Path) -> None:
    """A manifest nested 100,000 deep and one holding 1e400 as a file size: GET /admin/snapshots
    answers 200 listing both with their problem, and `amaters snapshot list` prints one line each,
    no traceback."""
    server = ServerProcess(tmp_path / "server", ["tls.enabled=false"])
    server.start().wait_ready()
    try:
        directory = server.data_dir / "snapshots"
        directory.mkdir(parents=True, exist_ok=True)
        _archive(directory / "amaters-20250101T000000.000Z.tar", b"[" * 100_000 + b"]" * 100_000)
        big = {
            "manifest_version": 1,
            "kind": "amaters-snapshot",
            "name": "x",
            "format": 1,
            "amaters_version": "0",
            "created_at": "now",
            "compression": "none",
            "collections": None,
            "files": [{"path": "db/CURRENT", "size": 1, "sha256": "0" * 64}],
        }
        text = json.dumps(big).replace('"size": 1', '"size": 1e400').encode()
        _archive(directory / "amaters-20250102T000000.000Z.tar", text)
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.web_port}/admin/snapshots", headers={"X-Amaters-Admin": "1"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            listed = json.loads(response.read())
        problems = [entry.get("problem") for entry in listed["snapshots"]]
        assert any(p and "nested more than 16 levels deep" in p for p in problems), listed
        assert any(p and "1e400 is not an integer" in p for p in problems), listed
        done = subprocess.run(
            [sys.executable, "-m", "amaters.cli", "snapshot", "list", "--config", str(server.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = done.stdout + done.stderr
        assert "Traceback" not in output, output
        assert "nested more than 16 levels deep" in output and "1e400" in output, output
        assert "Traceback" not in server.log()
    finally:
        server.stop()
        server.cleanup()
