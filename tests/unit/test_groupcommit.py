"""Group commit: one sync at a time, every waiting write sharing the next sync."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from amaters.errors import StorageIOError
from amaters.storage.groupcommit import GroupCommitter


class ManualRunner:
    """A BlockingRunner whose calls run only when the test says so (one "pool thread" each): a
    sync handed to it begins when the test calls :meth:`finish_one`."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred[Any]]] = []
        self.max_in_flight = 0

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((f, args, d))
        self.max_in_flight = max(self.max_in_flight, len(self.calls))
        return d

    def finish_one(self) -> None:
        f, args, d = self.calls.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)


class FakeSync:
    """A sync that counts its calls and can be told to fail.  ``during`` runs inside it, as the
    fsync itself runs: what the reactor thread does meanwhile (requests made then)."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_with: Exception | None = None
        self.during: Callable[[], object] | None = None

    def __call__(self) -> None:
        self.calls += 1
        if self.during is not None:
            during, self.during = self.during, None
            during()
        if self.fail_with is not None:
            raise self.fail_with


class Ledger:
    """For each request made through it: the fsyncs begun when it was made (counting a running
    one), in ``began_before``, and the number of the fsync that acknowledged it, in ``acked_by``."""

    def __init__(self, committer: GroupCommitter, sync: FakeSync) -> None:
        self.committer, self.sync = committer, sync
        self.began_before: dict[int, int] = {}
        self.acked_by: dict[int, int] = {}

    def request(self, i: int) -> None:
        self.began_before[i] = self.sync.calls
        self.committer.request().addCallback(lambda _: self.acked_by.__setitem__(i, self.sync.calls))


def make(timer: Callable[[], float] | None = None) -> tuple[GroupCommitter, ManualRunner, FakeSync]:
    runner, sync = ManualRunner(), FakeSync()
    ticks = iter(range(0, 10_000, 2))  # each sync "takes" 2 s of the fake timer
    committer = GroupCommitter(sync, runner, timer or (lambda: float(next(ticks))))
    return committer, runner, sync


def test_a_request_is_acknowledged_only_after_a_sync() -> None:
    """The first request starts a sync at once and fires when that sync has finished."""
    committer, runner, sync = make()
    d = committer.request()
    assert len(runner.calls) == 1 and not d.called
    runner.finish_one()
    assert d.called and sync.calls == 1
    assert committer.syncs == 1 and committer.synced_writes == 1


def test_requests_during_a_sync_share_the_next_one() -> None:
    """Writes arriving while a sync's fsync runs are all acknowledged by the one sync after it."""
    committer, runner, sync = make()
    first = committer.request()
    waiting: list[defer.Deferred[None]] = []
    sync.during = lambda: waiting.extend(committer.request() for _ in range(5))
    runner.finish_one()
    assert first.called and len(waiting) == 5
    assert not any(d.called for d in waiting), "an fsync that began before them does not count"
    assert len(runner.calls) == 1
    runner.finish_one()
    assert all(d.called for d in waiting)
    assert sync.calls == 2
    assert committer.last_group_size == 5 and committer.max_group_size == 5
    assert committer.synced_writes == 6


def test_requests_made_before_the_pool_thread_begins_the_sync_share_it() -> None:
    """A sync covers the requests made until its thread counts them, not only those made before it
    was handed to the thread: the reactor thread goes on applying writes until then."""
    committer, runner, sync = make()
    first = committer.request()
    assert len(runner.calls) == 1
    meanwhile = [committer.request() for _ in range(4)]
    assert len(runner.calls) == 1, "no second sync while one is in flight"
    runner.finish_one()
    assert first.called and all(d.called for d in meanwhile)
    assert sync.calls == 1 and runner.calls == []
    assert committer.last_group_size == 5 and committer.synced_writes == 5
    assert committer.queued == 0 and committer.idle().called


def test_failed_sync_fails_its_whole_group_and_the_next_group_proceeds() -> None:
    """If the sync fails, every request of that group fails with its error; later ones still work."""
    committer, runner, sync = make()
    sync.fail_with = StorageIOError("syncing the write-ahead log: I/O error")
    group = [committer.request()]
    sync.during = lambda: group.extend([committer.request(), committer.request()])
    runner.finish_one()  # the first request's sync fails
    sync.fail_with = StorageIOError("syncing the write-ahead log: I/O error")
    runner.finish_one()  # the other two share the next, which fails too
    errors: list[Any] = []
    for d in group:
        d.addErrback(lambda f: errors.append(f.value))
    assert len(errors) == 3 and all(isinstance(e, StorageIOError) for e in errors)
    assert committer.failed_syncs == 2 and committer.synced_writes == 0
    sync.fail_with = None
    ok = committer.request()
    runner.finish_one()
    assert ok.called and committer.synced_writes == 1


def test_observers_see_group_size_and_duration() -> None:
    """Each sync reports (group size, duration, ok) to observers; durations come from the timer."""
    committer, runner, sync = make()
    seen: list[tuple[int, float, bool]] = []
    committer.add_observer(lambda size, duration, ok: seen.append((size, duration, ok)))
    committer.request()
    sync.during = lambda: (committer.request(), committer.request())
    runner.finish_one()
    runner.finish_one()
    assert seen == [(1, 2.0, True), (2, 2.0, True)]
    assert committer.last_sync_seconds == 2.0 and committer.total_sync_seconds == 4.0


def test_a_failing_observer_is_logged_and_does_not_lose_acknowledgements() -> None:
    """An observer that raises is logged; the writes are acknowledged anyway."""
    committer, runner, _ = make()

    def broken(size: int, duration: float, ok: bool) -> None:
        raise RuntimeError("observer bug")

    committer.add_observer(broken)
    with capturedLogs() as events:
        d = committer.request()
        runner.finish_one()
    assert d.called
    assert any("observer" in str(e.get("log_format", "")) for e in events)
    for e in events:  # the logged failure is expected here
        if "log_failure" in e:
            e["log_failure"].cleanFailure()


def test_idle_waits_for_queued_syncs() -> None:
    """idle() fires only when no sync is running or queued."""
    committer, runner, sync = make()
    assert committer.idle().called
    committer.request()
    sync.during = committer.request
    idle = committer.idle()
    runner.finish_one()
    assert not idle.called
    runner.finish_one()
    assert idle.called


def test_a_request_from_an_acknowledgement_callback_gets_its_own_sync() -> None:
    """A write issued from another write's acknowledgement waits for a sync started after it."""
    committer, runner, sync = make()
    later: list[defer.Deferred[None]] = []
    committer.request().addCallback(lambda _: later.append(committer.request()))
    runner.finish_one()
    assert len(later) == 1 and not later[0].called
    runner.finish_one()
    assert later[0].called and sync.calls == 2


@given(st.lists(st.sampled_from(["request", "finish", "busy"]), max_size=60))
def test_every_request_is_covered_by_a_sync_that_started_after_it(actions: list[str]) -> None:
    """For any interleaving of writes, sync completions and writes made during an fsync, a write is
    acknowledged by an fsync that began after it, every write is acknowledged, and at most one
    sync is ever in flight."""
    runner, sync = ManualRunner(), FakeSync()
    committer = GroupCommitter(sync, runner, lambda: 0.0)
    ledger = Ledger(committer, sync)
    request, began_before, acked_by = ledger.request, ledger.began_before, ledger.acked_by
    for i, action in enumerate(actions):
        if action == "request":
            request(i)
        elif action == "busy" and runner.calls:
            sync.during = lambda i=i: request(-1 - i)  # made while the fsync runs
            runner.finish_one()
        elif runner.calls:
            runner.finish_one()
        assert len(runner.calls) <= 1
    while runner.calls:
        runner.finish_one()
    assert set(acked_by) == set(began_before)
    for i, before in began_before.items():
        assert acked_by[i] > before


@pytest.mark.parametrize("group", [1, 10, 100])
def test_group_size_follows_concurrency(group: int) -> None:
    """N writes that arrive during one fsync are acknowledged by exactly one more sync."""
    committer, runner, sync = make()
    committer.request()
    ds: list[defer.Deferred[None]] = []
    sync.during = lambda: ds.extend(committer.request() for _ in range(group))
    runner.finish_one()
    runner.finish_one()
    assert all(d.called for d in ds)
    assert sync.calls == 2 and committer.last_group_size == group


# -- with a clock: a sync from idle starts at the end of the reactor turn -----------------------


def make_clocked() -> tuple[GroupCommitter, ManualRunner, FakeSync, Clock]:
    runner, sync, clock = ManualRunner(), FakeSync(), Clock()
    committer = GroupCommitter(sync, runner, lambda: 0.0, clock=clock)
    return committer, runner, sync, clock


def test_with_a_clock_requests_of_one_turn_share_the_first_sync() -> None:
    """A burst of requests made in one reactor turn from idle is one group, not one plus the rest."""
    committer, runner, sync, clock = make_clocked()
    burst = [committer.request() for _ in range(5)]
    assert runner.calls == [], "the sync waits for the end of the turn"
    assert not committer.idle().called
    clock.advance(0)
    assert len(runner.calls) == 1
    late: list[defer.Deferred[None]] = []
    sync.during = lambda: late.append(committer.request())  # applied during the fsync: not covered
    runner.finish_one()
    assert all(d.called for d in burst) and not late[0].called
    assert committer.last_group_size == 5
    assert len(runner.calls) == 1, "waiting requests start the next sync at once"
    runner.finish_one()
    assert late[0].called and sync.calls == 2
    assert committer.idle().called
    clock.advance(0)
    assert runner.calls == []


def test_with_a_clock_a_failed_sync_reports_once_and_fails_its_group() -> None:
    """on_error sees each failed sync once; every request of the group fails."""
    runner, sync, clock = ManualRunner(), FakeSync(), Clock()
    seen: list[Any] = []
    committer = GroupCommitter(sync, runner, lambda: 0.0, clock=clock, on_error=seen.append)
    sync.fail_with = StorageIOError("syncing the write-ahead log: I/O error")
    group = [committer.request() for _ in range(3)]
    clock.advance(0)
    runner.finish_one()
    errors: list[Any] = []
    for d in group:
        d.addErrback(lambda f: errors.append(f.value))
    assert len(seen) == 1 and len(errors) == 3
    assert all(isinstance(e, StorageIOError) for e in errors)


def drain_and_check(
    runner: ManualRunner, clock: Clock, began_before: dict[int, int], acked_by: dict[int, int]
) -> None:
    """Run every sync still due; then each request was acknowledged, by a sync begun after it
    (``began_before[i]``: syncs begun when request i was made; ``acked_by[i]``: when answered)."""
    while runner.calls or clock.getDelayedCalls():
        clock.advance(0)
        if runner.calls:
            runner.finish_one()
    assert set(acked_by) == set(began_before)
    for i, before in began_before.items():
        assert acked_by[i] > before


@given(st.lists(st.sampled_from(["request", "finish", "turn"]), max_size=60))
def test_with_a_clock_every_request_is_covered_by_a_later_sync(actions: list[str]) -> None:
    """The end-of-turn start keeps the guarantee: acknowledged only by a sync started after it."""
    runner, sync, clock = ManualRunner(), FakeSync(), Clock()
    committer = GroupCommitter(sync, runner, lambda: 0.0, clock=clock)
    began_before: dict[int, int] = {}
    acked_by: dict[int, int] = {}
    for i, action in enumerate(actions):
        if action == "request":
            began_before[i] = sync.calls
            committer.request().addCallback(lambda _, i=i: acked_by.__setitem__(i, sync.calls))
        elif action == "turn":
            clock.advance(0)
        elif runner.calls:
            runner.finish_one()
        assert len(runner.calls) <= 1
    drain_and_check(runner, clock, began_before, acked_by)


# -- with a delay: a sync held back while several writers are at work --------------------------

DELAY = 0.25


class FakeHold:
    """The pool thread's wait for the writers due (``hold(event, timeout)``): records each
    timeout, runs ``during`` inside it, as the reactor thread would meanwhile (requests made while
    the sync holds back), and records whether those requests ended the hold early (set the event).
    The wait "takes" the whole timeout unless they did."""

    def __init__(self) -> None:
        self.holds: list[float] = []
        self.ended_early: list[bool] = []
        self.during: Callable[[], object] | None = None
        #: A clock that only the hold moves (the committer's timer).
        self.now = 0.0

    def __call__(self, gathered: threading.Event, timeout: float) -> None:
        self.holds.append(timeout)
        if self.during is not None:
            during, self.during = self.during, None
            during()
        self.ended_early.append(gathered.is_set())
        if not gathered.is_set():
            self.now += timeout


def make_delayed() -> tuple[GroupCommitter, ManualRunner, FakeSync, Clock, FakeHold]:
    runner, sync, clock, hold = ManualRunner(), FakeSync(), Clock(), FakeHold()
    committer = GroupCommitter(sync, runner, lambda: hold.now, clock=clock, delay=DELAY, hold=hold)
    return committer, runner, sync, clock, hold


def synced_turn(
    committer: GroupCommitter, runner: ManualRunner, clock: Clock, writes: int
) -> list[defer.Deferred[None]]:
    """``writes`` requests in one reactor turn, the turn's end, and the sync it started."""
    made = [committer.request() for _ in range(writes)]
    clock.advance(0)
    runner.finish_one()
    return made


def two_writers_then_sync(
    committer: GroupCommitter, runner: ManualRunner, clock: Clock, sync: FakeSync
) -> tuple[defer.Deferred[None], defer.Deferred[None]]:
    """A write, and a second writer's made during its fsync: the second sync is then due, with the
    first writer about to write again."""
    first = committer.request()
    clock.advance(0)
    during: list[defer.Deferred[None]] = []
    sync.during = lambda: during.append(committer.request())
    runner.finish_one()
    return first, during[0]


def test_a_delay_below_zero_is_refused() -> None:
    with pytest.raises(ValueError):
        GroupCommitter(FakeSync(), ManualRunner(), delay=-0.001)
    committer = GroupCommitter(FakeSync(), ManualRunner())
    with pytest.raises(ValueError):
        committer.delay = float("nan")
    assert committer.delay == 0.0 and committer.stats()["delay_seconds"] == 0.0


def test_a_lone_writer_never_holds_back() -> None:
    """One write at a time: each sync starts at the end of its turn and fsyncs at once."""
    committer, runner, sync, clock, hold = make_delayed()
    for n in range(1, 6):
        [d] = synced_turn(committer, runner, clock, 1)
        assert d.called and sync.calls == n and committer.last_group_size == 1
    assert hold.holds == []


def test_the_hold_ends_as_soon_as_the_writers_due_have_written() -> None:
    """The group just answered writes again while the next sync holds back: its write joins, and
    the hold ends with it rather than at the delay."""
    committer, runner, sync, clock, hold = make_delayed()
    first, second = two_writers_then_sync(committer, runner, clock, sync)
    assert first.called and not second.called and hold.holds == []
    assert len(runner.calls) == 1, "the next sync starts at once, and holds back in its thread"
    again: list[defer.Deferred[None]] = []
    hold.during = lambda: again.append(committer.request())  # the first writer's next write
    runner.finish_one()
    assert hold.holds == [DELAY] and hold.ended_early == [True]
    assert second.called and again[0].called
    assert committer.last_group_size == 2 and sync.calls == 2
    assert hold.now == 0.0 and committer.last_sync_seconds == 0.0


def test_a_hold_whose_writers_do_not_come_lasts_the_delay() -> None:
    """A writer of the last group that does not write again: the sync waits the whole delay, then
    covers what it has; the hold is not counted as the fsync's time."""
    committer, runner, sync, clock, hold = make_delayed()
    _, second = two_writers_then_sync(committer, runner, clock, sync)
    runner.finish_one()
    assert hold.holds == [DELAY] and hold.ended_early == [False]
    assert second.called and committer.last_group_size == 1
    assert hold.now == DELAY and committer.last_sync_seconds == 0.0


def test_a_write_made_during_the_fsync_waits_for_the_next_sync() -> None:
    """What the hold gathers is counted after it; a write made during the fsync is not covered."""
    committer, runner, sync, clock, hold = make_delayed()
    _, second = two_writers_then_sync(committer, runner, clock, sync)
    late: list[defer.Deferred[None]] = []
    sync.during = lambda: late.append(committer.request())
    runner.finish_one()
    assert hold.holds == [DELAY] and second.called and not late[0].called
    runner.finish_one()
    assert late[0].called


def test_the_first_write_after_a_burst_holds_back_once() -> None:
    """From idle, a sync holds back while writers of the last group have not written again; after
    a group of one, it does not."""
    committer, runner, _, clock, hold = make_delayed()
    burst = synced_turn(committer, runner, clock, 3)
    assert all(d.called for d in burst) and committer.last_group_size == 3
    assert hold.holds == [], "from idle with no group before: nobody else is due"
    [lone] = synced_turn(committer, runner, clock, 1)
    assert lone.called and committer.last_group_size == 1
    assert hold.holds == [DELAY] and hold.ended_early == [False]
    synced_turn(committer, runner, clock, 1)
    assert hold.holds == [DELAY], "after a group of one, no hold"


def test_a_sync_holds_back_only_from_min_writers_on() -> None:
    """With min_writers 3, two writers at work fsync at once; three hold back."""
    committer, runner, sync, clock, hold = make_delayed()
    committer.min_writers = 3
    two_writers_then_sync(committer, runner, clock, sync)
    runner.finish_one()
    assert hold.holds == []
    # A group of one answered, two waiting: three writers.
    committer.request()
    clock.advance(0)
    sync.during = lambda: [committer.request() for _ in range(2)]
    runner.finish_one()
    assert len(runner.calls) == 1
    runner.finish_one()
    assert hold.holds == [DELAY] and committer.last_group_size == 2
    with pytest.raises(ValueError):
        committer.min_writers = 1
    assert committer.stats()["delay_min_writers"] == 3


def test_the_delay_can_change_while_running() -> None:
    """A reload sets it: the next sync uses the new value, 0 turns it off."""
    committer, runner, sync, clock, hold = make_delayed()
    committer.delay = 0.0
    two_writers_then_sync(committer, runner, clock, sync)
    runner.finish_one()
    assert hold.holds == []
    committer.delay = 0.5
    two_writers_then_sync(committer, runner, clock, sync)
    runner.finish_one()
    assert hold.holds == [0.5]


@given(st.lists(st.sampled_from(["request", "finish", "turn", "hold-request"]), max_size=60))
def test_with_a_delay_every_request_is_covered_by_a_later_sync(actions: list[str]) -> None:
    """Holding a sync back keeps the guarantee, and every request is answered in the end."""
    committer, runner, sync, clock, hold = make_delayed()
    ledger = Ledger(committer, sync)
    request, began_before, acked_by = ledger.request, ledger.began_before, ledger.acked_by
    for i, action in enumerate(actions):
        if action == "request":
            request(i)
        elif action == "hold-request":
            hold.during = lambda i=i: request(i)  # made while the next sync holds back, if it does
        elif action == "turn":
            clock.advance(0)
        elif runner.calls:
            runner.finish_one()
        assert len(runner.calls) <= 1
    hold.during = None
    drain_and_check(runner, clock, began_before, acked_by)
    assert committer.idle().called
