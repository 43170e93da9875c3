"""``python -m bench ab OLD [NEW]``: one server's CPU per request, two trees, alternating runs.

A full run's ratios move by up to 0.06 between runs on a busy or virtual machine, more than most
single changes are worth.  To tell a change from that noise, this runs amaters from two trees in
turn under the same protocol scenarios (the suite's, over TLS, with an API key, RBAC and metrics
on, memory backend), ``--rounds`` times, swapping which tree goes first each round, and prints
each scenario's median server CPU per request and ops/s with their ranges.

OLD and NEW are git revisions of the repository holding ``bench`` (exported with ``git archive``)
or directories holding an ``amaters`` package; without NEW, the amaters installed here.  A tree
is put first on the server's ``PYTHONPATH``; the load generators are always this checkout's.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen
from bench.loadgen import LoadSpec, Target
from bench.scenarios import PROTOCOL_SCENARIOS, cpu_per_op, fill_keys, make_api_key
from bench.servers import BENCH_ROOT, AmatersServer, build_info


class ABError(Exception):
    """A tree that cannot be used; the message says which and why."""


@dataclass
class Tree:
    """One side of the comparison: a label and the directory put on the server's path (None: the
    installed amaters)."""

    label: str
    path: Path | None
    #: The version its server reported (``amaters_build_info``): shows which tree really ran.
    version: str = "?"
    #: Whether its request path ran compiled (``amaters_build_info``'s ``build`` label).
    build: str = "?"
    cpu: dict[str, list[float]] = field(default_factory=dict)
    ops: dict[str, list[float]] = field(default_factory=dict)


def resolve_tree(spec: str, work: Path) -> Tree:
    """A directory holding ``amaters/``, or a git revision exported under ``work``."""
    candidate = Path(spec)
    if candidate.is_dir():
        if not (candidate / "amaters" / "__init__.py").exists():
            raise ABError(f"{spec}: a directory without an amaters package")
        return Tree(spec, candidate.resolve())
    repo = BENCH_ROOT
    rev = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if rev.returncode != 0:
        raise ABError(f"{spec}: neither a directory nor a revision of {repo}")
    commit = rev.stdout.strip()
    target = work / commit[:12]
    if not target.exists():
        target.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", commit, "amaters", "twisted"], capture_output=True
        )
        if archive.returncode != 0:
            raise ABError(f"{spec}: git archive failed: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return Tree(f"{spec} ({commit[:9]})", target)


def run_tree(tree: Tree, scenarios: Sequence[tuple[str, str, int, int]], args: argparse.Namespace) -> None:
    """Start amaters from ``tree``, fill the collections, run every scenario once."""
    work = Path(tempfile.mkdtemp(prefix="ab-", dir=args.out))
    auth, api_key = make_api_key(work / "auth")
    server = AmatersServer(
        work / "amaters",
        {"storage.backend": "memory", "tls.enabled": True, **auth},
        label=f"amaters {tree.label}",
        pythonpath=tree.path,
    )
    with server:
        server.start()
        labels = build_info(server.metrics() or "")
        tree.version, tree.build = labels.get("version", "?"), labels.get("build", "?")
        target = Target(port=server.port, ca_cert=server.ca_cert, api_key=api_key)
        for size in sorted({size for _, _, size, _ in scenarios}):
            fill_keys(target, f"v{size}", args.keyspace, size, server.pid, f"fill v{size}")
        for name, op, size, depth in scenarios:
            spec = LoadSpec(
                connections=50,
                pipeline=depth,
                value_size=size,
                keyspace=args.keyspace,
                collection=f"v{size}",
                mix=((op, 1.0),),
                duration=args.duration,
                warmup=args.warmup,
            )
            result = loadgen.run(
                "load", target, spec, workers=args.workers, server_pid=server.pid, label=name
            )
            per_op = cpu_per_op(result.server_cpu_pct, result.ops_per_s)
            if result.errors or per_op is None:
                raise ABError(f"{tree.label} {name}: {loadgen.summary_line(result)}")
            tree.cpu.setdefault(name, []).append(per_op)
            tree.ops.setdefault(name, []).append(result.ops_per_s)
            print(
                f"  {tree.label:24s} {name:14s} {per_op:6.1f} µs/op  {result.ops_per_s:9,.0f} ops/s",
                flush=True,
            )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def spread(values: Sequence[float]) -> str:
    """``median (min–max)``."""
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def summary(old: Tree, new: Tree, names: Sequence[str]) -> list[str]:
    """The table: per scenario, each tree's CPU per request and ops/s, and the median change."""
    lines = [
        f"{'scenario':14s}  {'old µs/op':20s}  {'new µs/op':20s}  {'change':>7s}  {'old ops/s':>10s}  {'new ops/s':>10s}"
    ]
    for name in names:
        before, after = old.cpu.get(name), new.cpu.get(name)
        if not before or not after:
            continue
        change = (statistics.median(after) / statistics.median(before) - 1.0) * 100.0
        lines.append(
            f"{name:14s}  {spread(before):20s}  {spread(after):20s}  {change:+6.1f}%"
            f"  {statistics.median(old.ops[name]):10,.0f}  {statistics.median(new.ops[name]):10,.0f}"
        )
    return lines


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench ab", description=__doc__.splitlines()[0])
    parser.add_argument("old", help="git revision or directory holding amaters/")
    parser.add_argument("new", nargs="?", default=None, help="the same (default: the installed amaters)")
    parser.add_argument("--match", nargs="+", default=["*"], help="scenario patterns (default: all eight)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--keyspace", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=None, help="work directory and ab.json (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the servers' directories")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be at least 1 and --duration positive")
    args.out = (args.out or Path(tempfile.mkdtemp(prefix="bench-ab-"))).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    scenarios = [s for s in PROTOCOL_SCENARIOS if any(fnmatch.fnmatch(s[0], p) for p in args.match)]
    if not scenarios:
        parser.error(
            f"no scenario matches {' '.join(args.match)}; they are {', '.join(s[0] for s in PROTOCOL_SCENARIOS)}"
        )
    try:
        old = resolve_tree(args.old, args.out / "trees")
        new = resolve_tree(args.new, args.out / "trees") if args.new else Tree("installed", None)
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}", flush=True)
            for tree in (old, new) if round_ % 2 == 0 else (new, old):
                run_tree(tree, scenarios, args)
    except (ABError, RuntimeError) as e:
        print(f"bench ab: {e}", file=sys.stderr)
        return 2
    names = [s[0] for s in scenarios]
    print(
        f"old: {old.label}, server version {old.version} ({old.build});"
        f" new: {new.label}, server version {new.version} ({new.build})"
    )
    print("\n".join(summary(old, new, names)))
    report = {
        "old": {
            "tree": old.label,
            "version": old.version,
            "build": old.build,
            "cpu_us_per_op": old.cpu,
            "ops_per_s": old.ops,
        },
        "new": {
            "tree": new.label,
            "version": new.version,
            "build": new.build,
            "cpu_us_per_op": new.cpu,
            "ops_per_s": new.ops,
        },
        "rounds": args.rounds,
        "duration": args.duration,
    }
    (args.out / "ab.json").write_text(json.dumps(report, indent=2))
    print(f"results: {args.out / 'ab.json'}")
    return 0
