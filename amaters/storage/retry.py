"""Retries of transient backend errors, for idempotent operations only, on the reactor's clock.

A transient error is one that may go away by itself: :class:`~amaters.errors.StorageIOError`
(``STORAGE_IO``, category RETRYABLE), for example an I/O error on a WAL sync, and a backend's
:class:`~amaters.errors.Overloaded` (a RocksDB write stall: writes never wait on the reactor thread,
they fail at once and are retried here after a delay, which is RocksDB's own "slowdown" done
without blocking).  A full disk
(``STORAGE_FULL``), corruption, a missing collection or a bad request is never retried: trying
again would fail the same way, only later.

Only idempotent operations are retried, because a failed attempt may have been applied (a write
whose WAL sync failed is in the memtable): ``get``, ``list_collections``, ``stats``, ``put`` and
``write_batch`` (they set absolute values), ``delete`` (its effect is idempotent; a retry after an
applied attempt reports False), ``sync`` and ``flush``.  A conditional write
(``compare_and_write``) is tried again only after ``Overloaded``, which refuses it before it is
applied: after an applied attempt a retry's check would fail on the attempt's own writes.  Creating and dropping collections answer
"did it exist", and snapshots write a new directory, so they are not retried.

Delays grow exponentially from ``base_delay_ms`` up to ``max_delay_ms``, each moved at random by up
to ``jitter`` of itself so that clients failing together do not retry together.  Waiting uses
``clock.callLater`` (the reactor, or ``task.Clock`` in tests), never ``time.sleep``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from amaters.errors import Overloaded, StorageIOError
from amaters.interfaces import IRangeCursor, IStorageBackend
from amaters.types import CipherBlob, ConditionalResult, Expect, WriteOp

T = TypeVar("T")

log = Logger()


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` may succeed when tried again: a retryable ``StorageIOError``, or a
    backend's ``Overloaded`` (a RocksDB write stall, which ends when a flush catches up)."""
    return isinstance(error, (StorageIOError, Overloaded)) and error.retryable


@attrs.frozen
class RetryPolicy:
    """How often and how long to retry.  ``max_attempts`` counts the first try (1: never retry)."""

    max_attempts: int = 3
    base_delay_ms: int = 10
    max_delay_ms: int = 1000
    jitter: float = 0.2

    @classmethod
    def from_config(cls, retry: Any) -> RetryPolicy:
        """The policy of a ``RetryConfig`` (the ``[retry]`` section)."""
        return cls(retry.max_attempts, retry.base_delay_ms, retry.max_delay_ms, retry.jitter)

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        nominal = min(float(self.max_delay_ms), self.base_delay_ms * 2.0 ** (retry - 1))
        if self.jitter:
            nominal *= 1.0 + rng.uniform(-self.jitter, self.jitter)
        return max(0.0, min(nominal, float(self.max_delay_ms))) / 1000.0


async def call_with_retry(
    clock: IReactorTime,
    policy: RetryPolicy,
    f: Callable[..., Any],
    *args: Any,
    idempotent: bool,
    transient: Callable[[BaseException], bool] = is_transient,
    rng: random.Random | None = None,
    what: str = "storage operation",
    first_error: BaseException | None = None,
) -> Any:
    """Call ``f(*args)`` (a Deferred, coroutine or plain value) and retry transient failures.

    Non-idempotent calls and non-transient errors are never retried; after ``max_attempts`` the last
    error is raised.  ``first_error`` is the failure of a first attempt the caller already made
    (the loop then starts by waiting and retrying).  Cancelling the returned Deferred cancels the wait between attempts.
    """
    rng = rng or random.Random()
    attempt = 1
    error = first_error
    while True:
        if error is not None:
            if not idempotent or not transient(error) or attempt >= policy.max_attempts:
                raise error
            wait = policy.delay(attempt, rng)
            log.info(
                "Retrying {what} in {wait:.3f}s after {error} (attempt {attempt} of {attempts})",
                what=what,
                wait=wait,
                error=str(error),
                attempt=attempt + 1,
                attempts=policy.max_attempts,
            )
            await task.deferLater(clock, wait, lambda: None)
            attempt += 1
        try:
            return await defer.maybeDeferred(f, *args)
        except Exception as e:
            error = e


def _as_deferred(result: object) -> defer.Deferred[Any]:
    """What a backend method returned that is not a Deferred (a coroutine, a Failure or a plain
    value), as a Deferred."""
    return defer.maybeDeferred(lambda: result)


@implementer(IStorageBackend)
class RetryingBackend:
    """An ``IStorageBackend`` that applies a :class:`RetryPolicy` to the idempotent operations of
    ``inner``.

    ``policy`` may be replaced at any time (a config reload); calls in progress keep the policy
    they started with.
    """

    def __init__(
        self,
        inner: IStorageBackend,
        policy: RetryPolicy,
        clock: IReactorTime,
        rng: random.Random | None = None,
    ) -> None:
        # Typed Any: the interface declares its Deferred results as ``object``.
        self.inner: Any = inner
        self.policy = policy
        self._clock = clock
        self._rng = rng or random.Random()
        # Asked for every write and most reads and never retried: the inner method itself, with
        # no call in between.
        self.has_collection = inner.has_collection  # type: ignore[method-assign]
        # A write done at once in-process (the memory backend's): nothing to retry.
        put_now = getattr(inner, "put_now", None)
        if put_now is not None:
            self.put_now = put_now

    @property
    def name(self) -> str:
        return str(self.inner.name)

    def _retry(self, what: str, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        # The first attempt runs directly and its Deferred is returned as it is, with one errback:
        # when it has already succeeded (most reads and writes of an in-process engine) or is still
        # pending (a write waiting for its group commit), nothing else is added to the common path.
        # The retry loop (a coroutine) only starts after a transient failure.
        # Called directly rather than through maybeDeferred (which costs a call and a few checks
        # on every read and write): a backend's methods return Deferreds.
        try:
            first: defer.Deferred[Any] = f(*args)
        except BaseException:
            first = defer.fail()
        else:
            if type(first) is not defer.Deferred:
                first = _as_deferred(first)
        if not first.called:
            return first.addErrback(self._after_failure, what, f, args)
        if not isinstance(first.result, Failure):
            return first
        # Failed at once: answer with a fresh Deferred (one that has not fired yet while retries are
        # pending, rather than the first attempt's, which would look "called" while it waits).
        first.addErrback(self._after_failure, what, f, args)
        return defer.Deferred.fromCoroutine(self._after_first(first))

    async def _after_first(self, first: defer.Deferred[Any]) -> Any:
        return await first

    def _after_failure(
        self, failure: Failure, what: str, f: Callable[..., Any], args: tuple[Any, ...]
    ) -> defer.Deferred[Any] | Failure:
        error = failure.value
        policy = self.policy
        if policy.max_attempts <= 1 or not isinstance(error, Exception) or not is_transient(error):
            return failure
        # Returned from an errback, the retries' Deferred takes the place of the first attempt's
        # result (and cancelling the caller's Deferred cancels the wait between attempts).
        return defer.Deferred.fromCoroutine(
            call_with_retry(
                self._clock, policy, f, *args, idempotent=True, rng=self._rng, what=what, first_error=error
            )
        )

    def _once(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(f, *args)

    def open(self) -> defer.Deferred[None]:
        return self._once(self.inner.open)

    def close(self) -> defer.Deferred[None]:
        return self._once(self.inner.close)

    def create_collection(self, name: str) -> defer.Deferred[bool]:
        return self._once(self.inner.create_collection, name)

    def drop_collection(self, name: str) -> defer.Deferred[bool]:
        return self._once(self.inner.drop_collection, name)

    def list_collections(self) -> defer.Deferred[list[str]]:
        return self._retry("list_collections", self.inner.list_collections)

    def has_collection(self, name: str) -> bool:
        return bool(self.inner.has_collection(name))

    def collection_count(self) -> int:
        return int(self.inner.collection_count())

    def get(self, collection: str, key: bytes) -> defer.Deferred[CipherBlob | None]:
        return self._retry("get", self.inner.get, collection, key)

    def put(self, collection: str, key: bytes, value: CipherBlob) -> defer.Deferred[None]:
        return self._retry("put", self.inner.put, collection, key, value)

    def delete(self, collection: str, key: bytes) -> defer.Deferred[bool]:
        return self._retry("delete", self.inner.delete, collection, key)

    def write_batch(self, ops: Iterable[WriteOp]) -> defer.Deferred[None]:
        return self._retry("write_batch", self.inner.write_batch, list(ops))

    def compare_and_write(
        self, expected: Iterable[Expect], ops: Iterable[WriteOp]
    ) -> defer.Deferred[ConditionalResult]:
        # A conditional write whose sync failed was applied: tried again, its check would fail on
        # its own writes.  Only a write refused before it was applied (a RocksDB write stall,
        # Overloaded) is tried again.
        expected, ops = list(expected), list(ops)
        return defer.Deferred.fromCoroutine(
            call_with_retry(
                self._clock,
                self.policy,
                self.inner.compare_and_write,
                expected,
                ops,
                idempotent=True,
                transient=lambda e: isinstance(e, Overloaded) and e.retryable,
                rng=self._rng,
                what="compare_and_write",
            )
        )

    def scan(
        self, collection: str, start: bytes, end: bytes | None, limit: int | None, chunk_size: int
    ) -> IRangeCursor:
        cursor: IRangeCursor = self.inner.scan(collection, start, end, limit, chunk_size)
        return cursor

    def sync(self) -> defer.Deferred[None]:
        return self._retry("sync", self.inner.sync)

    def flush(self) -> defer.Deferred[None]:
        return self._retry("flush", self.inner.flush)

    def stats(self) -> defer.Deferred[dict[str, Any]]:
        return self._retry("stats", self.inner.stats)

    def snapshot(self, destination: str) -> defer.Deferred[None]:
        return self._once(self.inner.snapshot, destination)
