"""Benchmark output: ``results.json`` (a list of scenarios), ``run.json``, ``results.md`` and a plot.

Every scenario in ``results.json`` has at least ``name``, ``ops_per_s``, ``p50_ms``, ``p99_ms``,
``reference``, ``reference_ops_per_s`` and ``ratio`` (null where a scenario has no such number:
startup and recovery are measured in seconds, RSS in MB).  ``run.json`` says when, where and how the
numbers were measured.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("name", "ops_per_s", "p50_ms", "p99_ms", "reference", "reference_ops_per_s", "ratio")


def _number(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def _met(value: Any) -> str:
    if value is None:
        return ""
    return "MET" if value else "NOT MET"


def _detail(item: dict[str, Any]) -> str:
    """The scenario-specific numbers that the common columns do not show."""
    parts = []
    if item.get("writes_per_fsync") is not None:
        parts.append(f"{item['writes_per_fsync']:.1f} writes/fsync")
    if item.get("writes_per_fsync_syscall") is not None:
        parts.append(f"{item['writes_per_fsync_syscall']:.1f} writes/fsync syscall")
    if item.get("mb_per_s") is not None:
        parts.append(f"{item['mb_per_s']:.1f} MB/s")
    if item.get("rss_growth_mb") is not None:
        parts.append(f"RSS +{item['rss_growth_mb']:.1f} MB")
    if item.get("second_scan_rss_growth_mb") is not None:
        parts.append(
            f"warm-cache rescan {item.get('second_scan_mb_per_s') or 0:.1f} MB/s, RSS"
            f" +{item['second_scan_rss_growth_mb']:.1f} MB"
        )
    if item.get("startup_cold_s") is not None:
        parts.append(f"cold start {item['startup_cold_s']:.2f} s")
    if item.get("recovery_s") is not None:
        parts.append(
            f"recovery {item['recovery_s']:.2f} s after kill -9 with {item.get('data_mb', 0):,.0f} MB"
        )
    if item.get("restart_with_data_s") is not None and item.get("name") == "startup":
        parts.append(f"restart with data {item['restart_with_data_s']:.2f} s")
    if item.get("all_acknowledged_present") is not None:
        parts.append("all keys present" if item["all_acknowledged_present"] else "KEYS MISSING")
    if item.get("rss_mb_per_million_keys") is not None:
        parts.append(
            f"{item['rss_mb_per_million_keys']:.0f} MB per 1M keys"
            f" (reference {_number(item.get('reference_rss_mb_per_million_keys'))})"
        )
    if item.get("server_cpu_pct") is not None:
        parts.append(f"server CPU {item['server_cpu_pct']:.0f}%")
    if item.get("server_cpu_us_per_op") is not None:
        reference = item.get("reference_server_cpu_us_per_op")
        parts.append(
            f"{item['server_cpu_us_per_op']:.0f} µs CPU/op" + (f" (ref {reference:.0f})" if reference else "")
        )
    if item.get("cpu_us_per_op_over_nondurable") is not None:
        floor = item.get("reference_cpu_us_per_op_over_nondurable")
        parts.append(
            f"{item['cpu_us_per_op_over_nondurable']:+.0f} µs CPU/op vs sync=none"
            + (f" (reference server {floor:+.0f})" if floor is not None else "")
        )
        bare = item.get("bare_sync_floor_us")
        if bare:
            parts.append(
                f"barest Python server {bare.get('append', 0):+.0f} (log written over {bare.get('overwrite', 0):+.0f})"
            )
    if item.get("generator_cpu_pct") is not None:
        parts.append(f"gen CPU {item['generator_cpu_pct']:.0f}%")
    if item.get("errors"):
        parts.append(f"{item['errors']} errors")
    if item.get("error"):
        parts.append(f"FAILED: {item['error']}")
    return "; ".join(parts)


def rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The table's rows (header first)."""
    table = [
        [
            "scenario",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "reference",
            "ref ops/s",
            "ratio",
            "target",
            "met",
            "details",
        ]
    ]
    for item in results:
        table.append(
            [
                item["name"],
                _number(item.get("ops_per_s")),
                _number(item.get("p50_ms"), 2),
                _number(item.get("p99_ms"), 2),
                item.get("reference", "") or "",
                _number(item.get("reference_ops_per_s")),
                _number(item.get("ratio"), 2),
                item.get("target", "") or "",
                _met(item.get("target_met")),
                _detail(item),
            ]
        )
    return table


def table(results: Sequence[dict[str, Any]]) -> str:
    """A plain-text table for the terminal (long columns are shortened)."""
    data = [
        [cell if len(cell) <= 48 else cell[:45] + "..." for cell in row[:-1]] + [row[-1]]
        for row in rows(results)
    ]
    widths = [max(len(row[i]) for row in data) for i in range(len(data[0]) - 1)]
    lines = []
    for index, row in enumerate(data):
        cells = [
            cell.ljust(width) if i in (0, 4, 7, 8) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join(cells) + "  " + row[-1])
        if index == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def markdown(results: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results as a Markdown table with the run's date and machine."""
    machine = meta.get("machine", {})
    out = [
        f"Measured {meta.get('date', '?')} ({meta.get('mode', '?')} run, {meta.get('seconds', '?')} s) on"
        f" {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('memory_gib', '?')} GiB;"
        f" Python {machine.get('python', '?')}, Twisted {machine.get('twisted', '?')}, amaters"
        f" {machine.get('amaters', '?')}.  Load average before/after: {meta.get('load_average_before')} /"
        f" {meta.get('load_average_after')}.",
        "",
    ]
    data = rows(results)
    out.append("| " + " | ".join(data[0]) + " |")
    out.append("|" + "|".join("---" for _ in data[0]) + "|")
    for row in data[1:]:
        out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    notes = meta.get("notes") or []
    if notes:
        out.append("")
        out.extend(f"- {note}" for note in notes)
    return "\n".join(out) + "\n"


def plot(results: Sequence[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Throughput and latency per scenario, amaters next to its reference (log scales).  False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = [r for r in results if r.get("ops_per_s")]
    if not measured:
        return False
    names = [r["name"] for r in measured]
    positions = list(range(len(names)))
    height = 0.38
    figure, (throughput, latency) = plt.subplots(
        1, 2, figsize=(15, max(4.0, 0.45 * len(names) + 1.5)), sharey=True
    )
    throughput.barh(
        [p - height / 2 for p in positions], [r["ops_per_s"] for r in measured], height, label="amaters"
    )
    throughput.barh(
        [p + height / 2 for p in positions],
        [r.get("reference_ops_per_s") or 0 for r in measured],
        height,
        label="reference",
    )
    for p, r in zip(positions, measured, strict=True):
        if r.get("ratio") is not None:
            throughput.annotate(
                f"{r['ratio']:.2f}x", (r["ops_per_s"], p - height / 2), fontsize=7, va="center"
            )
    throughput.set_xscale("log")
    throughput.set_xlabel("operations/s (log)")
    throughput.set_yticks(positions, names)
    throughput.invert_yaxis()
    throughput.legend(loc="lower right", fontsize=8)
    throughput.set_title("throughput")
    for offset, key, label in (
        (-0.3, "p50_ms", "amaters p50"),
        (-0.1, "p99_ms", "amaters p99"),
        (0.1, "reference_p50_ms", "reference p50"),
        (0.3, "reference_p99_ms", "reference p99"),
    ):
        values = [r.get(key) or 0 for r in measured]
        latency.barh([p + offset for p in positions], values, 0.2, label=label)
    latency.set_xscale("log")
    latency.set_xlabel("latency ms (log)")
    latency.legend(loc="lower right", fontsize=8)
    latency.set_title("latency")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write(out: Path, results: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write results.json, run.json, results.md and results.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(list(results), indent=2, default=str) + "\n")
    (out / "run.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(results, meta))
    machine = meta.get("machine", {})
    title = (
        f"amaters bench ({meta.get('mode', '?')}), {meta.get('date', '?')}, {machine.get('cores', '?')} cores;"
        " ratio = amaters / reference ops/s (fsync-rate and range-stream have no reference)"
    )
    plot(results, out / "results.png", title)
