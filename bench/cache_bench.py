"""The query cache against RocksDB's block cache: GET throughput through the real pipeline.

``python -m bench.cache_bench [--keys N] [--value-size B] [--gets N] [--hot F]``

Builds the real service tree (``amaters.tap.build_service``) over the rocksdb backend in a
temporary directory, fills ``keys`` keys of ``value-size`` bytes, flushes them to SST files, then
times ``gets`` GETs through ``root.components.pipeline.execute`` (the path every protocol request takes after
decoding; no sockets, so the difference between configurations is not hidden by TLS and client
cost).  Keys are drawn with a skew: ``hot`` of the requests go to 1% of the keys.  Configurations:

- ``block cache only``: storage.block_cache_bytes = the data size, cache.max_bytes = 0 (default);
- ``query cache``: the same block cache, plus cache.max_bytes = the data size;
- ``small block cache``: storage.block_cache_bytes = 1 MiB, cache.max_bytes = 0;
- ``small block cache + query cache``: 1 MiB block cache, query cache the data size.

Prints GETs per second and microseconds per GET for each, plus the query cache hit rate.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from typing import Any

from twisted.internet import defer, task

from amaters.config import load_config
from amaters.protocols.server import ANONYMOUS
from amaters.query import operations as ops
from amaters.query.pipeline import RequestContext
from amaters.tap import build_service
from amaters.types import CipherBlob


async def run_one(reactor: Any, label: str, settings: list[str], args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        config = load_config(
            None,
            [
                "server.listen=tcp:0:interface=127.0.0.1",
                "web.enabled=false",
                "storage.backend=rocksdb",
                "storage.sync=none",
                "limits.shed_lag_ms=0",  # the timing loop blocks the reactor on purpose
                f"server.data_dir={directory}",
                "grpc.enabled=false",
                *settings,
            ],
            {},
        )
        root = build_service(config, reactor)
        await root.startService()
        try:
            pipeline = root.components.pipeline
            ctx = RequestContext(1, ANONYMOUS, "127.0.0.1:1")
            value = CipherBlob.wrap(os.urandom(args.value_size))
            keys = [b"key%09d" % i for i in range(args.keys)]
            for start in range(0, len(keys), 1000):
                await pipeline.execute(
                    ctx, ops.Batch(tuple(ops.Set("bench", k, value) for k in keys[start : start + 1000]))
                )
            await root.components.backend.flush()
            rng = random.Random(1)
            hot = keys[: max(1, len(keys) // 100)]
            plan = [
                rng.choice(hot) if rng.random() < args.hot else rng.choice(keys) for _ in range(args.gets)
            ]
            for k in plan[: args.gets // 10]:  # warm both caches
                await pipeline.execute(ctx, ops.Get("bench", k))
            cache = root.components.protection.cache
            hits0, misses0 = cache.hits, cache.misses
            started = time.perf_counter()
            for k in plan:
                d = pipeline.execute(ctx, ops.Get("bench", k))
                if not d.called:
                    await d
            elapsed = time.perf_counter() - started
            lookups = (cache.hits - hits0) + (cache.misses - misses0)
            return {
                "label": label,
                "ops_per_s": args.gets / elapsed,
                "us_per_get": elapsed / args.gets * 1e6,
                "hit_rate": (cache.hits - hits0) / lookups if lookups else 0.0,
            }
        finally:
            await root.stopService()


async def main(reactor: Any, args: argparse.Namespace) -> None:
    data = args.keys * (args.value_size + 400)
    small = 1024 * 1024
    runs = [
        ("block cache only", [f"storage.block_cache_bytes={data}", "cache.max_bytes=0"]),
        ("query cache", [f"storage.block_cache_bytes={data}", f"cache.max_bytes={data}"]),
        ("small block cache", [f"storage.block_cache_bytes={small}", "cache.max_bytes=0"]),
        (
            "small block cache + query cache",
            [f"storage.block_cache_bytes={small}", f"cache.max_bytes={data}"],
        ),
    ]
    print(
        f"{args.keys} keys x {args.value_size} B, {args.gets} GETs, {args.hot:.0%} to 1% of the keys;"
        f" caches sized {data / 2**20:.1f} MiB"
    )
    print("| configuration | GETs/s | µs/GET | query cache hit rate |\n|---|---:|---:|---:|")
    results = []
    for label, settings in runs:
        result = await run_one(reactor, label, settings, args)
        results.append(result)
        print(
            f"| {label} | {result['ops_per_s']:,.0f} | {result['us_per_get']:.1f} | {result['hit_rate']:.2f} |",
            flush=True,
        )
    base = results[0]["ops_per_s"]
    for result in results[1:]:
        print(f"{result['label']}: {result['ops_per_s'] / base:.2f}x the block cache alone")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--value-size", type=int, default=1024)
    parser.add_argument("--gets", type=int, default=200_000)
    parser.add_argument("--hot", type=float, default=0.9)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))


if __name__ == "__main__":
    cli()
