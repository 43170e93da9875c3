"""``python -m bench compare [OLD] NEW``: flag every ratio that fell by more than 10 %.

OLD and NEW are each a ``results.json`` written by the suite, the directory holding one, or a
baseline file (``bench/baseline.json``: ``{"ratios": {"get-100B-P1": 0.82, ...}}``).  Without OLD
the checked-in baseline is used.  A scenario is compared when both sides have a ratio (amaters ÷
its reference, measured in the same run); one that fell below ``(1 - tolerance) × old`` is a
regression and makes the exit status 1.  Scenarios only one side measured are listed, not judged.

``python -m bench compare --write-baseline RESULTS`` prints a baseline made from a results file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = Path(__file__).resolve().parent / "baseline.json"
DEFAULT_TOLERANCE = 0.10


class CompareError(Exception):
    """A file that is not a results or baseline file; the message says which and why."""


def _read(path: Path) -> tuple[Path, Any]:
    """The file's path (``results.json`` inside a directory) and its JSON document."""
    if path.is_dir():
        path = path / "results.json"
    try:
        return path, json.loads(path.read_text())
    except OSError as e:
        raise CompareError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise CompareError(f"{path}: not JSON: {e}") from None


def _is_results(data: Any) -> bool:
    return isinstance(data, list) and all(isinstance(item, dict) and "name" in item for item in data)


def load_results(path: Path) -> list[dict[str, Any]]:
    """The scenarios of a results.json (or of the directory holding one), as the suite wrote them."""
    path, data = _read(path)
    if not _is_results(data):
        raise CompareError(f"{path}: not a results.json (a list of scenarios)")
    return list(data)


def load_ratios(path: Path) -> dict[str, float | None]:
    """``{scenario: ratio}`` from a results.json, a directory with one, or a baseline file."""
    path, data = _read(path)
    if isinstance(data, dict) and isinstance(data.get("ratios"), dict):
        items = data["ratios"].items()
        ratios = {str(name): value for name, value in items}
    elif _is_results(data):
        ratios = {str(item["name"]): item.get("ratio") for item in data}
    else:
        raise CompareError(
            f"{path}: neither a results.json (a list of scenarios) nor a baseline ({{'ratios': {{...}}}})"
        )
    for name, value in ratios.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise CompareError(f"{path}: ratio of {name!r} is not a number: {value!r}")
    return {name: (float(value) if value is not None else None) for name, value in ratios.items()}


@dataclass(frozen=True)
class Row:
    """One scenario's comparison; ``verdict`` is ``fell``, ``ok``, ``rose`` or ``not compared``."""

    name: str
    old: float | None
    new: float | None
    change: float | None
    verdict: str


def compare(
    old: Mapping[str, float | None], new: Mapping[str, float | None], tolerance: float = DEFAULT_TOLERANCE
) -> list[Row]:
    """Every scenario of either side, in OLD's order then NEW's new ones."""
    rows = []
    for name in [*old, *(n for n in new if n not in old)]:
        before, after = old.get(name), new.get(name)
        if before is None or after is None or before <= 0:
            rows.append(Row(name, before, after, None, "not compared"))
            continue
        change = after / before - 1.0
        if after < before * (1.0 - tolerance):
            verdict = "fell"
        elif after > before * (1.0 + tolerance):
            verdict = "rose"
        else:
            verdict = "ok"
        rows.append(Row(name, before, after, change, verdict))
    return rows


def render(rows: list[Row], tolerance: float) -> str:
    """A plain-text table and a one-line verdict."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    width = max([len("scenario"), *(len(row.name) for row in rows)])
    lines = [f"{'scenario':<{width}}  {'old':>6}  {'new':>6}  {'change':>7}  verdict"]
    for row in rows:
        change = "-" if row.change is None else f"{row.change:+.1%}"
        verdict = "FELL" if row.verdict == "fell" else row.verdict
        lines.append(
            f"{row.name:<{width}}  {number(row.old):>6}  {number(row.new):>6}  {change:>7}  {verdict}"
        )
    fell = [row.name for row in rows if row.verdict == "fell"]
    compared = sum(1 for row in rows if row.verdict != "not compared")
    if fell:
        lines.append(f"{len(fell)} of {compared} ratios fell by more than {tolerance:.0%}: {', '.join(fell)}")
    else:
        lines.append(f"no ratio fell by more than {tolerance:.0%} ({compared} compared)")
    return "\n".join(lines)


def baseline_from(path: Path) -> dict[str, Any]:
    """A baseline document (every scenario's ratio that was measured) from a results file."""
    ratios = {name: value for name, value in load_ratios(path).items() if value is not None}
    document: dict[str, Any] = {"source": str(path), "ratios": ratios}
    run = (path if path.is_dir() else path.parent) / "run.json"
    if run.exists():
        try:
            meta = json.loads(run.read_text())
            document.update(measured=meta.get("date"), mode=meta.get("mode"))
        except ValueError:
            pass
    return document


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench compare",
        description="Flag every ratio (amaters ÷ reference) that fell by more than the tolerance.",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="[OLD] NEW", help="results or baseline files")
    parser.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE, help="allowed relative fall (default 0.10)"
    )
    parser.add_argument(
        "--write-baseline", action="store_true", help="print a baseline made from the one results file given"
    )
    args = parser.parse_args(argv)
    try:
        if args.write_baseline:
            if len(args.files) != 1:
                parser.error("--write-baseline takes one results file")
            print(json.dumps(baseline_from(args.files[0]), indent=2))
            return 0
        if len(args.files) > 2:
            parser.error("at most two files: OLD and NEW")
        if not 0 <= args.tolerance < 1:
            parser.error("--tolerance must be in [0, 1)")
        old_path, new_path = (BASELINE, args.files[0]) if len(args.files) == 1 else args.files
        rows = compare(load_ratios(old_path), load_ratios(new_path), args.tolerance)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"old: {old_path}\nnew: {new_path}")
    print(render(rows, args.tolerance))
    return 1 if any(row.verdict == "fell" for row in rows) else 0
