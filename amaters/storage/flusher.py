"""The storage flusher: periodic WAL sync, storage gauges, memtable flush on request.

One ``LoopingCall`` on the clock it is given (the reactor; ``task.Clock`` in tests) ticks every
``storage.sync_interval_ms`` under ``sync = "interval"`` and every ``storage.flush_interval_s``
otherwise.  Each tick:

- under ``interval``, syncs the WAL (``backend.sync()``), so a power loss loses at most about one
  interval of acknowledged writes;
- every ``flush_interval_s``, reads ``backend.stats()`` into :attr:`FlusherService.last_stats` and
  hands it to the stats observers (the metrics gauges).

A tick never raises (a failure is logged with ``log.failure`` and the timer keeps running: a
``LoopingCall`` whose function raises once stops for good) and never overlaps the previous one (the
tick returns its Deferred, and ticks and :meth:`FlusherService.flush_now` share a lock).  On stop the
timer stops, the running tick is awaited, and one final WAL sync makes every write durable before
the storage service closes the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from amaters.interfaces import IStorageBackend
from amaters.service import log_failure

StatsObserver = Callable[[dict[str, Any]], None]


class FlusherService(service.Service):
    """Runs the storage's periodic work; see the module docstring."""

    name = "flusher"
    _log = Logger()

    def __init__(
        self,
        backend: IStorageBackend,
        clock: IReactorTime,
        *,
        sync_mode: str = "always",
        sync_interval_s: float = 0.1,
        stats_interval_s: float = 10.0,
    ) -> None:
        # Typed Any: the interface declares its Deferred results as ``object``.
        self.backend = backend
        self.clock = clock
        self.sync_mode = sync_mode
        self.sync_interval_s = sync_interval_s
        self.stats_interval_s = stats_interval_s
        self.period = sync_interval_s if sync_mode == "interval" else stats_interval_s
        #: The most recent ``backend.stats()`` (empty until the first gauge tick).
        self.last_stats: dict[str, Any] = {}
        self.ticks = 0
        self.failures = 0
        self.interval_syncs = 0
        self._observers: list[StatsObserver] = []
        self._lock = defer.DeferredLock()
        self._loop: task.LoopingCall | None = None
        self._last_stats_at = float("-inf")

    @classmethod
    def from_config(cls, backend: IStorageBackend, storage: Any, clock: IReactorTime) -> FlusherService:
        """A flusher for the ``[storage]`` section ``storage``."""
        return cls(
            backend,
            clock,
            sync_mode=storage.sync,
            sync_interval_s=storage.sync_interval_ms / 1000.0,
            stats_interval_s=storage.flush_interval_s,
        )

    def add_stats_observer(self, observer: StatsObserver) -> None:
        """Call ``observer(stats)`` after every gauge reading (on the reactor thread)."""
        self._observers.append(observer)

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        loop = task.LoopingCall(self._tick)
        loop.clock = self.clock
        self._loop = loop
        # _tick never fails; this errback is for a bug in that promise.
        loop.start(self.period, now=False).addErrback(log_failure("Storage flusher timer died", self._log))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        # Waits for a tick or flush in progress, then flushes once more.
        await self._lock.acquire()
        try:
            await defer.maybeDeferred(self.backend.sync)
        except Exception:
            self._log.failure("Final storage sync on stop failed")
            raise
        finally:
            self._lock.release()

    # -- work ---------------------------------------------------------------------------------

    def flush_now(self) -> defer.Deferred[None]:
        """Flush memtables to SST files and sync, after any running tick (for admin requests)."""
        return self._lock.run(self.backend.flush)

    def _tick(self) -> defer.Deferred[None]:
        return self._lock.run(lambda: defer.Deferred.fromCoroutine(self._run_tick()))

    async def _run_tick(self) -> None:
        self.ticks += 1
        try:
            if self.sync_mode == "interval":
                await defer.maybeDeferred(self.backend.sync)
                self.interval_syncs += 1
            now = self.clock.seconds()
            if now - self._last_stats_at >= self.stats_interval_s:
                self._last_stats_at = now
                stats = await defer.maybeDeferred(self.backend.stats)
                self.last_stats = stats
                for observer in list(self._observers):
                    observer(stats)
        except Exception:
            self.failures += 1
            self._log.failure("Storage flusher tick failed; the flusher keeps running")
