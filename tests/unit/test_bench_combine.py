"""``bench.loadgen.combine``: windows of one load pooled as one window as long as all of them."""

from __future__ import annotations

import array
import json

import pytest

from bench.loadgen import LoadResult, combine, percentile
from bench.scenarios import cpu_per_op


def _window(
    ops: int, elapsed: float, cpu: float, latencies: list[float], rss: tuple[float, float, float]
) -> LoadResult:
    return LoadResult(
        label="w",
        spec={"connections": 50},
        ops=ops,
        completed_total=ops + 10,
        elapsed_s=elapsed,
        ops_per_s=ops / elapsed,
        errors=1,
        error_samples=["timeout"],
        ops_by_kind={"get": ops},
        server_cpu_pct=cpu,
        generator_cpu_pct=100.0,
        machine_cpu_pct=150.0,
        server_rss_mb_start=rss[0],
        server_rss_mb_end=rss[1],
        server_rss_mb_max=rss[2],
        generator_processes=2,
        latencies=array.array("d", latencies),
    )


def test_windows_combine_as_one_window() -> None:
    fast = _window(10_000, 5.0, 80.0, [0.001] * 90 + [0.010] * 10, (60.0, 62.0, 63.0))
    slow = _window(6_000, 5.0, 60.0, [0.002] * 50 + [0.030] * 50, (62.0, 61.0, 70.0))
    both = combine([fast, slow], "get amaters")
    assert (both.ops, both.elapsed_s, both.ops_per_s) == (16_000, 10.0, 1600.0)
    assert both.completed_total == 16_020 and both.errors == 2 and both.error_samples == ["timeout"]
    assert both.ops_by_kind == {"get": 16_000}
    pooled = sorted([0.001] * 90 + [0.010] * 10 + [0.002] * 50 + [0.030] * 50)
    assert both.p50_ms == round(percentile(pooled, 0.5) * 1000, 3)
    assert both.p99_ms == 30.0 and both.max_ms == 30.0
    # CPU per operation is the summed CPU over the summed operations.
    assert both.server_cpu_pct == 70.0
    cpu_seconds = 0.80 * 5.0 + 0.60 * 5.0
    assert cpu_per_op(both.server_cpu_pct, both.ops_per_s) == pytest.approx(
        cpu_seconds / 16_000 * 1e6, abs=0.1
    )
    assert (both.server_rss_mb_start, both.server_rss_mb_end, both.server_rss_mb_max) == (60.0, 61.0, 70.0)
    assert "latencies" not in both.to_dict()
    json.dumps(both.to_dict())  # what results.json holds


def test_windows_of_different_lengths_are_weighted_by_length() -> None:
    short = _window(1_000, 1.0, 90.0, [0.001], (1.0, 1.0, 1.0))
    long = _window(9_000, 9.0, 50.0, [0.001], (1.0, 1.0, 1.0))
    both = combine([short, long], "x")
    assert both.server_cpu_pct == 54.0
    assert both.ops_per_s == 1000.0


def test_a_window_without_server_cpu_leaves_it_unmeasured() -> None:
    measured = _window(100, 1.0, 50.0, [0.001], (1.0, 1.0, 1.0))
    unmeasured = _window(100, 1.0, 50.0, [0.001], (1.0, 1.0, 1.0))
    unmeasured.server_cpu_pct = None
    assert combine([measured, unmeasured], "x").server_cpu_pct is None
    with pytest.raises(ValueError):
        combine([], "x")
