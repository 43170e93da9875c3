"""The benchmark suite: every scenario of the issue, each measured against its reference in one run.

Blocks (``--only`` takes these names):

``fsync``
    fsyncs/s of the disk under the work directory (the physical limit for one durable writer).
``protocol``
    GET and SET, 100 B and 4 KiB values, C=50 connections, pipeline depth P=1 and P=16, over TLS,
    with authentication (an API key), RBAC and metrics on; amaters on its memory backend, so the
    comparison is of the server stack, not of storage engines.  Each against the reference server
    (``bench/reference_server.py``: same framing, same TLS, a dict) under the same load.
``durable``
    SET 100 B with ``storage.sync = always`` on RocksDB, C=1, 10 and 50, P=1, plain TCP; writes per
    fsync from the server's group-commit histogram (``amaters_storage_group_commit_size``) and from
    counting the process's fsync system calls with ``perf``; against redis-server with
    ``appendfsync always`` (redis-benchmark, same C, P=1, 100 B, plain TCP).  ``nondurable-set-C1``
    is C=1's load on a second server with ``storage.sync = none``: what a synced write adds, in
    server CPU per write, is measured in the same run.
``recovery``
    Cold start on an empty data dir; N keys of 1 KiB written (1 GB; 100 MB with ``--quick``);
    ``kill -9``; time until ``/readyz`` answers again (recovery); a RANGE stream of the whole
    collection over TLS (MB/s of values, server RSS growth during the scan, every acknowledged key
    present); a graceful restart with the data.
``rss``
    Server RSS per million keys of 100 B on the memory backend, against the reference server's dict.

``--quick`` runs every block in a short form (2 s windows, 100k keys instead of 1M) and says so.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import os
import platform
import secrets
import shutil
import socket
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import fsync_rate, loadgen, redis_ref, report, syncfloor
from bench.loadgen import LoadResult, LoadSpec, Target
from bench.servers import (
    AmatersServer,
    ReferenceServer,
    SyscallCounter,
    build_info,
    metric_sum,
    parse_prometheus,
    render_toml,
)

BLOCKS = ("fsync", "protocol", "durable", "recovery", "rss")
REFERENCE_NAME = "reference server (Twisted, same framing + TLS, dict)"
#: How much more server CPU a lone synced write may cost than the same write with ``sync = none``.
DURABLE_CPU_BUDGET_US = 120
#: durable-set-C50 goal: at least this share of the reference server's SET 100 B P=1 ops/s (same run)
#: and at least this many writes per fsync.
DURABLE_C50_SHARE_OF_REFERENCE = 0.6
DURABLE_C50_WRITES_PER_FSYNC = 20


def protocol_goal(pipeline: int) -> float:
    """The least ratio (amaters ÷ the reference server) a protocol scenario of this depth must reach."""
    return 0.85 if pipeline == 1 else 0.80


@dataclass
class Settings:
    """How big and how long: the full run, or ``--quick``."""

    quick: bool
    out: Path
    work: Path
    workers: int = 2
    only: tuple[str, ...] = BLOCKS
    duration: float = 10.0
    warmup: float = 2.0
    #: Protocol scenarios: windows per server, alternated (amaters first, then the reference
    #: first...), ``duration`` split between them.
    rounds: int = 2
    keyspace: int = 10_000
    connections: int = 50
    range_keys: int = 1_000_000
    range_value_size: int = 1024
    rss_keys: int = 1_000_000
    fsync_seconds: float = 3.0
    #: Only the protocol and durable scenarios whose names match one of these (fnmatch); empty: all.
    match: tuple[str, ...] = ()
    #: Settings every amaters server of the run takes over its block's own (``--config``).
    server_config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def selected(self, name: str) -> bool:
        return not self.match or any(fnmatch.fnmatchcase(name, pattern) for pattern in self.match)

    def amaters(self, own: dict[str, Any]) -> dict[str, Any]:
        """An amaters server's settings: the block's ``own``, then ``--config``'s over them."""
        return {**own, **self.server_config}

    @classmethod
    def build(cls, quick: bool, out: Path, work: Path, workers: int, only: tuple[str, ...]) -> Settings:
        settings = cls(quick=quick, out=out, work=work, workers=workers, only=only)
        if quick:
            settings.duration = 2.0
            settings.warmup = 0.5
            settings.rounds = 1
            settings.range_keys = 100_000
            settings.rss_keys = 100_000
            settings.fsync_seconds = 1.0
            settings.notes.append(
                "quick mode: 2 s measured windows after 0.5 s warm-up; RANGE and recovery over 100k keys"
                " of 1 KiB (100 MB) instead of 1M (1 GB); RSS per million keys extrapolated from 100k keys"
            )
        return settings


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return round(value / reference, 3)


def _entry(
    name: str,
    group: str,
    description: str,
    result: LoadResult | None,
    reference: str,
    reference_result: LoadResult | dict[str, Any] | None = None,
    target: str = "",
    met: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One results.json scenario: the required keys first, then details."""
    ref: dict[str, Any] = {}
    if isinstance(reference_result, LoadResult):
        ref = reference_result.to_dict()
    elif reference_result is not None:
        ref = dict(reference_result)
    ops = result.ops_per_s if result is not None else None
    entry: dict[str, Any] = {
        "name": name,
        "group": group,
        "ops_per_s": ops,
        "p50_ms": result.p50_ms if result is not None else None,
        "p99_ms": result.p99_ms if result is not None else None,
        "reference": reference,
        "reference_ops_per_s": ref.get("ops_per_s"),
        "ratio": _ratio(ops, ref.get("ops_per_s")),
        "target": target,
        "target_met": met,
        "description": description,
    }
    if result is not None:
        entry.update(
            p90_ms=result.p90_ms,
            max_ms=result.max_ms,
            errors=result.errors,
            error_samples=result.error_samples,
            server_cpu_pct=result.server_cpu_pct,
            server_rss_mb=result.server_rss_mb_end,
            generator_processes=result.generator_processes,
            generator_cpu_pct=result.generator_cpu_pct,
            machine_cpu_pct=result.machine_cpu_pct,
            bottleneck=result.bottleneck,
            measured_ops=result.ops,
            window_s=result.elapsed_s,
            load=loadgen.LoadSpec(**_spec_fields(result.spec)).describe() if result.spec else "",
        )
    if ref:
        entry.update(
            reference_p50_ms=ref.get("p50_ms"),
            reference_p99_ms=ref.get("p99_ms"),
            reference_errors=ref.get("errors"),
            reference_server_cpu_pct=ref.get("server_cpu_pct"),
            reference_generator_cpu_pct=ref.get("generator_cpu_pct"),
            reference_bottleneck=ref.get("bottleneck"),
        )
    # CPU per operation: steadier than ops/s on a machine shared with other work.
    entry["server_cpu_us_per_op"] = cpu_per_op(entry.get("server_cpu_pct"), ops)
    if ref:
        entry["reference_server_cpu_us_per_op"] = cpu_per_op(ref.get("server_cpu_pct"), ref.get("ops_per_s"))
    entry.update(extra)
    return entry


def cpu_per_op(cpu_pct: float | None, ops_per_s: float | None) -> float | None:
    """Server CPU µs per request from CPU percent of one core and ops/s (None when either is 0)."""
    if not cpu_pct or not ops_per_s:
        return None
    return round(cpu_pct / 100.0 / ops_per_s * 1e6, 1)


def protocol_label(op: str, value_size: int, pipeline: int) -> str:
    """A protocol scenario's name: ``get-100B-P1``, ``set-4KiB-P16``..."""
    return f"{op}-{'100B' if value_size == 100 else '4KiB'}-P{pipeline}"


#: The protocol scenarios, as the suite runs them: (name, operation, value size, pipeline depth).
PROTOCOL_SCENARIOS = tuple(
    (protocol_label(op, size, depth), op, size, depth)
    for op in ("get", "set")
    for size in (100, 4096)
    for depth in (1, 16)
)


def fill_keys(
    target: Target, collection: str, keys: int, value_size: int, server_pid: int, label: str
) -> LoadResult:
    """Write ``keys`` keys of ``value_size`` bytes into ``collection`` in batches; raises unless
    every key was written."""
    spec = LoadSpec(
        connections=4,
        pipeline=2,
        value_size=value_size,
        keyspace=keys,
        collection=collection,
        batch_size=max(1, min(500, (256 * 1024) // max(1, value_size))),
        duration=0,
        warmup=0,
    )
    result = loadgen.run("fill", target, spec, workers=2, server_pid=server_pid, label=label)
    if result.errors or result.ops != keys:
        raise RuntimeError(
            f"{label}: wrote {result.ops} of {keys} keys, {result.errors} errors {result.error_samples[:2]}"
        )
    return result


def _spec_fields(spec: dict[str, Any]) -> dict[str, Any]:
    names = set(LoadSpec.__dataclass_fields__)
    found = {k: v for k, v in spec.items() if k in names}
    if "mix" in found:
        found["mix"] = tuple(tuple(item) for item in found["mix"])
    return found


def _error_entry(name: str, group: str, error: str) -> dict[str, Any]:
    return {
        "name": name,
        "group": group,
        "ops_per_s": None,
        "p50_ms": None,
        "p99_ms": None,
        "reference": "",
        "reference_ops_per_s": None,
        "ratio": None,
        "target": "",
        "target_met": None,
        "error": error,
    }


def make_api_key(directory: Path) -> tuple[dict[str, Any], str]:
    """Server settings for auth with one API key, and the key.  Its role ``bench`` is the built-in
    ``user`` (write on every collection) plus ``create`` on every collection, so it can make the
    collections it fills."""
    from amaters.auth.apikeys import generate_api_key, hash_api_key

    directory.mkdir(parents=True, exist_ok=True)
    pepper = secrets.token_hex(32)
    key_id, key = generate_api_key("bench")
    keys_file = directory / "api-keys.toml"
    keys_file.write_text(
        "[[keys]]\n"
        f'id = "{key_id}"\n'
        'name = "benchmark client"\n'
        f'key_hash = "{hash_api_key(pepper.encode(), key)}"\n'
        'roles = ["bench"]\n'
    )
    os.chmod(keys_file, 0o600)
    roles_file = directory / "roles.toml"
    roles_file.write_text(
        '[roles.bench]\ninherits = ["user"]\npermissions = [{ resource = "collection:*", permission = "create" }]\n'
    )
    settings = {
        "auth.enabled": True,
        "auth.roles_file": str(roles_file),
        "auth.api_keys_file": str(keys_file),
        "auth.api_key_pepper": pepper,
    }
    return settings, key


class Suite:
    """Runs the selected blocks; a failing block is recorded as errors and the rest still run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.results: list[dict[str, Any]] = []
        self.notes: list[str] = list(settings.notes)
        self.fsync: fsync_rate.FsyncRate | None = None

    def run(self) -> None:
        blocks: dict[str, Callable[[], None]] = {
            "fsync": self.block_fsync,
            "protocol": self.block_protocol,
            "durable": self.block_durable,
            "recovery": self.block_recovery,
            "rss": self.block_rss,
        }
        for name in BLOCKS:
            if name not in self.settings.only:
                continue
            _say(f"== {name}")
            started = time.monotonic()
            try:
                blocks[name]()
            except Exception as e:
                _say(traceback.format_exc())
                self.results.append(_error_entry(f"{name} (block failed)", name, f"{type(e).__name__}: {e}"))
            _say(f"== {name} took {time.monotonic() - started:.1f} s")

    def _spec(self, **kwargs: Any) -> LoadSpec:
        s = self.settings
        base: dict[str, Any] = {
            "connections": s.connections,
            "duration": s.duration,
            "warmup": s.warmup,
            "keyspace": s.keyspace,
        }
        base.update(kwargs)
        return LoadSpec(**base)

    # -- blocks -------------------------------------------------------------------------------

    def block_fsync(self) -> None:
        probe = fsync_rate.measure(self.settings.work, self.settings.fsync_seconds)
        self.fsync = probe
        _say(f"  fsync: {probe.fsyncs_per_s:,.0f}/s (p50 {probe.p50_ms} ms, p99 {probe.p99_ms} ms)")
        self.results.append(
            {
                "name": "fsync-rate",
                "group": "fsync",
                "ops_per_s": probe.fsyncs_per_s,
                "p50_ms": probe.p50_ms,
                "p99_ms": probe.p99_ms,
                "reference": "none: the disk's limit for one writer waiting on each fsync",
                "reference_ops_per_s": None,
                "ratio": None,
                "target": "",
                "target_met": None,
                "description": "4 KiB appends + fdatasync in a loop on the work directory's disk",
                "max_ms": probe.max_ms,
                "directory": probe.directory,
            }
        )

    def block_protocol(self) -> None:
        s = self.settings
        auth_settings, api_key = make_api_key(s.work / "protocol-auth")
        amaters = AmatersServer(
            s.work / "protocol-amaters",
            s.amaters({"storage.backend": "memory", "tls.enabled": True, **auth_settings}),
            label="amaters (protocol)",
        )
        reference = ReferenceServer(s.work / "protocol-reference", tls=True)
        with amaters, reference:
            amaters.start()
            reference.start()
            metrics = amaters.metrics()
            security = "TLS, auth (API key, role user + create) + RBAC, metrics " + (
                "on (/metrics served)" if metrics is not None else "NOT served (/metrics missing)"
            )
            _say(f"  amaters: memory backend, {security}; reference: TLS, no auth")
            self.notes.append(
                f"protocol: amaters ran its {build_info(metrics or '').get('build', 'unknown')} build"
                " (amaters_build_info; `pip install .` compiles the request path, an editable install does not)"
            )
            a_target = Target(port=amaters.port, ca_cert=amaters.ca_cert, api_key=api_key)
            r_target = Target(port=reference.port, ca_cert=reference.ca_cert)
            for size in (100, 4096):
                collection = f"v{size}"
                fill_keys(a_target, collection, s.keyspace, size, amaters.pid, f"fill {collection} amaters")
                fill_keys(
                    r_target, collection, s.keyspace, size, reference.pid, f"fill {collection} reference"
                )
            servers = {"amaters": (a_target, amaters.pid), "reference": (r_target, reference.pid)}
            for label, op, size, pipeline in PROTOCOL_SCENARIOS:
                if not s.selected(label):
                    continue
                spec = self._spec(
                    pipeline=pipeline,
                    value_size=size,
                    mix=((op, 1.0),),
                    collection=f"v{size}",
                    duration=s.duration / s.rounds,
                )
                a, r, by_round = self._alternated(label, spec, servers)
                goal = protocol_goal(pipeline)
                ratio = _ratio(a.ops_per_s, r.ops_per_s)
                rounds_detail = {} if s.rounds == 1 else {"ratio_by_round": by_round}
                self.results.append(
                    _entry(
                        label,
                        "protocol",
                        f"{op.upper()} {size} B values, C={s.connections}, P={pipeline}; amaters over {security}"
                        " on the memory backend",
                        a,
                        REFERENCE_NAME,
                        r,
                        target=f">= {goal:.0%} of reference ops/s",
                        met=None if ratio is None else ratio >= goal,
                        security=security,
                        **rounds_detail,
                    )
                )
            final = amaters.metrics()
            if final is not None:
                samples = parse_prometheus(final)
                requests = metric_sum(samples, "amaters_requests_total")
                if requests is not None:
                    self.notes.append(f"protocol: the server's metrics counted {requests:,.0f} requests")

    def block_durable(self) -> None:
        s = self.settings
        server = AmatersServer(
            s.work / "durable-amaters",
            s.amaters({"storage.backend": "rocksdb", "storage.sync": "always", "tls.enabled": False}),
            label="amaters (durable)",
        )
        nondurable = AmatersServer(
            s.work / "nondurable-amaters",
            s.amaters({"storage.backend": "rocksdb", "storage.sync": "none", "tls.enabled": False}),
            label="amaters (sync none)",
        )
        runs: dict[int, tuple[LoadResult, dict[str, Any]]] = {}
        unsynced: LoadResult | None = None
        with server, nondurable:
            server.start()
            target = Target(port=server.port, plaintext=True)
            for clients in (1, 10, 50):
                if not s.selected(f"durable-set-C{clients}"):
                    continue
                runs[clients] = self._durable_run(server, target, clients)
                if clients == 1 and s.selected("nondurable-set-C1"):
                    unsynced = self._nondurable_run(nondurable)
            if unsynced is None and s.selected("nondurable-set-C1"):
                unsynced = self._nondurable_run(nondurable)
        floor = self._reference_sync_cost() if 1 in runs and unsynced is not None else None
        bare = self._bare_sync_floor() if floor is not None else None
        references: dict[int, redis_ref.RedisResult] = {}
        if redis_ref.available():
            with redis_ref.redis_server(s.work) as (port, pid):
                for clients, (result, _) in runs.items():
                    expected = (result.ops_per_s or 1000.0) * max(1.0, s.duration)
                    requests = int(min(500_000, max(500, expected)))
                    found = redis_ref.benchmark(
                        port,
                        ["set"],
                        clients=clients,
                        requests=requests,
                        value_size=100,
                        pipeline=1,
                        server_pid=pid,
                    )
                    references[clients] = found[0]
                    _say(
                        f"  redis appendfsync always SET C={clients}: {found[0].ops_per_s:,.0f} ops/s"
                        f" p50 {found[0].p50_ms} ms p99 {found[0].p99_ms} ms"
                    )
        else:
            self.notes.append("durable: redis-server/redis-benchmark not installed; no redis reference")
        unsynced_cpu = (
            cpu_per_op(unsynced.server_cpu_pct, unsynced.ops_per_s) if unsynced is not None else None
        )
        for clients, (result, details) in runs.items():
            redis = references.get(clients)
            goal, met = "", None
            if clients == 50:
                goal, met = self._durable_c50_goal(result, details)
            if clients == 1 and unsynced is not None:
                synced_cpu = cpu_per_op(result.server_cpu_pct, result.ops_per_s)
                extra = (
                    None
                    if synced_cpu is None or unsynced_cpu is None
                    else round(synced_cpu - unsynced_cpu, 1)
                )
                details["cpu_us_per_op_over_nondurable"] = extra
                if floor is not None:
                    details["reference_cpu_us_per_op_over_nondurable"] = floor
                    details["reference_note"] = (
                        "the same C=1 loads against the reference server on RocksDB, with and without"
                        " a WAL sync before each answer (one thread, flush_wal(True))"
                    )
                if bare is not None:
                    details["bare_sync_floor_us"] = bare
                goal = f"<= nondurable-set-C1 + {DURABLE_CPU_BUDGET_US} µs server CPU per write"
                met = None if extra is None else extra <= DURABLE_CPU_BUDGET_US
            self.results.append(
                _entry(
                    f"durable-set-C{clients}",
                    "durable",
                    f"SET 100 B, C={clients}, P=1, plain TCP, RocksDB storage.sync=always (group commit)",
                    result,
                    f"redis-server appendfsync always (redis-benchmark -t set -c {clients} -P 1 -d 100)"
                    if redis
                    else "redis not available",
                    redis.to_dict() if redis else None,
                    target=goal,
                    met=met,
                    **details,
                )
            )
        if unsynced is not None:
            self.results.append(
                _entry(
                    "nondurable-set-C1",
                    "durable",
                    "SET 100 B, C=1, P=1, plain TCP, RocksDB storage.sync=none: the load of durable-set-C1"
                    " without the fsync, to price what a synced write adds",
                    unsynced,
                    "none: the baseline durable-set-C1's extra CPU per write is measured against",
                )
            )

    def _durable_c50_goal(self, result: LoadResult, details: dict[str, Any]) -> tuple[str, bool | None]:
        """durable-set-C50's goal: >= 20 writes per fsync and >= 0.6 of the reference server's
        SET 100 B P=1 ops/s measured in the same run (the protocol block; without it, not judged).
        Adds ``share_of_reference_set_100B_P1`` to ``details``."""
        target = (
            f">= {DURABLE_C50_WRITES_PER_FSYNC} writes per fsync and >= {DURABLE_C50_SHARE_OF_REFERENCE}"
            " of the reference's SET 100 B P=1"
        )
        reference = next(
            (
                entry.get("reference_ops_per_s")
                for entry in self.results
                if entry.get("name") == "set-100B-P1"
            ),
            None,
        )
        share = _ratio(result.ops_per_s, reference)
        details["share_of_reference_set_100B_P1"] = share
        wpf = details.get("writes_per_fsync") or details.get("writes_per_fsync_syscall")
        if share is None:
            target += " (not measured in this run: add the protocol block)"
        if wpf is None or share is None:
            return target, None
        return target, wpf >= DURABLE_C50_WRITES_PER_FSYNC and share >= DURABLE_C50_SHARE_OF_REFERENCE

    def _durable_run(
        self, server: AmatersServer, target: Target, clients: int
    ) -> tuple[LoadResult, dict[str, Any]]:
        """One durable SET load at C clients: the result and its writes-per-fsync details."""
        s = self.settings
        spec = self._durable_spec(clients)
        before = _group_commit(server.metrics())
        counter = SyscallCounter(server.pid, s.work / f"perf-durable-C{clients}.txt")
        if clients == 1:
            # One writer waits for every write's own fsync: nothing to count, and perf's syscall
            # tracing would add to the server CPU compared with nondurable-set-C1's.
            counter.available = False
        counter.start()
        try:
            result = loadgen.run(
                "load",
                target,
                spec,
                workers=min(s.workers, clients),
                server_pid=server.pid,
                label=f"durable-set-C{clients} amaters",
            )
        finally:
            syscalls = counter.stop()
        after = _group_commit(server.metrics())
        _say("  " + loadgen.summary_line(result))
        details: dict[str, Any] = {"completed_writes": result.completed_total}
        if before is not None and after is not None and after[1] > before[1]:
            writes, syncs = after[0] - before[0], after[1] - before[1]
            details.update(
                writes_per_fsync=round(writes / syncs, 2),
                writes_per_fsync_source="server metrics: amaters_storage_group_commit_size (sum/count)",
                group_commits=int(syncs),
            )
        else:
            details.update(writes_per_fsync=None, writes_per_fsync_source="server metrics not available")
        if syscalls:
            details.update(
                fsync_syscalls=syscalls,
                writes_per_fsync_syscall=round(result.completed_total / syscalls, 2),
            )
        elif not counter.available:
            details.update(fsync_syscalls=None)
            if clients == 1:
                details["fsync_syscalls_note"] = "not counted at C=1 (no tracing while its CPU is measured)"
        if self.fsync is not None:
            details["disk_fsyncs_per_s"] = self.fsync.fsyncs_per_s
        _say(
            f"  writes per fsync: {details.get('writes_per_fsync')} (metrics),"
            f" {details.get('writes_per_fsync_syscall')} (fsync system calls counted by perf)"
        )
        return result, details

    def _reference_sync_cost(self) -> float | None:
        """What a synced write adds to the reference server's CPU per write: durable-set-C1's load
        against it on RocksDB with ``--sync always``, then ``--sync none``.  The floor the
        durable-set-C1 goal is seen against."""
        s = self.settings
        spec = self._durable_spec(1)
        cpu: dict[str, float | None] = {}
        for sync in ("always", "none"):
            reference = ReferenceServer(s.work / f"durable-reference-{sync}", tls=False, sync=sync)
            with reference:
                reference.start()
                target = Target(port=reference.port, plaintext=True)
                result = self._load(target, spec, 1, reference.pid, f"reference sync={sync} C=1")
            cpu[sync] = cpu_per_op(result.server_cpu_pct, result.ops_per_s)
        synced, unsynced = cpu["always"], cpu["none"]
        if synced is None or unsynced is None:
            return None
        extra = round(synced - unsynced, 1)
        _say(f"  the reference's synced write costs {extra} µs more server CPU than its unsynced one")
        return extra

    def _bare_sync_floor(self) -> dict[str, float]:
        """What a synced write handed to a thread adds to the barest Python server's CPU per write
        (``bench/syncfloor.py``), in a log that grows (as the fresh database's WAL of this block
        does) and in one written over (a recycled WAL): the floor under the reference server's."""
        writes = 500 if self.settings.quick else 3000
        found = syncfloor.floors(self.settings.work / "syncfloor", writes=writes)
        bare = {layout: float(entry["thread_extra_us"]) for layout, entry in found.items()}
        _say(
            "  the barest Python server's synced write (a second thread syncs) costs"
            f" +{bare['append']} µs of CPU over its unsynced one in a growing log,"
            f" +{bare['overwrite']} µs in one written over"
        )
        return bare

    def _nondurable_run(self, server: AmatersServer) -> LoadResult:
        """durable-set-C1's load against the same server with ``storage.sync = none``."""
        if server.process is None:
            server.start()
        target = Target(port=server.port, plaintext=True)
        return self._load(target, self._durable_spec(1), 1, server.pid, "nondurable-set-C1 amaters")

    def _durable_spec(self, clients: int) -> LoadSpec:
        """The durable block's load: SET 100 B from ``clients`` connections, one request each."""
        return self._spec(
            connections=clients, pipeline=1, value_size=100, mix=(("set", 1.0),), collection="durable"
        )

    def _alternated(
        self, label: str, spec: LoadSpec, servers: dict[str, tuple[Target, int]]
    ) -> tuple[LoadResult, LoadResult, list[float | None]]:
        """``settings.rounds`` windows of ``spec`` on each of the two ``servers`` (amaters, then
        the reference), taking turns to go first: amaters' windows combined, the reference's
        combined, and each round's ratio.  A load that drifts during the scenario (the machine's
        other work, its clock speed) then weighs on both sides alike instead of on the one that
        ran second."""
        rounds = self.settings.rounds
        windows: dict[str, list[LoadResult]] = {name: [] for name in servers}
        for round_ in range(rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for name in order:
                target, pid = servers[name]
                suffix = f" {round_ + 1}/{rounds}" if rounds > 1 else ""
                windows[name].append(
                    self._load(target, spec, self.settings.workers, pid, f"{label} {name}{suffix}")
                )
        mine, theirs = (windows[name] for name in servers)
        by_round = [_ratio(a.ops_per_s, r.ops_per_s) for a, r in zip(mine, theirs, strict=True)]
        if rounds == 1:
            return mine[0], theirs[0], by_round
        a = loadgen.combine(mine, f"{label} amaters")
        r = loadgen.combine(theirs, f"{label} reference")
        _say(
            f"  {label}: ratio by round "
            + ", ".join("-" if ratio is None else f"{ratio:.3f}" for ratio in by_round)
            + f"; over the {rounds} rounds {_ratio(a.ops_per_s, r.ops_per_s)}"
        )
        return a, r, by_round

    def _load(self, target: Target, spec: LoadSpec, workers: int, server_pid: int, label: str) -> LoadResult:
        """One measured load run against ``target``, its summary line printed."""
        result = loadgen.run("load", target, spec, workers=workers, server_pid=server_pid, label=label)
        _say("  " + loadgen.summary_line(result))
        return result

    def block_recovery(self) -> None:
        s = self.settings
        keys, size = s.range_keys, s.range_value_size
        written_mb = keys * size / 1e6
        server = AmatersServer(
            s.work / "recovery-amaters",
            s.amaters({"storage.backend": "rocksdb", "storage.sync": "always", "tls.enabled": True}),
            label="amaters (recovery)",
        )
        with server:
            server.start()
            cold_start = server.start_seconds
            _say(f"  cold start (empty data dir, TLS files generated): {cold_start:.2f} s")
            target = Target(port=server.port, ca_cert=server.ca_cert)
            fill = fill_keys(target, "range", keys, size, server.pid, "recovery fill")
            fill_mb_s = written_mb / fill.elapsed_s if fill.elapsed_s else None
            _say(
                f"  wrote {keys:,} keys x {size} B = {written_mb:,.0f} MB in {fill.elapsed_s:.1f} s (sync=always)"
            )
            server.kill9()
            server.start(timeout=600)
            recovery = server.start_seconds
            _say(f"  recovery after kill -9: {recovery:.2f} s until /readyz = 200")
            scan = loadgen.run(
                "scan",
                target,
                LoadSpec(
                    connections=1, value_size=size, keyspace=keys, collection="range", duration=0, warmup=0
                ),
                server_pid=server.pid,
                label="range scan",
            )
            mb_per_s = scan.value_bytes / scan.elapsed_s / 1e6 if scan.elapsed_s else None
            growth = (
                scan.server_rss_mb_max - scan.server_rss_mb_start
                if scan.server_rss_mb_max is not None and scan.server_rss_mb_start is not None
                else None
            )
            complete = scan.items == keys
            # Again, now that RocksDB's block cache holds what the first scan read: the difference
            # between the two growths is the cache filling up, not the stream buffering.
            again = loadgen.run(
                "scan",
                target,
                LoadSpec(
                    connections=1, value_size=size, keyspace=keys, collection="range", duration=0, warmup=0
                ),
                server_pid=server.pid,
                label="range scan again",
            )
            again_mb_per_s = again.value_bytes / again.elapsed_s / 1e6 if again.elapsed_s else None
            again_growth = (
                again.server_rss_mb_max - again.server_rss_mb_start
                if again.server_rss_mb_max is not None and again.server_rss_mb_start is not None
                else None
            )
            _say(
                f"  range: {scan.items:,} keys in {scan.elapsed_s:.2f} s = {mb_per_s or 0:,.1f} MB/s of values;"
                f" server RSS {scan.server_rss_mb_start} -> max {scan.server_rss_mb_max} MB"
            )
            _say(
                f"  range again (warm block cache): {again_mb_per_s or 0:,.1f} MB/s;"
                f" server RSS {again.server_rss_mb_start} -> max {again.server_rss_mb_max} MB"
            )
            server.stop()
            server.start(timeout=600)
            restart = server.start_seconds
            _say(f"  graceful restart with the data: {restart:.2f} s")
        self.results.append(
            {
                **_entry(
                    "startup",
                    "recovery",
                    "seconds from process start until /readyz answers 200",
                    None,
                    "none",
                ),
                "startup_cold_s": round(cold_start or 0, 3),
                "restart_with_data_s": round(restart or 0, 3),
                "data_mb": round(written_mb, 1),
            }
        )
        self.results.append(
            {
                **_entry(
                    "recovery-after-kill9",
                    "recovery",
                    f"kill -9 after {written_mb:,.0f} MB acknowledged with sync=always, restart until /readyz is 200,"
                    " then every key read back by the RANGE scan",
                    None,
                    "graceful restart with the same data",
                ),
                "recovery_s": round(recovery or 0, 3),
                "restart_with_data_s": round(restart or 0, 3),
                "data_mb": round(written_mb, 1),
                "keys_written": keys,
                "keys_found_after_recovery": scan.items,
                "all_acknowledged_present": complete,
                "fill_mb_per_s": round(fill_mb_s, 1) if fill_mb_s else None,
                "target_met": complete,
                "target": "every acknowledged key present after kill -9",
            }
        )
        met = None
        if mb_per_s is not None and growth is not None:
            met = mb_per_s >= 50 and growth < 64 and complete
        self.results.append(
            _entry(
                "range-stream",
                "recovery",
                f"one RANGE stream over {keys:,} keys of {size} B (TLS, RocksDB); ops_per_s counts keys",
                scan,
                "none (target: >= 50 MB/s of values, server RSS growth < 64 MB)",
                None,
                target=">= 50 MB/s and RSS growth < 64 MB",
                met=met,
                mb_per_s=round(mb_per_s, 1) if mb_per_s is not None else None,
                rss_growth_mb=round(growth, 1) if growth is not None else None,
                keys_streamed=scan.items,
                value_bytes=scan.value_bytes,
                block_cache_mb=_default_block_cache_mb(),
                second_scan_mb_per_s=round(again_mb_per_s, 1) if again_mb_per_s is not None else None,
                second_scan_rss_growth_mb=round(again_growth, 1) if again_growth is not None else None,
                rss_note="the first scan's growth includes RocksDB's block cache (storage.block_cache_bytes,"
                f" {_default_block_cache_mb():.0f} MB) filling with the blocks it reads; the second scan shows"
                " the stream itself",
            )
        )

    def block_rss(self) -> None:
        s = self.settings
        keys = s.rss_keys
        measured: dict[str, float] = {}
        amaters = AmatersServer(
            s.work / "rss-amaters",
            s.amaters({"storage.backend": "memory", "tls.enabled": False}),
            label="amaters (rss)",
        )
        reference = ReferenceServer(s.work / "rss-reference", tls=False)
        for name, server in (("amaters", amaters), ("reference", reference)):
            with server:
                server.start()
                target = Target(port=server.port, plaintext=True)
                time.sleep(0.3)
                before = server.rss_bytes()
                fill_keys(target, "rss", keys, 100, server.pid, f"rss fill {name}")
                time.sleep(0.5)
                after = server.rss_bytes()
                measured[name] = (after - before) / keys * 1_000_000 / 2**20
                _say(f"  {name}: RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MB for {keys:,} keys")
        self.results.append(
            {
                **_entry(
                    "rss-per-million-keys",
                    "rss",
                    f"server RSS growth per million keys of 100 B (memory backend), from {keys:,} keys",
                    None,
                    "reference server (a dict of serialized values)",
                ),
                "rss_mb_per_million_keys": round(measured["amaters"], 1),
                "reference_rss_mb_per_million_keys": round(measured["reference"], 1),
                "rss_vs_reference": _ratio(measured["amaters"], measured["reference"]),
            }
        )


def _default_block_cache_mb() -> float:
    from amaters.config import StorageConfig

    return float(StorageConfig().block_cache_bytes) / 2**20


def _group_commit(text: str | None) -> tuple[float, float] | None:
    """(writes, fsyncs) so far from the group-commit histogram, or None when not exposed."""
    if text is None:
        return None
    samples = parse_prometheus(text)
    writes = metric_sum(samples, "amaters_storage_group_commit_size_sum")
    syncs = metric_sum(samples, "amaters_storage_group_commit_size_count")
    if writes is None or syncs is None:
        return None
    return writes, syncs


def machine_description() -> dict[str, Any]:
    """What the results were measured on."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import amaters
    import twisted

    return {
        "hostname": socket.gethostname(),
        "cpu": model,
        "cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "amaters": amaters.__version__,
        "platform": platform.platform(),
    }


def _config_item(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as TOML (``250``, ``true``, ``"text"``; a bare word is text)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if "." not in key or not all(part.strip() for part in key.split(".")):
        raise argparse.ArgumentTypeError(f"{text!r}: the key must be section.key (e.g. storage.sync)")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def _config_problems(items: dict[str, Any]) -> list[str]:
    """What the server's own reading of its config file finds wrong with ``--config``'s items (an
    unknown key, a value of the wrong type or out of range), found before any server starts rather
    than as a server that exits before listening, minutes into the run."""
    from amaters.config import read_config

    with tempfile.TemporaryDirectory(prefix="amaters-bench-config-") as directory:
        path = Path(directory) / "config.toml"
        path.write_text(render_toml(items))
        _, problems = read_config(path, (), environ={})
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Run the amaters benchmark suite.")
    parser.add_argument("--quick", action="store_true", help="short version of every scenario (< 3 minutes)")
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default bench-results/<time>)"
    )
    parser.add_argument("--only", nargs="+", choices=BLOCKS, default=list(BLOCKS), help="blocks to run")
    parser.add_argument("--workers", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where servers keep data (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the servers' data dirs and logs")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per load run")
    parser.add_argument("--warmup", type=float, default=None, help="unmeasured seconds before each window")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="protocol scenarios: windows per server, taking turns (default 2, --quick 1)",
    )
    parser.add_argument(
        "--match", nargs="+", default=[], help="only protocol/durable scenarios matching these patterns"
    )
    parser.add_argument("--keys", type=int, default=None, help="keys for the RANGE/recovery and RSS blocks")
    parser.add_argument("--keyspace", type=int, default=None, help="keys the GET/SET scenarios use")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        type=_config_item,
        metavar="KEY=VALUE",
        help='a setting every amaters server of the run takes (repeatable; VALUE in TOML: 250, true, "x")',
    )
    args = parser.parse_args(argv)
    if args.config:
        problems = _config_problems(dict(args.config))
        if problems:
            parser.error("--config: " + "; ".join(problems))

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path("bench-results") / stamp
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="amaters-bench-", dir=args.work_dir))
    settings = Settings.build(args.quick, out, work, max(1, args.workers), tuple(args.only))
    if args.duration is not None:
        settings.duration = args.duration
    if args.warmup is not None:
        settings.warmup = args.warmup
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        settings.rounds = args.rounds
    if args.keys is not None:
        settings.range_keys = settings.rss_keys = args.keys
        settings.notes.append(f"--keys {args.keys}: RANGE, recovery and RSS over {args.keys:,} keys")
    if args.keyspace is not None:
        settings.keyspace = args.keyspace
    settings.match = tuple(args.match)
    if args.config:
        settings.server_config = dict(args.config)
        settings.notes.append(
            "every amaters server ran with "
            + ", ".join(f"{key} = {value!r}" for key, value in settings.server_config.items())
        )
    if settings.match:
        settings.notes.append("--match: only scenarios matching " + ", ".join(settings.match))
    started = time.monotonic()
    began = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    _say(f"amaters bench ({'quick' if args.quick else 'full'}): results in {out}, servers under {work}")
    for note in settings.notes:
        _say(f"  {note}")
    _say(
        f"  load generator: the Twisted client in {settings.workers} processes (multiprocessing, one reactor each);"
        " CPU of generators and server measured over every window"
    )
    suite = Suite(settings)
    try:
        suite.run()
    finally:
        if args.keep:
            _say(f"server data and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    meta = {
        "date": began.isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine_description(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "generator_processes": settings.workers,
        "window_s": settings.duration,
        "warmup_s": settings.warmup,
        "protocol_rounds": settings.rounds,
        "notes": suite.notes,
    }
    report.write(out, suite.results, meta)
    print(report.table(suite.results))
    for note in suite.notes:
        print(f"note: {note}")
    print(f"results: {out / 'results.json'}  plot: {out / 'results.png'}  ({meta['seconds']} s)")
    return 1 if any("error" in item for item in suite.results) else 0
