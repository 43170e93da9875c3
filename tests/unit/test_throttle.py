"""Brute-force throttling: failed logins per source address over a sliding minute, on a fake clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from amaters.auth.throttle import (
    TRUST_SECONDS,
    AuthThrottle,
    credential_bucket,
    source_host,
    source_network,
    throttled_error,
)
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


def test_networks_are_independent() -> None:
    """One /24 being throttled does not affect another; addresses inside it share the count."""
    t = throttle(2)
    t.record_failure("10.0.0.1:1")
    t.record_failure("10.0.0.2:2")
    assert t.retry_after("10.0.0.77:9") is not None
    assert t.retry_after("10.0.1.1:9") is None


def test_zero_disables_throttling() -> None:
    """max_failures_per_minute = 0 never throttles and tracks nothing."""
    t = throttle(0)
    for _ in range(100):
        t.record_failure("10.0.0.1:1")
    assert t.retry_after("10.0.0.1:1") is None and t.tracked == 0


def test_tracked_addresses_are_bounded() -> None:
    """Past max_sources, stale addresses are forgotten first, then the least recently failing."""
    t = throttle(2, max_sources=3)
    t.record_failure("10.0.1.1:1")
    t.clock.advance(61)
    for n in range(2, 5):
        t.record_failure(f"10.0.{n}.1:1")
    assert t.tracked == 3
    for n in range(5, 10):
        t.record_failure(f"10.0.{n}.1:1")
    assert t.tracked == 3
    t.record_failure("10.0.9.2:2")
    assert t.retry_after("10.0.9.3:3") is not None


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


def test_networks_are_slash_24_and_slash_64() -> None:
    """IPv4 sources count per /24, IPv6 per /64 (IPv4-mapped IPv6 as IPv4)."""
    assert source_network("192.0.2.77:5000") == "192.0.2.0/24"
    assert source_network("[2001:db8:1:2:aaaa::1]:5000") == "2001:db8:1:2::/64"
    assert source_network("::ffff:192.0.2.9:80") == "192.0.2.0/24"
    assert source_network("unix-socket") == "unix-socket"


def test_rotating_addresses_inside_a_network_is_throttled() -> None:
    """Failures from 10 different addresses of one /64 throttle the whole /64."""
    t = throttle(10)
    for n in range(10):
        t.record_failure(f"[2001:db8::{n + 1:x}]:1")
    assert t.retry_after("[2001:db8::ffff]:1") is not None
    assert t.retry_after("[2001:db8:0:1::1]:1") is None


def test_guesses_at_one_key_from_many_networks_throttle_that_key() -> None:
    """Failures against key id 'svc' from different networks add up on the key, not on others."""
    t = throttle(3)
    for n in range(3):
        t.record_failure(f"10.{n}.0.1:1", "key:svc")
    assert t.retry_after("172.16.0.1:1", "key:svc") is not None
    assert t.retry_after("172.16.0.1:1", "key:other") is None


def test_a_known_principal_is_not_locked_out_by_its_networks_failures() -> None:
    """A credential that logged in before still logs in from a throttled network; an unknown one
    does not; the known one's own failures throttle it; trust ends after TRUST_SECONDS."""
    t = throttle(3)
    t.record_success("key:good")
    for n in range(3):
        t.record_failure(f"10.0.0.{n}:1", f"key:guess{n}")
    assert t.retry_after("10.0.0.50:1", "key:good") is None
    assert t.retry_after("10.0.0.50:1", "key:new") is not None
    assert t.retry_after("10.0.0.50:1") is not None
    for _ in range(3):
        t.record_failure("10.9.0.1:1", "key:good")
    assert t.retry_after("10.0.0.50:1", "key:good") is not None
    t.clock.advance(61)
    t.record_success("key:good")
    t.clock.advance(TRUST_SECONDS)
    for n in range(3):
        t.record_failure(f"10.0.0.{n}:1")
    assert t.retry_after("10.0.0.50:1", "key:good") is not None


def test_credential_buckets_come_from_unverified_names() -> None:
    """An API key's id, a token's sub; nothing for anything else."""
    import base64
    import json

    class C:
        def __init__(self, kind: str, secret: str) -> None:
            self.kind, self.secret = kind, secret

    body = base64.urlsafe_b64encode(json.dumps({"sub": "alice"}).encode()).decode().rstrip("=")
    assert credential_bucket(C("api_key", "svc.secret")) == "key:svc"
    assert credential_bucket(C("api_key", "nodot")) is None
    assert credential_bucket(C("bearer_token", f"x.{body}.y")) == "sub:alice"
    assert credential_bucket(C("bearer_token", "garbage")) is None
    assert credential_bucket(None) is None
