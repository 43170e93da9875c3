"""The observability wiring on the real service tree (memory backend, MemoryReactorClock): service
order, pipeline stages, listener hooks, and readiness flipping while the tree starts and stops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.application import service
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from amaters.config import load_config
from amaters.interfaces import IReadScope
from amaters.ops.metrics import Metrics
from amaters.ops.observability import MeteredFactory
from amaters.tap import build_service
from amaters.tls.context import BatchedWritesTLSFactory


def tree(tmp_path: Path, *overrides: str) -> tuple[Any, MemoryReactorClock]:
    config = load_config(
        None,
        [f"server.data_dir={tmp_path}", "storage.backend=memory", "grpc.enabled=false", *overrides],
        {},
    )
    reactor = MemoryReactorClock()
    return build_service(config, reactor, synchronous_pools=True), reactor


def status(root: Any, path: str) -> int:
    treq = StubTreq(root.getServiceNamed("web").api.app.resource())
    d = treq.get("http://ops" + path)
    treq.flush()
    code: int = d.result.code  # type: ignore[attr-defined]
    return code


def test_services_are_placed_around_the_listener(tmp_path: Path) -> None:
    """logging is the first child (starts first, stops last); the lag monitor, tracing and metrics
    come just before the listener, so they stop only after it has drained."""
    root, _ = tree(tmp_path, "tracing.enabled=true")
    names = [child.name for child in root]
    assert names[0] == "logging"
    listener = names.index("listener")
    assert names[listener - 3 : listener] == ["lagmonitor", "tracing", "metrics"]
    assert names.index("web") < names.index("lagmonitor")


def test_pipeline_stages_and_hooks(tmp_path: Path) -> None:
    """The pipeline gets the tracing stage first and metrics and access log last; the ops site
    serves the tree's metrics; the listener wraps its factory for connection and byte counts."""
    root, _ = tree(tmp_path, "tracing.enabled=true")
    stage_names = [stage.name for stage in root.components.pipeline.stages]
    assert stage_names[0] == "tracing"
    assert stage_names[-2:] == ["metrics", "accesslog"]
    assert isinstance(root.components.metrics, Metrics)
    assert root.getServiceNamed("web").api.metrics is root.components.metrics
    listener = root.getServiceNamed("listener")
    assert listener.wrap_factory is not None
    assert root.components.logging in root.components.reloader.components


def test_no_tracing_stage_when_disabled(tmp_path: Path) -> None:
    """With tracing off (the default) there is no tracing service and no tracing stage."""
    root, _ = tree(tmp_path)
    assert "tracing" not in [child.name for child in root]
    assert "tracing" not in [stage.name for stage in root.components.pipeline.stages]


def test_listener_serves_through_the_metered_factory(tmp_path: Path) -> None:
    """Once started, the native port's factory is TLS (sending each write at once) around the
    metered factory around the protocol factory."""
    root, reactor = tree(tmp_path)
    d = root.startService()
    assert d.called
    listener = root.getServiceNamed("listener")
    factories = {port: factory for port, factory, *_ in reactor.tcpServers}
    native = factories[7878]
    while not isinstance(native, TLSMemoryBIOFactory):
        native = native.wrappedFactory
    assert isinstance(native, BatchedWritesTLSFactory)
    assert isinstance(native.wrappedFactory, MeteredFactory)
    assert native.wrappedFactory.wrappedFactory is listener.factory
    # A connection's TLS layer wraps the native protocol itself, which takes the read scope.
    connection = native.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    connection.makeConnection(StringTransport())
    assert IReadScope.providedBy(connection.wrappedProtocol)
    assert connection._scope is connection.wrappedProtocol
    connection.connectionLost(None)
    root.stopService()


class BusyConnection:
    """Stands in for a connection with one request in flight: a drain waits for it."""

    _inflight = 1

    def going_away(self) -> None:
        """Told of the drain; it keeps its request running."""

    def _close(self) -> None:
        raise AssertionError("a busy connection is not closed by the drain")

    def abort(self) -> None:
        raise AssertionError("the drain did not run out of time")


class Gate(service.Service):
    """A child whose start waits for the test (a slow step in the middle of the start)."""

    name = "gate"

    def __init__(self) -> None:
        self.opened: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> defer.Deferred[None]:  # type: ignore[override]
        super().startService()  # type: ignore[no-untyped-call]
        return self.opened


def test_readiness_flips_while_the_tree_starts_and_stops(tmp_path: Path) -> None:
    """The real tree: /readyz is 503 while a start step is still running (the ops site already
    answers) and while the listener drains, 200 in between; /livez stays 200 throughout."""
    root, _ = tree(tmp_path)
    gate = Gate()
    gate.setServiceParent(root)
    services = root.services
    services.remove(gate)
    services.insert(services.index(root.getServiceNamed("listener")), gate)
    started = root.startService()
    assert not started.called
    assert root.getServiceNamed("web").running
    assert status(root, "/readyz") == 503
    assert status(root, "/livez") == 200
    gate.opened.callback(None)
    assert started.called
    assert status(root, "/readyz") == 200

    # Hold the drain open with a connection that still has a request running.
    listener = root.getServiceNamed("listener")
    busy = BusyConnection()
    listener.factory.connections.add(busy)
    stopped = root.stopService()
    assert not stopped.called
    assert status(root, "/readyz") == 503
    assert status(root, "/livez") == 200
    listener.factory.connection_lost(busy)
    assert stopped.called


def test_web_disabled_still_wires_metrics(tmp_path: Path) -> None:
    """With web.enabled = false the metrics are still collected (nothing serves them)."""
    root, _ = tree(tmp_path, "web.enabled=false")
    assert isinstance(root.components.metrics, Metrics)
    assert "web" not in [child.name for child in root]
