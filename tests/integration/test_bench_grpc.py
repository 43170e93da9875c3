"""``python -m bench grpc`` runs both protocols against real servers and leaves nothing behind.

Only that every load completes without errors, from the generator processes asked for, is checked:
timings on a shared machine are not something a test can assert.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_grpc_bench_spreads_each_load_over_its_generators(tmp_path: Path) -> None:
    """Two calls in flight from two generator processes (one each), a GET and a SET, native and
    gRPC: every row counts operations and no error, the gRPC rows say two generators ran, the
    ratios come out, and the temporary directory is gone afterwards."""
    out = tmp_path / "grpc.json"
    command = [sys.executable, "-m", "bench", "grpc", "-d", "0.5", "-k", "50", "-c", "2", "-r", "1"]
    command += ["--ops", "get", "set", "--generators", "2", "--json", str(out)]
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 6 and result["generators"] == 2
    for row in rows:
        assert row["ops"] > 0 and row["errors"] == 0, row
    assert [row["generators"] for row in rows if row["protocol"] == "grpc"] == [2, 2]
    assert len(result["ratios"]) == 2
    assert "ratios (same run)" in completed.stdout
    assert not list(tmp_path.glob("amaters-grpc-bench-*"))
