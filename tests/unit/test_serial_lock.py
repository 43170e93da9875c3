"""SerialLock: DeferredLock's behaviour, without the stack growing with its queue."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from amaters.service import SerialLock


def test_holders_take_turns_in_order_and_the_lock_is_free_after_the_last() -> None:
    lock = SerialLock()
    order: list[Any] = []
    pending: list[defer.Deferred[None]] = []

    def slow(name: str) -> defer.Deferred[None]:
        order.append(("start", name))
        d: defer.Deferred[None] = defer.Deferred()
        pending.append(d)
        return d

    results: list[Any] = []
    lock.run(slow, "first").addCallback(lambda r: results.append(("first", r)))
    lock.run(slow, "second").addCallback(lambda r: results.append(("second", r)))
    lock.run(lambda: order.append(("at once", "third")) or "done").addCallback(
        lambda r: results.append(("third", r))
    )
    assert order == [("start", "first")] and lock.locked
    pending.pop().callback(1)
    assert order == [("start", "first"), ("start", "second")] and results == [("first", 1)]
    pending.pop().callback(2)
    assert order[-1] == ("at once", "third")
    # Released before its caller sees the result (as DeferredLock does): the third may finish first.
    assert dict(results) == {"first": 1, "second": 2, "third": "done"}
    assert not lock.locked


def test_a_long_queue_of_holders_that_finish_at_once_does_not_grow_the_stack() -> None:
    lock = SerialLock()
    assert lock.acquire().called
    queued = [lock.run(lambda i=i: i) for i in range(20_000)]
    lock.release()
    assert [d.result for d in queued] == list(range(20_000))
    assert not lock.locked


def test_a_failure_releases_the_lock_and_reaches_the_caller() -> None:
    lock = SerialLock()
    failed = lock.run(lambda: 1 / 0)
    errors: list[Any] = []
    failed.addErrback(errors.append)
    assert errors and errors[0].check(ZeroDivisionError)
    assert not lock.locked


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    lock = SerialLock()
    assert lock.acquire().called
    gone = lock.acquire()
    stays = lock.acquire()
    gone.cancel()
    gone.addErrback(lambda f: f.trap(defer.CancelledError))
    lock.release()
    assert stays.called and lock.locked
    lock.release()
    assert not lock.locked
