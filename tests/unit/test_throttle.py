"""Brute-force throttling: failed logins per source address over a sliding minute, on a fake clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from amaters.auth.throttle import AuthThrottle, source_host, throttled_error
from amaters.errors import AuthError, ErrorCategory, ErrorCode


def throttle(limit: int = 3, **kw: int) -> AuthThrottle:
    clock = Clock()
    clock.advance(1000)
    return AuthThrottle(clock, limit, **kw)


def test_source_host_drops_the_port() -> None:
    """Failures count per address: the port of host:port (IPv4 or IPv6) is ignored."""
    assert source_host("10.0.0.1:5555") == "10.0.0.1"
    assert source_host("::1:5555") == "::1"
    assert source_host("[::1]:5555") == "::1"
    assert source_host("unix-peer") == "unix-peer"


def test_limit_reached_refuses_until_the_oldest_failure_is_a_minute_old() -> None:
    """After `limit` failures within a minute the source is refused; it may retry when the first ages out."""
    t = throttle(3)
    for _ in range(2):
        t.record_failure("10.0.0.1:1")
        t.clock.advance(10)
    assert t.retry_after("10.0.0.1:2") is None
    t.record_failure("10.0.0.1:3")  # third failure at t=20 after the first
    assert t.retry_after("10.0.0.1:4") == pytest.approx(40)
    with pytest.raises(AuthError) as caught:
        t.check("10.0.0.1:4")
    error = caught.value
    assert error.code == ErrorCode.AUTH_FAILED
    assert error.category == ErrorCategory.RETRYABLE and error.retryable
    assert error.retry_after_ms == 40_000
    t.clock.advance(40)
    assert t.retry_after("10.0.0.1:5") is None
    t.check("10.0.0.1:5")


def test_window_slides() -> None:
    """Failures spread over more than a minute never reach the limit."""
    t = throttle(3)
    for _ in range(10):
        t.record_failure("10.0.0.1:1")
        t.clock.advance(31)  # at most two failures in any minute
        assert t.retry_after("10.0.0.1:1") is None


def test_sources_are_independent() -> None:
    """One address being throttled does not affect another."""
    t = throttle(2)
    t.record_failure("10.0.0.1:1")
    t.record_failure("10.0.0.1:2")
    assert t.retry_after("10.0.0.1:9") is not None
    assert t.retry_after("10.0.0.2:9") is None


def test_zero_disables_throttling() -> None:
    """max_failures_per_minute = 0 never throttles and tracks nothing."""
    t = throttle(0)
    for _ in range(100):
        t.record_failure("10.0.0.1:1")
    assert t.retry_after("10.0.0.1:1") is None and t.tracked == 0


def test_tracked_addresses_are_bounded() -> None:
    """Past max_sources, stale addresses are forgotten first, then the least recently failing."""
    t = throttle(2, max_sources=3)
    t.record_failure("10.0.0.1:1")
    t.clock.advance(61)
    for n in range(2, 5):
        t.record_failure(f"10.0.0.{n}:1")
    assert t.tracked == 3
    for n in range(5, 10):
        t.record_failure(f"10.0.0.{n}:1")
    assert t.tracked == 3
    t.record_failure("10.0.0.9:2")
    assert t.retry_after("10.0.0.9:3") is not None


def test_limit_change_starts_counting_afresh() -> None:
    """A reloaded limit replaces the old one; counts restart."""
    t = throttle(2)
    t.record_failure("10.0.0.1:1")
    t.record_failure("10.0.0.1:1")
    t.update_limit(5)
    assert t.retry_after("10.0.0.1:1") is None and t.limit == 5


def test_error_rounds_retry_after_up() -> None:
    """retry_after_ms is at least 1 ms and rounds up."""
    assert throttled_error(0.0001).retry_after_ms == 1
    assert throttled_error(1.2345).retry_after_ms == 1235
