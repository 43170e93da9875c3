"""Server CPU per request, in-process: ``python -m bench micro [--op get] [-p 16] [--auth]``.

The whole amaters service tree (memory backend, pipeline stages, auth and metrics as configured)
runs in this process; a connection's protocol is fed ready-made request frames through a
``StringTransport``, ``pipeline`` frames per read, and the CPU time per request is measured (best of
several rounds).  No sockets, no TLS, no client: what is left is the server's own per-request work,
which is stable even on a machine busy with other processes.  The reference server's protocol is
measured the same way for comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.servers import free_port


def _frames(op: str, count: int, value_size: int, keyspace: int, first_id: int) -> list[bytes]:
    from amaters.proto import aql_pb2, envelope_pb2, query_pb2, types_pb2
    from amaters.proto.convert import blob_to_proto
    from amaters.protocols.framing import encode_frame
    from amaters.types import CipherBlob

    value = blob_to_proto(CipherBlob.wrap(os.urandom(value_size)))
    frames = []
    for i in range(count):
        key = types_pb2.Key(data=b"k%09d" % (i % keyspace))
        if op == "get":
            query = query_pb2.Query(get=query_pb2.GetQuery(collection="micro", key=key))
        else:
            query = query_pb2.Query(set=query_pb2.SetQuery(collection="micro", key=key, value=value))
        envelope = envelope_pb2.Envelope(request_id=first_id + i, query=aql_pb2.QueryRequest(query=query))
        frames.append(encode_frame(envelope.SerializeToString()))
    return frames


def _handshake(api_key: str | None) -> bytes:
    from amaters import PROTOCOL_VERSION
    from amaters.proto import envelope_pb2
    from amaters.proto.convert import version_to_proto
    from amaters.protocols.framing import encode_frame

    credentials = envelope_pb2.Credentials()
    if api_key:
        credentials.api_key = api_key
    envelope = envelope_pb2.Envelope(
        request_id=1,
        handshake=envelope_pb2.Handshake(
            version=version_to_proto(PROTOCOL_VERSION), client_name="micro", credentials=credentials
        ),
    )
    return encode_frame(envelope.SerializeToString())


def _check_answers(data: bytes, expected: int) -> None:
    """Raise unless ``data`` holds ``expected`` successful query answers (an error is cheap to send)."""
    from amaters.proto import envelope_pb2
    from amaters.protocols.framing import FrameDecoder

    answers = FrameDecoder(2**31 - 1).feed(data)
    bad = 0
    example = ""
    for frame in answers:
        envelope = envelope_pb2.Envelope()
        envelope.ParseFromString(frame)
        if envelope.WhichOneof("body") != "query_response" or envelope.query_response.HasField("error"):
            bad += 1
            example = example or str(envelope).replace("\n", " ")[:300]
    if bad or len(answers) != expected:
        raise RuntimeError(
            f"{len(answers)} answers for {expected} requests, {bad} of them not successful, e.g. {example}"
        )


def _answer_count(transport: Any) -> int:
    """How many answers ``transport`` holds."""
    from amaters.protocols.framing import FrameDecoder

    return len(FrameDecoder(2**31 - 1).feed(transport.value()))


async def _answered(reactor: Any, transport: Any, expected: int, timeout: float = 60.0) -> None:
    """Wait until ``transport`` holds ``expected`` answers (a write to a collection that does not
    exist yet, or one that waits for its sync, is answered a few reactor turns later)."""
    from twisted.internet import task

    deadline = time.monotonic() + timeout
    while _answer_count(transport) < expected and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.01, lambda: None)


def _reads(frames: list[bytes], pipeline: int, record: int) -> list[list[bytes]]:
    """What the protocol is given: per read, ``pipeline`` frames joined, in pieces of at most
    ``record`` bytes when it is not 0 (TLS hands over one record of at most 16 KiB at a time)."""
    reads = [b"".join(frames[i : i + pipeline]) for i in range(0, len(frames), pipeline)]
    if not record:
        return [[read] for read in reads]
    return [[read[i : i + record] for i in range(0, len(read), record)] for read in reads]


def _takes_read_scope(protocol: Any) -> bool:
    """Whether the server's TLS transport would tell ``protocol`` where a read begins and ends."""
    from amaters.interfaces import IReadScope

    return bool(IReadScope.providedBy(protocol))


def _deliver(protocol: Any, pieces: list[bytes], scoped: bool) -> None:
    """Hand one read's pieces to ``protocol`` as the server's TLS transport does: a protocol that
    takes the read scope (``scoped``) is told where a read of several pieces begins and ends."""
    if len(pieces) == 1:
        protocol.dataReceived(pieces[0])
        return
    if scoped:
        protocol.readStarted()
    try:
        for piece in pieces:
            protocol.dataReceived(piece)
    finally:
        if scoped:
            protocol.readFinished()


async def _measure(
    reactor: Any,
    protocol: Any,
    transport: Any,
    frames: list[bytes],
    pipeline: int,
    rounds: int,
    record: int = 0,
) -> float:
    """Best CPU seconds per request over ``rounds`` passes of ``frames``, ``pipeline`` per read.

    The reactor gets a turn every few milliseconds, as it would between reads from real sockets:
    holding it for seconds would (rightly) make the load-shedding stage refuse requests.  That turn
    is timed with the reads before it (the afters of the requests answered in a turn run at its
    end); a real server's turn holds far fewer reads, so what the end of a turn costs is spread
    over more requests here.
    """
    from twisted.internet import task

    reads = _reads(frames, pipeline, record)
    scoped = _takes_read_scope(protocol)
    best = float("inf")
    for _ in range(rounds):
        transport.clear()
        spent = 0.0
        position = 0
        while position < len(reads):
            started = time.process_time()
            turn_ends = time.perf_counter() + 0.005
            while position < len(reads) and time.perf_counter() < turn_ends:
                _deliver(protocol, reads[position], scoped)
                position += 1
            # The turn's end is timed too: the afters of the requests answered during it run there.
            await task.deferLater(reactor, 0, lambda: None)
            spent += time.process_time() - started
        best = min(best, spent / len(frames))
        await _answered(reactor, transport, len(frames))
        _check_answers(transport.value(), len(frames))
    return best


class _SignallingTransport:
    """A ``StringTransport`` whose ``write`` fires :attr:`written` (a fresh Deferred per wait)."""

    @staticmethod
    def build(address: Any) -> Any:
        from twisted.internet import defer
        from twisted.internet.testing import StringTransport

        class Transport(StringTransport):
            written: defer.Deferred[None] | None = None

            def write(self, data: bytes) -> None:
                super().write(data)
                waiter, self.written = self.written, None
                if waiter is not None:
                    waiter.callback(None)

        return Transport(peerAddress=address)


async def _measure_sequential(
    reactor: Any, protocol: Any, transport: Any, frames: list[bytes], rounds: int
) -> float:
    """Best CPU seconds per request over ``rounds`` passes, one request at a time.

    Each request is sent when the previous one has been answered, and the reactor sleeps in its
    poll while a request waits (for a group commit's fsync in a pool thread, say), as a server
    with one sequential client does.  CPU time is the whole process's: every thread counts.

    Requests answered at once (a write under ``storage.sync = "none"``) would never let the reactor
    run: its timers would fall seconds behind and the load-shedding stage would (rightly) refuse
    requests as overloaded.  So the reactor also gets a turn whenever 5 ms passed without one, as
    it would between reads from a real socket.
    """
    from twisted.internet import defer, task

    best = float("inf")
    for _ in range(rounds):
        transport.clear()
        started = time.process_time()
        turn_ends = time.perf_counter() + 0.005
        for frame in frames:
            waiter: defer.Deferred[None] = defer.Deferred()
            transport.written = waiter
            protocol.dataReceived(frame)
            if not waiter.called:
                await waiter
                turn_ends = time.perf_counter() + 0.005
            elif time.perf_counter() >= turn_ends:
                await task.deferLater(reactor, 0, lambda: None)
                turn_ends = time.perf_counter() + 0.005
        best = min(best, (time.process_time() - started) / len(frames))
        _check_answers(transport.value(), len(frames))
    return best


async def _reference_sequential(
    reactor: Any, work: Path, fill: list[bytes], frames: list[bytes], args: argparse.Namespace
) -> float:
    """The reference server on RocksDB (``--sync always``: its bare group commit, a thread of
    its own running ``flush_wal(True)``) under the same sequential writes, per-thread CPU printed."""
    from twisted.internet.address import IPv4Address

    from bench.reference_server import RocksDBReferenceFactory

    address = IPv4Address("TCP", "127.0.0.1", 40001)
    factory = RocksDBReferenceFactory(work / "reference-db", args.sync == "always", reactor)
    try:
        reference = factory.buildProtocol(address)
        transport = _SignallingTransport.build(address)
        reference.makeConnection(transport)
        await _measure_sequential(reactor, reference, transport, fill, 1)
        threads_before = _thread_times()
        measured = await _measure_sequential(reactor, reference, transport, frames, args.rounds)
        print("reference server on RocksDB, the same requests:")
        _print_thread_times(threads_before, _thread_times(), len(frames) * args.rounds)
        reference.connectionLost(None)
    finally:
        factory.db.close()
    return measured * 1e6


def _count_opcodes(protocol: Any, frames: list[bytes], pipeline: int, record: int = 0) -> tuple[int, int]:
    """Python function calls and bytecode instructions the server runs for ``frames``, ``pipeline``
    per read, counted with :func:`sys.settrace` (the protocol's own calls and all they make).

    Unlike CPU time these counts do not move with the machine's load or the CPU's caches, so they
    tell a change in the interpreted work from the noise at once; what a call or an instruction
    costs still differs (a C function called from Python is not counted at all).
    """
    import sys

    counts = [0, 0]

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            counts[0] += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            counts[1] += 1
        return trace

    reads = _reads(frames, pipeline, record)
    scoped = _takes_read_scope(protocol)
    sys.settrace(trace)
    try:
        for pieces in reads:
            _deliver(protocol, pieces, scoped)
    finally:
        sys.settrace(None)
    return counts[0], counts[1]


def _print_counts(who: str, protocol: Any, frames: list[bytes], args: argparse.Namespace) -> None:
    """:func:`_count_opcodes` over the first ``args.opcodes`` frames, printed per request."""
    calls, opcodes = _count_opcodes(protocol, frames[: args.opcodes], args.pipeline, args.record)
    print(
        f"{who}: {calls / args.opcodes:.1f} Python calls and {opcodes / args.opcodes:.1f} bytecode"
        f" instructions per request (over {args.opcodes} requests)"
    )


def _thread_times() -> dict[str, tuple[int, int]]:
    """CPU nanoseconds and context switches of each thread of this process so far, by thread name.

    Read from ``/proc/self/task`` (Linux); threads Python does not know (RocksDB's own) are summed
    under ``"other"``.  Empty where ``/proc`` is not there.
    """
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    found: dict[str, tuple[int, int]] = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                cpu_ns, _, switches = (int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
        name = names.get(int(tid), "other")
        total = found.get(name, (0, 0))
        found[name] = (total[0] + cpu_ns, total[1] + switches)
    return found


def _print_thread_times(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], count: int
) -> None:
    """Each thread's CPU µs and context switches per request between two :func:`_thread_times`."""
    for name in sorted(after):
        cpu = after[name][0] - before.get(name, (0, 0))[0]
        switches = after[name][1] - before.get(name, (0, 0))[1]
        if cpu or switches:
            print(
                f"  thread {name}: {cpu / count / 1000:.1f} µs CPU and {switches / count:.2f} context"
                " switches per request (mean over all rounds)"
            )


async def _run(reactor: Any, args: argparse.Namespace) -> dict[str, float]:
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from amaters.config import load_config
    from amaters.tap import build_service
    from bench.reference_server import ReferenceFactory
    from bench.scenarios import make_api_key

    work = Path(tempfile.mkdtemp(prefix="amaters-micro-"))
    overrides = [
        f"server.listen=tcp:{free_port()}:interface=127.0.0.1",
        f"web.listen=tcp:{free_port()}:interface=127.0.0.1",
        f"web.enabled={'true' if args.metrics else 'false'}",
        f"storage.backend={args.backend}",
        f"storage.sync={args.sync}",
        "tls.enabled=false",
        f"server.data_dir={work}",
        "logging.level=warn",
        "grpc.enabled=false",
        *args.config,
    ]
    api_key = None
    if args.auth:
        settings, api_key = make_api_key(work / "auth")
        overrides += [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]
    root = build_service(load_config(None, overrides, {}), reactor)
    await root.startService()
    pipeline = root.components.pipeline
    print("pipeline stages:", ", ".join(stage.name for stage in pipeline.stages))
    for name in args.without:
        pipeline.remove_stage(name)
        print(f"removed stage {name} (to measure what it costs)")
    results: dict[str, float] = {}
    try:
        factory = root.getServiceNamed("listener").factory
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        protocol = factory.buildProtocol(address)
        transport = (
            _SignallingTransport.build(address) if args.sequential else StringTransport(peerAddress=address)
        )
        protocol.makeConnection(transport)
        protocol.dataReceived(_handshake(api_key))
        from twisted.internet import task

        await task.deferLater(reactor, 0.05, lambda: None)  # the handshake's login may take a turn
        fill = _frames("set", args.keyspace, args.value_size, args.keyspace, 10)
        if args.sequential:
            await _measure_sequential(reactor, protocol, transport, fill, 1)
        else:
            protocol.dataReceived(b"".join(fill))
            await _answered(reactor, transport, len(fill))
        frames = _frames(args.op, args.requests, args.value_size, args.keyspace, 10**6)
        if args.opcodes:
            before = _answer_count(transport)
            _print_counts(f"{args.op} P={args.pipeline}", protocol, frames, args)
            # A synced write is answered once its sync ends, turns later: not during the measurement.
            await _answered(reactor, transport, before + args.opcodes)
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile(time.thread_time)
            profiler.enable()
        if args.sequential:
            threads_before = _thread_times()
            measured = await _measure_sequential(reactor, protocol, transport, frames, args.rounds)
            _print_thread_times(threads_before, _thread_times(), len(frames) * args.rounds)
        else:
            measured = await _measure(
                reactor, protocol, transport, frames, args.pipeline, args.rounds, args.record
            )
        results["amaters_us"] = measured * 1e6
        if profiler is not None:
            import pstats

            profiler.disable()
            pstats.Stats(profiler).strip_dirs().sort_stats(args.profile).print_stats(args.top)
        protocol.connectionLost(None)
        if args.sequential:
            if args.backend == "rocksdb" and args.sync in ("always", "none"):
                results["reference_us"] = await _reference_sequential(reactor, work, fill, frames, args)
            return results

        reference = ReferenceFactory().buildProtocol(address)
        ref_transport = StringTransport(peerAddress=address)
        reference.makeConnection(ref_transport)
        reference.dataReceived(b"".join(_frames("set", args.keyspace, args.value_size, args.keyspace, 10)))
        if args.opcodes:
            _print_counts("reference", reference, frames, args)
        results["reference_us"] = (
            await _measure(reactor, reference, ref_transport, frames, args.pipeline, args.rounds, args.record)
            * 1e6
        )
    finally:
        await root.stopService()
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench micro", description=__doc__.splitlines()[0])
    parser.add_argument("--op", default="get", choices=("get", "set"))
    parser.add_argument("-p", "--pipeline", type=int, default=16, help="frames per read")
    parser.add_argument("-v", "--value-size", type=int, default=100)
    parser.add_argument(
        "--record",
        type=int,
        default=0,
        metavar="BYTES",
        help="hand each read over in pieces of at most BYTES, as TLS does (16384)",
    )
    parser.add_argument("-k", "--keyspace", type=int, default=1000)
    parser.add_argument("-n", "--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--auth", action="store_true", help="auth with an API key (RBAC on)")
    parser.add_argument("--no-metrics", dest="metrics", action="store_false", help="web site and metrics off")
    parser.add_argument("--profile", choices=("tottime", "cumulative"), help="cProfile amaters, sorted so")
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument(
        "--opcodes",
        type=int,
        default=0,
        metavar="N",
        help="also count the Python calls and bytecode instructions of N requests (no noise)",
    )
    parser.add_argument(
        "--config", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)"
    )
    parser.add_argument("--without", nargs="*", default=[], help="remove these pipeline stages first")
    parser.add_argument("--backend", default="memory", choices=("memory", "rocksdb"), help="storage.backend")
    parser.add_argument(
        "--sync",
        default="always",
        choices=("always", "interval", "none"),
        help="storage.sync (without --sequential only the reads' handling is timed, not the answers"
        " sent once a sync ends)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="one request at a time, each after the previous answer (whole-process CPU: pool threads"
        " count; each thread's CPU is printed); with --backend rocksdb, the reference server on RocksDB"
        " too",
    )
    args = parser.parse_args(argv)
    from twisted.internet import defer, task

    found: dict[str, float] = {}

    def run(reactor: Any) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(_run(reactor, args)).addCallback(found.update)

    try:
        task.react(run)
    except SystemExit as e:
        if e.code:
            raise
    amaters_us = found["amaters_us"]
    if args.sequential:
        reference = found.get("reference_us")
        print(
            f"{args.op} sequential V={args.value_size} backend={args.backend} sync={args.sync}"
            f" auth={'on' if args.auth else 'off'} metrics={'on' if args.metrics else 'off'}:"
            f" amaters {amaters_us:.1f} µs CPU/request (whole process)"
            + ("" if reference is None else f", reference {reference:.1f}")
        )
        return 0
    reference_us = found["reference_us"]
    print(
        f"{args.op} P={args.pipeline} V={args.value_size} auth={'on' if args.auth else 'off'}"
        f" metrics={'on' if args.metrics else 'off'}: amaters {amaters_us:.1f} µs/request,"
        f" reference {reference_us:.1f} µs/request (ratio {reference_us / amaters_us:.2f})"
    )
    return 0
