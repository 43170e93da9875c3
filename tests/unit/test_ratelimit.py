"""Rate limits: token buckets per client and global, on a fake clock; the pipeline stage; reload."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet.task import Clock

from amaters.config import Config, RateLimitConfig, default_config
from amaters.errors import ErrorCategory, ErrorCode, Overloaded
from amaters.protect.ratelimit import RateLimiter, RateLimitStage, client_of, request_cost
from amaters.proto.convert import error_from_proto, error_to_proto
from amaters.protocols.server import ANONYMOUS, Principal
from amaters.query import operations as ops
from amaters.query.pipeline import RequestContext
from amaters.types import CipherBlob


def limiter(**settings: float) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(RateLimitConfig(**settings), clock), clock  # type: ignore[arg-type]


def test_burst_then_refill_at_the_rate() -> None:
    """A client gets its burst at once, then one request per 1/rps seconds."""
    rl, clock = limiter(per_client_rps=10, per_client_burst=5)
    assert [rl.check("a") for _ in range(5)] == [None] * 5
    refusal = rl.check("a")
    assert refusal is not None and refusal.scope == "client"
    assert refusal.retry_after_ms == 100  # one token at 10/s
    clock.advance(0.05)
    refusal = rl.check("a")
    assert refusal is not None and refusal.retry_after_ms == 50
    clock.advance(0.05)
    assert rl.check("a") is None
    assert rl.refused_client == 2


def test_clients_have_separate_buckets() -> None:
    """One client using up its bucket does not affect another."""
    rl, _ = limiter(per_client_rps=1, per_client_burst=2)
    assert rl.check("a") is None and rl.check("a") is None
    assert rl.check("a") is not None
    assert rl.check("b") is None


def test_global_limit_applies_to_everyone_and_refusals_take_no_tokens() -> None:
    """The global bucket refuses any client once empty; a refused request takes no client tokens."""
    rl, clock = limiter(per_client_rps=100, per_client_burst=100, global_rps=2, global_burst=2)
    assert rl.check("a") is None and rl.check("b") is None
    refusal = rl.check("c")
    assert refusal is not None and refusal.scope == "global" and refusal.retry_after_ms == 500
    assert rl.refused_global == 1
    clock.advance(0.5)
    assert rl.check("c") is None
    # "c" was refused once by the global limit: its own bucket lost only the one admitted request.
    assert rl._buckets["c"].tokens == pytest.approx(99.0)


def test_batch_costs_one_per_operation_capped_at_the_burst() -> None:
    """A BATCH costs its operation count; one larger than the burst still passes on a full bucket."""
    blob = CipherBlob.wrap(b"x")
    small = ops.Batch(tuple(ops.Set("c", b"k%d" % i, blob) for i in range(3)))
    huge = ops.Batch(tuple(ops.Get("c", b"k%d" % i) for i in range(50)))
    assert request_cost(small) == 3 and request_cost(huge) == 50 and request_cost(ops.Get("c", b"k")) == 1
    rl, clock = limiter(per_client_rps=5, per_client_burst=10)
    assert rl.check("a", 3) is None
    assert rl.check("a", 50) is not None  # needs the whole (capped) bucket: 7 of 10 left
    clock.advance(1.0)
    assert rl.check("a", 50) is None
    assert rl.check("a", 1) is not None


def test_zero_burst_means_one_second_of_rate() -> None:
    """per_client_burst = 0 allows one second's worth of requests at once (at least one)."""
    rl, _ = limiter(per_client_rps=3)
    assert [rl.check("a") is None for _ in range(4)] == [True, True, True, False]
    rl, _ = limiter(per_client_rps=0.5)
    assert rl.check("a") is None and rl.check("a") is not None


def test_idle_buckets_expire() -> None:
    """Buckets that have refilled completely are swept; busy ones stay."""
    rl, clock = limiter(per_client_rps=10, per_client_burst=10)
    for name in ("idle", "busy"):
        for _ in range(10):
            rl.check(name)
    clock.advance(0.5)
    for _ in range(5):
        rl.check("busy")
    clock.advance(0.6)  # "idle" is full again (1.1 s); "busy" is not
    assert rl.sweep() == 1
    assert set(rl._buckets) == {"busy"}
    clock.advance(60)
    rl.check("new")  # a check after SWEEP_INTERVAL sweeps on its own
    assert set(rl._buckets) == {"new"}


def test_disabled_by_default() -> None:
    """With no rates configured the limiter is off and the stage lets everything through."""
    rl = RateLimiter(default_config().rate_limit, Clock())
    assert not rl.enabled
    ctx = RequestContext(1, ANONYMOUS, "127.0.0.1:5000")
    assert RateLimitStage(rl).before(ctx, ops.Get("c", b"k")) is None


def test_stage_refuses_with_retryable_overloaded_and_retry_after_in_ms() -> None:
    """Over the limit the stage raises SERVER_OVERLOADED (retryable) with retry_after_ms."""
    rl, _ = limiter(per_client_rps=4, per_client_burst=1)
    stage = RateLimitStage(rl)
    ctx = RequestContext(1, ANONYMOUS, "10.0.0.1:5000")
    assert stage.before(ctx, ops.Get("c", b"k")) is None
    with pytest.raises(Overloaded) as info:
        stage.before(ctx, ops.Get("c", b"k"))
    error = info.value
    assert error.code == ErrorCode.SERVER_OVERLOADED and error.category == ErrorCategory.RETRYABLE
    assert error.retry_after_ms == 250
    assert "this client's rate limit" in error.message
    # On the wire: exact milliseconds in retry_after_ms, whole seconds (rounded up) in retry_after.
    wire = error_to_proto(error)
    assert wire.retry_after_ms == 250 and wire.retry_after == 1
    assert error_from_proto(wire).retry_after_ms == 250
    wire.ClearField("retry_after_ms")  # as an upstream server sends it: seconds only
    assert error_from_proto(wire).retry_after_ms == 1000


def test_identity_is_the_principal_or_the_source_address() -> None:
    """Authenticated clients share a bucket across connections; anonymous ones are per address."""
    alice = Principal("u-alice", "alice", ("user",), "api_key")
    assert client_of(RequestContext(1, alice, "10.0.0.1:1")) == client_of(
        RequestContext(2, alice, "10.0.0.2:2")
    )
    assert client_of(RequestContext(1, alice, "10.0.0.1:1")) == "principal:u-alice"
    assert client_of(RequestContext(1, ANONYMOUS, "10.0.0.1:1")) == "address:10.0.0.1"
    assert client_of(RequestContext(1, ANONYMOUS, "10.0.0.1:2")) == "address:10.0.0.1"
    assert client_of(RequestContext(1, ANONYMOUS, "::1:443")) == "address:::1"


def test_reload_changes_rates_for_the_next_request() -> None:
    """prepare_reload changes nothing until committed; then the new rate and burst apply."""
    rl, clock = limiter(per_client_rps=1, per_client_burst=1)
    assert rl.check("a") is None and rl.check("a") is not None
    old = default_config()
    new: Config = attrs.evolve(old, rate_limit=RateLimitConfig(per_client_rps=100, per_client_burst=100))
    commit = rl.prepare_reload(old, new)
    assert commit is not None
    assert rl.check("a") is not None  # not applied yet
    commit()
    clock.advance(0.01)
    assert rl.check("a") is None
    assert rl.prepare_reload(new, new) is None
    off = attrs.evolve(old, rate_limit=RateLimitConfig())
    commit = rl.prepare_reload(new, off)
    assert commit is not None
    commit()
    assert not rl.enabled


def test_pipeline_skips_the_stage_while_off_and_applies_it_after_a_reload() -> None:
    """With every rate 0 the pipeline does not call the stage at all; a reload that sets a rate
    puts it back in front of the executor (and one that clears the rates takes it out again)."""
    from amaters.config import LimitsConfig
    from amaters.query.executor import QueryExecutor
    from amaters.query.pipeline import QueryPipeline
    from amaters.storage.memory import MemoryBackend

    old = default_config()
    rl = RateLimiter(old.rate_limit, Clock())
    stage = RateLimitStage(rl)
    pipeline = QueryPipeline(QueryExecutor(MemoryBackend()), LimitsConfig(), [stage])
    assert stage not in pipeline._befores
    on = attrs.evolve(old, rate_limit=RateLimitConfig(per_client_rps=1, per_client_burst=1))
    commit = rl.prepare_reload(old, on)
    assert commit is not None
    commit()
    assert stage in pipeline._befores
    get = ops.Get("c", b"k")
    pipeline.execute(RequestContext(1, ANONYMOUS, "10.0.0.1:1"), get)
    refused = pipeline.execute(RequestContext(2, ANONYMOUS, "10.0.0.1:1"), get)
    assert isinstance(refused.result.value, Overloaded)
    refused.addErrback(lambda failure: None)
    commit = rl.prepare_reload(on, old)
    assert commit is not None
    commit()
    assert stage not in pipeline._befores
    assert pipeline.stages == (stage,)
