"""Brute-force protection: failed logins per source address, counted over a sliding minute.

A source with ``max_failures_per_minute`` failures in the last 60 seconds is refused without its
credentials being checked until the oldest of those failures is a minute old; the refusal is
``AUTH_FAILED`` with category RETRYABLE and ``retry_after_ms`` saying when to try again.

Why AUTH_FAILED (rather than SERVER_OVERLOADED): the refusal is about this client's logins, not the
server's load, so clients and dashboards count it with authentication failures; the RETRYABLE
category and ``retry_after`` still tell a well-behaved client when it may try again.

A success does not reset the count (a valid key of one user must not buy an attacker more guesses
at another's).  Time comes from the reactor's clock.  Memory is bounded: at most ``max_sources``
addresses are tracked; past that, addresses with no recent failure are forgotten first, then the
least recently failing ones.
"""

from __future__ import annotations

import collections
import math

from twisted.internet.interfaces import IReactorTime

from amaters.errors import AuthError, ErrorCategory

WINDOW_SECONDS = 60.0


def source_host(source: str) -> str:
    """The address part of ``host:port`` (IPv6 ``::1:4000`` too); anything else as given."""
    host, sep, port = source.rpartition(":")
    if sep and host and port.isdigit():
        return host.strip("[]")
    return source


class AuthThrottle:
    """Counts failed logins per source address on ``clock``; 0 failures per minute disables it."""

    def __init__(self, clock: IReactorTime, max_failures_per_minute: int, max_sources: int = 100_000) -> None:
        self.clock = clock
        self.limit = max_failures_per_minute
        self.max_sources = max_sources
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def update_limit(self, max_failures_per_minute: int) -> None:
        """Apply a reloaded limit; counting starts afresh when it changes."""
        if max_failures_per_minute != self.limit:
            self.limit = max_failures_per_minute
            self._failures.clear()

    def retry_after(self, source: str) -> float | None:
        """Seconds until ``source`` may try again, or None when it may try now."""
        if self.limit <= 0:
            return None
        failures = self._failures.get(source_host(source))
        if failures is None or len(failures) < self.limit:
            return None
        wait = failures[0] + WINDOW_SECONDS - self.clock.seconds()
        return wait if wait > 0 else None

    def check(self, source: str) -> None:
        """Raise the retryable AuthError when ``source`` is throttled."""
        wait = self.retry_after(source)
        if wait is not None:
            raise throttled_error(wait)

    def record_failure(self, source: str) -> None:
        """Count one failed login from ``source``."""
        if self.limit <= 0:
            return
        host = source_host(source)
        failures = self._failures.pop(host, None)
        if failures is None:
            failures = collections.deque(maxlen=self.limit)
        failures.append(self.clock.seconds())
        self._failures[host] = failures  # most recent last
        if len(self._failures) > self.max_sources:
            self._prune()

    def _prune(self) -> None:
        cutoff = self.clock.seconds() - WINDOW_SECONDS
        for host in [h for h, f in self._failures.items() if f[-1] <= cutoff]:
            del self._failures[host]
        while len(self._failures) > self.max_sources:
            self._failures.popitem(last=False)

    @property
    def tracked(self) -> int:
        """How many source addresses are being tracked."""
        return len(self._failures)


def throttled_error(wait_seconds: float) -> AuthError:
    """The refusal for a throttled source: retryable AUTH_FAILED with ``retry_after_ms``."""
    wait_ms = max(1, math.ceil(wait_seconds * 1000))
    return AuthError(
        f"too many failed logins from this address; retry in {math.ceil(wait_ms / 1000)} s",
        category=ErrorCategory.RETRYABLE,
        retry_after_ms=wait_ms,
    )


__all__ = ["WINDOW_SECONDS", "AuthThrottle", "source_host", "throttled_error"]
