"""A thread pool that keeps to a few threads while they keep up, and grows when work would wait.

grpcio's threaded server hands every call to a pool thread for the call's whole life.  With a
``concurrent.futures.ThreadPoolExecutor`` of sixteen threads and sixteen calls at a time, every
call wakes a sleeping thread, and sixteen threads contend for the GIL: measured on the gRPC front
end, about 600 µs of server CPU and 31 context switches per unary call, against 346 µs and 10 with
four threads, which take the next call from the queue without sleeping.  But a call may hold its
thread for long (a stream, a client slow to send its message, a write waiting for its fsync), so
four threads are not enough either: calls would queue behind the held ones.

:class:`ElasticPool` keeps ``core`` threads making progress: a thread counts as *held* while the
work it runs says it waits (:meth:`ElasticPool.holding`) for longer than ``patience``, and while
work is queued the pool starts threads until ``core`` of them are not held, up to ``maximum``.
Should no work finish for ``stall`` seconds while work is queued (a thread held by something that
does not say so), it starts one more as well.  A thread beyond ``core`` ends once it finishes its
work with more than ``core`` threads not held, or after ``linger`` seconds with nothing to do.
The thresholds are far above the time a thread waits for the GIL, or a call for the reactor,
under load: lower, the pool grew with the load itself and lost what it saves.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

#: Seconds a wait (:meth:`ElasticPool.holding`) lasts before its thread counts as held.
PATIENCE = 0.005

#: Seconds queued work may go without any work finishing before the pool starts a thread anyway
#: (a thread held by something that does not say so).
STALL = 0.05

#: Seconds a thread beyond the core stays with nothing to do before it ends.
LINGER = 5.0

_Item = tuple["futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class ElasticPool(futures.Executor):
    """An executor of ``core`` threads that grows to ``maximum`` when work waits behind held
    threads (module docstring).  ``shutdown`` lets the threads finish what is queued (or cancels
    it with ``cancel_futures``), then ends them.  The threads are daemon threads."""

    def __init__(
        self,
        core: int,
        maximum: int,
        name: str = "pool",
        patience: float = PATIENCE,
        stall: float = STALL,
        linger: float = LINGER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= core <= maximum:
            raise ValueError(f"need 1 <= core ({core}) <= maximum ({maximum})")
        self.core = core
        self.maximum = maximum
        self.name = name
        self.patience = patience
        self.stall = stall
        self.linger = linger
        self._clock = clock
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # threads wait here for work
        self._watch = threading.Condition(self._lock)  # the watcher waits here for queued work
        self._queue: deque[_Item] = deque()
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # threads waiting for work, or started and not yet looking
        self._waits: dict[int, list[Any]] = {}  # waiting thread -> [holding() depth, when it began]
        self._finished_at = clock()
        self._shutdown = False
        self._watcher: threading.Thread | None = None
        self._watcher_asleep = False
        self._numbers = itertools.count(1)
        #: Threads started beyond the core since the pool was made (most have ended since).
        self.grown = 0

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._shutdown

    @property
    def threads(self) -> int:
        """Threads running now."""
        with self._lock:
            return len(self._threads)

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Around a wait of the work running on a pool thread (for a client, for the reactor's
        answer): past ``patience`` the thread counts as held, and the pool may start another."""
        thread = threading.get_ident()
        with self._lock:
            held = self._waits.get(thread)
            if held is None:
                self._waits[thread] = [1, self._clock()]
            else:
                held[0] += 1  # a wait inside a longer one: the thread was already waiting
        try:
            yield
        finally:
            with self._lock:
                held = self._waits[thread]
                held[0] -= 1
                if not held[0]:
                    del self._waits[thread]

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._queue.append((future, fn, args, kwargs))
            if len(self._queue) <= self._idle:
                self._work.notify()
            elif len(self._threads) < self.core:
                self._start_thread()
            elif len(self._threads) < self.maximum:
                if self._watcher is None:
                    self._watcher = threading.Thread(
                        target=self._watch_queue, name=f"{self.name}-watch", daemon=True
                    )
                    self._watcher.start()
                elif self._watcher_asleep:
                    self._watch.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            self._work.notify_all()
            self._watch.notify_all()
            threads = list(self._threads)
            watcher = self._watcher
        if wait:
            for thread in threads:
                thread.join()
            if watcher is not None:
                watcher.join()

    # -- with the lock held -----------------------------------------------------------------------

    def _start_thread(self) -> None:
        if len(self._threads) >= self.core:
            self.grown += 1
        thread = threading.Thread(target=self._run, name=f"{self.name}-{next(self._numbers)}", daemon=True)
        self._threads.add(thread)
        self._idle += 1  # until it looks at the queue
        thread.start()

    def _held(self, now: float) -> int:
        since = now - self.patience
        return sum(1 for _, began in self._waits.values() if began <= since)

    # -- threads --------------------------------------------------------------------------------

    def _run(self) -> None:
        me = threading.current_thread()
        with self._lock:
            self._idle -= 1
        while True:
            with self._lock:
                waited_out = False
                while not self._queue:
                    if self._shutdown or (waited_out and len(self._threads) > self.core):
                        self._threads.discard(me)
                        return
                    self._idle += 1
                    waited_out = not self._work.wait(self.linger)
                    self._idle -= 1
                item = self._queue.popleft()
            self._execute(item)
            with self._lock:
                now = self._finished_at = self._clock()
                threads = len(self._threads)
                if threads > self.core and threads - self._held(now) > self.core:
                    # Started for work that waited behind held threads: no longer needed.
                    self._threads.discard(me)
                    return

    @staticmethod
    def _execute(item: _Item) -> None:
        future, fn, args, kwargs = item
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            future.set_exception(e)
        else:
            future.set_result(result)

    def _watch_queue(self) -> None:
        """While work is queued that no idle thread will take: start a thread when fewer than
        ``core`` threads are not held, or when no work has finished for ``stall``; look again
        every ``patience``.  Sleep while nothing waits."""
        with self._lock:
            while not self._shutdown:
                threads = len(self._threads)
                if len(self._queue) > self._idle and threads < self.maximum:
                    now = self._clock()
                    if threads - self._held(now) < self.core or now - self._finished_at >= self.stall:
                        self._start_thread()
                    self._watch.wait(min(self.patience, self.stall))
                else:
                    self._watcher_asleep = True
                    self._watch.wait()
                    self._watcher_asleep = False
