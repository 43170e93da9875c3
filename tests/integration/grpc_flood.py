"""Measure what unauthenticated gRPC calls with large request messages cost a real server.

Starts ``twistd -n amaters`` (auth on, plain TCP, memory storage, login throttle off so that every
call reaches the login) on free loopback ports, floods one method with calls carrying a refused
token and a QueryRequest of the given size (``grpc_raw.flood``: as fast as flow control allows), and
prints the server's resident memory before, at its peak (VmHWM) and 2 s after, with the bytes the
server took in.  Run from the repository root with ``PYTHONPATH=$PWD``::

    python3 tests/integration/grpc_flood.py --connections 4 --calls 8 --mb 60
    python3 tests/integration/grpc_flood.py --method grpc.health.v1.Health/Check
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from grpc_raw import flood, grpc_message  # noqa: E402
from harness import ServerProcess  # noqa: E402

from amaters.proto import aql_pb2  # noqa: E402

MB = 1024 * 1024


def memory_mb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) // 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--calls", type=int, default=8, help="calls per connection")
    parser.add_argument("--mb", type=int, default=60, help="request message size, MiB")
    parser.add_argument("--method", default="amaters.aql.AqlService/ExecuteQuery")
    parser.add_argument("--limit", type=float, default=30.0, help="seconds the flood may last")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="grpc-flood-") as directory:
        server = ServerProcess(
            Path(directory),
            [
                "tls.enabled=false",
                "storage.backend=memory",
                "auth.enabled=true",
                "auth.jwt.secret=grpc-flood-secret-0123456789abcdef0123",
                "auth.max_failures_per_minute=0",
            ],
        )
        server.start().wait_ready()
        assert server.process is not None
        pid = server.process.pid
        try:
            time.sleep(1)
            before = memory_mb(pid)
            request = aql_pb2.QueryRequest()
            query = request.query.set
            query.collection, query.key.data, query.value.data = "c", b"k", b"\x01" * (args.mb * MB)
            message = grpc_message(request.SerializeToString())
            peak = [before["VmRSS"]]

            def sample() -> None:
                peak[0] = max(peak[0], memory_mb(pid)["VmRSS"])

            started = time.monotonic()
            result = flood(
                server.grpc_port,
                "/" + args.method,
                [("authorization", "Bearer not-a-token")],
                message,
                args.connections,
                args.calls,
                args.limit,
                sample,
                hold_s=2,
            )
            took = time.monotonic() - started
            time.sleep(2)
            after = memory_mb(pid)
            print(
                f"{args.method}: {result['calls']} calls ({args.connections} connections) of"
                f" {len(message) / MB:.1f} MB in {took:.1f} s: server took {result['sent'] / MB:.1f} MB,"
                f" ended {result['ended']} calls; VmRSS before {before['VmRSS']} MB, peak VmHWM"
                f" {after['VmHWM']} MB (sampled VmRSS {peak[0]} MB), VmRSS 2 s after {after['VmRSS']} MB"
            )
        finally:
            server.stop()
            server.cleanup()


if __name__ == "__main__":
    main()
