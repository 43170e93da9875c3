"""``python -m bench compare``: ratios that fell by more than the tolerance fail the comparison."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import compare

ROOT = Path(__file__).resolve().parents[2]


def _results(path: Path, ratios: dict[str, float | None]) -> Path:
    scenarios: list[dict[str, Any]] = [
        {"name": name, "ops_per_s": 1000.0, "ratio": ratio, "reference_ops_per_s": 1000.0}
        for name, ratio in ratios.items()
    ]
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(scenarios))
    return path / "results.json"


def test_a_ratio_that_fell_by_more_than_ten_percent_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _results(tmp_path / "old", {"get-100B-P1": 0.80, "set-100B-P1": 0.80, "startup": None})
    new = _results(tmp_path / "new", {"get-100B-P1": 0.71, "set-100B-P1": 0.73, "startup": None})
    assert compare.main([str(old), str(new)]) == 1
    out = capsys.readouterr().out
    fell = [line for line in out.splitlines() if line.endswith("FELL")]
    assert [line.split()[0] for line in fell] == ["get-100B-P1"]
    assert "1 of 2 ratios fell by more than 10%: get-100B-P1" in out


def test_falls_within_the_tolerance_and_rises_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _results(tmp_path / "old", {"a": 0.80, "b": 0.50, "only-old": 0.9})
    new = _results(tmp_path / "new", {"a": 0.73, "b": 0.70, "only-new": 0.1})
    # Directories holding a results.json are accepted too.
    assert compare.main([str(old.parent), str(new.parent)]) == 0
    rows = {row.name: row for row in compare.compare(compare.load_ratios(old), compare.load_ratios(new))}
    assert rows["a"].verdict == "ok" and rows["a"].change == pytest.approx(-0.0875)
    assert rows["b"].verdict == "rose"
    assert rows["only-old"].verdict == rows["only-new"].verdict == "not compared"
    assert "no ratio fell by more than 10% (2 compared)" in capsys.readouterr().out


def test_tolerance_option(tmp_path: Path) -> None:
    old = _results(tmp_path / "old", {"a": 0.80})
    new = _results(tmp_path / "new", {"a": 0.76})
    assert compare.main([str(old), str(new)]) == 0
    assert compare.main(["--tolerance", "0.02", str(old), str(new)]) == 1


def test_checked_in_baseline_is_the_default_old_side(tmp_path: Path) -> None:
    baseline = compare.load_ratios(compare.BASELINE)
    protocol = [f"{op}-{size}-P{p}" for op in ("get", "set") for size in ("100B", "4KiB") for p in (1, 16)]
    assert set(protocol) <= set(baseline)
    assert all(isinstance(baseline[name], float) and baseline[name] > 0 for name in protocol)
    same = _results(tmp_path / "same", dict(baseline))
    worse = _results(tmp_path / "worse", {**baseline, "get-100B-P16": baseline["get-100B-P16"] * 0.8})  # type: ignore[operator]
    assert compare.main([str(same)]) == 0
    assert compare.main([str(worse)]) == 1


def test_a_baseline_written_from_results_round_trips(tmp_path: Path) -> None:
    results = _results(tmp_path / "run", {"a": 0.8, "b": None})
    document = compare.baseline_from(results)
    assert document["ratios"] == {"a": 0.8}
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(document))
    assert compare.load_ratios(path) == {"a": 0.8}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not JSON"),
        ('{"x": 1}', "neither a results.json"),
        ('{"ratios": {"a": "fast"}}', "ratio of 'a' is not a number"),
    ],
)
def test_bad_files_get_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert compare.main([str(bad), str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert compare.main([str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_command_line_entry(tmp_path: Path) -> None:
    """``python -m bench compare OLD NEW`` exits 1 on a regression and prints the table."""
    old = _results(tmp_path / "old", {"get-100B-P16": 0.6})
    new = _results(tmp_path / "new", {"get-100B-P16": 0.5})
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "compare", str(old), str(new)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 1, completed.stderr
    assert "get-100B-P16" in completed.stdout and "FELL" in completed.stdout
