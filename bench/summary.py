"""``python -m bench summary RUN [RUN ...]``: each goal over several runs of the suite.

One run of ``python -m bench --only protocol durable`` judges each goal once.  On a shared
2-core machine a protocol ratio moves by up to a third between two rounds of the same scenario in
one run, so a single run says little about whether a goal holds or how far it is.  This reads the
``results.json`` of several runs (the file, or the directory holding it) and prints, for each goal
the suite judges, how many runs measured it and how many met it, the median of the figure it is
judged on and its range, and whether the median meets it; then how many runs met every goal they
measured, and what each run missed.

The figure of each goal is the one the suite judges: the ratio for a protocol scenario (amaters ÷
the reference server, ≥ 0.85 at P=1 and ≥ 0.80 at P=16); for ``durable-set-C1`` the server CPU per
write over ``nondurable-set-C1``'s (≤ the budget, with the reference server's own extra beside it);
for ``durable-set-C50`` its writes per fsync and its share of the reference's SET 100 B P=1.  A run
that did not measure a goal is not counted for it.  The exit status is 0, or 2 with a one-line
message when a file is not a results file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.compare import CompareError, load_results
from bench.scenarios import (
    DURABLE_C50_SHARE_OF_REFERENCE,
    DURABLE_C50_WRITES_PER_FSYNC,
    DURABLE_CPU_BUDGET_US,
    PROTOCOL_SCENARIOS,
    protocol_goal,
)


@dataclass(frozen=True)
class Goal:
    """One judged goal: the scenario and field its figure comes from, and the bound it must keep."""

    name: str
    scenario: str
    field: str
    bound: float
    at_least: bool
    #: A field of the same scenario shown beside the figure (the reference server's own).
    context: str = ""

    def met(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound

    def describe(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.bound:g}"


GOALS = (
    *(
        Goal(f"{label} ratio", label, "ratio", protocol_goal(depth), at_least=True)
        for label, _op, _size, depth in PROTOCOL_SCENARIOS
    ),
    Goal(
        "durable-set-C1 µs over nondurable",
        "durable-set-C1",
        "cpu_us_per_op_over_nondurable",
        DURABLE_CPU_BUDGET_US,
        at_least=False,
        context="reference_cpu_us_per_op_over_nondurable",
    ),
    Goal(
        "durable-set-C50 writes per fsync",
        "durable-set-C50",
        "writes_per_fsync",
        DURABLE_C50_WRITES_PER_FSYNC,
        at_least=True,
    ),
    Goal(
        "durable-set-C50 share of reference",
        "durable-set-C50",
        "share_of_reference_set_100B_P1",
        DURABLE_C50_SHARE_OF_REFERENCE,
        at_least=True,
    ),
)


@dataclass(frozen=True)
class Run:
    """One run's figures: ``{goal name: value}`` for the goals it measured."""

    label: str
    values: dict[str, float]
    context: dict[str, float]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_run(path: Path) -> Run:
    """The goals' figures of the run in ``path`` (a results.json or its directory)."""
    scenarios = {str(item["name"]): item for item in load_results(path)}
    values: dict[str, float] = {}
    context: dict[str, float] = {}
    for goal in GOALS:
        scenario = scenarios.get(goal.scenario)
        if scenario is None:
            continue
        value = _number(scenario.get(goal.field))
        if value is not None:
            values[goal.name] = value
        if goal.context:
            beside = _number(scenario.get(goal.context))
            if beside is not None:
                context[goal.name] = beside
    directory = path if path.is_dir() else path.parent
    return Run(_label(directory), values, context)


def _label(directory: Path) -> str:
    """The run's directory name, with its date when its run.json has one."""
    try:
        date = json.loads((directory / "run.json").read_text()).get("date")
    except (OSError, ValueError, AttributeError):
        date = None
    name = directory.resolve().name
    return f"{name} ({str(date)[:16]})" if date else name


@dataclass(frozen=True)
class Line:
    goal: Goal
    measured: int
    met: int
    median: float | None
    low: float | None
    high: float | None
    context_median: float | None


def summarize(runs: list[Run]) -> list[Line]:
    """One line per goal, over the runs that measured it."""
    lines = []
    for goal in GOALS:
        found = [run.values[goal.name] for run in runs if goal.name in run.values]
        beside = [run.context[goal.name] for run in runs if goal.name in run.context]
        lines.append(
            Line(
                goal,
                len(found),
                sum(1 for value in found if goal.met(value)),
                statistics.median(found) if found else None,
                min(found) if found else None,
                max(found) if found else None,
                statistics.median(beside) if beside else None,
            )
        )
    return lines


def missed(run: Run) -> list[str]:
    """The goals ``run`` measured and did not meet."""
    return [goal.name for goal in GOALS if goal.name in run.values and not goal.met(run.values[goal.name])]


def render(runs: list[Run]) -> str:
    lines = summarize(runs)

    def figure(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}".rstrip("0").rstrip(".")

    width = max(len("goal"), *(len(line.goal.name) for line in lines))
    out = [
        f"{'goal':<{width}}  {'runs':>4}  {'met':>3}  {'median':>8}  {'range':<17}  {'bound':<9}  median meets"
    ]
    for line in lines:
        if not line.measured:
            out.append(
                f"{line.goal.name:<{width}}  {0:>4}  {'-':>3}  {'-':>8}  {'-':<17}  {line.goal.describe():<9}  -"
            )
            continue
        assert line.median is not None
        spread = f"{figure(line.low)}-{figure(line.high)}"
        verdict = "yes" if line.goal.met(line.median) else "NO"
        if line.context_median is not None:
            verdict += f" (reference server's median {figure(line.context_median)})"
        out.append(
            f"{line.goal.name:<{width}}  {line.measured:>4}  {line.met:>3}  {figure(line.median):>8}  {spread:<17}"
            f"  {line.goal.describe():<9}  {verdict}"
        )
    complete = [run for run in runs if run.values and not missed(run)]
    out.append("")
    out.append(f"runs that met every goal they measured: {len(complete)} of {len(runs)}")
    never = [line.goal.name for line in lines if line.measured and not line.met]
    if never:
        others = [run for run in runs if run.values and set(missed(run)) <= set(never)]
        out.append(
            f"met by no run: {', '.join(never)}; runs that met every other goal: {len(others)} of {len(runs)}"
        )
    for run in runs:
        if not run.values:
            out.append(f"  {run.label}: measured none of the goals")
            continue
        misses = missed(run)
        out.append(f"  {run.label}: " + ("met all" if not misses else "missed " + ", ".join(misses)))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench summary", description="Each goal of the suite over several runs."
    )
    parser.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN", help="results.json files or their directories"
    )
    args = parser.parse_args(argv)
    try:
        runs = [read_run(path) for path in args.runs]
    except CompareError as e:
        print(f"python -m bench summary: {e}", file=sys.stderr)
        return 2
    print(render(runs))
    return 0
