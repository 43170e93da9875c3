"""Memory bounds of the gRPC front end against a real ``twistd -n amaters`` (auth on, plain TCP),
measured by the server's peak resident memory (``VmHWM`` in ``/proc/<pid>/status``).

- Unauthenticated AqlService calls carrying 60 MB request messages are refused without the
  server reading their messages: each takes in at most its HTTP/2 stream window, and the server's
  peak memory stays well under one message's size, however many calls there are.
- The services that need no login (health, reflection) read at most two request messages at a
  time and refuse large ones: the peak stays within a few messages, not one per call.
- A logged-in call's large message still works; a unary method given no message, or two, ends
  with INVALID_ARGUMENT.
- Health Watch streams hold no worker thread while open, and ending them never freezes the server;
  neither do Watch streams whose client never lets a message out (a zero HTTP/2 window).

The figures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import signal
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_raw import flood, grpc_message, stalled_calls
from harness import ServerProcess, http_get

from amaters.proto import aql_pb2
from amaters.protocols.grpc_service import OPEN_READ_SLOTS, STREAM_WINDOW_BYTES

pytestmark = pytest.mark.integration

MB = 1024 * 1024
SECRET = "grpc-memory-secret-0123456789abcdef0123"
QUERY = "/amaters.aql.AqlService/ExecuteQuery"


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of process ``pid``, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def token(roles: list[str], subject: str = "mem") -> str:
    claims = {"sub": subject, "roles": roles, "exp": int(time.time()) + 300}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _auth_server(directory: Path, *settings: str, config_text: str | None = None) -> ServerProcess:
    """A started server over plain TCP on memory storage, with JWT auth (``SECRET``) and
    ``settings`` beside."""
    process = ServerProcess(
        directory,
        [
            "tls.enabled=false",
            "storage.backend=memory",
            "auth.enabled=true",
            f"auth.jwt.secret={SECRET}",
            *settings,
        ],
        config_text=config_text,
    )
    process.start().wait_ready()
    return process


@contextmanager
def _stops_cleanly(process: ServerProcess, stop: threading.Event | None = None) -> Iterator[None]:
    """Run the block against ``process``; then (the silent request streams ended through ``stop``)
    the server must stop with status 0 and no traceback in its log.  It is killed, and the streams
    ended, when the block failed."""
    try:
        yield
        if stop is not None:
            stop.set()
        assert process.stop(timeout=20) == 0
        assert "Traceback" not in process.log()
    finally:
        if stop is not None:
            stop.set()
        process.cleanup()


def _silent(stop: threading.Event) -> Iterator[bytes]:
    """A request stream that sends nothing until ``stop`` is set, then ends."""
    stop.wait()
    yield from ()


def _ended_codes(calls: list[Any], timeout: float) -> list[grpc.StatusCode]:
    """The status each of ``calls`` ended with; each must have ended (the server ending it) within
    ``timeout`` seconds."""
    codes = []
    for call in calls:
        with pytest.raises(grpc.RpcError) as ended:
            call.result(timeout=timeout)
        codes.append(ended.value.code())
    return codes


def set_request(size: int, key: bytes = b"k") -> aql_pb2.QueryRequest:
    request = aql_pb2.QueryRequest(request_id="big")
    query = request.query.set
    query.collection, query.key.data, query.value.data = "mem", key, b"\x01" * size
    query.value.metadata.checksum = zlib.crc32(query.value.data)
    query.value.metadata.size = size
    return request


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path_factory.mktemp("grpc-memory"),
        [
            "tls.enabled=false",
            "storage.backend=memory",
            "auth.enabled=true",
            f"auth.jwt.secret={SECRET}",
            # every flooded call reaches the login (none is cut short by the login throttle)
            "auth.max_failures_per_minute=0",
        ],
    )
    with process.running():
        yield process


@pytest.fixture(scope="module")
def big_message() -> bytes:
    return grpc_message(set_request(60 * MB).SerializeToString())


def _flood(
    server: ServerProcess, path: str, message: bytes, connections: int, calls: int
) -> tuple[dict, int]:
    """Flood ``path`` with unauthenticated calls; returns the flood's figures and how far the
    server's peak memory rose above its resident memory before."""
    assert server.process is not None
    pid = server.process.pid
    before = memory(pid)
    metadata = [("authorization", "Bearer not-a-token")]
    result = flood(server.grpc_port, path, metadata, message, connections, calls, limit_s=30, hold_s=10)
    after = memory(pid)
    rise = after["VmHWM"] - max(before["VmRSS"], before["VmHWM"])
    print(
        f"\n{path}: {connections}x{calls} unauthenticated calls of {len(message) / MB:.0f} MB: server took"
        f" {result['sent'] / MB:.1f} MB, {result['ended']} ended by the server; VmRSS before"
        f" {before['VmRSS'] / MB:.0f} MB, peak (VmHWM) {after['VmHWM'] / MB:.0f} MB, after"
        f" {after['VmRSS'] / MB:.0f} MB"
    )
    return result, max(rise, 0)


def test_unauthenticated_large_messages_are_never_read(server: ServerProcess, big_message: bytes) -> None:
    """32 calls with 60 MB messages and a bad token, over 4 connections: every call is ended by the
    server after at most its stream window of the message, and the server's peak memory rises by
    less than a sixth of one message (it rose by about 2 GB when the messages were read first)."""
    result, rise = _flood(server, QUERY, big_message, connections=4, calls=8)
    assert result["ended"] == result["calls"] == 32
    assert result["complete"] == 0
    assert result["sent"] <= result["calls"] * 2 * STREAM_WINDOW_BYTES
    assert rise < len(big_message) // 6, rise
    assert "Traceback" not in server.log()


def test_open_services_read_a_bounded_number_of_messages(server: ServerProcess, big_message: bytes) -> None:
    """Health checks and reflection need no login: 16 concurrent 60 MB messages to each are refused
    (too large), and the server's peak memory stays within three times what its read slots can
    hold, not one message per call."""
    for path in (
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        result, rise = _flood(server, path, big_message, connections=2, calls=8)
        assert result["ended"] == result["calls"]
        assert rise < (OPEN_READ_SLOTS + 1) * 2 * len(big_message), rise
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _channel(server: ServerProcess) -> grpc.Channel:
    return grpc.insecure_channel(
        f"127.0.0.1:{server.grpc_port}",
        options=[("grpc.max_receive_message_length", 64 * MB), ("grpc.max_send_message_length", 64 * MB)],
    )


def test_a_logged_in_large_message_still_works(server: ServerProcess) -> None:
    """An administrator's 20 MB SET (unary, with grpcio's own client) is read, stored and read back."""
    metadata = [("authorization", f"Bearer {token(['admin'])}")]
    with _channel(server) as channel:
        call = channel.unary_unary(
            QUERY,
            request_serializer=aql_pb2.QueryRequest.SerializeToString,
            response_deserializer=aql_pb2.QueryResponse.FromString,
        )
        written = call(set_request(20 * MB, b"large"), metadata=metadata, timeout=60)
        assert not written.HasField("error"), written.error
        assert written.request_id == "big"
        get = aql_pb2.QueryRequest(request_id="g")
        get.query.get.collection, get.query.get.key.data = "mem", b"large"
        read = call(get, metadata=metadata, timeout=60)
        assert read.result.single.value.data == b"\x01" * (20 * MB)


@pytest.mark.parametrize("method", ["ExecuteQuery", "ExecuteBatch", "GetServerInfo", "ExecuteStream"])
def test_unary_methods_take_one_message(server: ServerProcess, method: str) -> None:
    """A logged-in call of a unary-request method that sends no message ends with INVALID_ARGUMENT
    and a one-line message; one that sends two is answered from the first, as grpcio's and tonic's
    own unary methods do; without credentials it is UNAUTHENTICATED whatever it sends (its messages
    are never read)."""
    request = aql_pb2.QueryRequest(request_id="first")
    request.query.get.collection, request.query.get.key.data = "mem", b"k"
    payload = {
        "ExecuteBatch": aql_pb2.BatchRequest(request_id="first"),
        "GetServerInfo": aql_pb2.ServerInfoRequest(),
    }.get(method, request)
    second = aql_pb2.QueryRequest(request_id="second")
    second.query.delete.collection, second.query.delete.key.data = "mem", b"k"
    admin = [("authorization", f"Bearer {token(['admin'])}")]
    with _channel(server) as channel:
        path = f"/amaters.aql.AqlService/{method}"
        if method == "ExecuteStream":
            stub = channel.stream_stream(path, response_deserializer=aql_pb2.StreamResponse.FromString)

            def call(messages: list[bytes], metadata: list[tuple[str, str]]) -> Any:
                return list(stub(iter(messages), metadata=metadata, timeout=10))
        else:
            answer = {
                "ExecuteBatch": aql_pb2.BatchResponse,
                "GetServerInfo": aql_pb2.ServerInfoResponse,
            }.get(method, aql_pb2.QueryResponse)
            unary = channel.stream_unary(path, response_deserializer=answer.FromString)

            def call(messages: list[bytes], metadata: list[tuple[str, str]]) -> Any:
                return unary(iter(messages), metadata=metadata, timeout=10)

        with pytest.raises(grpc.RpcError) as refused:
            call([], admin)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = refused.value.details() or ""
        assert "none was sent" in details and method in details and "\n" not in details

        answered = call([payload.SerializeToString(), second.SerializeToString()], admin)
        if method in ("ExecuteQuery", "ExecuteBatch"):
            assert answered.request_id == "first"
        elif method == "GetServerInfo":
            assert answered.capabilities
        else:
            assert all(not part.HasField("error") for part in answered)
        for messages in ([], [payload.SerializeToString()] * 2):
            with pytest.raises(grpc.RpcError) as anonymous:
                call(messages, [])
            assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_recent_login_lets_the_next_call_log_in_with_its_request(tmp_path: Path) -> None:
    """A unary call whose credentials logged in a moment ago reads its message at once and logs in
    on the same trip as its request (one trip to the reactor instead of two); the login still
    decides: a token expired since is refused, and its next call logs in before its message is
    read again.  A reload forgets every recent login (a token of a replaced secret is refused
    unread).  Credentials that never logged in never have a message read."""
    process = ServerProcess(
        tmp_path / "recent",
        ["tls.enabled=false", "storage.backend=memory"],
        config_text=f'[auth]\nenabled = true\n[auth.jwt]\nsecret = "{SECRET}"\nleeway = 0\n',
    )
    process.start().wait_ready()
    message = grpc_message(set_request(1 * MB).SerializeToString())

    def raw(bearer: str) -> dict[str, int]:
        metadata = [("authorization", f"Bearer {bearer}")]
        return flood(process.grpc_port, QUERY, metadata, message, 1, 1, limit_s=20, hold_s=10)

    def login(bearer: str) -> None:
        with _connection(process) as channel:
            info = _server_info(channel)
            assert info(
                aql_pb2.ServerInfoRequest(), metadata=[("authorization", f"Bearer {bearer}")], timeout=10
            )

    def expiring(seconds: int, subject: str) -> str:
        claims = {"sub": subject, "roles": ["admin"], "exp": int(time.time()) + seconds}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    with _stops_cleanly(process):
        never = raw(token(["admin"], "never"))  # a valid token, but not logged in recently
        assert never["ended"] == 1 and never["complete"] == 1  # logged in first, then read: served

        short = expiring(2, "short")
        login(short)
        time.sleep(
            max(0.0, jwt.decode(short, options={"verify_signature": False})["exp"] - time.time()) + 1.1
        )
        late = raw(short)  # read at once, then refused by its login on the same trip
        assert (late["ended"], late["complete"]) == (1, 1), late
        forgotten = raw(short)  # refused before anything past the stream window is read
        assert forgotten["ended"] == 1 and forgotten["complete"] == 0, forgotten
        assert forgotten["sent"] <= 2 * STREAM_WINDOW_BYTES

        kept = token(["admin"], "kept")
        login(kept)
        process.config_path.write_text(
            process.config_path.read_text().replace(SECRET, "another-secret-0123456789abcdef0123456")
        )
        process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "Reloaded configuration" not in process.log():
            assert time.monotonic() < deadline, "the reload did not happen"
            time.sleep(0.05)
        replaced = raw(kept)
        assert replaced["ended"] == 1 and replaced["complete"] == 0, replaced


def test_a_message_that_does_not_parse_is_invalid_argument(server: ServerProcess) -> None:
    """A logged-in ExecuteQuery whose message is not a QueryRequest ends with INVALID_ARGUMENT."""
    with _channel(server) as channel:
        call = channel.unary_unary(QUERY)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"\xff\xff\xff", metadata=[("authorization", f"Bearer {token(['admin'])}")], timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "amaters.aql.QueryRequest" in (refused.value.details() or "")


def test_health_watch_streams_hold_no_worker_thread(server: ServerProcess) -> None:
    """More open health Watch streams than gRPC worker threads (grpc.max_workers, 16; 4 on each of
    5 connections, opened one after another: one address may have 4 reads at once) each get
    SERVING, and calls keep being served while they stay open."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    others = [_connection(server) for _ in range(4)]
    with _channel(server) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # refreshes the status Watch reports
        stubs = [stub, *(health_pb2_grpc.HealthStub(other) for other in others)]
        watches: list[Any] = []
        try:
            for each in stubs:
                for _ in range(4):
                    watches.append(_watch_opens(each))
            info = _server_info(channel)
            answer = info(
                aql_pb2.ServerInfoRequest(),
                metadata=[("authorization", f"Bearer {token(['admin'])}")],
                timeout=10,
            )
            assert answer.capabilities
        finally:
            for watch in watches:
                watch.cancel()
            for other in others:
                other.close()


def _connection(process: ServerProcess) -> grpc.Channel:
    """A channel with a connection of its own (grpcio shares one between channels to one address
    by default)."""
    return grpc.insecure_channel(
        f"127.0.0.1:{process.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )


def test_sigterm_after_watch_streams_ended_stops_the_server(tmp_path: Path) -> None:
    """Health Watch streams the client cancels do not freeze the server: a
    SIGTERM right after stops it (it hung for good when a status change met a Watch ending)."""
    from grpc_health.v1 import health_pb2_grpc

    process = ServerProcess(tmp_path / "watch", ["tls.enabled=false", "storage.backend=memory"])
    process.start().wait_ready()
    with _stops_cleanly(process):
        channels = [_connection(process) for _ in range(5)]
        try:
            # One after another (one address may have 4 reads at once); each is read once.
            watches = [
                _watch_opens(health_pb2_grpc.HealthStub(channel)) for channel in channels for _ in range(4)
            ]
            for watch in watches:
                watch.cancel()
        finally:
            for channel in channels:
                channel.close()


def test_watch_streams_a_client_never_reads_do_not_freeze_the_server(tmp_path: Path) -> None:
    """Health Watch streams whose client announces a zero HTTP/2 stream window (no message can be
    sent to them, ever) hold neither the reactor nor a gRPC worker: the ops site and other calls
    keep answering, a reading Watch is told NOT_SERVING on SIGTERM, and the server stops.  (A send
    on the reactor froze the whole server at the first status change.)"""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    process = ServerProcess(
        tmp_path / "stalled",
        ["tls.enabled=false", "storage.backend=memory", "grpc.max_workers=2", "grpc.reserved_workers=1"],
    )
    process.start().wait_ready()
    request = grpc_message(health_pb2.HealthCheckRequest().SerializeToString())
    stalled = [stalled_calls(process.grpc_port, "/grpc.health.v1.Health/Watch", request, 4) for _ in range(4)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{process.grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            for _ in range(3):  # more calls than worker threads, each answered
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert process.readyz() == 200  # the ops site, on the reactor
            process.signal(signal.SIGTERM)
            statuses = []
            with pytest.raises(grpc.RpcError) as ended:  # the server cancels the call when it stops
                for item in watch:
                    statuses.append(item.status)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        assert process.wait_exit(20) == 0
        assert "Traceback" not in process.log()
    finally:
        for sock in stalled:
            sock.close()
        process.cleanup()


def _watch_opens(stub: Any, timeout: float = 30) -> Any:
    """A Watch stream, once it was sent its first status (SERVING)."""
    from grpc_health.v1 import health_pb2

    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=timeout)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    return watch


def _metric(process: ServerProcess, name: str) -> float:
    body = http_get(f"http://127.0.0.1:{process.web_port}/metrics")[1].decode()
    (line,) = [line for line in body.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


def test_health_watch_streams_are_capped(tmp_path: Path) -> None:
    """Watch needs no login, so the streams one may keep open are capped: 4 per connection and
    grpc.max_health_watches in all (RESOURCE_EXHAUSTED past either; grpcio's own call limit counts
    a Watch only while it starts, so 3,000 stayed open against a limit of 1,024).  A stream that
    ends makes room, Check keeps answering, the metrics show both, and SIGHUP applies a new cap."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    process = ServerProcess(
        tmp_path / "watches",
        ["tls.enabled=false", "storage.backend=memory"],
        config_text="max_health_watches = 6\n",  # in the harness's [grpc] table
    )
    process.start().wait_ready()
    channels = [_connection(process) for _ in range(3)]
    stubs = [health_pb2_grpc.HealthStub(channel) for channel in channels]
    try:
        first = [_watch_opens(stubs[0]) for _ in range(4)]
        with pytest.raises(grpc.RpcError) as refused:
            _watch_opens(stubs[0])
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4 health Watch streams" in (refused.value.details() or "")
        second = [_watch_opens(stubs[1]) for _ in range(2)]
        with pytest.raises(grpc.RpcError) as refused:
            _watch_opens(stubs[1])
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "grpc.max_health_watches" in (refused.value.details() or "")
        answer = stubs[1].Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert _metric(process, "amaters_grpc_health_watches") == 6
        assert _metric(process, "amaters_grpc_health_watches_refused_total") == 2

        first.pop().cancel()
        deadline = time.monotonic() + 10
        while _metric(process, "amaters_grpc_health_watches") != 5:
            assert time.monotonic() < deadline, "an ended Watch stream was still counted"
            time.sleep(0.05)
        second.append(_watch_opens(stubs[1]))

        process.config_path.write_text(
            process.config_path.read_text().replace("max_health_watches = 6", "max_health_watches = 8")
        )
        process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        third: list[Any] = []
        while len(third) < 2:
            try:
                third.append(_watch_opens(stubs[2]))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the new grpc.max_health_watches was not applied"
                time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as refused:
            _watch_opens(stubs[2])
        assert "grpc.max_health_watches" in (refused.value.details() or "")
        assert _metric(process, "amaters_grpc_health_watches") == 8
        for watch in first + second + third:
            watch.cancel()
        assert process.stop(timeout=20) == 0
        assert "Traceback" not in process.log()
    finally:
        for channel in channels:
            channel.close()
        process.cleanup()


def test_silent_calls_without_login_hold_no_worker_for_long(tmp_path: Path) -> None:
    """Health calls that never send their request message (20 a second, no credentials) are
    refused past 4 per client address or cancelled 2 s after their read began, so logged-in calls
    keep being served: before, each held a gRPC worker thread until its client gave up, and a
    GetServerInfo waited 5 s, then passed its deadline.  Every silent call is ended by the server."""
    process = _auth_server(tmp_path / "silent")
    stop = threading.Event()

    channels = [_connection(process) for _ in range(4)]
    silent: list[Any] = []

    def attack() -> None:
        for index in range(80):  # 20 a second for 4 s
            if stop.is_set():
                return
            check = channels[index % 4].stream_unary("/grpc.health.v1.Health/Check")
            silent.append(check.future(_silent(stop), timeout=60))
            time.sleep(0.05)

    attacker = threading.Thread(target=attack)
    attacker.start()
    try:
        time.sleep(2)
        with _connection(process) as channel:
            info = _server_info(channel)
            for _ in range(3):
                answer = info(
                    aql_pb2.ServerInfoRequest(),
                    metadata=[("authorization", f"Bearer {token(['admin'])}")],
                    timeout=3,
                )
                assert answer.capabilities
        attacker.join(10)
        codes = _ended_codes(silent, timeout=10)  # ended by the server, long before the client's 60 s
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes  # over 4 from this address
        assert grpc.StatusCode.CANCELLED in codes  # its message did not arrive within 2 s
        stop.set()
        assert process.stop(timeout=20) == 0
        assert "Traceback" not in process.log()
    finally:
        stop.set()
        attacker.join(10)
        for channel in channels:
            channel.close()
        process.cleanup()


def test_a_logged_in_call_whose_message_never_comes_is_cancelled(tmp_path: Path) -> None:
    """A logged-in ExecuteQuery that sends no message is cancelled once limits.frame_timeout (1 s
    here) has passed, as a native frame that stalls is: it held a gRPC worker thread until the
    client's own deadline before.  One that sends its message but never its end is answered at once
    (nothing after the message is read), and calls that send theirs are served meanwhile."""
    process = _auth_server(tmp_path / "stalled-login", "limits.frame_timeout=1")
    stop = threading.Event()
    metadata = [("authorization", f"Bearer {token(['admin'])}")]

    def message_then_nothing() -> Iterator[bytes]:
        yield set_request(10).SerializeToString()
        stop.wait()

    with _stops_cleanly(process, stop), _connection(process) as channel:
        query = channel.stream_unary(QUERY, response_deserializer=aql_pb2.QueryResponse.FromString)
        silent = query.future(_silent(stop), metadata=metadata, timeout=60)
        unended = query.future(message_then_nothing(), metadata=metadata, timeout=60)
        served = query(iter([set_request(10).SerializeToString()]), metadata=metadata, timeout=10)
        assert not served.HasField("error")
        assert not unended.result(timeout=10).HasField("error")
        # Ended by the server, long before the client's 60 s.
        assert _ended_codes([silent], timeout=20) == [grpc.StatusCode.CANCELLED]


def test_one_principal_cannot_hold_every_worker(tmp_path: Path) -> None:
    """A logged-in principal, even one with no rights, has at most
    grpc.max_waiting_calls_per_principal calls waiting on its client: its streams (more are refused
    with RESOURCE_EXHAUSTED) and its calls whose request message is 1 s late (more are cancelled
    then, not after limits.frame_timeout).  So its idle interactive streams and its silent calls
    leave the other worker threads to other principals, and its calls that send their message are
    served; an interactive stream with no request for limits.idle_timeout is cancelled, which gives
    its place back; SIGHUP applies a new cap.  Before, 16 idle streams of a principal without any
    role held every worker, and every other gRPC call waited past its deadline."""
    process = _auth_server(
        tmp_path / "principal-waits",
        "limits.idle_timeout=2",
        "limits.frame_timeout=6",
        # the harness's [grpc]; no reserve, which the next test checks
        config_text="max_workers = 4\nmax_waiting_calls_per_principal = 3\nreserved_workers = 0\n",
    )
    stop = threading.Event()
    nobody = [("authorization", f"Bearer {token([], 'nobody')}")]
    other = [("authorization", f"Bearer {token(['admin'], 'other')}")]
    refusals = "amaters_grpc_waiting_calls_refused_total"

    def codes(calls: list[Any]) -> list[grpc.StatusCode]:
        return sorted((call.code() for call in calls), key=lambda code: code.name)

    def refused(count: int, what: str) -> None:
        deadline = time.monotonic() + 10
        while _metric(process, refusals) < count:
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    with _stops_cleanly(process, stop), _connection(process) as channel, _connection(process) as second:
        interactive = channel.stream_stream(
            "/amaters.aql.AqlService/ExecuteInteractive",
            response_deserializer=aql_pb2.QueryResponse.FromString,
        )
        query = channel.stream_unary(QUERY, response_deserializer=aql_pb2.QueryResponse.FromString)
        info = _server_info(second)

        idle = [interactive(_silent(stop), metadata=nobody, timeout=30) for _ in range(4)]
        refused(1, "the fourth stream of one principal was not refused")
        assert info(aql_pb2.ServerInfoRequest(), metadata=other, timeout=5).capabilities
        # A unary call that sends its message is not counted: served (refused by RBAC, in-band).
        sent = query(iter([set_request(10).SerializeToString()]), metadata=nobody, timeout=5)
        assert sent.HasField("error")
        # The three that ran are cancelled for their idleness, well before the client's 30 s.
        assert codes(idle) == [grpc.StatusCode.CANCELLED] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        stream_refusal = [call for call in idle if call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert "grpc.max_waiting_calls_per_principal" in (stream_refusal[0].details() or "")

        # Their places were given back: the principal's stream is served (refused by RBAC).
        get = aql_pb2.QueryRequest()
        get.query.get.collection, get.query.get.key.data = "c", b"k"
        answers = list(interactive(iter([get.SerializeToString()]), metadata=nobody, timeout=10))
        assert len(answers) == 1 and answers[0].HasField("error")

        # Silent unary calls: three wait until limits.frame_timeout, the fourth is cancelled
        # once late, and the other principal keeps a thread meanwhile.
        silent = [query.future(_silent(stop), metadata=nobody, timeout=30) for _ in range(4)]
        refused(2, "the fourth late call of one principal was not cancelled")
        assert info(aql_pb2.ServerInfoRequest(), metadata=other, timeout=5).capabilities
        assert _ended_codes(silent, timeout=20) == [grpc.StatusCode.CANCELLED] * len(silent)

        process.config_path.write_text(
            process.config_path.read_text().replace(
                "max_waiting_calls_per_principal = 3", "max_waiting_calls_per_principal = 2"
            )
        )
        process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            idle = [interactive(_silent(stop), metadata=nobody, timeout=30) for _ in range(3)]
            if codes(idle).count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 1:
                break
            assert time.monotonic() < deadline, "the new grpc.max_waiting_calls_per_principal was not applied"


def test_principals_together_cannot_hold_every_worker(tmp_path: Path) -> None:
    """Calls waiting on their clients, over all principals, leave grpc.reserved_workers threads to
    the calls that run: two principals each within their cap (2 of 4 workers each) get three
    streams open between them, the fourth is refused with RESOURCE_EXHAUSTED naming the setting,
    and a third principal is answered meanwhile; SIGHUP applies a new reserve.  Before, the two
    held all four workers and every other gRPC call waited past its deadline."""
    process = _auth_server(
        tmp_path / "reserved",
        "limits.idle_timeout=2",
        config_text="max_workers = 4\nmax_waiting_calls_per_principal = 2\nreserved_workers = 1\n",
    )
    stop = threading.Event()
    principals = {name: [("authorization", f"Bearer {token([], name)}")] for name in ("a", "b", "c")}
    other = [("authorization", f"Bearer {token(['admin'], 'other')}")]
    with _stops_cleanly(process, stop), _connection(process) as channel, _connection(process) as second:
        interactive = channel.stream_stream(
            "/amaters.aql.AqlService/ExecuteInteractive",
            response_deserializer=aql_pb2.QueryResponse.FromString,
        )
        info = _server_info(second)

        def streams(*names: str) -> list[Any]:
            return [interactive(_silent(stop), metadata=principals[name], timeout=30) for name in names]

        idle = streams("a", "a", "b", "b")
        deadline = time.monotonic() + 10
        while _metric(process, "amaters_grpc_waiting_calls_refused_total") < 1:
            assert time.monotonic() < deadline, "the fourth waiting stream was not refused"
            time.sleep(0.05)
        assert info(aql_pb2.ServerInfoRequest(), metadata=other, timeout=5).capabilities
        ended = [(call.code(), call.details() or "") for call in idle]  # the rest after idle_timeout
        refused = [details for code, details in ended if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(refused) == 1 and "grpc.reserved_workers" in refused[0], ended
        assert [code for code, _ in ended].count(grpc.StatusCode.CANCELLED) == 3

        process.config_path.write_text(
            process.config_path.read_text().replace("reserved_workers = 1", "reserved_workers = 2")
        )
        process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:  # three principals, one stream each: the third waits on a new reserve
            codes = [call.code() for call in streams("a", "b", "c")]
            if codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 1:
                break
            assert time.monotonic() < deadline, "the new grpc.reserved_workers was not applied"


def test_worker_threads_grow_only_while_calls_wait_behind_held_ones(tmp_path: Path) -> None:
    """grpc.core_workers threads serve calls that keep up, however many are made: 200 unary calls
    one after another start no thread beyond them.  Streams waiting on their clients hold threads,
    and the pool grows past the core for the calls behind them (up to grpc.max_workers): with both
    core threads held by idle interactive streams, another principal is still answered at once;
    when the streams end, the extra threads end too."""
    process = _auth_server(tmp_path / "elastic", "grpc.core_workers=2")
    stop = threading.Event()
    admin = [("authorization", f"Bearer {token(['admin'], 'admin')}")]
    with _stops_cleanly(process, stop), _connection(process) as channel:
        info = _server_info(channel)
        for _ in range(200):
            assert info(aql_pb2.ServerInfoRequest(), metadata=admin, timeout=10).capabilities
        assert _metric(process, "amaters_grpc_worker_threads_grown_total") == 0
        assert _metric(process, "amaters_grpc_worker_threads") <= 2

        interactive = channel.stream_stream("/amaters.aql.AqlService/ExecuteInteractive")
        idle = [
            interactive(_silent(stop), metadata=[("authorization", f"Bearer {token([], name)}")], timeout=30)
            for name in ("a", "b", "c")
        ]
        deadline = time.monotonic() + 10
        while _metric(process, "amaters_grpc_worker_threads") < 3:
            assert time.monotonic() < deadline, "no thread was started for the streams behind the core"
            time.sleep(0.05)
        assert info(aql_pb2.ServerInfoRequest(), metadata=admin, timeout=5).capabilities
        assert _metric(process, "amaters_grpc_worker_threads_grown_total") >= 2
        stop.set()
        for call in idle:
            call.code()
        deadline = time.monotonic() + 10
        while _metric(process, "amaters_grpc_worker_threads") > 2:
            assert time.monotonic() < deadline, "the extra threads did not end with the streams"
            assert info(aql_pb2.ServerInfoRequest(), metadata=admin, timeout=5).capabilities


def _server_info(channel: grpc.Channel) -> Any:
    return channel.unary_unary(
        "/amaters.aql.AqlService/GetServerInfo",
        request_serializer=aql_pb2.ServerInfoRequest.SerializeToString,
        response_deserializer=aql_pb2.ServerInfoResponse.FromString,
    )
