"""The benchmark suite runs end to end in a tiny, bounded form and writes well-formed results.

Only structure and sanity are checked (keys present, operations counted, files written): timings on a
shared machine are not something a test can assert.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ("name", "ops_per_s", "p50_ms", "p99_ms", "reference", "reference_ops_per_s", "ratio")


def test_tiny_bench_writes_results_with_every_required_key(tmp_path: Path) -> None:
    """A tiny run of every block writes results.json (a list of scenarios with the required keys),
    run.json, results.md and the plot, and the load scenarios measured operations on both sides."""
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path),
        "--match",
        "get-100B-P1",
        "durable-set-C1",
        "nondurable-set-C1",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--keyspace",
        "200",
        "--keys",
        "2000",
        "--workers",
        "1",
        "--rounds",
        "2",
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]

    results = json.loads((out / "results.json").read_text())
    assert isinstance(results, list)
    for scenario in results:
        missing = [key for key in REQUIRED if key not in scenario]
        assert not missing, (scenario["name"], missing)
        assert "error" not in scenario, scenario
    by_name = {scenario["name"]: scenario for scenario in results}
    assert {
        "fsync-rate",
        "get-100B-P1",
        "durable-set-C1",
        "nondurable-set-C1",
        "startup",
        "recovery-after-kill9",
        "range-stream",
    } <= set(by_name)
    assert "rss-per-million-keys" in by_name

    get = by_name["get-100B-P1"]
    assert get["ops_per_s"] > 0 and get["reference_ops_per_s"] > 0
    assert get["ratio"] > 0
    assert get["errors"] == 0
    assert get["p50_ms"] <= get["p99_ms"]
    assert get["generator_processes"] == 1
    # Two windows per server, taking turns; the ratio is over both rounds together.
    assert len(get["ratio_by_round"]) == 2 and all(ratio > 0 for ratio in get["ratio_by_round"])
    assert min(get["ratio_by_round"]) <= get["ratio"] <= max(get["ratio_by_round"])
    assert "get-100B-P1 reference 2/2" in completed.stderr

    durable = by_name["durable-set-C1"]
    assert durable["ops_per_s"] > 0
    assert durable["writes_per_fsync"] is None or durable["writes_per_fsync"] > 0
    unsynced = by_name["nondurable-set-C1"]
    assert unsynced["ops_per_s"] > 0 and unsynced["errors"] == 0
    # The synced write's extra CPU is derived from both runs of this one invocation.
    assert durable["cpu_us_per_op_over_nondurable"] == pytest.approx(
        durable["server_cpu_us_per_op"] - unsynced["server_cpu_us_per_op"], abs=0.2
    )
    # ... and the reference server's, on RocksDB with and without a WAL sync, beside it.
    assert isinstance(durable["reference_cpu_us_per_op_over_nondurable"], float)
    # ... and the barest Python server's (bench/syncfloor.py), in a growing log and one written over.
    assert sorted(durable["bare_sync_floor_us"]) == ["append", "overwrite"]

    recovery = by_name["recovery-after-kill9"]
    assert recovery["all_acknowledged_present"] is True
    assert recovery["keys_found_after_recovery"] == 2000
    assert by_name["range-stream"]["keys_streamed"] == 2000

    meta = json.loads((out / "run.json").read_text())
    assert meta["mode"] == "quick" and meta["machine"]["cores"] >= 1
    assert meta["protocol_rounds"] == 2
    assert (out / "results.md").read_text().startswith("Measured ")
    assert (out / "results.png").stat().st_size > 0
    assert "get-100B-P1" in completed.stdout
