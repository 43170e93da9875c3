"""Clustered mode: GET/SET throughput through 1 and 2 amaters nodes, next to the same etcd driven
directly by the same etcd client the nodes use, and the time writes take to resume after the etcd
leader is killed.

::

    python -m bench.cluster_bench [--seconds 3] [--concurrency 16] [--kills 3] [--json]

Everything runs on loopback in this process's machine: a 3-member etcd (heartbeat 50 ms, election
500 ms), two ``twistd -n amaters`` nodes over it (plain TCP), and the load from this process.  Each
phase runs ``--concurrency`` request loops for ``--seconds`` (at most 50,000 requests).  The ratio
columns compare each amaters figure with etcd driven directly in the same run, so the numbers stay
meaningful on a busy machine.  Process helpers come from the test harness (``tests/``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
for _folder in (_ROOT / "tests", _ROOT / "tests" / "integration"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from etcd_helpers import EtcdCluster  # noqa: E402
from harness import ServerProcess  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from amaters.client import connect  # noqa: E402
from amaters.cluster.etcd import EtcdClient, b64  # noqa: E402
from amaters.errors import AmatersError  # noqa: E402

KEYS = 1000
VALUE = b"v" * 100
MAX_OPS = 50_000


async def _drive(reactor: Any, loops: list[Any], seconds: float) -> dict[str, Any]:
    """Run each ``loop(n)`` coroutine factory until ``seconds`` pass; ops/s and latency percentiles."""
    stop_at = time.monotonic() + seconds
    latencies: list[float] = []
    errors = [0]
    budget = [MAX_OPS]

    async def run(one: Any) -> None:
        rng = random.Random(id(one))
        while time.monotonic() < stop_at and budget[0] > 0:
            budget[0] -= 1
            started = time.perf_counter()
            try:
                await one(rng.randrange(KEYS))
            except Exception:
                errors[0] += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    await defer.gatherResults([defer.Deferred.fromCoroutine(run(one)) for one in loops])
    elapsed = time.monotonic() - started
    latencies.sort()

    def pct(p: float) -> float:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2) if latencies else 0.0
        )

    return {
        "ops_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "errors": errors[0],
    }


async def throughput(
    reactor: Any, etcd: EtcdCluster, nodes: list[ServerProcess], args: Any
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    direct = EtcdClient(etcd.endpoints, reactor)
    prefix = b"/bench-direct/"

    async def etcd_set(i: int) -> None:
        await direct.call(
            "/v3/kv/put", {"key": b64(prefix + b"%06d" % i), "value": b64(VALUE)}, idempotent=False
        )

    async def etcd_get(i: int) -> None:
        await direct.range(prefix + b"%06d" % i)

    results["etcd direct SET"] = await _drive(reactor, [etcd_set] * args.concurrency, args.seconds)
    results["etcd direct GET"] = await _drive(reactor, [etcd_get] * args.concurrency, args.seconds)
    await direct.close()

    for count in (1, 2):
        clients = []
        for index in range(args.concurrency):
            node = nodes[index % count]
            clients.append(await connect(reactor, "127.0.0.1", node.port, plaintext=True, timeout=10))

        def setter(client: Any) -> Any:
            return lambda n: client.set("bench", b"%06d" % n, VALUE)

        def getter(client: Any) -> Any:
            return lambda n: client.get("bench", b"%06d" % n)

        results[f"{count} node SET"] = await _drive(reactor, [setter(c) for c in clients], args.seconds)
        results[f"{count} node GET"] = await _drive(reactor, [getter(c) for c in clients], args.seconds)
        for client in clients:
            await client.close()
    for name, row in results.items():
        kind = name.split()[-1]
        reference = results[f"etcd direct {kind}"]["ops_per_s"]
        row["vs_etcd_direct"] = round(row["ops_per_s"] / reference, 2) if reference else None
    return results


async def leader_kills(
    reactor: Any, etcd: EtcdCluster, nodes: list[ServerProcess], kills: int
) -> list[float]:
    """Seconds from kill -9 of the etcd leader to the first acknowledged write sent after it."""
    recoveries: list[float] = []
    clients = [
        await connect(reactor, "127.0.0.1", nodes[i % 2].port, plaintext=True, timeout=10) for i in range(4)
    ]
    for _ in range(kills):
        recovery = await _one_kill(reactor, etcd, clients)
        if recovery is not None:
            recoveries.append(recovery)
        await task.deferLater(reactor, 1.0, lambda: None)
    for client in clients:
        await client.close()
    return recoveries


async def _one_kill(reactor: Any, etcd: EtcdCluster, clients: list[Any]) -> float | None:
    killed_at = [0.0]
    first_ok: list[float] = []
    stop_at = time.monotonic() + 8

    async def writer(client: Any) -> None:
        n = 0
        while time.monotonic() < stop_at and not first_ok:
            n += 1
            sent = time.monotonic()
            try:
                await client.set("killbench", b"k%d" % (n % 50), VALUE, timeout=5)
            except AmatersError:
                await task.deferLater(reactor, 0.02, lambda: None)
                continue
            if killed_at[0] and sent > killed_at[0] and not first_ok:
                first_ok.append(time.monotonic())

    writers = [defer.Deferred.fromCoroutine(writer(c)) for c in clients]
    await task.deferLater(reactor, 0.5, lambda: None)
    leader = etcd.leader()
    killed_at[0] = time.monotonic()
    etcd.kill(leader)
    await defer.gatherResults(writers)
    etcd.start_member(leader)
    etcd.wait_leader()
    return round(first_ok[0] - killed_at[0], 3) if first_ok else None


async def main(reactor: Any, args: Any) -> None:
    directory = Path(tempfile.mkdtemp(prefix="amaters-cluster-bench-"))
    etcd = EtcdCluster(directory / "etcd", 3)
    nodes: list[ServerProcess] = []
    try:
        etcd.start()
        for name in ("a", "b"):
            nodes.append(
                ServerProcess(
                    directory / name,
                    settings=[
                        "storage.backend=etcd",
                        f"cluster.endpoints={json.dumps(etcd.endpoints)}",
                        f"cluster.node_name={name}",
                        "tls.enabled=false",
                        "logging.level=warn",
                    ],
                ).start()
            )
        for node in nodes:
            node.wait_ready()
        report: dict[str, Any] = {"throughput": await throughput(reactor, etcd, nodes, args)}
        report["leader_kill_recovery_s"] = await leader_kills(reactor, etcd, nodes, args.kills)
    finally:
        for node in nodes:
            node.stop(timeout=10)
            node.cleanup()
        etcd.stop()
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'':18} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs etcd':>8}")
    for name, row in report["throughput"].items():
        print(
            f"{name:18} {row['ops_per_s']:9.1f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f}"
            f" {row['errors']:7d} {row['vs_etcd_direct']!s:>8}"
        )
    print(f"writes resumed after etcd leader kill -9 (s): {report['leader_kill_recovery_s']}")


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
