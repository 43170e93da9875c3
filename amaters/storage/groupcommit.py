"""Group commit: many writes acknowledged by one WAL fsync.

A write under ``storage.sync = "always"`` is applied to RocksDB on the reactor thread without a sync
(memtable plus a ``write()`` of its WAL record, a few microseconds), and then asks the
:class:`GroupCommitter` for durability.  The committer runs one blocking sync at a time in a pool
thread.  Every request made while no sync is running starts one; the requests made after that
share it, up to the moment the pool thread begins the sync: it counts the requests made so far
before it calls fsync, and that fsync acknowledges exactly those.  A request is made after its
write was applied, so every counted write is in the file before the fsync starts, and nothing is
acknowledged before its WAL record is on disk.  Requests made while the fsync runs wait for the
*next* sync, which starts as soon as the running one ends and covers all of them together.

Counting in the pool thread rather than closing the group when the sync is handed to it matters
under load: the pool thread needs the GIL to begin, and the reactor thread, still holding it,
applies more writes in the meantime.  Closing the group on the reactor thread made those wait a
whole further sync (at 50 concurrent writers, 21-22 writes per fsync against 23-25 counted in the
thread, and about 15 % fewer writes a second; docs/benchmarks.md).

Under N concurrent writers the group size settles near N: one fsync (0.2-3 ms here) acknowledges
every write that arrived while the previous one ran.  Each sync's group size and duration go to the
counters below and to observers, so metrics can show writes per fsync.

Given a ``clock`` (the reactor), a request that finds the committer idle does not start a sync at
once but at the end of the current reactor turn (``callLater(0)``), after the reactor has handled
every request that arrived in the same poll: what redis does by fsyncing before its event loop
sleeps.  Without it a burst of N writes arriving together is split into a group of one (the first,
which starts a sync by itself) and a group of N - 1, and under steady load the group sizes alternate
between tiny and full.  The delay never acknowledges anything earlier: the sync still starts after
every write it covers was applied.

Given a ``delay`` (``storage.group_commit_delay_us``, off by default), a sync that starts while
at least ``min_writers`` writers are at work first waits in the pool thread, before it counts the
requests it covers, for the writers of the group just answered to write again (their clients got
their answers and are about to), at most ``delay``: their writes share this fsync instead of
queueing for the next.  Fewer, fuller fsyncs, for disks whose fsyncs per second are few or paid
for.  The writers at work are those of the group just answered plus those waiting; from idle, the
larger of the last group and the waiting requests.  The request that brings the count to what the
hold waits for sets an event the pool thread waits on, so the hold ends with it: at two writers
it lasts a client's round trip, not the delay.  A lone writer never waits, except on its first
write after a burst, and then for at most the delay.  The pool thread waits, not a reactor
timer: the reactor's timers have the poll's millisecond granularity, and the reactor thread stays
free.  This is MySQL's ``binlog_group_commit_sync_delay`` with
``binlog_group_commit_sync_no_delay_count``, and PostgreSQL's ``commit_delay`` with
``commit_siblings``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from amaters.service import log_failure

T = TypeVar("T")

#: ``observer(group_size, duration_seconds, ok)``, called on the reactor thread after each sync.
SyncObserver = Callable[[int, float, bool], None]


class BlockingRunner(Protocol):
    """Runs a blocking callable somewhere else (a pool thread) and returns a Deferred of its result.

    :class:`amaters.service.ThreadPoolService` is one.
    """

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]: ...


class GroupCommitter:
    """Serializes calls to a blocking ``sync`` and lets every waiting request share the next one.

    ``sync`` raises an :class:`~amaters.errors.AmatersError` on failure; every request of that group
    then fails with it (their writes were applied but are not known to be durable, so none of them is
    acknowledged).  ``timer`` measures each sync's duration in the pool thread.  ``clock`` (optional)
    delays a sync started from idle to the end of the current reactor turn (see the module's
    docstring); without it such a sync starts at once.  ``delay`` (seconds) is the longest a sync
    holds back while ``min_writers`` or more writers are at work; ``hold(event, timeout)`` is how
    the pool thread waits (``threading.Event.wait``).
    ``on_error(failure)`` is called once per failed sync, before its requests fail.
    """

    _log = Logger()

    def __init__(
        self,
        sync: Callable[[], None],
        runner: BlockingRunner,
        timer: Callable[[], float] = time.perf_counter,
        clock: IReactorTime | None = None,
        on_error: Callable[[Failure], object] | None = None,
        delay: float = 0.0,
        min_writers: int = 2,
        hold: Callable[[threading.Event, float], object] = threading.Event.wait,
    ) -> None:
        self._sync = sync
        self._runner = runner
        self._timer = timer
        self._clock = clock
        self._hold = hold
        #: While a sync holds back: the count of requests that ends the hold, and the event the
        #: pool thread waits on, set by the request that reaches it.
        self._gather_until = -1
        self._gathered = threading.Event()
        self._delay = 0.0
        self.delay = delay
        self._min_writers = 2
        self.min_writers = min_writers
        self._on_error = on_error
        self._waiting: list[defer.Deferred[None]] = []
        #: Requests made so far, and how many of them have been answered (acknowledged or failed):
        #: ``_waiting`` holds the others, in the order they were made.
        self._requested = 0
        self._answered = 0
        self._idle_waiters: list[defer.Deferred[None]] = []
        self._running = False
        #: A start is scheduled for the end of this reactor turn (only with a clock).
        self._scheduled = False
        self._observers: list[SyncObserver] = []
        # Made once: a lone durable writer starts one sync per write.
        self._bookkeeping_failed = log_failure("Group commit bookkeeping failed", self._log)
        #: Syncs finished (successful or not).
        self.syncs = 0
        #: Syncs that failed.
        self.failed_syncs = 0
        #: Requests acknowledged by a successful sync.
        self.synced_writes = 0
        #: Size of the most recent group, and the largest group seen.
        self.last_group_size = 0
        self.max_group_size = 0
        #: Duration of the most recent sync, and the sum over all syncs, in seconds.
        self.last_sync_seconds = 0.0
        self.total_sync_seconds = 0.0

    @property
    def delay(self) -> float:
        """Seconds a sync is held back while several writers are at work (0: never)."""
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"a group commit delay must be >= 0 seconds, not {seconds!r}")
        self._delay = seconds

    @property
    def min_writers(self) -> int:
        """Writers at work from which a sync holds back for :attr:`delay`."""
        return self._min_writers

    @min_writers.setter
    def min_writers(self, writers: int) -> None:
        if writers < 2:
            raise ValueError(f"a group commit holds back for 2 writers or more, not {writers!r}")
        self._min_writers = writers

    @property
    def running(self) -> bool:
        """Whether a sync is in progress."""
        return self._running

    @property
    def queued(self) -> int:
        """Requests not yet answered (covered by the running sync or waiting for the next)."""
        return len(self._waiting)

    def add_observer(self, observer: SyncObserver) -> None:
        """Call ``observer(group_size, duration_seconds, ok)`` after every sync."""
        self._observers.append(observer)

    def remove_observer(self, observer: SyncObserver) -> None:
        self._observers.remove(observer)

    def request(self) -> defer.Deferred[None]:
        """A Deferred firing once a sync that began its fsync after this call has finished.

        Call it after the write it covers has been applied.
        """
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        self._requested += 1
        if self._requested == self._gather_until:
            self._gathered.set()
        if not self._running and not self._scheduled:
            if self._clock is None:
                self._start(1)
            else:
                self._scheduled = True
                self._clock.callLater(0, self._scheduled_start)
        return d

    def _scheduled_start(self) -> None:
        self._scheduled = False
        if self._waiting and not self._running:
            # From idle: the last group's writers may be about to write again.
            waiting = len(self._waiting)
            self._start(max(self.last_group_size, waiting), self.last_group_size - waiting)

    def idle(self) -> defer.Deferred[None]:
        """A Deferred firing when no sync is running or queued (used before closing)."""
        if not self._running and not self._waiting and not self._scheduled:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def stats(self) -> dict[str, Any]:
        """The counters as a dict (for ``IStorageBackend.stats``)."""
        return {
            "syncs": self.syncs,
            "failed_syncs": self.failed_syncs,
            "synced_writes": self.synced_writes,
            "last_group_size": self.last_group_size,
            "max_group_size": self.max_group_size,
            "last_sync_seconds": self.last_sync_seconds,
            "total_sync_seconds": self.total_sync_seconds,
            "queued": len(self._waiting),
            "delay_seconds": self._delay,
            "delay_min_writers": self._min_writers,
        }

    def _timed_sync(self, hold: float) -> tuple[int, float]:
        # Runs in the pool thread: the requests counted here were made (and their writes applied)
        # before the fsync starts, so it covers them; those made while it holds back join it.
        if hold:
            self._hold(self._gathered, hold)
        covered = self._requested
        started = self._timer()
        self._sync()
        return covered, self._timer() - started

    def _start(self, writers: int, expected: int = 0) -> None:
        """Start a sync.  When ``writers`` are at least ``min_writers`` and ``expected`` requests
        are due (the writers of the group just answered, about to write again), it holds back
        until they are made or the delay is over, whichever comes first."""
        self._running = True
        hold = 0.0
        if self._delay and expected > 0 and writers >= self._min_writers:
            hold = self._delay
            self._gathered.clear()
            self._gather_until = self._requested + expected
        d = self._runner.run(self._timed_sync, hold)
        d.addBoth(self._finished, self._requested)
        d.addErrback(self._bookkeeping_failed)

    def _finished(self, result: tuple[int, float] | Failure, at_start: int) -> None:
        self._running = False
        ok = not isinstance(result, Failure)
        # A failed sync fails the requests made before it was started (at the least, those it
        # was meant to cover); the later ones wait for the next.
        covered, duration = result if not isinstance(result, Failure) else (at_start, 0.0)
        count = covered - self._answered
        group, self._waiting = self._waiting[:count], self._waiting[count:]
        self._answered = covered
        self.syncs += 1
        self.last_group_size = len(group)
        self.max_group_size = max(self.max_group_size, len(group))
        self.last_sync_seconds = duration
        self.total_sync_seconds += duration
        if ok:
            self.synced_writes += len(group)
        else:
            self.failed_syncs += 1
        for observer in list(self._observers):
            try:
                observer(len(group), duration, ok)
            except Exception:
                self._log.failure("Group commit observer {observer!r} failed", observer=observer)
        # One pass per outcome: this loop runs once per acknowledged write.
        if ok:
            for waiter in group:
                waiter.callback(None)
        else:
            assert isinstance(result, Failure)
            if self._on_error is not None:
                try:
                    self._on_error(result)
                except Exception:
                    self._log.failure("Group commit error handler failed")
            for waiter in group:
                waiter.errback(result)
        if self._waiting and not self._running:
            # Requests that arrived while the sync ran: start the next one now (their clients
            # have waited a whole sync already).  The group just answered is about to write again.
            self._scheduled = False
            self._start(len(group) + len(self._waiting), len(group))
        elif not self._running and not self._scheduled:
            idle, self._idle_waiters = self._idle_waiters, []
            for waiter in idle:
                waiter.callback(None)
