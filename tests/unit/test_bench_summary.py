"""``python -m bench summary RUN ...``: each judged goal over several runs of the suite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import summary
from bench.__main__ import main as bench_main


def _protocol(name: str, ratio: float) -> dict[str, Any]:
    return {"name": name, "group": "protocol", "ratio": ratio}


def _run(
    directory: Path,
    ratios: dict[str, float],
    c1_extra: float | None = None,
    c1_reference: float | None = None,
    c50: tuple[float, float] | None = None,
    date: str | None = None,
) -> Path:
    """A run directory with a results.json as the suite writes it (the fields summary reads)."""
    directory.mkdir(parents=True)
    scenarios = [_protocol(name, ratio) for name, ratio in ratios.items()]
    if c1_extra is not None:
        scenarios.append(
            {
                "name": "durable-set-C1",
                "group": "durable",
                "ratio": 0.3,
                "cpu_us_per_op_over_nondurable": c1_extra,
                "reference_cpu_us_per_op_over_nondurable": c1_reference,
            }
        )
    if c50 is not None:
        scenarios.append(
            {
                "name": "durable-set-C50",
                "group": "durable",
                "ratio": 0.3,
                "writes_per_fsync": c50[0],
                "share_of_reference_set_100B_P1": c50[1],
            }
        )
    (directory / "results.json").write_text(json.dumps(scenarios))
    if date is not None:
        (directory / "run.json").write_text(json.dumps({"date": date}))
    return directory


def _fields(out: str, goal: str) -> list[str]:
    """The fields of ``goal``'s line after its name: runs, met, median, range, bound..."""
    (line,) = [line for line in out.splitlines() if line.startswith(goal + "  ")]
    return line[len(goal) :].split()


ALL_MET = {
    "get-100B-P1": 0.9,
    "get-100B-P16": 0.85,
    "get-4KiB-P1": 0.85,  # exactly the bound: met
    "get-4KiB-P16": 0.8,
    "set-100B-P1": 0.95,
    "set-100B-P16": 0.9,
    "set-4KiB-P1": 0.9,
    "set-4KiB-P16": 1.1,
}


def test_every_goal_is_counted_and_its_median_judged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = _run(tmp_path / "s1", ALL_MET, 200.0, 180.0, (22.0, 0.8), date="2026-12-06T10:00:00+00:00")
    two = _run(tmp_path / "s2", {**ALL_MET, "set-100B-P1": 0.84}, 150.0, 170.0, (19.5, 0.9))
    three = _run(tmp_path / "s3", {**ALL_MET, "set-100B-P1": 0.80}, 119.0, 160.0, (25.0, 0.7))
    assert bench_main(["summary", str(one), str(two / "results.json"), str(three)]) == 0
    out = capsys.readouterr().out
    # set-100B-P1: 0.95, 0.84, 0.80 -> one run met it, the median 0.84 misses 0.85.
    assert _fields(out, "set-100B-P1 ratio") == ["3", "1", "0.84", "0.8-0.95", ">=", "0.85", "NO"]
    assert _fields(out, "get-4KiB-P1 ratio") == ["3", "3", "0.85", "0.85-0.85", ">=", "0.85", "yes"]
    # The lone durable write: only the third run kept within the budget; the median is 150.
    c1 = _fields(out, "durable-set-C1 µs over nondurable")
    assert c1[:6] == ["3", "1", "150", "119-200", "<=", "120"], c1
    assert " ".join(c1[6:]) == "NO (reference server's median 170)"
    assert _fields(out, "durable-set-C50 writes per fsync")[:3] == ["3", "2", "22"]
    assert _fields(out, "durable-set-C50 share of reference")[:3] == ["3", "3", "0.8"]
    assert "runs that met every goal they measured: 0 of 3" in out
    assert "met by no run" not in out  # each goal was met by one run at least
    assert "s1 (2026-12-06T10:00): missed durable-set-C1 µs over nondurable\n" in out
    assert (
        "s2: missed set-100B-P1 ratio, durable-set-C1 µs over nondurable, durable-set-C50 writes per fsync"
        in out
    )
    assert "s3: missed set-100B-P1 ratio\n" in out + "\n"


def test_a_goal_no_run_met_is_named_with_the_runs_that_met_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = _run(tmp_path / "a", ALL_MET, 200.0, 180.0, (22.0, 0.8))
    two = _run(tmp_path / "b", {**ALL_MET, "get-100B-P1": 0.5}, 190.0, 185.0, (22.0, 0.8))
    assert summary.main([str(one), str(two)]) == 0
    out = capsys.readouterr().out
    assert "runs that met every goal they measured: 0 of 2" in out
    assert "met by no run: durable-set-C1 µs over nondurable; runs that met every other goal: 1 of 2" in out


def test_a_run_without_a_block_is_not_counted_for_its_goals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    protocol_only = _run(tmp_path / "p", ALL_MET)
    durable = _run(tmp_path / "d", {}, 100.0, 150.0, (21.0, 0.7))
    assert summary.main([str(protocol_only), str(durable)]) == 0
    out = capsys.readouterr().out
    assert _fields(out, "get-100B-P1 ratio")[:2] == ["1", "1"]
    assert _fields(out, "durable-set-C1 µs over nondurable")[:2] == ["1", "1"]
    assert "runs that met every goal they measured: 2 of 2" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ('{"ratios": {"get-100B-P1": 0.9}}', "not a results.json (a list of scenarios)"),
    ],
)
def test_a_file_that_is_not_a_run_is_one_line_and_exit_2(
    content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "results.json"
    path.write_text(content)
    assert summary.main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err


def test_a_missing_run_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert summary.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err, err
