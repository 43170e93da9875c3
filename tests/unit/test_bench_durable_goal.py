"""The bench judges durable-set-C50 by the goal's own terms: writes per fsync and a share of the
reference server's SET 100 B P=1 measured in the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult
from bench.scenarios import Settings, Suite


def _suite(tmp_path: Path, reference_set_ops: float | None) -> Suite:
    suite = Suite(Settings(quick=True, out=tmp_path, work=tmp_path))
    if reference_set_ops is not None:
        suite.results.append({"name": "set-100B-P1", "reference_ops_per_s": reference_set_ops})
    return suite


def _judge(
    suite: Suite, ops: float, writes_per_fsync: float | None
) -> tuple[str, bool | None, dict[str, Any]]:
    details: dict[str, Any] = {"writes_per_fsync": writes_per_fsync}
    target, met = suite._durable_c50_goal(LoadResult(label="c50", spec={}, ops_per_s=ops), details)
    return target, met, details


def test_met_with_enough_writes_per_fsync_and_share_of_the_reference(tmp_path: Path) -> None:
    target, met, details = _judge(_suite(tmp_path, 10_000.0), 6_500.0, 21.5)
    assert met is True
    assert details["share_of_reference_set_100B_P1"] == 0.65
    assert "0.6 of the reference's SET 100 B P=1" in target


def test_not_met_below_either_bound(tmp_path: Path) -> None:
    assert _judge(_suite(tmp_path, 10_000.0), 5_900.0, 25.0)[1] is False
    assert _judge(_suite(tmp_path, 10_000.0), 9_000.0, 19.0)[1] is False


def test_not_judged_without_the_reference_in_the_run(tmp_path: Path) -> None:
    target, met, details = _judge(_suite(tmp_path, None), 9_000.0, 25.0)
    assert met is None and details["share_of_reference_set_100B_P1"] is None
    assert "not measured in this run" in target
