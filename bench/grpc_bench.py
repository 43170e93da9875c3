"""``python -m bench grpc``: GET and SET over the gRPC front end next to the native protocol.

One real server (``twistd -n amaters``, memory storage, TLS) serves both protocols; a second one
with ``grpc.enabled = false`` gives the native protocol's figures without the gRPC front end, so
the report shows whether serving gRPC costs the native protocol anything.  For every protocol and
concurrency it reports operations per second and the server's CPU time per operation (psutil, over
the measured window), and the ratios gRPC / native measured in the same run.

The native load comes from :mod:`bench.loadgen` (``C`` connections, one request in flight each);
the gRPC load from generator processes running ``C`` concurrent calls between them, each on one
HTTP/2 channel with grpcio's asyncio client (the way a gRPC application would).  Both spread the
load over ``--generators`` processes (2; at most one per call in flight): one grpcio client
process saturates a core before the server does, and the server's figures would then be the
generator's.  Both use 100-byte values over a key
space filled first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench import loadgen
from bench.servers import AmatersServer

COLLECTION = "bench"

#: Load generator processes per measurement, gRPC and native alike (at most one per call in flight).
GENERATORS = 2

# The generator: a separate process so its CPU never counts as the server's.
_GENERATOR = r"""
import asyncio, json, sys, time, zlib
import grpc
from amaters.proto import aql_pb2, query_pb2, types_pb2

port, ca, op, concurrency, seconds, keyspace, size, api_key, first, lanes, start_at = sys.argv[1:12]
metadata = [("x-api-key", api_key)] if api_key else []
concurrency, seconds, keyspace, size = int(concurrency), float(seconds), int(keyspace), int(size)
first, lanes, start_at = int(first), int(lanes), float(start_at)
value = b"x" * size
blob = types_pb2.CipherBlob(data=value, metadata=types_pb2.CipherMetadata(size=size, checksum=zlib.crc32(value)))

def request(i):
    key = types_pb2.Key(data=b"k%09d" % (i % keyspace))
    if op == "get":
        return aql_pb2.QueryRequest(query=query_pb2.Query(get=query_pb2.GetQuery(collection="bench", key=key)))
    return aql_pb2.QueryRequest(query=query_pb2.Query(set=query_pb2.SetQuery(collection="bench", key=key, value=blob)))

async def main():
    credentials = grpc.ssl_channel_credentials(open(ca, "rb").read())
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        call = channel.unary_unary(
            "/amaters.aql.AqlService/ExecuteQuery",
            request_serializer=aql_pb2.QueryRequest.SerializeToString,
            response_deserializer=aql_pb2.QueryResponse.FromString,
        )
        counts = [0] * concurrency
        errors = [0]
        state = {"measure": False, "stop": False}

        async def lane(n):
            i = first + n  # this process's lanes among all generators' (keys spread over all)
            while not state["stop"]:
                r = await call(request(i), metadata=metadata)
                if r.WhichOneof("response") != "result":
                    errors[0] += 1
                if state["measure"]:
                    counts[n] += 1
                i += lanes

        tasks = [asyncio.ensure_future(lane(n)) for n in range(concurrency)]
        late = time.time() > start_at - 0.2  # too little warm-up: the window would be skewed
        await asyncio.sleep(max(0.0, start_at - time.time()))  # warm-up until the shared start
        state["measure"] = True
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        state["measure"] = False
        elapsed = time.perf_counter() - started
        state["stop"] = True
        await asyncio.gather(*tasks)
        print(json.dumps({"ops": sum(counts), "elapsed": elapsed, "errors": errors[0], "late": late}))

asyncio.run(main())
"""


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _processes(generators: int, concurrency: int) -> int:
    """Generator processes for ``concurrency`` calls in flight: ``generators``, at most one per call."""
    return max(1, min(generators, concurrency))


#: Seconds the generators have to start and warm up before the shared measured window.
WARM_UP = 2.5


def grpc_load(
    server: AmatersServer,
    op: str,
    concurrency: int,
    seconds: float,
    keyspace: int,
    api_key: str = "",
    generators: int = GENERATORS,
) -> dict[str, Any]:
    """Run ``concurrency`` calls at a time against ``server`` from up to ``generators`` processes
    (one grpcio client process saturates a core before the server does); ops/s and server CPU per
    op over one window that every generator measures, from a shared start time."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    processes = _processes(generators, concurrency)
    shares = [concurrency // processes + (1 if n < concurrency % processes else 0) for n in range(processes)]
    start_at = time.time() + WARM_UP
    running = []
    first = 0
    for share in shares:
        argv = [sys.executable, "-c", _GENERATOR, str(server.grpc_port), str(server.ca_cert), op]
        argv += [str(share), str(seconds), str(keyspace), "100", api_key, str(first), str(concurrency)]
        argv.append(repr(start_at))
        running.append(subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, text=True))
        first += share
    process = server.psutil()
    time.sleep(max(0.0, start_at - time.time()))
    cpu_start = _cpu_seconds(process)
    time.sleep(max(0.0, start_at + seconds - time.time()))
    cpu_end = _cpu_seconds(process)
    results = []
    for generator in running:
        out, _ = generator.communicate(timeout=120)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if generator.returncode != 0 or not lines:
            raise RuntimeError("a gRPC load generator failed")
        results.append(json.loads(lines[-1]))
    if any(result["late"] for result in results):
        raise RuntimeError(f"a gRPC load generator was not ready {WARM_UP} s after it started")
    ops = sum(int(result["ops"]) for result in results)
    return {
        "ops": ops,
        "ops_per_s": ops / max(result["elapsed"] for result in results),
        "cpu_us_per_op": (cpu_end - cpu_start) / ops * 1e6 if ops else None,
        "errors": sum(int(result["errors"]) for result in results),
        "generators": processes,
    }


def native_load(
    server: AmatersServer,
    op: str,
    concurrency: int,
    seconds: float,
    keyspace: int,
    api_key: str = "",
    generators: int = GENERATORS,
) -> dict[str, Any]:
    """The native protocol under :mod:`bench.loadgen` with the same shape of load, from as many
    generator processes."""
    target = loadgen.Target("127.0.0.1", server.port, server.ca_cert, api_key=api_key or None)
    spec = loadgen.LoadSpec(
        connections=concurrency,
        pipeline=1,
        value_size=100,
        keyspace=keyspace,
        mix=((op, 1.0),),
        duration=seconds,
        warmup=1.0,
        collection=COLLECTION,
    )
    process = server.psutil()
    cpu_before = _cpu_seconds(process)
    workers = _processes(generators, concurrency)
    result = loadgen.run("load", target, spec, workers=workers, server_pid=server.pid, quiet=True)
    cpu_total = _cpu_seconds(process) - cpu_before
    ops_per_s = result.ops_per_s or 0.0
    # loadgen measures the server's CPU over its window (percent of one core).
    cpu_us = (
        (result.server_cpu_pct / 100.0) / ops_per_s * 1e6 if result.server_cpu_pct and ops_per_s else None
    )
    return {
        "ops": result.ops,
        "ops_per_s": ops_per_s,
        "cpu_us_per_op": cpu_us,
        "errors": result.errors,
        "server_cpu_s_whole_run": cpu_total,
    }


def fill(server: AmatersServer, keyspace: int, api_key: str = "") -> None:
    target = loadgen.Target("127.0.0.1", server.port, server.ca_cert, api_key=api_key or None)
    spec = loadgen.LoadSpec(connections=4, value_size=100, keyspace=keyspace, collection=COLLECTION)
    loadgen.run("fill", target, spec, workers=1, quiet=True)


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The best of repeated runs: the machine is shared, and interference only ever slows a run."""
    best = dict(max(runs, key=lambda r: r["ops_per_s"]))
    cpus = [r["cpu_us_per_op"] for r in runs if r["cpu_us_per_op"]]
    best["cpu_us_per_op"] = min(cpus) if cpus else None
    best["runs_ops_per_s"] = [round(r["ops_per_s"]) for r in runs]
    return best


def run(
    seconds: float,
    keyspace: int,
    concurrencies: list[int],
    ops: list[str],
    repeat: int,
    auth: bool = False,
    generators: int = GENERATORS,
) -> dict[str, Any]:
    """Both servers run side by side; each measurement is repeated ``repeat`` times, interleaved
    (native without gRPC, native with gRPC, gRPC), and the best of each is kept."""
    with tempfile.TemporaryDirectory(prefix="amaters-grpc-bench-") as directory:
        rows = _measure(Path(directory), seconds, keyspace, concurrencies, ops, repeat, auth, generators)
    return {
        "seconds": seconds,
        "keyspace": keyspace,
        "repeat": repeat,
        "auth": auth,
        "generators": generators,
        "rows": rows,
        "ratios": ratios(rows),
    }


def _measure(
    work: Path,
    seconds: float,
    keyspace: int,
    concurrencies: list[int],
    ops: list[str],
    repeat: int,
    auth: bool,
    generators: int,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    settings: dict[str, Any] = {"storage.backend": "memory", "web.enabled": True}
    api_key = ""
    if auth:  # every request logs in with an API key (native: once per connection; gRPC: per call)
        from bench.scenarios import make_api_key

        auth_settings, api_key = make_api_key(work / "auth")
        settings |= auth_settings
    with (
        AmatersServer(work / "with-grpc", settings) as both,
        AmatersServer(work / "native-only", settings | {"grpc.enabled": False}) as native_only,
    ):
        both.start()
        native_only.start()
        fill(both, keyspace, api_key)
        fill(native_only, keyspace, api_key)
        for op in ops:
            for c in concurrencies:
                runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": [], "grpc": []}
                for _ in range(repeat):
                    runs["off"].append(
                        native_load(native_only, op, c, seconds, keyspace, api_key, generators)
                    )
                    runs["on"].append(native_load(both, op, c, seconds, keyspace, api_key, generators))
                    runs["grpc"].append(grpc_load(both, op, c, seconds, keyspace, api_key, generators))
                common = {"op": op, "concurrency": c}
                rows.append({"server": "grpc off", "protocol": "native", **common} | _best(runs["off"]))
                rows.append({"server": "grpc on", "protocol": "native", **common} | _best(runs["on"]))
                rows.append({"server": "grpc on", "protocol": "grpc", **common} | _best(runs["grpc"]))
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """gRPC / native (same server) and native with gRPC on / off, per op and concurrency."""

    def find(server: str, protocol: str, op: str, c: int) -> dict[str, Any]:
        return next(
            r
            for r in rows
            if (r["server"], r["protocol"], r["op"], r["concurrency"]) == (server, protocol, op, c)
        )

    out = []
    for row in rows:
        if row["protocol"] != "grpc":
            continue
        op, c = row["op"], row["concurrency"]
        native_on = find("grpc on", "native", op, c)
        native_off = find("grpc off", "native", op, c)
        out.append(
            {
                "op": op,
                "concurrency": c,
                "grpc_vs_native_ops": row["ops_per_s"] / native_on["ops_per_s"],
                "grpc_vs_native_cpu_per_op": (row["cpu_us_per_op"] or 0) / (native_on["cpu_us_per_op"] or 1),
                "native_grpc_on_vs_off_ops": native_on["ops_per_s"] / native_off["ops_per_s"],
                "native_grpc_on_vs_off_cpu_per_op": (native_on["cpu_us_per_op"] or 0)
                / (native_off["cpu_us_per_op"] or 1),
            }
        )
    return out


def report(result: dict[str, Any]) -> str:
    lines = [f"{'server':9} {'protocol':8} {'op':4} {'C':>3} {'ops/s':>9} {'CPU µs/op':>10} {'errors':>6}"]
    for r in result["rows"]:
        cpu = f"{r['cpu_us_per_op']:.0f}" if r["cpu_us_per_op"] else "-"
        lines.append(
            f"{r['server']:9} {r['protocol']:8} {r['op']:4} {r['concurrency']:>3} {r['ops_per_s']:>9.0f}"
            f" {cpu:>10} {r['errors']:>6}"
        )
    lines.append("")
    lines.append(
        "ratios (same run): gRPC/native ops/s, gRPC/native CPU per op; native with gRPC on/off ops/s, CPU per op"
    )
    for q in result["ratios"]:
        lines.append(
            f"  {q['op']} C={q['concurrency']}: {q['grpc_vs_native_ops']:.2f} {q['grpc_vs_native_cpu_per_op']:.2f};"
            f" {q['native_grpc_on_vs_off_ops']:.2f} {q['native_grpc_on_vs_off_cpu_per_op']:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench grpc", description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("-k", "--keyspace", type=int, default=1000)
    parser.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--ops", nargs="+", default=["get", "set"], choices=["get", "set"])
    parser.add_argument("-r", "--repeat", type=int, default=3, help="runs per measurement (best kept)")
    parser.add_argument("--auth", action="store_true", help="auth on: every request presents an API key")
    parser.add_argument(
        "-g",
        "--generators",
        type=int,
        default=GENERATORS,
        help=f"load generator processes per measurement, at most one per call in flight (default {GENERATORS})",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.generators < 1:
        parser.error("--generators must be at least 1")
    started = time.perf_counter()
    result = run(
        args.duration, args.keyspace, args.concurrency, args.ops, args.repeat, args.auth, args.generators
    )
    print(report(result))
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
