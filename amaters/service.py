"""Service plumbing: an AsyncMultiService that awaits its children, thread-pool services, helpers.

Twisted's ``MultiService`` starts children without waiting for them and drops stop failures on the
floor; a database must not report "ready" before its storage is open, nor exit 0 when a flush
failed.  :class:`AsyncMultiService` starts children in order, awaiting each, and stops them in
reverse, awaiting each and reporting every failure.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from amaters.errors import AmatersError

P = ParamSpec("P")
T = TypeVar("T")

log = Logger()


def log_failure(message: str, logger: Logger = log) -> Callable[[Failure], None]:
    """An errback that logs a failure (for Deferreds nobody else awaits)."""

    def errback(failure: Failure) -> None:
        logger.failure(message, failure)

    return errback


def fire_all(outcome: Any, waiting: list[defer.Deferred[Any]]) -> None:
    """Fire each of ``waiting`` in turn with ``outcome`` (a result, or a Failure each one handles).

    A callback for one Deferred (``d.addBoth(fire_all, waiting)``) that wakes many: one after the
    other from this loop, not each from the last one's callbacks, so the stack does not grow
    with their number.
    """
    for d in waiting:
        if isinstance(outcome, Failure):
            d.errback(outcome)
        else:
            d.callback(outcome)


class SerialLock:
    """A ``DeferredLock`` (``acquire``, ``release``, ``run``) that hands itself on from a loop.

    Twisted's lock wakes the next waiter from inside ``release``; a waiter whose work finishes at
    once releases again from there, so a queue of such waiters grows the stack by a few frames
    each, and a few hundred of them exhaust it (the lock then stays held for good).  Here a release
    made while the lock is being handed on only notes it, and the loop that is handing it on
    wakes the next waiter.
    """

    def __init__(self) -> None:
        self.locked = False
        self._waiting: deque[defer.Deferred[None]] = deque()
        self._handing_on = False
        self._released_again = False

    def acquire(self) -> defer.Deferred[None]:
        """Fires (with None) once the lock is held by the caller; cancelling it leaves the queue."""
        if not self.locked:
            self.locked = True
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d

    def release(self) -> None:
        if self._handing_on:
            self._released_again = True
            return
        self._handing_on = True
        try:
            while self._waiting:
                self._released_again = False
                self._waiting.popleft().callback(None)
                if not self._released_again:
                    return  # the woken waiter holds it
            self.locked = False
        finally:
            self._handing_on = False

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``f(*args)`` with the lock held; fires with its result once it is released."""

        def locked(_: None) -> defer.Deferred[Any]:
            return defer.maybeDeferred(f, *args).addBoth(unlock)

        def unlock(outcome: Any) -> Any:
            self.release()
            return outcome

        return self.acquire().addCallback(locked)


class Lifecycle:
    """Where the server is in its life: what probes, health answers and uptime are made from.

    The root service moves it through ``stopped → starting → running → stopping → stopped``; the
    ops site, the executor's health check and the admin status read it.  Holding this instead of
    the root service keeps every reader ignorant of the tree.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.state = "stopped"
        self.started_at: float | None = None

    @property
    def ready(self) -> bool:
        return self.state == "running"

    @property
    def draining(self) -> bool:
        return self.state == "stopping"

    def uptime(self) -> float:
        """Seconds since the start began (0 before it)."""
        if self.started_at is None:
            return 0.0
        return max(0.0, self.clock.seconds() - self.started_at)


class StartupError(Exception):
    """A child service failed to start; the tree stops what it had started."""


class StopErrors(Exception):
    """One or more children failed to stop cleanly; ``failures`` maps name to Failure."""

    def __init__(self, failures: dict[str, Failure]) -> None:
        self.failures = failures
        super().__init__("; ".join(f"{name}: {f.getErrorMessage()}" for name, f in failures.items()))


class AsyncMultiService(service.MultiService):
    """A MultiService whose start and stop await each child, in order and in reverse.

    ``startService`` returns a Deferred (twistd ignores it, so :meth:`whenStarted` exposes it);
    if a child fails to start, the children already started are stopped in reverse and the failure
    is reported.  ``stopService`` stops every running child even when some fail, then fails with
    :class:`StopErrors` naming each.
    """

    def __init__(self) -> None:
        super().__init__()
        self._started: list[service.IService] = []
        self._start_d: defer.Deferred[None] | None = None
        self._start_waiters: list[defer.Deferred[None]] = []
        self.state = "stopped"  # stopped | starting | running | stopping

    def startService(self) -> defer.Deferred[None]:
        service.Service.startService(self)
        self.state = "starting"
        self._start_d = defer.Deferred.fromCoroutine(self._start_children())
        self._start_d.addBoth(self._notify_started)
        return self._start_d

    async def _start_children(self) -> None:
        self._started = []
        for child in list(self):
            if self.state != "starting":
                return  # stop was requested while starting
            try:
                await defer.maybeDeferred(child.startService)
            except BaseException as e:
                name = getattr(child, "name", None) or repr(child)
                if not isinstance(e, AmatersError):  # an expected refusal: the caller logs its one line
                    log.failure("Service {name} failed to start", Failure(), name=name)
                await self._stop_started()
                self.state = "stopped"
                raise StartupError(f"{name} failed to start: {e}") from e
            self._started.append(child)
        self.state = "running"

    def _notify_started(self, result: object) -> object:
        waiters, self._start_waiters = self._start_waiters, []
        for w in waiters:
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(None)
        return result

    def whenStarted(self) -> defer.Deferred[None]:
        """A Deferred firing when every child has started (or failing if one did not)."""
        if self.state == "running":
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._start_waiters.append(d)
        return d

    async def _stop_started(self) -> dict[str, Failure]:
        failures: dict[str, Failure] = {}
        for child in reversed(self._started):
            name = getattr(child, "name", None) or repr(child)
            try:
                await defer.maybeDeferred(child.stopService)
            except defer.CancelledError:
                # The stop was cut short (a shutdown timeout): expected, so one line, no traceback.
                log.error("Service {name} was still stopping when the shutdown timed out", name=name)
                failures[name] = Failure(TimeoutError("still stopping when the shutdown timed out"))
            except BaseException:
                f = Failure()
                log.failure("Service {name} failed to stop", f, name=name)
                failures[name] = f
        self._started = []
        return failures

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.state == "starting" and self._start_d is not None:
            # Let the child that is starting finish, then stop what started.
            self.state = "stopping"
            try:
                await self._start_d
            except Exception:
                pass
        self.state = "stopping"
        failures = await self._stop_started()
        self.state = "stopped"
        if failures:
            raise StopErrors(failures)


class ThreadPoolService(service.Service):
    """A named thread pool whose lifetime is a service's: started on start, joined on stop.

    ``run(f, *args)`` runs ``f`` in the pool and returns a Deferred.  With ``synchronous=True``
    (unit tests) the call runs inline and the Deferred has already fired.
    """

    def __init__(
        self,
        reactor: IReactorThreads,
        name: str,
        min_threads: int = 0,
        max_threads: int = 4,
        synchronous: bool = False,
    ) -> None:
        self.name = name
        self._reactor = reactor
        self._synchronous = synchronous
        self.pool = ThreadPool(min_threads, max_threads, name=f"amaters-{name}")

    def startService(self) -> None:
        super().startService()
        if not self._synchronous:
            self.pool.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._synchronous or not self.pool.started:
            return defer.succeed(None)
        # ThreadPool.stop joins the workers; join from a helper thread so work still running can
        # deliver its results through callFromThread while we wait.
        import threading

        done: defer.Deferred[None] = defer.Deferred()
        reactor: Any = self._reactor

        def join() -> None:
            self.pool.stop()
            reactor.callFromThread(done.callback, None)

        threading.Thread(target=join, name=f"amaters-{self.name}-stop", daemon=True).start()
        return done

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        if self._synchronous:
            return defer.maybeDeferred(f, *args, **kwargs)
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self.pool, f, *args, **kwargs)


class SerialThreadService(service.Service):
    """One long-lived thread that runs blocking calls one after another, in the order asked.

    ``run(f, *args)`` returns a Deferred fired on the reactor thread with ``f``'s result (or its
    failure), like :class:`ThreadPoolService`, for work that is always serial anyway (the WAL fsyncs
    of group commit: one at a time by design).  A hand-off costs a queue put and one
    ``callFromThread`` instead of a thread pool's worker bookkeeping and context wrapping, which
    matters when each durable write of a lone client waits for its own fsync.  With
    ``synchronous=True`` (unit tests) calls run inline.  A call made while the thread is not
    running fails with ``RuntimeError`` (it never runs on the reactor thread instead).
    """

    def __init__(self, reactor: IReactorThreads, name: str, synchronous: bool = False) -> None:
        import queue

        self.name = name
        self._reactor = reactor
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: Any = None
        self._stopped: defer.Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        if self._synchronous or self._thread is not None:
            return
        import threading

        self._thread = threading.Thread(target=self._work, name=f"amaters-{self.name}", daemon=True)
        self._thread.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._thread is None:
            return defer.succeed(None)
        # Calls queued before this one still run; the thread then says it is done and ends.
        self._stopped = defer.Deferred()
        self._queue.put(None)
        self._thread = None
        return self._stopped

    def _work(self) -> None:
        reactor: Any = self._reactor
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                reactor.callFromThread(self._finished)
                return
            d, f, args, kwargs = item
            try:
                result = f(*args, **kwargs)
            except BaseException:
                reactor.callFromThread(d.errback, Failure())
            else:
                reactor.callFromThread(d.callback, result)

    def _finished(self) -> None:
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            stopped.callback(None)

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        if self._synchronous:
            return defer.maybeDeferred(f, *args, **kwargs)
        if self._thread is None:
            return defer.fail(RuntimeError(f"the {self.name} thread is not running"))
        d: defer.Deferred[T] = defer.Deferred()
        self._queue.put((d, f, args, kwargs))
        return d
