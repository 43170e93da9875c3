"""ElasticPool: the gRPC worker threads, few while they keep up, more while work waits behind held ones."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures

import pytest

from amaters.protocols.elastic import ElasticPool


def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_results_and_errors_come_back_through_futures() -> None:
    pool = ElasticPool(2, 4, patience=0.01, stall=0.1)
    try:
        assert pool.submit(lambda a, b=0: a + b, 2, b=3).result(timeout=10) == 5

        def boom() -> None:
            raise ValueError("no")

        with pytest.raises(ValueError, match="no"):
            pool.submit(boom).result(timeout=10)
    finally:
        pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    with pytest.raises(ValueError):
        ElasticPool(0, 4)
    with pytest.raises(ValueError):
        ElasticPool(5, 4)


def test_quick_work_stays_on_the_core_threads() -> None:
    """Thousands of short callables, submitted faster than they run, never start a thread beyond
    the core: queued work that keeps finishing is not a reason to grow."""
    pool = ElasticPool(2, 8, patience=0.05, stall=0.5)
    try:
        done = [pool.submit(sum, range(200)) for _ in range(5000)]
        futures.wait(done, timeout=30)
        assert all(f.result() == 19900 for f in done)
        assert pool.grown == 0 and pool.threads <= 2
    finally:
        pool.shutdown()


def test_work_waiting_behind_held_threads_gets_a_thread_that_leaves_after() -> None:
    """With every core thread held (waiting inside ``holding``), queued work gets a new thread
    after ``patience`` even though the held work has not finished; once nothing is held, the extra
    thread ends after its work, and the pool never exceeds its maximum."""
    pool = ElasticPool(1, 2, patience=0.02, stall=60.0, linger=60.0)
    release = threading.Event()
    try:

        def held(started: threading.Event) -> str:
            with pool.holding():
                started.set()
                release.wait(10)
            return "held"

        started = [threading.Event(), threading.Event()]
        first = pool.submit(held, started[0])
        assert started[0].wait(10)
        second = pool.submit(lambda: "served")
        assert second.result(timeout=10) == "served"  # while the first is still held
        assert not first.done() and pool.grown == 1
        third = pool.submit(held, started[1])
        assert started[1].wait(10)  # on the extra thread, which stayed: the first is still held
        fourth = pool.submit(lambda: "waits")  # two threads, both held: the maximum
        time.sleep(0.2)
        assert not fourth.done() and pool.threads == 2 and pool.grown == 1
        release.set()
        assert [f.result(timeout=10) for f in (first, third, fourth)] == ["held", "held", "waits"]
        _until(lambda: pool.threads == 1, "the extra thread did not end once nothing was held")
    finally:
        release.set()
        pool.shutdown()


def test_a_stall_without_a_hold_still_gets_a_thread() -> None:
    """Work that blocks without saying so (no ``holding``) is found by the stall rule: queued work
    that has seen nothing finish for ``stall`` seconds gets a thread."""
    pool = ElasticPool(1, 3, patience=60.0, stall=0.05)
    release = threading.Event()
    try:
        blocked = pool.submit(release.wait, 10)
        _until(lambda: not pool._queue, "the blocking work did not start")
        assert pool.submit(lambda: "served").result(timeout=10) == "served"
        assert not blocked.done() and pool.grown == 1
    finally:
        release.set()
        pool.shutdown()


def test_nested_holds_count_one_thread() -> None:
    pool = ElasticPool(1, 4, patience=0.0, stall=60.0)
    try:
        with pool.holding(), pool.holding():
            assert len(pool._waits) == 1
            assert pool._held(time.monotonic()) == 1
        assert pool._waits == {}
    finally:
        pool.shutdown()


def test_shutdown_finishes_or_cancels_what_is_queued() -> None:
    pool = ElasticPool(1, 1, patience=60.0, stall=60.0)
    release = threading.Event()
    running = pool.submit(release.wait, 10)
    queued = [pool.submit(lambda n=n: n) for n in range(3)]
    _until(lambda: len(pool._queue) == 3, "the first work did not start")
    release.set()
    pool.shutdown(wait=True)
    assert running.result(timeout=1) is True and [f.result(timeout=1) for f in queued] == [0, 1, 2]
    assert pool.threads == 0

    pool = ElasticPool(1, 1, patience=60.0, stall=60.0)
    release = threading.Event()
    running = pool.submit(release.wait, 10)
    queued = [pool.submit(lambda: None) for _ in range(3)]
    _until(lambda: len(pool._queue) == 3, "the first work did not start")
    pool.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    release.set()
    assert running.result(timeout=10) is True
    _until(lambda: pool.threads == 0, "the thread did not end after shutdown")
