"""Rate limits: token buckets per client and for the whole server, on the reactor's clock.

A bucket holds up to ``burst`` tokens and refills at ``rps`` tokens per second; a request takes one
token (a BATCH one per operation, at most a full bucket) from its client's bucket *and* from the
global bucket, or from neither: a request refused by one limit does not use up the other.  A client
is its principal when it authenticated (all of its connections share one bucket) and its source
address when it is anonymous.

A refused request is answered with ``SERVER_OVERLOADED`` (category RETRYABLE) whose
``retry_after_ms`` says when enough tokens will be there.  On the wire that is the
``ErrorResponse.retry_after_ms`` field (milliseconds, exact), and upstream's ``retry_after`` (whole
seconds, rounded up) for clients that only know that one; the Python client exposes it as
``AmatersError.retry_after_ms``.

A bucket that has refilled completely is indistinguishable from a new one, so such buckets are
dropped (idle buckets expire) during a sweep every :data:`SWEEP_INTERVAL` seconds: memory grows
with the clients active in the last ``burst / rps`` seconds, not with every client ever seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet.interfaces import IReactorTime

from amaters.config import Config, RateLimitConfig
from amaters.errors import Overloaded
from amaters.query import operations as ops
from amaters.query.pipeline import PipelineStage, RequestContext

#: Seconds between sweeps of full (idle) buckets.
SWEEP_INTERVAL = 10.0


class Refusal(NamedTuple):
    """Why a request was refused: ``scope`` is "client" or "global"; when to retry."""

    retry_after_ms: int
    scope: str


class TokenBucket:
    """``tokens`` available as of ``updated`` (clock seconds)."""

    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated

    def refill(self, now: float, rate: float, capacity: float) -> float:
        """Bring ``tokens`` up to ``now``; returns them."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(capacity, self.tokens + elapsed * rate)
            self.updated = now
        elif self.tokens > capacity:
            self.tokens = capacity
        return self.tokens


def _capacity(rate: float, burst: int) -> float:
    # burst 0: one second's worth, and never less than one request.
    return float(burst) if burst > 0 else max(1.0, rate)


def _wait_ms(missing: float, rate: float) -> int:
    """Milliseconds until ``missing`` tokens have refilled (at least 1)."""
    return max(1, math.ceil(missing / rate * 1000.0))


class RateLimiter:
    """Per-client and global token buckets under the ``[rate_limit]`` settings.

    :meth:`check` takes the tokens and returns None, or returns a :class:`Refusal`.
    """

    def __init__(self, config: RateLimitConfig, clock: IReactorTime) -> None:
        self._watchers: list[Callable[[], None]] = []
        self._config = config
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._global: TokenBucket | None = None
        self._last_sweep = clock.seconds()
        #: Requests refused by a client's bucket, and by the global bucket.
        self.refused_client = 0
        self.refused_global = 0

    @property
    def config(self) -> RateLimitConfig:
        return self._config

    @config.setter
    def config(self, config: RateLimitConfig) -> None:
        was = self.enabled
        self._config = config
        if self.enabled != was:
            for watcher in list(self._watchers):
                watcher()

    def watch_enabled(self, watcher: Callable[[], None]) -> None:
        """Call ``watcher()`` whenever new settings turn the limits on or off."""
        self._watchers.append(watcher)

    @property
    def enabled(self) -> bool:
        return self._config.per_client_rps > 0 or self._config.global_rps > 0

    @property
    def bucket_count(self) -> int:
        """Client buckets currently held (idle ones are swept)."""
        return len(self._buckets)

    def check(self, client: str, cost: int = 1) -> Refusal | None:
        """Take ``cost`` tokens for ``client`` and from the global bucket, or say why not."""
        config = self.config
        now = self.clock.seconds()
        if now - self._last_sweep >= SWEEP_INTERVAL:
            self.sweep(now)
        client_rate = config.per_client_rps
        global_rate = config.global_rps
        bucket: TokenBucket | None = None
        client_cost = global_cost = 0.0
        wait_client = wait_global = 0
        if client_rate > 0:
            capacity = _capacity(client_rate, config.per_client_burst)
            client_cost = min(float(cost), capacity)
            bucket = self._buckets.get(client)
            if bucket is None:
                bucket = self._buckets[client] = TokenBucket(capacity, now)
            tokens = bucket.refill(now, client_rate, capacity)
            if tokens < client_cost:
                wait_client = _wait_ms(client_cost - tokens, client_rate)
        glob: TokenBucket | None = None
        if global_rate > 0:
            capacity = _capacity(global_rate, config.global_burst)
            global_cost = min(float(cost), capacity)
            glob = self._global
            if glob is None:
                glob = self._global = TokenBucket(capacity, now)
            tokens = glob.refill(now, global_rate, capacity)
            if tokens < global_cost:
                wait_global = _wait_ms(global_cost - tokens, global_rate)
        if wait_client or wait_global:
            if wait_client:
                self.refused_client += 1
            else:
                self.refused_global += 1
            return Refusal(max(wait_client, wait_global), "client" if wait_client else "global")
        if bucket is not None:
            bucket.tokens -= client_cost
        if glob is not None:
            glob.tokens -= global_cost
        return None

    def sweep(self, now: float | None = None) -> int:
        """Drop the client buckets that have refilled completely; returns how many."""
        if now is None:
            now = self.clock.seconds()
        self._last_sweep = now
        rate = self.config.per_client_rps
        if rate <= 0:
            dropped = len(self._buckets)
            self._buckets.clear()
            return dropped
        capacity = _capacity(rate, self.config.per_client_burst)
        full = [
            name
            for name, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * rate >= capacity
        ]
        for name in full:
            del self._buckets[name]
        return len(full)

    # -- reload -------------------------------------------------------------------------------

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        """New rates and bursts apply to the next request (buckets keep their tokens, capped)."""
        if new.rate_limit == self.config:
            return None
        settings = new.rate_limit

        def commit() -> None:
            self.config = settings
            if settings.global_rps <= 0:
                self._global = None

        return commit


def client_of(ctx: RequestContext) -> str:
    """The rate-limit identity of a request: its principal, or its source address if anonymous."""
    principal = ctx.principal
    if getattr(principal, "auth_method", "anonymous") == "anonymous":
        host, _, port = ctx.source.rpartition(":")
        return "address:" + (host if port.isdigit() and host else ctx.source)
    return "principal:" + str(principal.id)


def request_cost(op: Any) -> int:
    """Tokens a request takes: one, or one per operation of a BATCH."""
    if type(op) is ops.Batch:
        return max(1, len(op.ops))
    return 1


class RateLimitStage(PipelineStage):
    """Refuses requests over the rate limits with a retryable ``SERVER_OVERLOADED``."""

    name = "ratelimit"

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    @property
    def active(self) -> bool:
        """Whether the pipeline calls :meth:`before`: not while every rate is 0 (no limit)."""
        return self.limiter.enabled

    def watch_active(self, watcher: Callable[[], None]) -> None:
        """The pipeline re-reads :attr:`active` when a reload turns the limits on or off."""
        self.limiter.watch_enabled(watcher)

    def before(self, ctx: RequestContext, op: Any) -> object:
        limiter = self.limiter
        if not limiter.enabled:
            return None
        refusal = limiter.check(client_of(ctx), request_cost(op))
        if refusal is None:
            return None
        wait = refusal.retry_after_ms
        which = "this client's" if refusal.scope == "client" else "the server's"
        raise Overloaded(f"{which} rate limit is reached; retry in {wait} ms", retry_after_ms=wait)


__all__ = [
    "SWEEP_INTERVAL",
    "RateLimitStage",
    "RateLimiter",
    "Refusal",
    "TokenBucket",
    "client_of",
    "request_cost",
]
