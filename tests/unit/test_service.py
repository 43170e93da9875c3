"""AsyncMultiService: ordered, awaited start and stop, with failures reported; thread-pool service."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import Clock

from amaters.service import (
    AsyncMultiService,
    SerialThreadService,
    StartupError,
    StopErrors,
    ThreadPoolService,
)


class FakeService(service.Service):
    """A child whose start and stop fire when the test says so."""

    def __init__(
        self, name: str, journal: list[str], fail_start: bool = False, fail_stop: bool = False
    ) -> None:
        self.name = name
        self.journal = journal
        self.fail_start = fail_start
        self.fail_stop = fail_stop
        self.start_d: defer.Deferred[None] = defer.Deferred()
        self.stop_d: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> Any:
        super().startService()
        self.journal.append(f"start {self.name}")
        if self.fail_start:
            return defer.fail(RuntimeError(f"{self.name} cannot start"))
        return self.start_d

    def stopService(self) -> Any:
        super().stopService()
        self.journal.append(f"stop {self.name}")
        if self.fail_stop:
            return defer.fail(RuntimeError(f"{self.name} cannot stop"))
        return self.stop_d


def make(journal: list[str], *children: FakeService) -> AsyncMultiService:
    root = AsyncMultiService()
    for child in children:
        child.setServiceParent(root)
    return root


def test_start_awaits_each_child_in_order() -> None:
    """The second child is not started until the first child's start has finished."""
    journal: list[str] = []
    a, b = FakeService("a", journal), FakeService("b", journal)
    root = make(journal, a, b)
    d = root.startService()
    assert journal == ["start a"]
    assert root.state == "starting"
    a.start_d.callback(None)
    assert journal == ["start a", "start b"]
    assert not d.called
    b.start_d.callback(None)
    assert d.called and root.state == "running"


def test_stop_reverse_order_awaited() -> None:
    journal: list[str] = []
    a, b = FakeService("a", journal), FakeService("b", journal)
    a.start_d.callback(None)
    b.start_d.callback(None)
    root = make(journal, a, b)
    root.startService()
    journal.clear()
    d = root.stopService()
    assert journal == ["stop b"]
    b.stop_d.callback(None)
    assert journal == ["stop b", "stop a"]
    assert not d.called
    a.stop_d.callback(None)
    assert d.called and root.state == "stopped"


def test_failed_start_stops_started_children_and_fails() -> None:
    """If a child fails to start, those already started are stopped in reverse, and start fails."""
    journal: list[str] = []
    a = FakeService("a", journal)
    b = FakeService("b", journal)
    c = FakeService("c", journal, fail_start=True)
    for s in (a, b):
        s.start_d.callback(None)
        s.stop_d.callback(None)
    root = make(journal, a, b, c)
    d = root.startService()
    failure = None

    def eb(f: Any) -> None:
        nonlocal failure
        failure = f

    d.addErrback(eb)
    assert failure is not None and failure.check(StartupError)
    assert "c failed to start" in failure.getErrorMessage()
    assert journal == ["start a", "start b", "start c", "stop b", "stop a"]
    assert root.state == "stopped"


def test_stop_failures_are_reported_and_all_children_still_stop() -> None:
    """A child that fails to stop does not keep the others running, and the failure surfaces."""
    journal: list[str] = []
    a = FakeService("a", journal)
    b = FakeService("b", journal, fail_stop=True)
    for s in (a, b):
        s.start_d.callback(None)
    a.stop_d.callback(None)
    root = make(journal, a, b)
    root.startService()
    d = root.stopService()
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert journal[-2:] == ["stop b", "stop a"]
    assert failures and failures[0].check(StopErrors)
    assert "b: b cannot stop" in failures[0].getErrorMessage()


def test_when_started() -> None:
    journal: list[str] = []
    a = FakeService("a", journal)
    root = make(journal, a)
    root.startService()
    waiter = root.whenStarted()
    assert not waiter.called
    a.start_d.callback(None)
    assert waiter.called


def test_stop_during_start_waits_then_stops() -> None:
    """Stopping while a child is still starting lets it finish, then stops it; later children never start."""
    journal: list[str] = []
    a, b = FakeService("a", journal), FakeService("b", journal)
    a.stop_d.callback(None)
    root = make(journal, a, b)
    root.startService()
    d = root.stopService()
    a.start_d.callback(None)
    assert journal == ["start a", "stop a"]
    assert d.called


def test_thread_pool_synchronous_mode() -> None:
    """In synchronous mode (unit tests) work runs inline and the Deferred has fired."""
    pool = ThreadPoolService(Clock(), "io", synchronous=True)  # type: ignore[arg-type]
    pool.startService()
    d = pool.run(lambda x: x * 2, 21)
    assert d.result == 42
    assert pool.stopService().called


@pytest_twisted.inlineCallbacks
def test_thread_pool_runs_in_thread_and_stops() -> Any:
    """Work runs off the reactor thread; stop waits for the pool to finish."""
    import threading

    from twisted.internet import reactor

    pool = ThreadPoolService(reactor, "io")
    pool.startService()
    name = yield pool.run(lambda: threading.current_thread().name)
    assert "amaters-io" in name and name != threading.current_thread().name
    yield pool.stopService()
    assert not pool.pool.started


@pytest_twisted.inlineCallbacks
def test_serial_thread_runs_calls_in_order_off_the_reactor_thread() -> Any:
    """Calls run one at a time in the order asked, on the service's own thread; results and
    failures come back on the reactor thread; stop lets queued calls finish, and a call after
    stop fails instead of running on the reactor thread."""
    import threading
    import time

    from twisted.internet import reactor

    serial = SerialThreadService(reactor, "wal")
    serial.startService()
    seen: list[tuple[int, str]] = []
    reactor_thread = threading.current_thread()

    def work(i: int) -> int:
        time.sleep(0.002 if i == 0 else 0)
        seen.append((i, threading.current_thread().name))
        return i * 10

    calls = [serial.run(work, i) for i in range(5)]
    fired_on: list[threading.Thread] = []
    calls[0].addCallback(lambda r: fired_on.append(threading.current_thread()) or r)

    def boom() -> None:
        raise ValueError("disk on fire")

    failed = serial.run(boom)
    results = yield defer.gatherResults(calls)
    assert results == [0, 10, 20, 30, 40]
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert {name for _, name in seen} == {"amaters-wal"}
    assert fired_on == [reactor_thread]
    with pytest.raises(ValueError, match="disk on fire"):
        yield failed
    last = serial.run(work, 5)
    yield serial.stopService()
    assert (yield last) == 50
    with pytest.raises(RuntimeError, match="not running"):
        yield serial.run(work, 6)


def test_serial_thread_synchronous_mode() -> None:
    serial = SerialThreadService(Clock(), "wal", synchronous=True)  # type: ignore[arg-type]
    serial.startService()
    d = serial.run(lambda: threading_name())
    assert d.called
    serial.stopService()


def threading_name() -> str:
    import threading

    return threading.current_thread().name
