"""Retry policy: transient errors of idempotent operations, with backoff on the reactor's clock."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from amaters.config import RetryConfig
from amaters.errors import (
    Corrupted,
    ErrorCategory,
    NotFound,
    Overloaded,
    StorageFull,
    StorageIOError,
)
from amaters.storage.faults import FaultInjectingBackend
from amaters.storage.memory import MemoryBackend
from amaters.storage.retry import RetryingBackend, RetryPolicy, call_with_retry, is_transient
from amaters.types import CipherBlob


class Flaky:
    """Fails with the given errors, in order, then returns "ok"; counts calls."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> defer.Deferred[str]:
        self.calls += 1
        if self.errors:
            return defer.fail(self.errors.pop(0))
        return defer.succeed("ok")


def outcome(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    return results[0] if results else None


def retry(clock: Clock, policy: RetryPolicy, f: Any, idempotent: bool = True) -> defer.Deferred[Any]:
    return defer.Deferred.fromCoroutine(
        call_with_retry(clock, policy, f, idempotent=idempotent, rng=random.Random(1))
    )


NO_JITTER = RetryPolicy(max_attempts=4, base_delay_ms=10, max_delay_ms=35, jitter=0.0)


def test_delays_grow_exponentially_up_to_the_maximum() -> None:
    """Without jitter the delays are base, 2*base, 4*base... capped at max_delay."""
    rng = random.Random(0)
    assert [NO_JITTER.delay(n, rng) for n in (1, 2, 3, 4)] == [0.010, 0.020, 0.035, 0.035]


def test_jitter_moves_delays_within_its_fraction() -> None:
    """Each delay is within ±jitter of the nominal delay, never above max_delay, and varies."""
    policy = RetryPolicy(max_attempts=5, base_delay_ms=100, max_delay_ms=1000, jitter=0.2)
    rng = random.Random(7)
    delays = [policy.delay(1, rng) for _ in range(200)]
    assert all(0.080 <= d <= 0.120 for d in delays)
    assert len(set(delays)) > 100
    assert all(policy.delay(10, rng) <= 1.0 for _ in range(100))


def test_transient_error_is_retried_after_the_delay() -> None:
    """A StorageIOError is retried, each attempt only after its delay has passed on the clock."""
    clock = Clock()
    flaky = Flaky(StorageIOError("io"), StorageIOError("io"))
    d = retry(clock, NO_JITTER, flaky)
    assert flaky.calls == 1 and not d.called
    clock.advance(0.0099)
    assert flaky.calls == 1
    clock.advance(0.0002)
    assert flaky.calls == 2 and not d.called
    clock.advance(0.0198)
    assert flaky.calls == 2
    clock.advance(0.0002)
    assert flaky.calls == 3
    assert outcome(d) == "ok"
    assert clock.getDelayedCalls() == []


def test_a_write_stall_is_retried() -> None:
    """A backend's Overloaded (a RocksDB write stall) is transient: retried after the delay."""
    clock = Clock()
    flaky = Flaky(Overloaded("storage is stalled", retry_after_ms=100))
    d = retry(clock, NO_JITTER, flaky)
    clock.advance(0.0101)
    assert flaky.calls == 2 and outcome(d) == "ok"


def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    """After max_attempts failures the last error is raised; no further attempt is scheduled."""
    clock = Clock()
    errors = [StorageIOError(f"io {i}") for i in range(10)]
    flaky = Flaky(*errors)
    d = retry(clock, NO_JITTER, flaky)
    clock.pump([0.05] * 10)
    assert flaky.calls == 4
    result = outcome(d)
    assert isinstance(result, Failure) and result.value is errors[3]
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "error",
    [
        StorageFull("disk full"),
        Corrupted("bad crc"),
        NotFound("no collection"),
        StorageIOError("not retryable", category=ErrorCategory.SERVER_ERROR),
        ValueError("a bug"),
    ],
)
def test_non_transient_errors_are_not_retried(error: Exception) -> None:
    """A full disk, corruption, a missing collection or a bug fails at once."""
    clock = Clock()
    flaky = Flaky(error)
    d = retry(clock, NO_JITTER, flaky)
    assert flaky.calls == 1
    result = outcome(d)
    assert isinstance(result, Failure) and result.value is error
    assert not is_transient(error)
    assert clock.getDelayedCalls() == []


def test_non_idempotent_operations_are_not_retried() -> None:
    """Even a transient error is not retried for an operation that is not idempotent."""
    clock = Clock()
    flaky = Flaky(StorageIOError("io"))
    d = retry(clock, NO_JITTER, flaky, idempotent=False)
    assert flaky.calls == 1
    assert isinstance(outcome(d), Failure)


def test_max_attempts_one_means_no_retry() -> None:
    """max_attempts = 1 tries once."""
    clock = Clock()
    flaky = Flaky(StorageIOError("io"))
    d = retry(clock, RetryPolicy(max_attempts=1), flaky)
    assert flaky.calls == 1 and isinstance(outcome(d), Failure)


def test_cancelling_stops_the_retries() -> None:
    """Cancelling while waiting between attempts cancels the wait; no more attempts happen."""
    clock = Clock()
    flaky = Flaky(StorageIOError("io"), StorageIOError("io"))
    d = retry(clock, NO_JITTER, flaky)
    d.cancel()
    assert clock.getDelayedCalls() == []
    clock.advance(1)
    assert flaky.calls == 1
    result = outcome(d)
    assert isinstance(result, Failure) and result.check(defer.CancelledError)


def test_policy_from_config() -> None:
    """The [retry] section maps to the policy field by field."""
    config = RetryConfig(max_attempts=5, base_delay_ms=20, max_delay_ms=500, jitter=0.5)
    assert RetryPolicy.from_config(config) == RetryPolicy(5, 20, 500, 0.5)


# -- RetryingBackend ---------------------------------------------------------------------------


def backends(policy: RetryPolicy = NO_JITTER) -> tuple[RetryingBackend, FaultInjectingBackend, Clock]:
    faults = FaultInjectingBackend(MemoryBackend())
    clock = Clock()
    retrying = RetryingBackend(faults, policy, clock, rng=random.Random(3))
    outcome(retrying.open())
    outcome(retrying.create_collection("c"))
    return retrying, faults, clock


def test_backend_retries_transient_write_errors() -> None:
    """A put that meets two I/O errors succeeds on the third attempt, after the backoff delays."""
    retrying, faults, clock = backends()
    faults.fail_writes("io_error", count=2)
    d = retrying.put("c", b"k", CipherBlob.wrap(b"v"))
    assert not d.called
    clock.pump([0.01, 0.02])
    assert outcome(d) is None
    assert faults.failed_writes == 2
    assert outcome(retrying.get("c", b"k")).data == b"v"


def test_backend_does_not_retry_a_full_disk() -> None:
    """StorageFull reaches the caller at once, and reads are still served."""
    retrying, faults, clock = backends()
    outcome(retrying.put("c", b"k", CipherBlob.wrap(b"v")))
    faults.fail_writes("disk_full")
    result = outcome(retrying.put("c", b"k2", CipherBlob.wrap(b"v2")))
    assert isinstance(result, Failure) and result.check(StorageFull)
    assert faults.failed_writes == 1
    assert outcome(retrying.get("c", b"k")).data == b"v"
    assert clock.getDelayedCalls() == []


def test_backend_does_not_retry_collection_creation() -> None:
    """create_collection answers "did it exist", so an I/O error on it is not retried."""
    retrying, faults, clock = backends()
    faults.fail_writes("io_error", count=1)
    result = outcome(retrying.create_collection("new"))
    assert isinstance(result, Failure) and result.check(StorageIOError)
    assert clock.getDelayedCalls() == []


def test_backend_uses_a_replaced_policy_for_new_calls() -> None:
    """Assigning a new policy (a config reload) changes how later calls are retried."""
    retrying, faults, _ = backends()
    retrying.policy = RetryPolicy(max_attempts=1)
    faults.fail_writes("io_error", count=1)
    result = outcome(retrying.put("c", b"k", CipherBlob.wrap(b"v")))
    assert isinstance(result, Failure) and result.check(StorageIOError)


class PendingPuts(MemoryBackend):
    """A memory backend whose puts answer later, like a write waiting for its group commit."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[defer.Deferred[None]] = []
        self.puts = 0

    def put(self, collection: str, key: bytes, value: CipherBlob) -> defer.Deferred[None]:
        self.puts += 1
        d: defer.Deferred[None] = defer.Deferred()
        self.pending.append(d)
        return d


def pending_backends() -> tuple[RetryingBackend, PendingPuts, Clock]:
    inner = PendingPuts()
    clock = Clock()
    retrying = RetryingBackend(inner, NO_JITTER, clock, rng=random.Random(3))
    outcome(retrying.open())
    outcome(retrying.create_collection("c"))
    return retrying, inner, clock


def test_backend_retries_a_pending_write_that_fails_later() -> None:
    """A write whose durability fails after the call returned (a failed group commit) is retried."""
    retrying, inner, clock = pending_backends()
    d = retrying.put("c", b"k", CipherBlob.wrap(b"v"))
    assert not d.called
    inner.pending.pop(0).errback(StorageIOError("syncing the write-ahead log: I/O error"))
    assert inner.puts == 1
    clock.advance(0.01)
    assert inner.puts == 2
    inner.pending.pop(0).callback(None)
    assert outcome(d) is None


def test_backend_passes_on_a_pending_non_transient_failure() -> None:
    """A pending write failing with a non-transient error fails at once, without a retry."""
    retrying, inner, clock = pending_backends()
    d = retrying.put("c", b"k", CipherBlob.wrap(b"v"))
    inner.pending.pop(0).errback(StorageFull("disk full"))
    result = outcome(d)
    assert isinstance(result, Failure) and result.check(StorageFull)
    assert inner.puts == 1 and clock.getDelayedCalls() == []


def test_backend_pending_write_succeeds_without_retry_machinery() -> None:
    """A pending write that succeeds is answered through the first attempt's own Deferred."""
    retrying, inner, _ = pending_backends()
    d = retrying.put("c", b"k", CipherBlob.wrap(b"v"))
    first = inner.pending.pop(0)
    assert d is first
    first.callback(None)
    assert outcome(d) is None and inner.puts == 1


def test_cancelling_a_pending_write_between_attempts_stops_the_retries() -> None:
    """Cancelling the caller's Deferred while it waits to retry cancels the wait."""
    retrying, inner, clock = pending_backends()
    d = retrying.put("c", b"k", CipherBlob.wrap(b"v"))
    inner.pending.pop(0).errback(StorageIOError("io"))
    assert clock.getDelayedCalls()
    d.cancel()
    assert clock.getDelayedCalls() == []
    clock.advance(1)
    assert inner.puts == 1
    result = outcome(d)
    assert isinstance(result, Failure) and result.check(defer.CancelledError)


def test_backend_retries_a_conditional_write_only_when_it_was_refused_unapplied() -> None:
    """compare_and_write is tried again after Overloaded (a write stall refuses it before it is
    applied) but not after an I/O error (its sync may have failed after the write was applied: a
    retry's check would then fail on its own write)."""
    from amaters.types import Expect, WriteOp

    inner = MemoryBackend()
    calls: list[Exception | None] = []
    errors: list[Exception] = [Overloaded("stalled", retry_after_ms=100), StorageIOError("sync failed")]

    class Stalling(MemoryBackend):
        def compare_and_write(self, expected: Any, ops: Any) -> defer.Deferred[Any]:
            error = errors.pop(0) if errors else None
            calls.append(error)
            if error is not None:
                return defer.fail(error)
            return inner.compare_and_write(expected, ops)

    inner.create_collection("c")
    clock = Clock()
    retrying = RetryingBackend(Stalling(), NO_JITTER, clock, random.Random(1))
    write = ([Expect("c", b"k", None)], [WriteOp.put("c", b"k", CipherBlob.wrap(b"v"))])
    d = retrying.compare_and_write(*write)
    clock.pump([0.01])
    result = outcome(d)
    assert isinstance(result, Failure) and result.check(StorageIOError)
    assert len(calls) == 2 and clock.getDelayedCalls() == []
    assert outcome(retrying.compare_and_write(*write)).applied
    assert outcome(inner.get("c", b"k")).data == b"v"


class OddPuts(MemoryBackend):
    """A memory backend whose put raises at once (``errors``, in order), then answers in the form
    ``answer`` gives: a Deferred, a coroutine or a plain value."""

    def __init__(self, answer: str, *errors: Exception) -> None:
        super().__init__()
        self.answer = answer
        self.errors = list(errors)
        self.puts = 0

    def put(self, collection: str, key: bytes, value: CipherBlob) -> Any:
        self.puts += 1
        if self.errors:
            raise self.errors.pop(0)
        stored = super().put(collection, key, value)
        if self.answer == "coroutine":

            async def done() -> None:
                await stored

            return done()
        if self.answer == "value":
            return None
        return stored


@pytest.mark.parametrize("answer", ["deferred", "coroutine", "value"])
def test_backend_takes_a_raise_and_any_answer_form_of_the_first_attempt(answer: str) -> None:
    """A backend method that raises at once is retried like one whose Deferred failed, and one
    that answers with a coroutine or a plain value is waited for as maybeDeferred would."""
    inner = OddPuts(answer, StorageIOError("flaky"))
    clock = Clock()
    retrying = RetryingBackend(inner, NO_JITTER, clock, rng=random.Random(3))
    outcome(retrying.create_collection("c"))
    d = retrying.put("c", b"k", CipherBlob.wrap(b"v"))
    assert not d.called
    clock.advance(0.01)
    assert outcome(d) is None and inner.puts == 2
    assert outcome(retrying.get("c", b"k")).data == b"v"
    # The first attempt answering in that form.
    assert outcome(retrying.put("c", b"k", CipherBlob.wrap(b"v2"))) is None and inner.puts == 3
    assert outcome(retrying.get("c", b"k")).data == b"v2"
    # A non-transient error raised at once reaches the caller as a failed Deferred.
    inner.errors.append(NotFound("no such collection"))
    failed = outcome(retrying.put("c", b"k", CipherBlob.wrap(b"w")))
    assert isinstance(failed, Failure) and failed.check(NotFound)
    assert clock.getDelayedCalls() == []
