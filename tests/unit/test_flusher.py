"""The storage flusher: a timer on task.Clock that survives failures, never overlaps, flushes on stop."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from amaters.config import StorageConfig
from amaters.errors import StorageIOError
from amaters.storage.flusher import FlusherService


class FakeBackend:
    """Records sync/flush/stats calls; a call can fail, raise, or be held open by the test."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_next: dict[str, Exception] = {}
        self.raise_next: dict[str, Exception] = {}
        self.hold: set[str] = set()
        self.held: list[defer.Deferred[Any]] = []
        self.stats_value: dict[str, Any] = {"backend": "fake", "keys": {}, "bytes": 0}

    def _call(self, name: str, result: Any = None) -> defer.Deferred[Any]:
        self.calls.append(name)
        if name in self.raise_next:
            raise self.raise_next.pop(name)
        if name in self.fail_next:
            return defer.fail(self.fail_next.pop(name))
        if name in self.hold:
            d: defer.Deferred[Any] = defer.Deferred()
            self.held.append(d)
            return d
        return defer.succeed(result)

    def sync(self) -> defer.Deferred[None]:
        return self._call("sync")

    def flush(self) -> defer.Deferred[None]:
        return self._call("flush")

    def stats(self) -> defer.Deferred[dict[str, Any]]:
        return self._call("stats", dict(self.stats_value))


def flusher(mode: str = "interval", **kw: Any) -> tuple[FlusherService, FakeBackend, Clock]:
    backend, clock = FakeBackend(), Clock()
    service = FlusherService(
        backend,  # type: ignore[arg-type]
        clock,
        sync_mode=mode,
        sync_interval_s=kw.get("sync_interval_s", 0.1),
        stats_interval_s=kw.get("stats_interval_s", 1.0),
    )
    return service, backend, clock


def fired(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def syncs_and_flushes(backend: FakeBackend) -> list[str]:
    return [call for call in backend.calls if call != "stats"]


def consume_logged_failures(events: list[Any]) -> list[Failure]:
    return [e["log_failure"] for e in events if "log_failure" in e]


def test_interval_mode_syncs_every_interval() -> None:
    """Under sync=interval the flusher syncs the WAL once per sync_interval."""
    service, backend, clock = flusher("interval", stats_interval_s=100.0)
    service.startService()
    assert backend.calls == []
    clock.pump([0.1] * 5)
    assert backend.calls.count("sync") == 5
    assert service.interval_syncs == 5
    fired(service.stopService())


def test_always_and_none_modes_do_not_sync_on_ticks() -> None:
    """Under always (group commit syncs) and none, ticks only read gauges."""
    for mode in ("always", "none"):
        service, backend, clock = flusher(mode, stats_interval_s=1.0)
        assert service.period == 1.0
        service.startService()
        clock.pump([1.0] * 3)
        assert backend.calls == ["stats"] * 3
        fired(service.stopService())


def test_gauges_are_read_every_stats_interval() -> None:
    """stats() is read every stats_interval into last_stats and handed to observers."""
    service, backend, clock = flusher("interval", sync_interval_s=0.1, stats_interval_s=1.0)
    seen: list[dict[str, Any]] = []
    service.add_stats_observer(seen.append)
    service.startService()
    backend.stats_value["bytes"] = 42
    clock.pump([0.1] * 25)
    assert backend.calls.count("stats") == 3  # at 0.1 s (first tick), then after each further second
    assert service.last_stats["bytes"] == 42
    assert len(seen) == 3
    fired(service.stopService())


def test_a_failing_tick_is_logged_and_the_timer_keeps_running() -> None:
    """A sync that fails, or raises outright, is logged; the next ticks still run."""
    service, backend, clock = flusher("interval", stats_interval_s=100.0)
    service.startService()
    backend.fail_next["sync"] = StorageIOError("syncing the write-ahead log: I/O error")
    with capturedLogs() as events:
        clock.advance(0.1)
        backend.raise_next["sync"] = RuntimeError("bug in sync")
        clock.advance(0.1)
        clock.advance(0.1)
        clock.advance(0.1)
    failures = consume_logged_failures(events)
    assert [f.type for f in failures] == [StorageIOError, RuntimeError]
    assert any("keeps running" in e.get("log_format", "") for e in events)
    assert backend.calls.count("sync") == 4
    assert service.failures == 2
    fired(service.stopService())


def test_a_failing_stats_observer_does_not_stop_the_timer() -> None:
    """An observer that raises is logged like any tick failure; the flusher keeps ticking."""
    service, backend, clock = flusher("always", stats_interval_s=1.0)

    def broken(stats: dict[str, Any]) -> None:
        raise ValueError("observer bug")

    service.add_stats_observer(broken)
    service.startService()
    with capturedLogs() as events:
        clock.pump([1.0] * 3)
    assert len(consume_logged_failures(events)) == 3
    assert backend.calls.count("stats") == 3
    fired(service.stopService())


def test_ticks_never_overlap() -> None:
    """While a sync is still running, later ticks do not start another one."""
    service, backend, clock = flusher("interval", stats_interval_s=100.0)
    service.startService()
    backend.hold.add("sync")
    clock.advance(0.1)
    clock.pump([0.1] * 10)
    assert backend.calls.count("sync") == 1
    backend.hold.clear()
    backend.held.pop().callback(None)
    clock.advance(0.1)
    assert backend.calls.count("sync") == 2
    fired(service.stopService())


def test_stop_waits_for_the_running_tick_then_flushes_once_more() -> None:
    """stopService stops the timer, waits for the tick in progress, then syncs one last time."""
    service, backend, clock = flusher("interval", stats_interval_s=100.0)
    service.startService()
    backend.hold.add("sync")
    clock.advance(0.1)
    stopped = service.stopService()
    assert not stopped.called
    assert syncs_and_flushes(backend) == ["sync"]
    backend.hold.clear()
    backend.held.pop().callback(None)
    assert fired(stopped) is None
    assert syncs_and_flushes(backend) == ["sync", "sync"]
    clock.pump([0.1] * 10)
    assert syncs_and_flushes(backend) == ["sync", "sync"], "no tick after stop"
    assert clock.getDelayedCalls() == []


def test_final_flush_happens_in_every_mode() -> None:
    """Even under sync=none and always, stopping syncs the WAL once."""
    for mode in ("none", "always"):
        service, backend, _ = flusher(mode)
        service.startService()
        fired(service.stopService())
        assert backend.calls == ["sync"]


def test_a_failing_final_flush_fails_the_stop() -> None:
    """If the last sync fails, stopService fails with its error (and logs it)."""
    service, backend, _ = flusher("interval")
    service.startService()
    backend.fail_next["sync"] = StorageIOError("syncing the write-ahead log: I/O error")
    with capturedLogs() as events:
        result = fired(service.stopService())
    assert isinstance(result, Failure) and result.check(StorageIOError)
    assert len(consume_logged_failures(events)) == 1


def test_flush_now_waits_for_a_running_tick() -> None:
    """A memtable flush requested while a tick runs starts only after that tick."""
    service, backend, clock = flusher("interval", stats_interval_s=100.0)
    service.startService()
    backend.hold.add("sync")
    clock.advance(0.1)
    flushed = service.flush_now()
    assert syncs_and_flushes(backend) == ["sync"] and not flushed.called
    backend.hold.clear()
    backend.held.pop().callback(None)
    assert fired(flushed) is None
    assert syncs_and_flushes(backend) == ["sync", "flush"]
    fired(service.stopService())


def test_from_config() -> None:
    """The flusher takes its mode and periods from [storage]."""
    config = StorageConfig(sync="interval", sync_interval_ms=250, flush_interval_s=5.0)
    service = FlusherService.from_config(FakeBackend(), config, Clock())  # type: ignore[arg-type]
    assert service.name == "flusher"
    assert (service.sync_mode, service.sync_interval_s, service.stats_interval_s) == ("interval", 0.25, 5.0)
    assert service.period == 0.25


def test_service_tree_has_a_flusher_after_storage(tmp_path: Any) -> None:
    """build_service wires a "flusher" over the tree's backend, started after storage (so it stops
    before storage closes the backend), with the configured mode."""
    from twisted.internet.testing import MemoryReactorClock

    from amaters.config import load_config
    from amaters.tap import build_service

    config = load_config(
        None, [f"server.data_dir={tmp_path}", "storage.sync=interval", "grpc.enabled=false"], {}
    )
    root = build_service(config, MemoryReactorClock())
    names = [child.name for child in root]
    assert names.index("storage") < names.index("flusher")
    service = root.getServiceNamed("flusher")
    assert isinstance(service, FlusherService)
    assert service.backend is root.components.backend  # type: ignore[attr-defined]
    assert service.sync_mode == "interval" and service.period == 0.1
