"""The reactor lag monitor on a task.Clock: measurement, observers, warnings, surviving failures."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogEvent, Logger, LogLevel

from amaters.ops.lag import LagMonitor


def monitor(clock: Clock, **kwargs: object) -> tuple[LagMonitor, list[LogEvent]]:
    events: list[LogEvent] = []
    lag = LagMonitor(clock, 0.5, **kwargs)  # type: ignore[arg-type]
    lag._log = Logger(observer=events.append)  # type: ignore[misc]
    return lag, events


def test_on_time_probes_measure_no_lag() -> None:
    """While the clock runs the probe on time, the measured lag is zero and probes keep coming."""
    clock = Clock()
    lag, _ = monitor(clock)
    lag.startService()
    for _ in range(4):
        clock.advance(0.5)
    assert lag.samples == 4
    assert lag.last_lag == 0.0
    assert lag.current_lag() == 0.0
    lag.stopService()
    assert clock.getDelayedCalls() == []


def test_a_blocked_reactor_shows_as_lag() -> None:
    """A probe that runs 3 s late measures 3 s (the observer sees it); the next on-time probe
    measures zero again, but max_lag remembers."""
    clock = Clock()
    lag, _ = monitor(clock)
    seen: list[float] = []
    lag.add_observer(seen.append)
    lag.startService()
    clock.advance(3.5)  # the probe was due at 0.5
    assert seen == [3.0]
    assert lag.current_lag() == 3.0
    clock.advance(0.5)
    assert seen == [3.0, 0.0]
    assert lag.max_lag == 3.0
    lag.stopService()


def test_overdue_probe_counts_before_it_runs() -> None:
    """current_lag includes how overdue the next probe is, so a request served right after a stall
    (before the probe has run) sees it."""
    clock = Clock()
    lag, _ = monitor(clock)
    lag.startService()
    # Move time without running the timers, as a reactor stuck in a blocking call would.
    clock.rightNow += 7.5
    assert lag.current_lag() == 7.0
    lag.stopService()
    assert lag.current_lag() == 0.0


def test_failing_observer_does_not_stop_the_monitor() -> None:
    """An observer that raises is logged; probing continues and other observers still run."""
    clock = Clock()
    lag, events = monitor(clock)
    seen: list[float] = []

    def broken(value: float) -> None:
        raise RuntimeError("gauge exploded")

    lag.add_observer(broken)
    lag.add_observer(seen.append)
    lag.startService()
    clock.advance(0.5)
    clock.advance(0.5)
    assert seen == [0.0, 0.0]
    assert lag.running and clock.getDelayedCalls()
    assert any(e.get("log_failure") is not None for e in events)
    lag.stopService()


def test_warns_about_a_long_stall_at_most_once_a_minute() -> None:
    """A lag above warn_above logs one warning; another within warn_every does not."""
    clock = Clock()
    lag, events = monitor(clock, warn_above=lambda: 1.0, warn_every=60.0)
    lag.startService()
    clock.advance(5.5)
    clock.advance(5.5)
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    assert warnings[0]["lag"] == 5.0
    for _ in range(120):  # a minute of on-time probes
        clock.advance(0.5)
    assert len([e for e in events if e["log_level"] == LogLevel.warn]) == 1
    clock.advance(5.5)
    assert len([e for e in events if e["log_level"] == LogLevel.warn]) == 2
    lag.stopService()
