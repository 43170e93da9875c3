"""``python -m bench``: the benchmark suite, or one of its tools.

::

    python -m bench [--quick] [--out DIR] [--only NAME ...]    every scenario (the suite)
    python -m bench loadgen --port P [--ca CA | --plaintext] [-c 50 -p 1 -v 100 --mix get:1 ...]
    python -m bench fsync [--dir DIR] [--seconds 2]
    python -m bench syncfloor [--dir DIR] [--writes 3000]            a synced write in the barest server
    python -m bench profile [--op get -p 16 --auth ...]             the server under cProfile or py-spy
    python -m bench micro [--op get -p 16 --auth]                   server CPU per request, in-process
    python -m bench grpc [-d 5 -c 1 16 --ops get set]                 gRPC next to the native protocol
    python -m bench reference-server --port P [--tls-dir DIR]
    python -m bench compare [OLD] NEW                               ratios that fell by > 10 % (exit 1)
    python -m bench summary RUN [RUN ...]                           each goal over several runs

``docs/benchmarks.md`` describes the scenarios and how to read the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _mix(text: str) -> tuple[tuple[str, float], ...]:
    """``get:9,set:1`` → ``(("get", 9.0), ("set", 1.0))``."""
    found = []
    for part in text.split(","):
        kind, _, weight = part.partition(":")
        found.append((kind.strip(), float(weight or 1)))
    return tuple(found)


def loadgen_main(argv: list[str]) -> int:
    from bench import loadgen

    parser = argparse.ArgumentParser(prog="python -m bench loadgen", description="Drive a running server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", default=None, help="CA certificate (PEM) to trust")
    parser.add_argument(
        "--plaintext", action="store_true", help="plain TCP (server with tls.enabled = false)"
    )
    parser.add_argument("--token", default=None, help="JWT bearer token")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("-c", "--connections", type=int, default=50)
    parser.add_argument("-p", "--pipeline", type=int, default=1)
    parser.add_argument("-v", "--value-size", type=int, default=100)
    parser.add_argument("-k", "--keyspace", type=int, default=10_000)
    parser.add_argument("--mix", type=_mix, default=(("get", 1.0),), help="e.g. get:9,set:1")
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("-n", "--max-ops", type=int, default=None)
    parser.add_argument("--collection", default="bench")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--server-pid", type=int, default=None, help="measure this process's CPU and RSS")
    parser.add_argument("--fill", action="store_true", help="first write every key of the key space")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    target = loadgen.Target(args.host, args.port, args.ca, args.plaintext, args.token, args.api_key)
    spec = loadgen.LoadSpec(
        connections=args.connections,
        pipeline=args.pipeline,
        value_size=args.value_size,
        keyspace=args.keyspace,
        mix=args.mix,
        duration=args.duration,
        warmup=args.warmup,
        max_ops=args.max_ops,
        collection=args.collection,
    )
    if args.fill:
        fill = loadgen.LoadSpec(
            connections=4, pipeline=2, value_size=args.value_size, keyspace=args.keyspace,
            collection=args.collection, batch_size=500,
        )  # fmt: skip
        print(
            loadgen.summary_line(loadgen.run("fill", target, fill, workers=2, label="fill")), file=sys.stderr
        )
    result = loadgen.run(
        "load", target, spec, workers=args.workers, server_pid=args.server_pid, label="loadgen"
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(loadgen.summary_line(result))
    return 0 if result.ops else 1


def fsync_main(argv: list[str]) -> int:
    from bench.fsync_rate import measure

    parser = argparse.ArgumentParser(
        prog="python -m bench fsync", description="fsyncs/s of a directory's disk."
    )
    parser.add_argument("--dir", type=Path, default=Path("."))
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.dir, args.seconds).to_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "loadgen":
        return loadgen_main(argv[1:])
    if argv and argv[0] == "fsync":
        return fsync_main(argv[1:])
    if argv and argv[0] == "syncfloor":
        from bench.syncfloor import main as syncfloor_main

        return syncfloor_main(argv[1:])
    if argv and argv[0] == "profile":
        from bench import profile

        return profile.main(argv[1:])
    if argv and argv[0] == "grpc":
        from bench import grpc_bench

        return grpc_bench.main(argv[1:])
    if argv and argv[0] == "micro":
        from bench import micro

        return micro.main(argv[1:])
    if argv and argv[0] == "ab":
        from bench import ab

        return ab.main(argv[1:])
    if argv and argv[0] == "compare":
        from bench import compare

        return compare.main(argv[1:])
    if argv and argv[0] == "summary":
        from bench import summary

        return summary.main(argv[1:])
    if argv and argv[0] == "reference-server":
        from bench import reference_server

        reference_server.main(argv[1:])
        return 0
    from bench import scenarios

    return scenarios.main(argv)


if __name__ == "__main__":
    sys.exit(main())
