"""The reactor lag monitor: how late the event loop runs a timer, as a liveness signal.

Every ``interval`` seconds the monitor asks the clock to call it back ``interval`` seconds later and
measures how late the call arrives.  A healthy reactor is late by microseconds; a reactor blocked by
a long synchronous call (or starved of CPU) is late by as long as it was blocked.  ``/livez`` answers
503 when :meth:`LagMonitor.current_lag` exceeds ``web.liveness_max_lag``, and the
``amaters_reactor_lag_seconds`` gauge shows the last measurement.

The probe runs on the reactor it measures, so it sees a stall only once the stall ends; while the
reactor is stuck nothing (the ops site included) can answer, and a Kubernetes liveness probe then
times out, which is the point.  :meth:`LagMonitor.current_lag` also counts how overdue the next
probe is, so a request served right after a stall, before the probe has run, still sees it.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application import service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

#: ``observer(lag_seconds)``, called on the reactor thread after every measurement.
LagObserver = Callable[[float], None]


class LagMonitor(service.Service):
    """Measures reactor scheduling delay every ``interval`` seconds while running.

    ``warn_above`` (seconds, 0: never) logs a warning for a lag above it, at most once per
    ``warn_every`` seconds.  A failing observer is logged and the monitor keeps running.
    """

    name = "lagmonitor"
    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = 0.5,
        *,
        warn_above: Callable[[], float] | float = 0.0,
        warn_every: float = 60.0,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self._warn_above = warn_above
        self.warn_every = warn_every
        #: The most recent measurement, in seconds.
        self.last_lag = 0.0
        #: The largest measurement since start.
        self.max_lag = 0.0
        self.samples = 0
        self._due: float | None = None
        self._call: IDelayedCall | None = None
        self._observers: list[LagObserver] = []
        self._last_warning = float("-inf")

    def add_observer(self, observer: LagObserver) -> None:
        """Call ``observer(lag)`` after each measurement (e.g. to set a gauge)."""
        self._observers.append(observer)

    def current_lag(self) -> float:
        """The last measured lag, or how overdue the next probe is if that is larger; 0 while the
        monitor is not running (before start and after stop)."""
        # Read on every request by load shedding: max() spelled out (same result, no call).
        last = self.last_lag
        due = self._due
        overdue = 0.0 if due is None else self.clock.seconds() - due
        return overdue if overdue > last else last

    # -- service --------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def stopService(self) -> None:
        super().stopService()
        call, self._call = self._call, None
        self._due = None
        self.last_lag = 0.0
        if call is not None and call.active():
            call.cancel()

    # -- probing --------------------------------------------------------------------------------

    def _schedule(self) -> None:
        self._due = self.clock.seconds() + self.interval
        self._call = self.clock.callLater(self.interval, self._probe)

    def _probe(self) -> None:
        self._call = None
        try:
            self._measure()
        except Exception:
            self._log.failure("Reactor lag probe failed; the monitor keeps running")
        finally:
            if self.running:
                self._schedule()

    def _measure(self) -> None:
        due = self._due
        now = self.clock.seconds()
        lag = max(0.0, now - due) if due is not None else 0.0
        self.last_lag = lag
        self.max_lag = max(self.max_lag, lag)
        self.samples += 1
        for observer in list(self._observers):
            try:
                observer(lag)
            except Exception:
                self._log.failure("Reactor lag observer {observer!r} failed", observer=observer)
        threshold = self._warn_above() if callable(self._warn_above) else self._warn_above
        if threshold > 0 and lag > threshold and now - self._last_warning >= self.warn_every:
            self._last_warning = now
            self._log.warn(
                "The reactor was blocked for {lag:.3f} s (above {threshold} s): something ran"
                " synchronously on the event loop",
                lag=lag,
                threshold=threshold,
            )
