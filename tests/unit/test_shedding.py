"""Load shedding (lag and queue) and connection limits, on fake clocks and memory reactors."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from amaters.config import LimitsConfig, default_config
from amaters.errors import ErrorCategory, Overloaded
from amaters.ops.lag import LagMonitor
from amaters.protect.connlimit import ConnectionLimiter, ConnectionLimitFactory
from amaters.protect.shedding import LoadShedder
from amaters.protocols.server import ANONYMOUS
from amaters.query import operations as ops
from amaters.query.executor import QueryExecutor
from amaters.query.pipeline import PipelineStage, QueryPipeline, RequestContext
from amaters.storage.memory import MemoryBackend


def ctx(n: int = 1) -> RequestContext:
    return RequestContext(n, ANONYMOUS, "127.0.0.1:1")


class Hold(PipelineStage):
    """Keeps every request in progress until released."""

    name = "hold"

    def __init__(self) -> None:
        self.held: list[defer.Deferred[None]] = []

    def before(self, ctx: RequestContext, op: Any) -> object:
        d: defer.Deferred[None] = defer.Deferred()
        self.held.append(d)
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d in held:
            d.callback(None)


def pipeline_with(shedder: LoadShedder) -> tuple[QueryPipeline, Hold]:
    backend = MemoryBackend()
    backend.open()
    pipeline = QueryPipeline(QueryExecutor(backend), LimitsConfig())
    hold = Hold()
    pipeline.add_stage(shedder)
    pipeline.add_stage(hold)
    return pipeline, hold


def test_queue_limit_refuses_fast_then_recovers() -> None:
    """At limits.max_queued requests in progress, new ones fail at once; once they finish, all is well."""
    shedder = LoadShedder(LimitsConfig(max_queued=3, shed_lag_ms=0), lambda: 0.0)
    pipeline, hold = pipeline_with(shedder)
    running = [pipeline.execute(ctx(i), ops.Get("c", b"k")) for i in range(3)]
    assert shedder.in_progress == 3
    refused = pipeline.execute(ctx(9), ops.Get("c", b"k"))
    failure = refused.result  # failed synchronously: no waiting in a queue
    refused.addErrback(lambda _: None)
    assert isinstance(failure.value, Overloaded)
    assert failure.value.category == ErrorCategory.RETRYABLE and failure.value.retry_after_ms == 100
    assert shedder.shed_queue == 1
    hold.release()
    for d in running:
        assert d.called
    assert shedder.in_progress == 0
    ok = pipeline.execute(ctx(10), ops.Get("c", b"k"))
    hold.release()
    assert ok.called and shedder.in_progress == 0


def test_lag_refuses_with_the_lag_as_retry_hint_and_health_is_exempt() -> None:
    """Reactor lag over limits.shed_lag_ms refuses requests; HEALTH_CHECK and SERVER_INFO still pass."""
    lag = [0.0]
    shedder = LoadShedder(LimitsConfig(shed_lag_ms=200), lambda: lag[0])
    assert shedder.before(ctx(), ops.Get("c", b"k")) is None
    lag[0] = 0.75
    with pytest.raises(Overloaded) as info:
        shedder.before(ctx(), ops.Get("c", b"k"))
    assert info.value.retry_after_ms == 750
    assert "750 ms behind" in info.value.message
    assert shedder.before(ctx(), ops.HealthCheck()) is None
    assert shedder.before(ctx(), ops.ServerInfo()) is None
    lag[0] = 60.0
    with pytest.raises(Overloaded) as info:
        shedder.before(ctx(), ops.Set("c", b"k", None))  # type: ignore[arg-type]
    assert info.value.retry_after_ms == 5000  # capped
    assert shedder.shed_lag == 2


def test_refused_by_an_earlier_stage_is_not_counted() -> None:
    """A request another stage refused before the shedder saw it does not change the count."""

    class Refuse(PipelineStage):
        name = "refuse"

        def before(self, ctx: RequestContext, op: Any) -> object:
            raise Overloaded("no")

    shedder = LoadShedder(LimitsConfig(max_queued=5), lambda: 0.0)
    backend = MemoryBackend()
    backend.open()
    pipeline = QueryPipeline(QueryExecutor(backend), LimitsConfig())
    pipeline.add_stage(Refuse())
    pipeline.add_stage(shedder)
    d = pipeline.execute(ctx(), ops.Get("c", b"k"))
    d.addErrback(lambda _: None)
    assert shedder.in_progress == 0


def test_requests_answered_together_leave_the_count_together() -> None:
    """after_many lowers the count of requests in progress by those before() counted."""
    shedder = LoadShedder(LimitsConfig(max_queued=10, shed_lag_ms=0), lambda: 0.0)
    counted = [ctx(n) for n in range(3)]
    for c in counted:
        shedder.before(c, ops.Get("c", b"k"))
    assert shedder.in_progress == 3
    items = [(c, ops.Get("c", b"k"), None) for c in [*counted[:2], ctx(9)]]
    shedder.after_many(items)
    assert shedder.in_progress == 1
    shedder.after_many(items)  # counted once only
    assert shedder.in_progress == 1


def test_shedder_reload() -> None:
    """New shed_lag_ms / max_queued apply once committed; unrelated limit changes need nothing."""
    shedder = LoadShedder(LimitsConfig(max_queued=1), lambda: 0.0)
    old = default_config()
    same = attrs.evolve(old, limits=attrs.evolve(old.limits, max_queued=1, max_key_bytes=10))
    shedder.limits = same.limits
    assert shedder.prepare_reload(old, same) is None
    new = attrs.evolve(old, limits=attrs.evolve(old.limits, max_queued=0))
    commit = shedder.prepare_reload(old, new)
    assert commit is not None
    commit()
    assert shedder.limits.max_queued == 0


def test_lag_source_reads_the_running_monitor() -> None:
    """The shedder's lag (the monitor's current_lag) comes from the lag monitor while it runs, and
    reads 0 before and after."""
    clock = Clock()
    monitor = LagMonitor(clock, 0.5)
    source = monitor.current_lag
    assert source() == 0.0
    monitor.startService()
    clock.advance(0.5)
    clock.advance(2.0)  # the next probe is 1.5 s overdue
    assert source() == pytest.approx(1.5)
    monitor.stopService()
    assert source() == 0.0
    assert not clock.getDelayedCalls()


# -- connection limits -------------------------------------------------------------------------


class Echo(Protocol):
    pass


def connect(factory: Any, host: str, port: int) -> Any:
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    if protocol is not None:
        protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", host, port)))
    return protocol


def test_connection_limits_total_and_per_address() -> None:
    """Past max_connections_per_ip one address is refused (None: closed at once) while others connect;
    past max_connections everyone is; closing a connection frees its slot."""
    limiter = ConnectionLimiter(LimitsConfig(max_connections=4, max_connections_per_ip=2), Clock())
    factory = ConnectionLimitFactory.wrapper(limiter)(Factory.forProtocol(Echo))
    a1, a2 = connect(factory, "10.0.0.1", 1), connect(factory, "10.0.0.1", 2)
    assert a1 is not None and a2 is not None
    assert connect(factory, "10.0.0.1", 3) is None
    assert limiter.refused_per_ip == 1
    b1, b2 = connect(factory, "10.0.0.2", 1), connect(factory, "10.0.0.3", 1)
    assert b1 is not None and b2 is not None and limiter.total == 4
    assert connect(factory, "10.0.0.4", 1) is None
    assert limiter.refused_total == 1
    a1.connectionLost(None)
    assert limiter.total == 3 and limiter.per_source["10.0.0.1"] == 1
    assert connect(factory, "10.0.0.1", 4) is not None


def test_connection_limits_add_no_wrapper_and_release_once() -> None:
    """An admitted connection is the wrapped factory's own protocol (nothing in its data path);
    its slot is released exactly once, however often connectionLost is called."""
    limiter = ConnectionLimiter(LimitsConfig(max_connections=2, max_connections_per_ip=1), Clock())
    factory = ConnectionLimitFactory(Factory.forProtocol(Echo), limiter)
    protocol = connect(factory, "10.0.0.1", 1)
    assert type(protocol) is Echo
    assert protocol.transport is not None
    protocol.dataReceived(b"x")  # straight to the protocol
    assert limiter.total == 1 and limiter.per_source == {"10.0.0.1": 1}
    protocol.connectionLost(None)
    protocol.connectionLost(None)
    assert limiter.total == 0 and limiter.per_source == {}
    assert connect(factory, "10.0.0.1", 2) is not None


def test_connection_limits_zero_means_unlimited_and_reload() -> None:
    """Limits of 0 admit everything; a reload tightens them for the next connection only."""
    limiter = ConnectionLimiter(LimitsConfig(max_connections=0, max_connections_per_ip=0), Clock())
    factory = ConnectionLimitFactory(Factory.forProtocol(Echo), limiter)
    opened = [connect(factory, "10.0.0.1", i) for i in range(50)]
    assert all(p is not None for p in opened)
    old = default_config()
    new = attrs.evolve(old, limits=attrs.evolve(old.limits, max_connections_per_ip=10))
    commit = limiter.prepare_reload(old, new)
    assert commit is not None
    commit()
    assert connect(factory, "10.0.0.1", 99) is None
    assert limiter.total == 50  # nothing open was closed
    assert limiter.prepare_reload(new, new) is None


@pytest.mark.parametrize("lag", [0.0, 0.75])
def test_requests_of_one_read_are_admitted_and_counted_as_one_by_one(lag: float) -> None:
    """Through run_many (the keyed requests of one read), the shedder admits and refuses exactly
    the requests it would admit and refuse one by one, counts each admitted one as in progress
    until its afters, and refuses them all while lagging."""
    shedder = LoadShedder(LimitsConfig(max_queued=5, shed_lag_ms=200), lambda: lag)
    pipeline, hold = pipeline_with(shedder)
    running = [pipeline.execute(ctx(i), ops.Get("c", b"k")) for i in range(2)]
    if lag:
        for d in running:
            d.addErrback(lambda _: None)
    finished: list[Any] = []
    outcomes = pipeline.run_many([(ctx(10 + i), ops.Get("c", b"k")) for i in range(4)], finished)
    refused = [not done and d.called and isinstance(d.result, Failure) for done, d in outcomes]
    if lag:
        assert refused == [True, True, True, True] and shedder.shed_lag == 6
        assert shedder.in_progress == 0
    else:
        assert refused == [False, False, False, True] and shedder.shed_queue == 1
        assert shedder.in_progress == 5
    for _, d in outcomes:
        d.addErrback(lambda _: None)
    hold.release()
    assert shedder.in_progress == 0


def test_a_read_far_from_the_limits_is_counted_at_once() -> None:
    """Far from max_queued and without lag, the keyed requests of one read are admitted with one
    reading of the lag, and all counted."""
    readings: list[float] = []

    def lag() -> float:
        readings.append(0.0)
        return 0.0

    shedder = LoadShedder(LimitsConfig(max_queued=100, shed_lag_ms=200), lag)
    items = [(ctx(i), ops.Get("c", b"k")) for i in range(10)]
    assert shedder.before_many(items) is None
    assert len(readings) == 1 and shedder.in_progress == 10
    shedder.after_many([(c, op, None) for c, op in items])
    assert shedder.in_progress == 0
