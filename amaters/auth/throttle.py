"""Brute-force protection: failed logins counted over a sliding minute per network and per
credential, with a way through for principals who logged in before.

Two kinds of buckets count failures:

- the source's **network**: its /24 for IPv4, its /64 for IPv6 (one host usually holds a whole
  /64, and rotating addresses inside either costs an attacker nothing);
- the **credential** presented, when it names one without being verified: an API key's id (the part
  before the first ``.``) or a bearer token's ``sub`` claim (read, not trusted, only to pick the
  bucket).  Guesses at one key from many networks add up there.

A login is refused without its credentials being checked while its credential's bucket holds
``max_failures_per_minute`` failures, or while its network's does, **unless** the credential has
logged in successfully within :data:`TRUST_SECONDS` (a known principal).  So a client behind an
address that others are attacking (a NAT, a shared proxy) keeps logging in with a credential that
worked before, while its own failures still throttle that credential.  The trade-off: a principal
that never logged in from anywhere yet is locked out with the rest of a throttled network for up to
a minute; and an attacker who knows a known principal's key id gets ``max_failures_per_minute``
guesses a minute at that key's 256-bit secret, which is harmless.

The refusal is ``AUTH_FAILED`` with category RETRYABLE and ``retry_after_ms`` saying when to try
again.  Why AUTH_FAILED (rather than SERVER_OVERLOADED): it is about these logins, not the server's
load, so clients and dashboards count it with authentication failures; the RETRYABLE category and
``retry_after`` still tell a well-behaved client when it may try again.

A success does not reset any count (a valid key of one user must not buy an attacker more guesses
at another's).  Time comes from the reactor's clock.  Memory is bounded: at most ``max_sources``
buckets and as many trusted credentials are kept; past that, buckets with no recent failure are
forgotten first, then the least recently failing ones (and the least recently trusted credentials).
"""

from __future__ import annotations

import base64
import collections
import ipaddress
import json
import math
from typing import Any

from twisted.internet.interfaces import IReactorTime

from amaters.errors import AuthError, ErrorCategory

WINDOW_SECONDS = 60.0
#: How long a credential that logged in successfully may log in from a throttled network.
TRUST_SECONDS = 3600.0
#: Prefix lengths of the network buckets.
IPV4_PREFIX = 24
IPV6_PREFIX = 64


def source_host(source: str) -> str:
    """The address part of ``host:port`` (IPv6 ``::1:4000`` too); anything else as given."""
    host, sep, port = source.rpartition(":")
    if sep and host and port.isdigit():
        return host.strip("[]")
    return source


def source_network(source: str) -> str:
    """The network bucket of ``source`` (``host:port``): its /24 or /64, or the host as given."""
    host = source_host(source)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = IPV4_PREFIX if address.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def credential_bucket(credentials: Any) -> str | None:
    """The bucket a presented credential's failures count in: ``key:<id>`` for an API key,
    ``sub:<subject>`` for a bearer token (unverified; only a bucket name), None otherwise."""
    kind = getattr(credentials, "kind", None)
    secret = getattr(credentials, "secret", None)
    if not isinstance(secret, str) or len(secret) > 16384:
        return None
    if kind == "api_key":
        key_id, dot, _ = secret.partition(".")
        if dot and 0 < len(key_id) <= 64:
            return "key:" + key_id
        return None
    if kind == "bearer_token":
        parts = secret.split(".")
        if len(parts) != 3:
            return None
        try:
            payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        except (ValueError, TypeError):
            return None
        subject = payload.get("sub") if isinstance(payload, dict) else None
        if isinstance(subject, str) and 0 < len(subject) <= 256:
            return "sub:" + subject
    return None


class AuthThrottle:
    """Counts failed logins per network and per credential on ``clock``; 0 failures per minute
    disables it."""

    def __init__(self, clock: IReactorTime, max_failures_per_minute: int, max_sources: int = 100_000) -> None:
        self.clock = clock
        self.limit = max_failures_per_minute
        self.max_sources = max_sources
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        #: Credential buckets that logged in successfully -> when (most recent last).
        self._trusted: collections.OrderedDict[str, float] = collections.OrderedDict()

    def update_limit(self, max_failures_per_minute: int) -> None:
        """Apply a reloaded limit; counting starts afresh when it changes (trust is kept)."""
        if max_failures_per_minute != self.limit:
            self.limit = max_failures_per_minute
            self._failures.clear()

    def _wait(self, bucket: str) -> float | None:
        failures = self._failures.get(bucket)
        if failures is None or len(failures) < self.limit:
            return None
        wait = failures[0] + WINDOW_SECONDS - self.clock.seconds()
        return wait if wait > 0 else None

    def trusted(self, credential: str | None) -> bool:
        """Whether ``credential`` logged in successfully within TRUST_SECONDS."""
        if credential is None:
            return False
        since = self._trusted.get(credential)
        return since is not None and self.clock.seconds() - since < TRUST_SECONDS

    def retry_after(self, source: str, credential: str | None = None) -> float | None:
        """Seconds until a login from ``source`` presenting ``credential`` (a bucket name from
        :func:`credential_bucket`) may be tried, or None when it may be tried now."""
        if self.limit <= 0:
            return None
        if credential is not None:
            wait = self._wait(credential)
            if wait is not None:
                return wait
        wait = self._wait("net:" + source_network(source))
        if wait is not None and self.trusted(credential):
            return None  # a known principal is not locked out by its network's failures
        return wait

    def check(self, source: str, credential: str | None = None) -> None:
        """Raise the retryable AuthError when this login is throttled."""
        wait = self.retry_after(source, credential)
        if wait is not None:
            raise throttled_error(wait)

    def record_failure(self, source: str, credential: str | None = None) -> None:
        """Count one failed login from ``source`` (and against ``credential``)."""
        if self.limit <= 0:
            return
        self._count("net:" + source_network(source))
        if credential is not None:
            self._count(credential)
        if len(self._failures) > self.max_sources:
            self._prune()

    def record_success(self, credential: str | None) -> None:
        """``credential`` logged in: it may log in from a throttled network for TRUST_SECONDS."""
        if credential is None or self.limit <= 0:
            return
        self._trusted.pop(credential, None)
        self._trusted[credential] = self.clock.seconds()
        while len(self._trusted) > self.max_sources:
            self._trusted.popitem(last=False)

    def _count(self, bucket: str) -> None:
        failures = self._failures.pop(bucket, None)
        if failures is None:
            failures = collections.deque(maxlen=self.limit)
        failures.append(self.clock.seconds())
        self._failures[bucket] = failures  # most recent last

    def _prune(self) -> None:
        cutoff = self.clock.seconds() - WINDOW_SECONDS
        for host in [h for h, f in self._failures.items() if f[-1] <= cutoff]:
            del self._failures[host]
        while len(self._failures) > self.max_sources:
            self._failures.popitem(last=False)

    @property
    def tracked(self) -> int:
        """How many buckets (networks and credentials) are being tracked."""
        return len(self._failures)


def throttled_error(wait_seconds: float) -> AuthError:
    """The refusal for a throttled source: retryable AUTH_FAILED with ``retry_after_ms``."""
    wait_ms = max(1, math.ceil(wait_seconds * 1000))
    return AuthError(
        f"too many failed logins from this network or with this credential; retry in"
        f" {math.ceil(wait_ms / 1000)} s",
        category=ErrorCategory.RETRYABLE,
        retry_after_ms=wait_ms,
    )


__all__ = [
    "TRUST_SECONDS",
    "WINDOW_SECONDS",
    "AuthThrottle",
    "credential_bucket",
    "source_host",
    "source_network",
    "throttled_error",
]
