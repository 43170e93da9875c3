"""redis-server with ``appendfsync always`` and redis-benchmark: the durable-write reference.

redis acknowledges a write with ``appendfsync always`` only after the AOF is fsynced, and it fsyncs
once per event-loop turn for every client served in that turn: group commit, in C.  That makes it
the natural yardstick for amaters' durable SETs.  Each run starts its own ``redis-server`` on a
loopback port below 32768 with ``--save '' --appendonly yes --appendfsync always --dir <tmp>`` and
shuts it down afterwards; nothing else (such as a system redis service) is used.

When ``redis-server`` or ``redis-benchmark`` is not installed, :func:`available` is False and the
benchmarks record the reference as missing.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.servers import CPUMeter, free_port, wait_for_port


def available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-benchmark") is not None


@dataclass
class RedisResult:
    test: str
    clients: int
    pipeline: int
    requests: int
    value_size: int
    ops_per_s: float
    avg_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_pct: float | None
    appendfsync: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def redis_server(directory: Path | None = None, appendfsync: str = "always") -> Iterator[tuple[int, int]]:
    """A private redis-server (AOF on); yields ``(port, pid)`` and shuts it down on exit."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-", dir=directory) as data:
        argv = [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", appendfsync,
            "--dir", data,
            "--daemonize", "no",
            "--logfile", str(Path(data) / "redis.log"),
        ]  # fmt: skip
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port, process, 20.0)
            yield port, process.pid
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def benchmark(
    port: int,
    tests: Sequence[str] = ("set", "get"),
    *,
    clients: int = 50,
    requests: int = 100_000,
    value_size: int = 100,
    pipeline: int = 1,
    keyspace: int = 10_000,
    server_pid: int | None = None,
    appendfsync: str = "always",
    timeout: float = 300.0,
) -> list[RedisResult]:
    """``redis-benchmark -t TESTS -c C -n N -d V -r K -P P --csv`` against 127.0.0.1:port."""
    argv = [
        "redis-benchmark",
        "-h", "127.0.0.1",
        "-p", str(port),
        "-t", ",".join(tests),
        "-c", str(clients),
        "-n", str(requests),
        "-d", str(value_size),
        "-r", str(keyspace),
        "-P", str(pipeline),
        "--csv",
    ]  # fmt: skip
    meter = CPUMeter([server_pid]) if server_pid else None
    started = time.perf_counter()
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)
    elapsed = time.perf_counter() - started
    cpu = round(meter.percent(), 1) if meter is not None and elapsed > 0 else None
    found = []
    for row in csv.DictReader(io.StringIO(completed.stdout)):
        found.append(
            RedisResult(
                test=row["test"],
                clients=clients,
                pipeline=pipeline,
                requests=requests,
                value_size=value_size,
                ops_per_s=float(row["rps"]),
                avg_ms=float(row["avg_latency_ms"]),
                p50_ms=float(row["p50_latency_ms"]),
                p99_ms=float(row["p99_latency_ms"]),
                max_ms=float(row["max_latency_ms"]),
                # Over the whole redis-benchmark run (all tests), not per test.
                server_cpu_pct=cpu,
                appendfsync=appendfsync,
            )
        )
    if not found:
        raise RuntimeError(
            f"redis-benchmark printed no results: {completed.stdout[:500]} {completed.stderr[:500]}"
        )
    return found
