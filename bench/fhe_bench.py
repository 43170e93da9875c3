"""Homomorphic FILTER through the real server against raw concrete evaluation of the same circuit.

``python -m bench.fhe_bench [--rows 8] [--json FILE]``

In one run, with one key set (schema ``age:8,score:8``) and one predicate
(``age > 30 and score <= 17``: three module calls per row):

- **keygen** seconds and evaluation key bytes; **key upload** seconds (chunked, over TLS);
- **raw**: the predicate evaluated in this process with concrete directly (the same compiled
  module, the same evaluation keys), seconds per row: the reference;
- **FILTER** through ``twistd -n amaters`` over TLS with ``fhe.workers = 1``: seconds per row and
  the ratio to raw (target <= 1.2: the server's overhead over the FHE work itself);
- rows per second with 1 and with 2 workers (on a 2-core machine shared with other work the
  second worker helps only when a core is free);
- **cold / warm first query**: a one-row FILTER right after a restart (key set and circuit read
  from disk, first evaluation with a fresh key set) and the same query again.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from bench.servers import AmatersServer

os.environ.setdefault("OMP_NUM_THREADS", "1")


def raw_seconds_per_row(keys: Any, tree: Any, rows: list[bytes]) -> float:
    from amaters.fhe import circuits, engine, records

    fhe = circuits.concrete()
    # The circuit's module and the evaluation keys (about 62 MB) are not needed once loaded.
    with tempfile.TemporaryDirectory(prefix="fhe-bench-circuits-") as module_dir:
        keys_path = Path(module_dir) / "evaluation.keys"
        keys_path.write_bytes(keys.evaluation_keys())
        server, _ = engine.load_circuit(module_dir, keys.schema.widths)
        backend = engine.ConcreteBackend(server, fhe.EvaluationKeys.deserialize(keys_path.read_bytes()))
    decoded = [records.decode(r) for r in rows]
    engine.evaluate_tree(backend, tree, decoded[0], {}, {})  # the fresh key set's first use
    started = time.perf_counter()
    consts: dict[bytes, Any] = {}
    for row in decoded:
        backend.dump(engine.evaluate_tree(backend, tree, row, consts, {}))
    return (time.perf_counter() - started) / len(decoded)


async def timed_filter(
    reactor: Any, server: AmatersServer, keys: Any, predicate: Any, limit: int | None
) -> float:
    from amaters.client import connect

    client = await connect(reactor, "127.0.0.1", server.port, ca_cert=server.ca_cert, timeout=600)
    try:
        started = time.perf_counter()
        await client.filter("people", predicate, keys=keys, limit=limit)
        return time.perf_counter() - started
    finally:
        await client.close()


async def main(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    from amaters.client import connect
    from amaters.fhe import FheKeys, field
    from amaters.fhe import predicate as P

    out: dict[str, Any] = {"rows": args.rows}
    started = time.perf_counter()
    keys = FheKeys.generate("age:8,score:8")
    out["keygen_seconds"] = time.perf_counter() - started
    out["evaluation_key_bytes"] = len(keys.evaluation_keys())
    predicate = (field("age") > 30) & (field("score") <= 17)
    records = {
        f"r{i:03d}".encode(): {"age": (i * 37) % 256, "score": (i * 11) % 256} for i in range(args.rows)
    }
    blobs = [keys.encrypt(r) for r in records.values()]
    out["record_bytes"] = len(blobs[0])
    tree = P.from_proto(keys.encrypt_predicate(predicate))
    out["raw_seconds_per_row"] = raw_seconds_per_row(keys, tree, blobs)

    with tempfile.TemporaryDirectory() as workdir:
        settings = {"storage.backend": "rocksdb", "fhe.workers": 1}
        server = AmatersServer(Path(workdir) / "one", settings).start()
        try:
            client = await connect(reactor, "127.0.0.1", server.port, ca_cert=server.ca_cert, timeout=600)
            try:
                t = time.perf_counter()
                await client.upload_keys(keys)
                out["key_upload_seconds"] = time.perf_counter() - t
                for key, record in records.items():
                    await client.set_record("people", key, keys, record)
            finally:
                await client.close()
            await timed_filter(reactor, server, keys, predicate, 1)  # circuit loaded in the worker
            seconds = await timed_filter(reactor, server, keys, predicate, None)
            out["filter_seconds_per_row_1_worker"] = seconds / args.rows
            out["rows_per_second_1_worker"] = args.rows / seconds
        finally:
            server.stop()
        # Restart: the key set and the circuit are on disk, nothing loaded.
        server = AmatersServer(Path(workdir) / "one", settings).start()
        try:
            out["cold_first_query_seconds"] = await timed_filter(reactor, server, keys, predicate, 1)
            out["warm_first_query_seconds"] = await timed_filter(reactor, server, keys, predicate, 1)
        finally:
            server.stop()
        server = AmatersServer(Path(workdir) / "one", {**settings, "fhe.workers": 2}).start()
        try:
            # Batches of 4 rows: a full FILTER gives both workers work, so both load circuit and keys.
            await timed_filter(reactor, server, keys, predicate, None)
            seconds = await timed_filter(reactor, server, keys, predicate, None)
            out["rows_per_second_2_workers"] = args.rows / seconds
        finally:
            server.stop()
    # Raw again after the servers: the machine's load drifts; the lower of the two is the reference.
    out["raw_seconds_per_row"] = min(out["raw_seconds_per_row"], raw_seconds_per_row(keys, tree, blobs))
    out["filter_vs_raw"] = out["filter_seconds_per_row_1_worker"] / out["raw_seconds_per_row"]
    return out


def report(result: dict[str, Any]) -> str:
    lines = [f"{k:36s} {v:.3f}" if isinstance(v, float) else f"{k:36s} {v}" for k, v in result.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="python -m bench.fhe_bench")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--json", metavar="FILE")
    ns = parser.parse_args()
    holder: dict[str, Any] = {}

    async def _body(reactor: Any) -> None:
        holder.update(await main(reactor, ns))

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(_body(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    print(report(holder))
    if ns.json:
        Path(ns.json).write_text(json.dumps(holder, indent=2))
    sys.exit(0)
