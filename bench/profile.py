"""Profile the amaters server under one load: ``python -m bench profile [options]``.

Starts the server under cProfile (reactor-thread CPU time, so other processes on a shared machine do
not distort it), writes the keys, applies the load, stops the server gracefully and prints the
functions with the most CPU time.  ``--py-spy`` records a py-spy flame graph instead (py-spy must be
installed).  The profile (``server.prof``) and the server log are kept in ``--out``.
"""

from __future__ import annotations

import argparse
import os
import pstats
import sys
from pathlib import Path

from bench import loadgen
from bench.scenarios import make_api_key
from bench.servers import PROFILE_ENV, AmatersServer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--op",
        default="get",
        choices=("get", "set", "range", "batch", "delete", "scan"),
        help="scan: one RANGE stream over the whole key space",
    )
    parser.add_argument("-c", "--connections", type=int, default=50)
    parser.add_argument("-p", "--pipeline", type=int, default=1)
    parser.add_argument("-v", "--value-size", type=int, default=100)
    parser.add_argument("-k", "--keyspace", type=int, default=10_000)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--backend", default="memory", choices=("memory", "rocksdb"))
    parser.add_argument("--sync", default="always", choices=("always", "interval", "none"))
    parser.add_argument("--plaintext", action="store_true", help="TLS off")
    parser.add_argument("--auth", action="store_true", help="auth with an API key (RBAC on)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--py-spy", action="store_true", help="py-spy flame graph instead of cProfile")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--sort", default="tottime", choices=("tottime", "cumulative"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/profile"))
    args = parser.parse_args(argv)

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = {
        "storage.backend": args.backend,
        "storage.sync": args.sync,
        "tls.enabled": not args.plaintext,
    }
    api_key = None
    if args.auth:
        extra, api_key = make_api_key(args.out / "auth")
        settings.update(extra)
    previous = os.environ.get(PROFILE_ENV)
    os.environ[PROFILE_ENV] = "py-spy" if args.py_spy else "cprofile"
    server = AmatersServer(args.out / "server", settings, label="amaters (profiled)")
    try:
        with server:
            server.start()
            target = loadgen.Target(
                port=server.port, ca_cert=server.ca_cert, plaintext=args.plaintext, api_key=api_key
            )
            fill = loadgen.LoadSpec(
                connections=4,
                pipeline=2,
                value_size=args.value_size,
                keyspace=args.keyspace,
                collection="profile",
                batch_size=200,
                duration=0,
                warmup=0,
            )
            loadgen.run("fill", target, fill, workers=2, server_pid=server.pid, label="fill", quiet=True)
            spec = loadgen.LoadSpec(
                connections=args.connections,
                pipeline=args.pipeline,
                value_size=args.value_size,
                keyspace=args.keyspace,
                mix=(("get" if args.op == "scan" else args.op, 1.0),),
                duration=args.duration,
                warmup=0.5,
                collection="profile",
            )
            mode = "scan" if args.op == "scan" else "load"
            result = loadgen.run(
                mode, target, spec, workers=args.workers, server_pid=server.pid, label=f"profile {args.op}"
            )
            print(loadgen.summary_line(result))
    finally:
        if previous is None:
            os.environ.pop(PROFILE_ENV, None)
        else:
            os.environ[PROFILE_ENV] = previous
    profile = server.workdir / "server.prof"
    if not args.py_spy and profile.exists():
        stats = pstats.Stats(str(profile), stream=sys.stdout)
        stats.strip_dirs().sort_stats(args.sort).print_stats(args.top)
        print(f"profile: {profile} (pstats; e.g. snakeviz or python -m pstats)")
    elif args.py_spy:
        print(f"flame graphs: {sorted(server.workdir.glob('server-py-spy-*.svg'))}")
    return 0
