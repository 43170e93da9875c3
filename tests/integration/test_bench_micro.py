"""``python -m bench micro --sequential`` measures lone writes in-process, durable or not.

Only that it completes with every answer successful and prints its per-thread breakdown is checked:
timings on a shared machine are not something a test can assert.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _micro(*args: str, tmp: Path | None = None) -> str:
    command = [sys.executable, "-m", "bench", "micro", "--op", "set", *args]
    env = None if tmp is None else {**os.environ, "TMPDIR": str(tmp)}
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


def test_sequential_unsynced_writes_give_the_reactor_its_turns() -> None:
    """Writes answered at once (sync none) still let the reactor run between them, so its lag stays
    low and load shedding admits every request (it refused most of them when the loop held the
    reactor for whole rounds).  The shedding limit is lowered so that a round held in one turn would
    exceed it even on a fast machine."""
    out = _micro(
        "--backend",
        "rocksdb",
        "--sync",
        "none",
        "--sequential",
        "-n",
        "20000",
        "--rounds",
        "2",
        "--config",
        "limits.shed_lag_ms=200",
    )
    assert "sync=none" in out and "µs CPU/request (whole process)" in out
    assert "thread MainThread:" in out


def test_sequential_durable_writes_report_the_wal_thread(tmp_path: Path) -> None:
    """A lone durable write's CPU is split by thread: the reactor's and the WAL thread's fsyncs,
    for amaters and then for the reference server on RocksDB under the same writes.  The run's
    work directory (both servers' data) is removed at the end."""
    out = _micro(
        "--backend", "rocksdb", "--sync", "always", "--sequential", "-n", "300", "--rounds", "1", tmp=tmp_path
    )
    assert "sync=always" in out
    assert "thread MainThread:" in out and "thread amaters-wal:" in out
    reference = out.split("reference server on RocksDB, the same requests:", 1)[1]
    assert "thread MainThread:" in reference and "thread reference-wal:" in reference
    assert re.search(r"µs CPU/request \(whole process\), reference [\d.]+", out), out
    assert list(tmp_path.iterdir()) == []


def test_reads_in_tls_record_pieces_are_all_answered_and_counted() -> None:
    """``--record`` hands each pipelined read over in pieces of one TLS record, inside the read
    scope the listener's TLS layer gives; the run fails unless every request is answered
    successfully.  ``--opcodes`` prints the calls and instructions per request of both servers."""
    out = _micro(
        "-v", "4096", "-p", "16", "--record", "16384", "-n", "640", "--rounds", "1", "--opcodes", "320"
    )
    counts = re.findall(r"([\d.]+) Python calls and ([\d.]+) bytecode instructions per request", out)
    assert len(counts) == 2, out  # amaters, then the reference
    (calls, instructions), (ref_calls, ref_instructions) = ((float(a), float(b)) for a, b in counts)
    assert 0 < ref_calls < calls and 0 < ref_instructions < instructions, out
    assert "set P=16 V=4096" in out


def test_counted_synced_writes_are_answered_before_the_measurement(tmp_path: Path) -> None:
    """``--opcodes`` on synced writes: the counted requests are answered once their sync ends, turns
    later; the measurement that follows sees only its own answers (it failed with more answers
    than requests when they arrived during it)."""
    out = _micro(
        "--backend",
        "rocksdb",
        "--sync",
        "always",
        "-p",
        "1",
        "-n",
        "400",
        "--rounds",
        "1",
        "--opcodes",
        "200",
        tmp=tmp_path,
    )
    assert len(re.findall(r"Python calls and [\d.]+ bytecode instructions per request", out)) == 2, out
    assert re.search(r"set P=1 V=100 auth=\w+ metrics=on: amaters [\d.]+ µs/request", out), out
