"""Adaptive load shedding: while the server is overloaded, refuse new requests fast.

When a server falls behind, accepting more work makes every request slower until all of them time
out.  The shedder refuses new requests instead, at once and cheaply, with a retryable
``SERVER_OVERLOADED`` carrying ``retry_after_ms``, so the requests already admitted finish in time
and clients back off.  Two signals, each with its own limit:

- reactor lag above ``limits.shed_lag_ms``: the event loop runs timers late, so everything on it
  (parsing, answering, TLS) is late too.  Measured by the ``lagmonitor`` service
  (:class:`~amaters.ops.lag.LagMonitor`), or by the shedder's own monitor when there is none;
- requests in progress server-wide (admitted, not yet answered) at ``limits.max_queued``.

HEALTH_CHECK and SERVER_INFO are never shed, and the ops site's ``/health``, ``/metrics`` and
probes do not go through the pipeline at all, so monitoring keeps working while the server sheds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from amaters.config import Config, LimitsConfig
from amaters.errors import Overloaded
from amaters.query.pipeline import PipelineStage, RequestContext

#: Operations answered even while shedding: cheap, and what monitoring and load balancers use.
EXEMPT = frozenset({"health_check", "server_info"})

#: ``ctx.annotations`` key of a request the shedder counted as in progress.
COUNTED = "shed.counted"

#: Retry hint when shedding on queue length: long enough for a burst of answers to drain.
QUEUE_RETRY_MS = 100

#: Bounds of the retry hint when shedding on lag (the hint is the lag itself).
LAG_RETRY_MIN_MS = 50
LAG_RETRY_MAX_MS = 5000


class LoadShedder(PipelineStage):
    """The ``shed`` pipeline stage: counts requests in progress and refuses new ones when overloaded.

    ``lag`` returns the current reactor lag in seconds.
    """

    name = "shed"
    _log = Logger()

    def __init__(self, limits: LimitsConfig, lag: Callable[[], float], clock: Any = None) -> None:
        self.limits = limits
        self.lag = lag
        self.clock = clock
        #: Requests admitted and not yet answered.
        self.in_progress = 0
        #: Requests refused because of lag, and because of the queue.
        self.shed_lag = 0
        self.shed_queue = 0
        self._last_warning = float("-inf")

    def before(self, ctx: RequestContext, op: Any) -> object:
        if op.name in EXEMPT:
            return None
        limits = self.limits
        if limits.max_queued and self.in_progress >= limits.max_queued:
            self.shed_queue += 1
            self._warn("{count} requests in progress (limits.max_queued)", self.in_progress)
            raise Overloaded(
                f"the server is overloaded ({self.in_progress} requests in progress); retry in"
                f" {QUEUE_RETRY_MS} ms",
                retry_after_ms=QUEUE_RETRY_MS,
            )
        if limits.shed_lag_ms:
            lag_ms = self.lag() * 1000.0
            if lag_ms > limits.shed_lag_ms:
                self.shed_lag += 1
                self._warn("reactor lag of {count} ms (limits.shed_lag_ms)", int(lag_ms))
                wait = int(min(LAG_RETRY_MAX_MS, max(LAG_RETRY_MIN_MS, lag_ms)))
                raise Overloaded(
                    f"the server is overloaded (running {int(lag_ms)} ms behind); retry in {wait} ms",
                    retry_after_ms=wait,
                )
        self.in_progress += 1
        ctx.annotations[COUNTED] = True
        return None

    def before_many(self, items: list[tuple[RequestContext, Any]]) -> object:
        """:meth:`before` for the keyed requests of one read: one reading of the lag for all of
        them, and while the server is far from both limits, one count."""
        limits = self.limits
        max_queued = limits.max_queued
        if max_queued and self.in_progress + len(items) >= max_queued:
            return NotImplemented  # near the queue limit: request by request
        if limits.shed_lag_ms and self.lag() * 1000.0 > limits.shed_lag_ms:
            return NotImplemented
        for ctx, _ in items:
            ctx.annotations[COUNTED] = True
        self.in_progress += len(items)
        return None

    def after(self, ctx: RequestContext, op: Any, outcome: object) -> None:
        if ctx.annotations.pop(COUNTED, False):
            self.in_progress -= 1

    def after_many(self, items: list[Any]) -> None:
        done = 0
        for ctx, _, _ in items:
            if ctx.annotations.pop(COUNTED, False):
                done += 1
        self.in_progress -= done

    def _warn(self, what: str, count: int) -> None:
        # At most one warning a minute: an overloaded server must not also flood its log.
        clock = self.clock
        if clock is None:
            return
        now = clock.seconds()
        if now - self._last_warning < 60.0:
            return
        self._last_warning = now
        self._log.warn("Shedding load: " + what + "; new requests are refused until it passes", count=count)

    # -- reload -------------------------------------------------------------------------------

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        limits = new.limits
        if (limits.shed_lag_ms, limits.max_queued) == (self.limits.shed_lag_ms, self.limits.max_queued):
            return None

        def commit() -> None:
            self.limits = limits

        return commit


__all__ = ["EXEMPT", "LoadShedder"]
