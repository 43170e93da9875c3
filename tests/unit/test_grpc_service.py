"""The gRPC front end's pure parts: grpc.listen parsing and checks, call metadata, health status."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from amaters.auth.principal import Credentials
from amaters.config import ConfigError, grpc_bind_address, load_config
from amaters.protocols.grpc_service import (
    CallInfo,
    PrincipalWaits,
    ReadinessHealth,
    ReadWatchdog,
    RecentLogins,
    _CallRefused,
    _LateRead,
    _ReadGate,
    call_info,
    client_address,
    waiting_calls_limit,
)


@pytest.mark.parametrize(
    ("endpoint", "address"),
    [
        ("tcp:7880:interface=127.0.0.1", "127.0.0.1:7880"),
        ("tcp:0", "0.0.0.0:0"),
        ("tcp6:7880:interface=\\:\\:1", "[::1]:7880"),
        ("tcp6:7880", "[::]:7880"),
        ("unix:/run/amaters/grpc.sock", "unix:/run/amaters/grpc.sock"),
        ("tcp:port=7881:interface=localhost", "localhost:7881"),
    ],
)
def test_bind_address(endpoint: str, address: str) -> None:
    assert grpc_bind_address(endpoint) == address


@pytest.mark.parametrize("endpoint", ["ssl:7880", "tcp:http", "tcp:70000", "tcp:1:reuse=yes", "tcp"])
def test_bad_endpoints_are_refused_in_one_line(endpoint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"grpc.listen={endpoint}"], {})
    problems = [p for p in caught.value.problems if p.startswith("grpc.listen")]
    assert len(problems) == 1 and "\n" not in problems[0]


def test_listen_checks() -> None:
    """grpc.listen beyond loopback needs auth (protected mode); it must not be server.listen."""
    with pytest.raises(ConfigError, match=r"grpc\.listen: 'tcp:7880' is reachable from other hosts"):
        load_config(None, ["grpc.listen=tcp:7880"], {})
    with pytest.raises(ConfigError, match=r"grpc\.listen: must differ"):
        load_config(None, ["grpc.listen=tcp:7878:interface=127.0.0.1"], {})
    assert load_config(None, ["grpc.enabled=false", "grpc.listen=tcp:7880"], {}).grpc.enabled is False


def test_reserved_workers_must_leave_a_worker() -> None:
    """grpc.reserved_workers at or above grpc.max_workers is refused in one line (no stream could
    ever be served); below it, or with gRPC off, it is accepted."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["grpc.max_workers=4"], {})
    assert caught.value.problems == [
        "grpc.reserved_workers: must be below grpc.max_workers (4), or no stream could ever be served"
    ]
    assert load_config(None, ["grpc.max_workers=4", "grpc.reserved_workers=3"], {}).grpc.reserved_workers == 3
    assert load_config(None, ["grpc.max_workers=2", "grpc.reserved_workers=0"], {}).grpc.max_workers == 2
    assert load_config(None, ["grpc.enabled=false", "grpc.max_workers=2"], {}).grpc.enabled is False


class FakeContext:
    def __init__(self, metadata: list[tuple[str, str]], peer: str = "ipv4:127.0.0.1:5000") -> None:
        self.metadata = metadata
        self._peer = peer

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def info(metadata: list[tuple[str, str]], **kwargs: Any) -> Any:
    return call_info(FakeContext(metadata, **kwargs), Credentials, False)  # type: ignore[arg-type]


def test_credentials_from_metadata() -> None:
    bearer = info([("authorization", "Bearer abc.def.ghi"), ("traceparent", "00-a-b-01")])
    assert bearer.credentials == Credentials("bearer_token", "abc.def.ghi")
    assert bearer.trace_context == {"traceparent": "00-a-b-01"}
    assert bearer.source == "127.0.0.1:5000"
    key = info([("x-api-key", "id.secret")], peer="ipv6:[::1]:6000")
    assert key.credentials == Credentials("api_key", "id.secret") and key.source == "[::1]:6000"
    assert info([]).credentials is None and info([]).trace_context is None


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ([("authorization", "Basic dTpw")], "must be 'Bearer <token>'"),
        ([("authorization", "Bearer ")], "must be 'Bearer <token>'"),
        ([("authorization", "Bearer t"), ("x-api-key", "k")], "not both"),
    ],
)
def test_malformed_credentials_are_unauthenticated(metadata: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(_CallRefused) as caught:
        info(metadata)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and message in caught.value.message


def test_health_follows_readiness() -> None:
    """Check answers from readiness() each time, for "" and the AqlService; unknown names are
    NOT_FOUND."""
    ready = [False]
    health = ReadinessHealth(lambda: ready[0])

    class Context:
        code: Any = None

        def set_code(self, code: Any) -> None:
            self.code = code

    def check(service: str) -> Any:
        context = Context()
        response = health.Check(health_pb2.HealthCheckRequest(service=service), context)
        return context.code or response.status

    assert check("") == health_pb2.HealthCheckResponse.NOT_SERVING
    ready[0] = True
    assert check("") == health_pb2.HealthCheckResponse.SERVING
    assert check("amaters.aql.AqlService") == health_pb2.HealthCheckResponse.SERVING
    assert check("nope") == grpc.StatusCode.NOT_FOUND
    ready[0] = False
    assert check("amaters.aql.AqlService") == health_pb2.HealthCheckResponse.NOT_SERVING


class _Aborted(Exception):
    pass


class _WatchContext:
    """A Watch call's context: its close callbacks, run by ``end()``; its connection is ``peer``."""

    def __init__(self, ended: bool = False, peer: str = "ipv4:127.0.0.1:40000") -> None:
        self.callbacks: list[Any] = []
        self.ended = ended
        self.address = peer
        self.status: tuple[grpc.StatusCode, str] | None = None

    def peer(self) -> str:
        return self.address

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise _Aborted(details)

    def add_callback(self, callback: Any) -> bool:
        if self.ended:
            return False
        self.callbacks.append(callback)
        return True

    def end(self) -> None:
        self.ended = True
        for callback in self.callbacks:
            callback()


class _Stream:
    """A Watch stream's send callback whose sends block while ``gate`` is closed (a client that
    does not let messages out), recording what it was sent (None: the call's end)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.sent: list[Any] = []
        self.sending = threading.Event()

    def __call__(self, response: Any) -> None:
        if response is None:
            self.sent.append(None)
            return
        self.sending.set()
        assert self.gate.wait(10)
        self.sent.append(response.status)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _watch(health: ReadinessHealth, stream: _Stream, context: _WatchContext, service: str = "") -> None:
    assert health.Watch(health_pb2.HealthCheckRequest(service=service), context, stream) is None


def test_a_watch_stream_that_never_takes_a_message_blocks_no_caller() -> None:
    """Status changes return at once while a Watch stream's send is stuck; once it takes messages
    again it is sent the latest status, after the one it was stuck on, and the others are served
    meanwhile."""
    ready = [True]
    health = ReadinessHealth(lambda: ready[0])
    stuck, reading = _Stream(), _Stream()
    stuck.gate.clear()
    _watch(health, stuck, _WatchContext())  # returns although its first send waits
    assert stuck.sending.wait(10)
    _watch(health, reading, _WatchContext())
    ready[0] = False
    health.refresh()
    ready[0] = True
    health.refresh()
    ready[0] = False
    health.refresh()
    assert not health.wait_sent(0.2)  # the stuck one is still sending
    assert stuck.sent == []
    stuck.gate.set()
    assert health.wait_sent(10)
    assert stuck.sent == [SERVING, NOT_SERVING]  # the changes in between were superseded
    assert reading.sent[-1] == NOT_SERVING  # the latest, without waiting for the stuck one


def test_a_watch_stream_that_ended_is_forgotten() -> None:
    """A stream whose call ended is sent nothing more (its end is passed on once), and a call that
    had ended before its Watch registered is not kept."""
    ready = [True]
    health = ReadinessHealth(lambda: ready[0])
    stream, context = _Stream(), _WatchContext()
    _watch(health, stream, context, "amaters.aql.AqlService")
    assert health.wait_sent(10)
    context.end()
    ready[0] = False
    health.refresh()
    assert health.wait_sent(10)
    assert stream.sent == [SERVING, None]
    late = _Stream()
    _watch(health, late, _WatchContext(ended=True))
    assert health.wait_sent(10)
    assert None in late.sent
    assert health._watches == {}


def test_graceful_shutdown_tells_watch_streams_not_serving_and_stays() -> None:
    ready = [True]
    health = ReadinessHealth(lambda: ready[0])
    stream = _Stream()
    _watch(health, stream, _WatchContext())
    health.enter_graceful_shutdown()
    health.set("", SERVING)  # ignored from now on
    assert health.wait_sent(10)
    assert stream.sent[-1] == NOT_SERVING


def test_no_thread_to_send_with_leaves_the_status_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    """When no thread can be started (a process at its limit), a change is not lost and nothing
    raises or waits: the stream gets the latest status at the next change."""
    ready = [True]
    health = ReadinessHealth(lambda: ready[0])
    stream = _Stream()
    start = threading.Thread.start

    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    _watch(health, stream, _WatchContext())
    ready[0] = False
    health.refresh()
    assert health.wait_sent(0)  # nothing is sending
    assert stream.sent == []
    monkeypatch.setattr(threading.Thread, "start", start)
    ready[0] = True
    health.refresh()
    assert health.wait_sent(10)
    assert stream.sent == [SERVING]


def test_watch_streams_are_capped_in_total_and_per_connection() -> None:
    """Past ``max_watches`` open streams, or 4 on one connection, a Watch is refused with
    RESOURCE_EXHAUSTED and is not kept; a stream that ends makes room for another, and a lower cap
    set later applies to the streams opened from then on."""
    health = ReadinessHealth(lambda: True, max_watches=6)
    one = [_WatchContext(peer="ipv4:127.0.0.1:1") for _ in range(5)]
    for context in one[:4]:
        _watch(health, _Stream(), context)
    with pytest.raises(_Aborted):
        _watch(health, _Stream(), one[4])
    assert one[4].status is not None
    assert one[4].status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4 health Watch streams" in one[4].status[1]
    other = [_WatchContext(peer=f"ipv4:127.0.0.1:{port}") for port in (2, 3, 4)]
    _watch(health, _Stream(), other[0])
    _watch(health, _Stream(), other[1], "amaters.aql.AqlService")
    with pytest.raises(_Aborted):
        _watch(health, _Stream(), other[2])
    assert other[2].status is not None
    assert "grpc.max_health_watches" in other[2].status[1]
    assert (health.open_watches, health.refused) == (6, 2)

    one[0].end()  # a stream of the first connection ends: room on it, and in total
    assert health.open_watches == 5
    again = _WatchContext(peer="ipv4:127.0.0.1:1")
    _watch(health, _Stream(), again)
    assert health.open_watches == 6

    health.max_watches = 2
    for context in [*one[1:4], other[0], other[1], again]:
        context.end()
    assert health.open_watches == 0
    assert health._watches == {} and health._per_peer == {}
    late = _WatchContext(peer="ipv4:127.0.0.1:5")
    _watch(health, _Stream(), late)
    _watch(health, _Stream(), _WatchContext(peer="ipv4:127.0.0.1:6"))
    with pytest.raises(_Aborted):
        _watch(health, _Stream(), _WatchContext(peer="ipv4:127.0.0.1:7"))
    assert health.wait_sent(10)


def test_unix_socket_watch_streams_count_only_in_the_total() -> None:
    """grpcio names every Unix-socket peer ``unix:``: its streams are not capped per connection
    (that would cap all the socket's clients together at 4), only in total."""
    health = ReadinessHealth(lambda: True, max_watches=6)
    for _ in range(6):
        _watch(health, _Stream(), _WatchContext(peer="unix:"))
    refused = _WatchContext(peer="unix:")
    with pytest.raises(_Aborted):
        _watch(health, _Stream(), refused)
    assert refused.status is not None
    assert "grpc.max_health_watches" in refused.status[1]
    assert health.wait_sent(10)


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.7:51234", "10.0.0.7"),
        ("ipv6:[::1]:51234", "::1"),
        ("ipv6:%5B2001:db8::1%5D:443", "2001:db8::1"),
        ("unix:/run/amaters/grpc.sock", "unix"),
        ("unix:", "unix"),
    ],
)
def test_client_address(peer: str, address: str) -> None:
    assert client_address(peer) == address


class _ReadContext(_WatchContext):
    """A call of a service without a login: ``cancel()`` ends the wait for its message."""

    def __init__(self, peer: str) -> None:
        super().__init__(peer=peer)
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


def _message_when(context: _ReadContext, arrived: threading.Event) -> Any:
    """A request stream whose one message comes when ``arrived`` is set, and none if the call is
    cancelled first."""
    while not (arrived.is_set() or context.cancelled.is_set()):
        time.sleep(0.01)
    if arrived.is_set() and not context.cancelled.is_set():
        yield b"request"


def test_reads_without_a_login_are_capped_per_address_and_cancelled_when_silent() -> None:
    """One address gets ``per_client`` reads at a time (more are refused at once, others' are not);
    a message that does not come within ``timeout`` cancels its call (DEADLINE_EXCEEDED) and frees
    its slot and its place; one that comes is read."""
    gate = _ReadGate(slots=8, max_bytes=1024, wait=5.0, watchdog=ReadWatchdog(), timeout=0.3, per_client=2)
    never = threading.Event()
    silent = [_ReadContext("ipv4:10.0.0.7:1"), _ReadContext("ipv4:10.0.0.7:2")]
    outcomes: list[Any] = []

    def read(context: _ReadContext, arrived: threading.Event) -> None:
        try:
            outcomes.append(gate.read(_message_when(context, arrived), context))  # type: ignore[arg-type]
        except _Aborted:
            outcomes.append(context.status)

    readers = [threading.Thread(target=read, args=(context, never)) for context in silent]
    for reader in readers:
        reader.start()
    while gate._reading.get("10.0.0.7", 0) < 2:
        time.sleep(0.01)
    third = _ReadContext("ipv4:10.0.0.7:3")
    with pytest.raises(_Aborted):
        gate.read(_message_when(third, never), third)  # type: ignore[arg-type]
    assert third.status is not None
    assert third.status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    other, sent = _ReadContext("ipv4:10.0.0.8:1"), threading.Event()
    sent.set()
    assert gate.read(_message_when(other, sent), other) == b"request"  # type: ignore[arg-type]
    for reader in readers:
        reader.join(10)
    assert all(context.cancelled.is_set() for context in silent)
    assert [outcome[0] for outcome in outcomes] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
    assert gate._reading == {}
    again = _ReadContext("ipv4:10.0.0.7:4")
    assert gate.read(_message_when(again, sent), again) == b"request"  # type: ignore[arg-type]
    assert not again.cancelled.is_set()


def test_the_watchdog_cancels_only_reads_past_their_deadline() -> None:
    """Reads finished in time are forgotten and never cancelled; reads past their deadline are
    cancelled and marked expired, those of a shorter timeout first even when watched later."""
    watchdog = ReadWatchdog()
    finished = _ReadContext("ipv4:10.0.0.1:1")
    watched = watchdog.watch(finished, 0.2)
    watchdog.done(watched)
    slow, quick = _ReadContext("ipv4:10.0.0.1:2"), _ReadContext("ipv4:10.0.0.1:3")
    slow_read = watchdog.watch(slow, 1.0)
    quick_read = watchdog.watch(quick, 0.1)
    assert quick.cancelled.wait(10)
    assert quick_read.expired and not slow.cancelled.is_set()
    assert slow.cancelled.wait(10)
    assert slow_read.expired
    assert not finished.cancelled.is_set() and not watched.expired
    assert all(not pending for pending in watchdog._queues.values())
    later = _ReadContext("ipv4:10.0.0.1:4")  # the thread keeps serving after idling
    watchdog.watch(later, 0.05)
    assert later.cancelled.wait(10)


def test_a_principal_has_at_most_its_cap_of_streams_open() -> None:
    """Past ``limit`` open streams of one holder, ``enter`` refuses (saying how many are open) and
    does not count the stream; other holders are not affected; a stream that returned makes room;
    leaving twice, or for a stream never counted, changes nothing; a cap changed later applies to the streams
    entering from then on, and 0 means no cap."""
    streams = PrincipalWaits(limit=2)
    a = [_WatchContext(peer=f"ipv4:10.0.0.1:{port}") for port in range(4)]
    assert streams.enter(a[0], "principal a") is None
    assert streams.enter(a[1], "principal a") is None
    assert streams.enter(a[2], "principal a") == (
        "2 calls of this principal are waiting on their client (grpc.max_waiting_calls_per_principal)"
    )
    b = _WatchContext(peer="ipv4:10.0.0.2:1")
    assert streams.enter(b, "principal b") is None
    assert (streams.waiting("principal a"), streams.waiting("principal b"), streams.total) == (2, 1, 3)
    assert streams.refused == 1

    streams.leave(a[2])  # refused: never counted
    streams.leave(a[0])
    streams.leave(a[0])
    assert streams.waiting("principal a") == 1
    assert streams.enter(a[3], "principal a") is None
    assert (streams.enter(a[0], "principal a") or "").startswith("2 calls of this principal")

    streams.limit = 0
    many = [_WatchContext(peer=f"ipv4:10.0.0.1:{port}") for port in range(10, 20)]
    assert all(streams.enter(context, "principal a") is None for context in many)
    streams.limit = 1
    assert (streams.enter(a[2], "principal a") or "").startswith("12 calls of this principal")
    for context in [a[1], a[3], b, *many]:
        streams.leave(context)
    assert streams.total == 0 and streams._waiting == {} and streams._holders == {}
    assert streams.refused == 3


def test_principals_together_leave_the_reserved_workers() -> None:
    """With ``total_limit``, calls waiting over all holders stop there, each holder within its own
    cap: one more is refused (saying why) and not counted, whoever it is; a call that left makes
    room for any holder; 0 lifts it.  The total is every worker but the reserved ones."""
    assert waiting_calls_limit(16, 4) == 12
    assert waiting_calls_limit(16, 0) == 0  # nothing reserved: no total cap
    assert waiting_calls_limit(2, 4) == 1  # refused by the configuration; never no cap
    waits = PrincipalWaits(limit=2, total_limit=3)
    calls = {
        who: [_WatchContext(peer=f"ipv4:10.0.0.{n}:{port}") for port in range(2)]
        for n, who in enumerate("abc")
    }
    assert waits.enter(calls["a"][0], "principal a") is None
    assert waits.enter(calls["a"][1], "principal a") is None
    assert waits.enter(calls["b"][0], "principal b") is None
    refusal = waits.enter(calls["b"][1], "principal b")
    assert refusal == "3 calls are waiting on their clients, every worker thread but grpc.reserved_workers"
    assert waits.enter(calls["c"][0], "principal c") is not None
    assert (waits.total, waits.waiting("principal b"), waits.waiting("principal c"), waits.refused) == (
        3,
        1,
        0,
        2,
    )
    waits.leave(calls["a"][0])
    assert waits.enter(calls["c"][0], "principal c") is None
    waits.total_limit = 0
    assert waits.enter(calls["b"][1], "principal b") is None
    assert waits.total == 4


def test_recent_logins_are_kept_by_digest_for_a_while() -> None:
    """A credential remembered is found until ``seconds`` have passed, then not; forgetting or a
    reload's clear drops it; when ``size`` are kept, a new one makes room by forgetting the expired
    ones, or all of them when none has expired.
    Keys are digests: other secrets, kinds or client certificates give other keys, and the secret
    is not kept."""
    now = [100.0]
    recent = RecentLogins(seconds=30.0, size=3, clock=lambda: now[0])

    def key(kind: str, secret: str) -> bytes:
        return RecentLogins.key(CallInfo(Credentials(kind, secret), None, "127.0.0.1:5000", None))

    alice = key("bearer_token", "token-a")
    assert len(alice) == 32 and b"token-a" not in alice
    assert len({alice, key("bearer_token", "token-b"), key("api_key", "token-a"), key("api_key", "")}) == 4
    anonymous = RecentLogins.key(CallInfo(None, None, "127.0.0.1:5000", None))
    assert anonymous != key("api_key", "")
    assert recent.get(alice) is None
    recent.remember(alice, "principal alice")
    recent.remember(anonymous, "")
    now[0] += 29.9
    assert (recent.get(alice), recent.get(anonymous)) == ("principal alice", "")
    now[0] += 0.2
    assert recent.get(alice) is None
    recent.remember(alice, "principal alice")
    recent.forget(alice)
    assert recent.get(alice) is None and recent.get(anonymous) is None  # expired too
    for n in range(2):
        recent.remember(key("api_key", f"k{n}"), f"principal k{n}")
    assert len(recent) == 3  # the anonymous one has expired but is still kept
    recent.remember(key("api_key", "k2"), "principal k2")  # full: the expired one goes
    recent.remember(key("api_key", "k0"), "principal k0")  # already kept: nothing forgotten
    assert len(recent) == 3 and recent.get(key("api_key", "k1")) == "principal k1"
    recent.remember(alice, "principal alice")
    assert len(recent) == 1 and recent.get(alice) == "principal alice"
    recent.clear()
    assert len(recent) == 0


def test_a_late_read_counts_among_its_principals_waiting_calls_until_it_finishes() -> None:
    """A read still going ``after`` seconds on counts among its holder's waiting calls until it
    finishes; past the cap it is cancelled instead (and marked expired); a read finished in time
    is never counted, even when its turn to be late comes after it finished."""
    watchdog = ReadWatchdog()
    waits = PrincipalWaits(limit=1)
    first, second = _ReadContext("ipv4:10.0.0.1:1"), _ReadContext("ipv4:10.0.0.1:2")
    first_late, second_late = _LateRead(waits, first, "principal a"), _LateRead(waits, second, "principal a")
    with watchdog.reading(first, 30.0, (0.05, first_late)) as first_read:
        deadline = time.monotonic() + 10
        while waits.waiting("principal a") < 1:
            assert time.monotonic() < deadline, "the late read was not counted"
            time.sleep(0.01)
        with watchdog.reading(second, 30.0, (0.05, second_late)) as second_read:
            assert second.cancelled.wait(10)  # the holder's one place is taken
        assert second_read.expired and waits.refused == 1
        second_late.finished()
        assert not first.cancelled.is_set() and not first_read.expired
    first_late.finished()
    assert waits.total == 0

    in_time = _ReadContext("ipv4:10.0.0.1:3")
    late = _LateRead(waits, in_time, "principal a")
    with watchdog.reading(in_time, 30.0, (0.05, late)) as read:
        pass
    late.finished()
    late(read)  # its turn comes after it finished (the watchdog took it just before)
    time.sleep(0.2)
    assert waits.total == 0 and not in_time.cancelled.is_set() and not read.expired
