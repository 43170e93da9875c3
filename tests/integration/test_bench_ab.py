"""``python -m bench ab OLD NEW`` runs amaters from two trees in turn and compares them.

What is checked is that each side really ran its own tree (a copy with another version number),
that the rounds alternate which tree goes first, and that bad trees get a one-line error: timings
on a shared machine are not something a test can assert.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _ab(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bench", "ab", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_each_tree_runs_its_own_amaters_in_alternating_rounds(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "amaters", copy / "amaters", ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "amaters" / "__init__.py"
    text = init.read_text()
    start = text.index('__version__ = "')
    end = text.index('"', start + len('__version__ = "'))
    init.write_text(text[:start] + '__version__ = "0.0.0+abtest' + text[end:])
    out = tmp_path / "out"
    completed = _ab(
        str(copy),
        "--match",
        "get-100B-P1",
        "--rounds",
        "2",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--out",
        str(out),
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((out / "ab.json").read_text())
    assert report["old"]["version"] == "0.0.0+abtest" and report["old"]["build"] == "interpreted"
    assert report["new"]["tree"] == "installed" and report["new"]["version"] != "0.0.0+abtest"
    assert len(report["old"]["cpu_us_per_op"]["get-100B-P1"]) == 2
    assert len(report["new"]["ops_per_s"]["get-100B-P1"]) == 2
    runs = [
        line.split()[0] for line in completed.stdout.splitlines() if "µs/op" in line and "get-100B-P1" in line
    ]
    assert runs[:4] == [str(copy), "installed", "installed", str(copy)]
    assert any(line.startswith("get-100B-P1") for line in completed.stdout.splitlines())


@pytest.mark.parametrize(
    ("tree", "error"),
    [
        ("no-such-revision-xyz", "neither a directory nor a revision"),
        (".github-missing-dir", "neither a directory nor a revision"),
        ("docs", "a directory without an amaters package"),
    ],
)
def test_a_tree_that_cannot_be_used_is_one_line(tree: str, error: str) -> None:
    completed = _ab(tree, "--match", "get-100B-P1", "--rounds", "1")
    assert completed.returncode == 2
    assert completed.stderr.strip().count("\n") == 0 and error in completed.stderr
    assert "Traceback" not in completed.stderr
