"""The QueryPipeline: the one path every request takes from a protocol to the executor.

::

    protocol ──decode──▶ validation (limits, input rules)      QueryPipeline.decode_*
             ──execute─▶ stage.before(ctx, op) for each stage   auth/RBAC, rate limit, cache, ...
                         QueryExecutor                           the operation
                         stage.after(ctx, op, outcome)           metrics, audit, slow-request log
             ◀────────── result (or an AmatersError failure)

Later features plug in as stages (:class:`IPipelineStage`) with :meth:`QueryPipeline.add_stage`
instead of editing the protocol or the executor.  A stage's ``before`` may refuse a request by
raising an :class:`~amaters.errors.AmatersError` (or returning a Deferred that fails with one), and
may answer it instead of the executor by setting ``ctx.result`` (a cache hit).  ``after`` runs for
every request that reached the stages, successful or not, and must not raise: the pipeline logs
anything it raises and carries on.

A front end that writes the answers of one read together (the native protocol) passes a list to
:meth:`QueryPipeline.run`: the afters of the requests answered during the call are then not run
at once but collected there, and :meth:`QueryPipeline.settle` runs them for the whole list when
the read has been handled, before those answers are written together.  A stage may give
itself an ``after_many(items)`` that does for a list of ``(ctx, op, outcome)`` what ``after`` does
for each (one clock read for all of them, say); ``settle`` calls it instead of ``after``.  Each
request still sees every stage in order; only the afters of different requests of one read are no
longer interleaved with each other.

The native protocol also runs the GET, SET and DELETE requests of one read together
(:meth:`QueryPipeline.admit_many`, then :meth:`QueryPipeline.run_admitted` for each): each stage's
``before`` for all of them (one ``before_many(items)`` call where the stage has one), then the
executor for each in order.

A stage that a reload can switch off (a rate limit of 0) may have an ``active`` attribute and a
``watch_active(callback)`` method: the pipeline calls ``watch_active`` once and re-reads ``active``
whenever the callback is called.  While inactive, neither its ``before`` nor its ``after`` is
called at all.

A stage that reads the client's trace context (``ctx.annotations["trace_context"]``) says so
with a true ``reads_trace_context`` attribute: while no stage does
(:attr:`QueryPipeline.reads_trace_context`), a front end need not decode it for each request.

Unexpected exceptions from a stage or the executor are logged with their traceback here and turned
into ``SERVER_INTERNAL`` with a generic message: tracebacks never reach a client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from amaters.config import LimitsConfig
from amaters.errors import AmatersError, ServerError
from amaters.interfaces import IPipelineStage, IPrincipal, IRangeCursor
from amaters.proto import aql_pb2, query_pb2
from amaters.query import operations as ops
from amaters.query.validation import Validator
from amaters.service import fire_all

_NO_RESULT: Any = object()

#: What :func:`immediate_result` returns for a Deferred that has not succeeded yet.
NOT_YET: Any = object()


def immediate_result(d: defer.Deferred[Any]) -> Any:
    """The result of ``d`` if it has already succeeded, else :data:`NOT_YET`.

    Most reads from the memory backend (and cache hits) are answered synchronously; taking the
    result directly saves the callback machinery on the hottest path.  A failed Deferred is left
    alone so the caller's errback consumes (and handles) the failure.
    """
    # While a Deferred waits on another one it is paused, so an unpaused result is never a
    # Deferred (and checking for one costs an ABC instance check on every request).
    if d.called and not d.paused:
        result = d.result
        if not isinstance(result, Failure):
            return result
    return NOT_YET


class Executor(Protocol):
    """What the pipeline runs a request with (:class:`QueryExecutor`, or a cache around one)."""

    def execute(self, op: Any) -> defer.Deferred[Any]: ...

    def open_range(self, op: ops.Range | ops.Filter) -> IRangeCursor: ...

    def update_limits(self, limits: LimitsConfig) -> None: ...


class RequestContext:
    """What the pipeline and its stages know about one request.  Never holds keys or values.

    ``annotations`` is a free-form dict stages share (e.g. a trace span, a cache key).
    ``response`` is the serialized ``QueryResponse`` carrying the result when whoever produced the
    result already had it encoded (a query-cache hit): a front end may send it as it is instead of
    encoding the result again.  None: encode the result.
    """

    __slots__ = (
        "annotations",
        "principal",
        "protocol",
        "request_id",
        "response",
        "result",
        "session",
        "source",
        "started",
    )

    def __init__(
        self,
        request_id: int,
        principal: IPrincipal,
        source: str = "",
        started: float = 0.0,
        session: Any = None,
        protocol: str = "native",
    ) -> None:
        self.request_id = request_id
        self.principal = principal
        self.source = source
        self.started = started
        self.session = session
        self.protocol = protocol
        self.result: Any = _NO_RESULT
        self.response: bytes | None = None
        self.annotations: dict[str, Any] = {}

    @property
    def answered(self) -> bool:
        """Whether a stage has already set the result (the executor is then skipped)."""
        return self.result is not _NO_RESULT


@implementer(IPipelineStage)
class PipelineStage:
    """A stage that does nothing: subclass it and override ``before`` and/or ``after``."""

    name = "noop"

    def before(self, ctx: RequestContext, op: ops.Operation) -> object:
        return None

    def after(self, ctx: RequestContext, op: ops.Operation, outcome: object) -> None:
        return None


class QueryPipeline:
    """Validation, then stages, then the executor.  Shared by every protocol front end."""

    _log = Logger()

    def __init__(
        self,
        executor: Executor,
        limits: LimitsConfig,
        stages: Sequence[IPipelineStage] = (),
    ) -> None:
        self.executor = executor
        #: The executor's ``cached(op, ctx)`` (a query cache in front of it), or None.
        self._cached: Callable[[Any, RequestContext], Any] | None = getattr(executor, "cached", None)
        #: The executor's ``set_now(op)`` (a SET written at once when nothing waits), or None when
        #: it never writes (a backend whose writes may wait: RocksDB, etcd).
        self._set_now: Callable[[Any], bool] | None = (
            getattr(executor, "set_now", None) if getattr(executor, "writes_now", False) else None
        )
        #: The executor's ``set_many(writes)`` (SETs that arrived together, as one write), or None.
        self._set_many: Callable[[list[Any]], defer.Deferred[Any] | None] | None = getattr(
            executor, "set_many", None
        )
        # FILTER and UPDATE ask the executor whether FHE can run here (None: no FHE at all).
        self.validator = Validator(limits, getattr(executor, "fhe_unavailable", None))
        executor.update_limits(limits)
        self._stages: list[IPipelineStage] = []
        self._befores: tuple[IPipelineStage, ...] = ()
        self._afters: tuple[IPipelineStage, ...] = ()
        self._before_calls: tuple[Any, ...] = ()
        self._after_calls: tuple[Any, ...] = ()
        self._settle_calls: tuple[Any, ...] = ()
        self._many_calls: tuple[Any, ...] = ()
        #: Whether a stage reads the client's trace context (else front ends may skip decoding it).
        self.reads_trace_context = False
        self._rejection_observers: list[Callable[[str | None, AmatersError], None]] = []
        for stage in stages:
            self.add_stage(stage)

    # -- configuration ------------------------------------------------------------------------

    @property
    def limits(self) -> LimitsConfig:
        return self.validator.limits

    def update_limits(self, limits: LimitsConfig) -> None:
        """Apply reloaded limits to requests decoded from now on (and to the executor)."""
        self.validator.limits = limits
        self.executor.update_limits(limits)

    @property
    def stages(self) -> tuple[IPipelineStage, ...]:
        return tuple(self._stages)

    @property
    def active_stages(self) -> tuple[IPipelineStage, ...]:
        """The stages requests pass through now (a reload may switch some off and on)."""
        return tuple(s for s in self._stages if s in self._befores or s in self._afters)

    def add_stage(
        self, stage: IPipelineStage, *, before: str | None = None, after: str | None = None
    ) -> None:
        """Insert a stage: at the end, or just before/after the stage with that name."""
        names = [s.name for s in self._stages]
        if stage.name in names:
            raise ValueError(f"a pipeline stage named {stage.name!r} is already installed")
        if before is not None:
            index = names.index(before)
        elif after is not None:
            index = names.index(after) + 1
        else:
            index = len(self._stages)
        self._stages.insert(index, stage)
        # A stage that can be switched off by a reload (a rate limit of 0) has an ``active``
        # attribute and tells the pipeline when it changes: while inactive it costs no call at all.
        watch = getattr(stage, "watch_active", None)
        if watch is not None:
            watch(self._refresh)
        self._refresh()

    def remove_stage(self, name: str) -> None:
        self._stages = [s for s in self._stages if s.name != name]
        self._refresh()

    def _refresh(self) -> None:
        # Skip the no-op halves of stages on the hot path.
        self._befores = tuple(
            s
            for s in self._stages
            if getattr(type(s), "before", None) is not PipelineStage.before and getattr(s, "active", True)
        )
        self._afters = tuple(
            s
            for s in self._stages
            if getattr(type(s), "after", None) is not PipelineStage.after and getattr(s, "active", True)
        )
        # The same halves as bound methods, for the synchronous path of :meth:`run` (no attribute
        # lookup per stage per request; ``__self__`` is the stage).
        self._before_calls = tuple(s.before for s in self._befores)
        self._after_calls = tuple(s.after for s in self._afters)
        # For :meth:`settle`: each stage with its ``after_many`` (None: its ``after`` for each item).
        self._settle_calls = tuple((s, getattr(s, "after_many", None)) for s in self._afters)
        # For :meth:`admit_many`: each stage with its ``before_many`` (None: its ``before`` for each).
        self._many_calls = tuple((s, getattr(s, "before_many", None)) for s in self._befores)
        self.reads_trace_context = any(getattr(s, "reads_trace_context", False) for s in self._stages)

    # -- decoding (validation) ----------------------------------------------------------------

    def add_rejection_observer(self, observer: Callable[[str | None, AmatersError], None]) -> None:
        """Call ``observer(op_name, error)`` for every request validation refuses (such requests
        never reach the stages; metrics count them here).  ``op_name`` is None when unknown."""
        self._rejection_observers.append(observer)

    def _rejected(self, op_name: str | None, error: AmatersError) -> None:
        for observer in self._rejection_observers:
            try:
                observer(op_name, error)
            except Exception:
                self._log.failure("Rejection observer {observer!r} failed", observer=observer)

    def decode_query(self, query: query_pb2.Query) -> ops.Operation:
        """The validated operation for a Query; raises AmatersError."""
        try:
            return self.validator.query(query)
        except AmatersError as e:
            self._rejected(query.WhichOneof("query"), e)
            raise

    def decode_batch(self, request: aql_pb2.BatchRequest) -> ops.Batch:
        try:
            return self.validator.batch(request)
        except AmatersError as e:
            self._rejected("batch", e)
            raise

    def decode_collection(self, name: str) -> str:
        try:
            return self.validator.collection(name)
        except AmatersError as e:
            self._rejected(None, e)
            raise

    # -- execution ----------------------------------------------------------------------------

    def execute(self, ctx: RequestContext, op: ops.Operation) -> defer.Deferred[Any]:
        """Run ``op`` through the stages and the executor.  Fails only with AmatersError."""
        done, outcome = self.run(ctx, op)
        if done:
            return defer.succeed(outcome)
        return outcome

    def run(
        self, ctx: RequestContext, op: ops.Operation, finished: list[Any] | None = None
    ) -> tuple[bool, Any]:
        """:meth:`execute` for callers on the hot path: ``(True, result)`` when the request has
        already succeeded (memory backend, RocksDB point read, cache hit), else ``(False,
        deferred)`` as :meth:`execute` would return it.

        Same stages, order and outcome as :meth:`execute`, without building and unpacking a
        Deferred when the answer is already known.  The afters of a request that has already
        succeeded have run, unless ``finished`` is a list: then ``(ctx, op, result)`` is appended
        to it, and the caller passes the list to :meth:`settle` once the read is handled.
        """
        try:
            for before in self._before_calls:
                waiting = before(ctx, op)
                if waiting is not None:
                    return False, self._finish(ctx, op, self._continue(ctx, op, before.__self__, waiting))
                if ctx.result is not _NO_RESULT:
                    break
            else:
                return self.run_admitted(ctx, op, finished)
        except Exception:
            return False, self._finish(ctx, op, defer.fail())
        # Answered by a stage (a cache, say).
        return self._succeeded(ctx, op, ctx.result, finished)

    def _succeeded(
        self, ctx: RequestContext, op: Any, result: Any, finished: list[Any] | None
    ) -> tuple[bool, Any]:
        # Already succeeded: the afters run now rather than through more callbacks (same order
        # and outcome as addBoth on a fired Deferred, at a fraction of the cost), or with the
        # other answers the caller sends together.
        if finished is None:
            self._run_afters(result, ctx, op)
        else:
            finished.append((ctx, op, result))
        return True, result

    def run_many(
        self, items: list[tuple[RequestContext, Any]], finished: list[Any]
    ) -> list[tuple[bool, Any]]:
        """:meth:`run` for the keyed requests (GET, SET, DELETE) of one read, in their order: every
        stage's befores for all of them (:meth:`admit_many`), then the executor for each one
        admitted (:meth:`run_admitted`), its afters collected in ``finished``.  Returns one
        ``(done, outcome)`` per item, as :meth:`run` would."""
        going, outcomes = self.admit_many(items, finished)
        index, count = 0, len(going)
        while index < count:
            ctx, op = going[index]
            stop = index + 1
            if type(op) is ops.Set:
                while stop < count and type(going[stop][1]) is ops.Set:
                    stop += 1
            if stop - index > 1:
                sets = going[index:stop]
                for (each, _), outcome in zip(sets, self.run_admitted_sets(sets, finished)[1], strict=True):
                    outcomes[each] = outcome
            else:
                outcomes[ctx] = self.run_admitted(ctx, op, finished)
            index = stop
        return [outcomes[ctx] for ctx, _ in items]

    def admit_many(
        self, items: list[tuple[RequestContext, Any]], finished: list[Any]
    ) -> tuple[list[tuple[RequestContext, Any]], dict[RequestContext, tuple[bool, Any]]]:
        """The befores of the keyed requests of one read, stage by stage for all of them: the
        requests every stage let through, in order (each to be run with :meth:`run_admitted`, or
        given up with :meth:`abandon`), and the ``(done, outcome)`` of each other one (refused,
        answered by a stage, or waiting on a stage).

        A stage with ``before_many(items)`` is called once for the list of requests still going:
        the same checks as its ``before`` on each, in order (a decision made for one request may
        be reused for the next one alike), returning None when all may go on, a list with an
        AmatersError (refused) or None per item, or ``NotImplemented`` to have ``before`` called
        for each.  It may only be given to stages whose ``before`` never returns a Deferred for a
        keyed request.  The stages see the requests of one read all before any of them runs, as
        if they had arrived together on parallel connections of the same client.
        """
        outcomes: dict[RequestContext, tuple[bool, Any]] = {}
        going = items
        for stage, many in self._many_calls:
            still = []
            if many is not None:
                try:
                    refusals = many(going)
                except Exception:
                    failure = Failure()
                    for ctx, op in going:
                        outcomes[ctx] = (False, self._finish(ctx, op, defer.fail(failure)))
                    return [], outcomes
                if refusals is None:
                    continue  # all go on (a stage's before_many does not answer requests)
                if refusals is not NotImplemented:
                    for item, error in zip(going, refusals, strict=True):
                        if error is None:
                            still.append(item)
                        else:
                            ctx, op = item
                            outcomes[ctx] = (False, self._finish(ctx, op, defer.fail(error)))
                    going = still
                    continue
            before = stage.before
            for item in going:
                ctx, op = item
                try:
                    waiting = before(ctx, op)
                except Exception:
                    outcomes[ctx] = (False, self._finish(ctx, op, defer.fail()))
                    continue
                if waiting is not None:
                    outcomes[ctx] = (False, self._finish(ctx, op, self._continue(ctx, op, stage, waiting)))
                elif ctx.result is not _NO_RESULT:  # answered by the stage
                    outcomes[ctx] = self._succeeded(ctx, op, ctx.result, finished)
                else:
                    still.append(item)
            going = still
        return going, outcomes

    def run_admitted(self, ctx: RequestContext, op: Any, finished: list[Any] | None) -> tuple[bool, Any]:
        """The executor's part of :meth:`run`, for a request every stage let through (there, or
        in :meth:`admit_many`)."""
        try:
            result = NOT_YET
            kind = type(op)
            if kind is ops.Get:
                # A cached answer needs no Deferred (the cache counts the hit and may set
                # ``ctx.response``; a miss goes on).
                cached = self._cached
                if cached is not None:
                    result = cached(op, ctx)
            elif kind is ops.Set:
                # Nor does a SET written at once (the memory backend; the cache invalidates its key).
                set_now = self._set_now
                if set_now is not None and set_now(op):
                    result = None
            if result is NOT_YET:
                d = self.executor.execute(op)
                if not d.called or d.paused or isinstance(d.result, Failure):
                    return False, self._finish(ctx, op, d)
                result = d.result
        except Exception:
            return False, self._finish(ctx, op, defer.fail())
        # _succeeded's body, inline: this is every request's path.
        if finished is None:
            self._run_afters(result, ctx, op)
        else:
            finished.append((ctx, op, result))
        return True, result

    def run_admitted_sets(
        self, items: list[tuple[RequestContext, Any]], finished: list[Any] | None
    ) -> tuple[bool, list[tuple[bool, Any]]]:
        """:meth:`run_admitted` for SETs let through one after another (a read's consecutive SETs):
        written together where the executor can (its ``set_many``: one atomic write, each request
        then done or failed with the others), else one by one.  Whether they were written
        together, and one ``(done, outcome)`` per item.
        """
        set_many = self._set_many
        try:
            d = None if set_many is None else set_many([op for _, op in items])
        except Exception:
            d = defer.fail()
        if d is None:
            return False, [self.run_admitted(ctx, op, finished) for ctx, op in items]
        if d.called and not d.paused and not isinstance(d.result, Failure):
            result = d.result
            if finished is None:
                return True, [self._succeeded(ctx, op, result, None) for ctx, op in items]
            # _succeeded's collecting case, for all of them at once.
            finished.extend([(ctx, op, result) for ctx, op in items])
            return True, [(True, result)] * len(items)
        # Still being written (waiting for its sync), or failed: each request gets a Deferred of
        # its own, fired with the write's outcome.
        each = [defer.Deferred[Any]() for _ in items]
        d.addBoth(fire_all, each)
        return True, [(False, self._finish(ctx, op, one)) for (ctx, op), one in zip(items, each, strict=True)]

    def abandon(self, ctx: RequestContext, op: Any, error: AmatersError) -> None:
        """Give up a request :meth:`admit_many` let through, without running it (its connection
        went away): its afters see ``error``."""
        self._finish(ctx, op, defer.fail(error)).addErrback(lambda _: None)

    def settle(self, finished: list[Any]) -> None:
        """Run the afters of the requests :meth:`run` collected in ``finished``: stage by stage,
        each for every request (``after_many`` where the stage has one)."""
        if len(finished) == 1:  # a read of one request: its afters as run() would have run them
            ctx, op, result = finished[0]
            self._run_afters(result, ctx, op)
            return
        for stage, many in self._settle_calls:
            if many is not None:
                try:
                    many(finished)
                except Exception:
                    self._log.failure("Pipeline stage {stage} failed in after_many()", stage=stage.name)
                continue
            after = stage.after
            for ctx, op, outcome in finished:
                try:
                    after(ctx, op, outcome)
                except Exception:
                    self._log.failure("Pipeline stage {stage} failed in after()", stage=stage.name)

    def open_range(self, ctx: RequestContext, op: ops.Range | ops.Filter) -> defer.Deferred[IRangeCursor]:
        """Run the stages for a RANGE (or a FILTER) and open its cursor (streamed by the caller)."""
        try:
            for stage in self._befores:
                waiting = stage.before(ctx, op)
                if waiting is not None:
                    d: defer.Deferred[Any] = defer.Deferred.fromCoroutine(
                        self._await_then(ctx, op, stage, waiting, self._open_cursor)
                    )
                    return self._finish(ctx, op, d)
            d = defer.succeed(self.executor.open_range(op))
        except Exception:
            d = defer.fail()
        return self._finish(ctx, op, d)

    def _open_cursor(self, op: ops.Range | ops.Filter) -> defer.Deferred[IRangeCursor]:
        return defer.maybeDeferred(self.executor.open_range, op)

    def _continue(
        self, ctx: RequestContext, op: ops.Operation, stage: IPipelineStage, waiting: object
    ) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._await_then(ctx, op, stage, waiting, self.executor.execute))

    async def _await_then(
        self,
        ctx: RequestContext,
        op: Any,
        stage: IPipelineStage,
        waiting: object,
        run: Any,
    ) -> Any:
        await waiting  # type: ignore[misc]
        stages = self._befores
        for later in stages[stages.index(stage) + 1 :] if stage in stages else ():
            if ctx.result is not _NO_RESULT:
                break
            more = later.before(ctx, op)
            if more is not None:
                await more  # type: ignore[misc]
        if ctx.result is not _NO_RESULT:
            return ctx.result
        return await run(op)

    def _finish(self, ctx: RequestContext, op: ops.Operation, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        result = immediate_result(d)
        if result is not NOT_YET:
            # Already succeeded (memory backend, RocksDB point read, cache hit): run the afters now
            # rather than through two more callbacks.  Same order and outcome as addBoth on a fired
            # Deferred, at a fraction of the cost on the hottest path.
            if self._afters:
                self._run_afters(result, ctx, op)
            return d
        if self._afters:
            d.addBoth(self._settle, ctx, op)  # one callback, not an errback and then a callback
        else:
            d.addErrback(self._sanitize, op)
        return d

    def _settle(self, outcome: object, ctx: RequestContext, op: ops.Operation) -> object:
        """Sanitize a failure, then run the afters on the outcome (what they see is what is sent)."""
        if isinstance(outcome, Failure):
            outcome = self._sanitize(outcome, op)
        return self._run_afters(outcome, ctx, op)

    def _sanitize(self, failure: Failure, op: ops.Operation) -> Failure:
        if isinstance(failure.value, AmatersError):
            return failure
        self._log.failure("Unexpected error in {op} request", failure, op=op.name)
        return Failure(ServerError("internal server error; the server log has the details"))

    def _run_afters(self, outcome: object, ctx: RequestContext, op: ops.Operation) -> object:
        for after in self._after_calls:
            try:
                after(ctx, op, outcome)
            except Exception:
                self._log.failure("Pipeline stage {stage} failed in after()", stage=after.__self__.name)
        return outcome
