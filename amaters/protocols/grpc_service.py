"""The gRPC front end: AmateRS's ``amaters.aql.AqlService`` over grpcio, plus ``grpc.health.v1``
and server reflection.

It only translates.  Every call becomes the same pipeline operation the native protocol would run
(:class:`~amaters.query.pipeline.QueryPipeline`): validation, admission, RBAC, cache, executor,
metrics, audit and tracing all happen there, exactly as for a native request.  Answers go back as
AmateRS's messages with errors in-band (``QueryResponse.error``); only a refused login is a gRPC
status (``UNAUTHENTICATED``).

Threads.  grpcio's server runs each call on one of ``grpc.max_workers`` threads of its own.  A call
never touches the pipeline from there: it hands one function to the reactor thread
(``reactor.callFromThread``) and waits on a queue for the answer, bounded by the call's deadline and
the request timeout.  Streams wait the same way for each chunk, so a slow reader holds a worker
thread, not server memory, and the next chunk is read only when the client took the last one.
``docs/grpc.md`` has the measured cost of the hop and the reasons for the choice.

Metadata a call may carry: ``authorization: Bearer <jwt>`` or ``x-api-key: <id>.<secret>``
(otherwise the TLS client certificate, when ``tls.client_auth = "required"``), ``traceparent`` and
``tracestate`` (W3C), and grpc's own ``grpc-timeout`` (the deadline).
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from amaters.config import ConfigError, grpc_bind_address
from amaters.errors import AmatersError, AuthError, RequestTimeout, ServerError, ShuttingDown
from amaters.interfaces import IPrincipal, IRangeCursor
from amaters.proto import aql_pb2
from amaters.proto.convert import error_to_proto, fill_blob, fill_key_values, fill_result, version_to_proto
from amaters.protocols.elastic import ElasticPool
from amaters.query import operations as ops
from amaters.query.pipeline import NOT_YET, QueryPipeline, RequestContext, immediate_result

if TYPE_CHECKING:
    from amaters.config import Config

SERVICE_NAME = aql_pb2.DESCRIPTOR.services_by_name["AqlService"].full_name

#: The metadata entry carrying an API key (``<id>.<secret>``); ``authorization`` carries a JWT.
API_KEY_METADATA = "x-api-key"

#: The HTTP/2 stream window the server announces: what a call may send before its message is read
#: (grpcio's BDP probing, which would grow it, is off).
STREAM_WINDOW_BYTES = 64 * 1024

#: Calls one HTTP/2 connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
MAX_STREAMS_PER_CONNECTION = 100

#: Health Watch streams one connection may have open at once (a client watches one or two service
#: names per connection; ``grpc.max_health_watches`` bounds them over all connections).
WATCHES_PER_CONNECTION = 4

Authenticator = Callable[[Any, Any, str], "defer.Deferred[IPrincipal]"]


# -- TLS material --------------------------------------------------------------------------------


@attrs.frozen
class GrpcTLSMaterial:
    """What grpcio's TLS needs, as PEM bytes (never logged)."""

    cert_chain: bytes = attrs.field(repr=False)
    key: bytes = attrs.field(repr=False)
    client_ca: bytes | None = attrs.field(repr=False)
    require_client_auth: bool


def load_tls_material(config: Config) -> GrpcTLSMaterial:
    """The native listener's certificate, key and client CA for ``config``, checked by building
    the same OpenSSL context the listener would use; raises ConfigError when unusable.

    Does file I/O (and generates the private CA on a first start, as the listener does)."""
    from amaters.ops.tlsreload import build_server_options
    from amaters.tls.certs import ensure_server_tls

    build_server_options(config)  # key matches certificate, CA readable: or ConfigError
    files = ensure_server_tls(config)
    client_auth = config.tls.client_auth
    try:
        client_ca = Path(config.tls.ca).read_bytes() if config.tls.ca and client_auth != "none" else None
        return GrpcTLSMaterial(
            cert_chain=files.cert.read_bytes(),
            key=files.key.read_bytes(),
            client_ca=client_ca,
            require_client_auth=client_auth == "required",
        )
    except OSError as e:
        raise ConfigError([f"tls: cannot read the certificate material for gRPC ({e.strerror})"]) from None


def _certificate_configuration(material: GrpcTLSMaterial) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert_chain)], root_certificates=material.client_ca
    )


# -- per-call translation --------------------------------------------------------------------------


class _CallRefused(Exception):
    """The call ends with this gRPC status (credentials refused, the server shutting down)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Ended(Exception):
    """The call was cancelled, or its deadline passed, while waiting for the reactor."""


class _Answers:
    """Where a call's worker thread waits for the reactor: a fresh queue per wait (so a late
    answer to a wait that timed out is never taken for the next one), and the call's end."""

    __slots__ = ("ended", "queue")

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.ended = False

    def end(self) -> None:
        """The call is over (cancelled, deadline passed, or finished): stop waiting."""
        self.ended = True
        self.queue.put((False, _Ended()))

    def fresh(self) -> queue.SimpleQueue[Any]:
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.queue = q
        if self.ended:
            q.put((False, _Ended()))
        return q


@attrs.frozen
class CallInfo:
    """What a call's metadata and transport say about its caller (read on the worker thread)."""

    credentials: Any
    peer_certificate: Any
    source: str
    trace_context: dict[str, str] | None


def _source(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` → ``127.0.0.1:5000`` (the native protocol's form)."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and address:
        return address
    return peer


def _peer_certificates(context: grpc.ServicerContext) -> Any:
    """The client's verified certificate (leaf first, then its chain) as ``cryptography`` objects."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert_chain") or auth.get("x509_pem_cert")
    if not pems:
        return None
    from cryptography import x509

    certificates = []
    for pem in pems:
        certificates.extend(x509.load_pem_x509_certificates(pem))
    return certificates or None


def call_info(
    context: grpc.ServicerContext, credentials_type: Callable[[str, str], Any], client_certificates: bool
) -> CallInfo:
    """Read credentials, trace context and the peer from a call; raises _CallRefused when the
    credential metadata is malformed.  ``client_certificates``: whether TLS asks clients for one
    (reading the TLS session costs a little on every call, so it is skipped otherwise)."""
    authorization = api_key = None
    trace: dict[str, str] | None = None
    for key, value in context.invocation_metadata():
        if key == "authorization":
            authorization = value
        elif key == API_KEY_METADATA:
            api_key = value
        elif key in ("traceparent", "tracestate") and isinstance(value, str):
            if trace is None:
                trace = {}
            trace[key] = value
    credentials = None
    if authorization is not None and api_key is not None:
        raise _CallRefused(
            grpc.StatusCode.UNAUTHENTICATED,
            f"send either authorization or {API_KEY_METADATA} metadata, not both",
        )
    if authorization is not None:
        scheme, _, token = str(authorization).strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _CallRefused(
                grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'"
            )
        credentials = credentials_type("bearer_token", token.strip())
    elif api_key is not None:
        credentials = credentials_type("api_key", str(api_key).strip())
    peer_certificate = _peer_certificates(context) if client_certificates else None
    return CallInfo(credentials, peer_certificate, _source(context.peer()), trace)


def _execution_ms(ctx: RequestContext, clock: Any) -> int:
    return max(0, int((clock.seconds() - ctx.started) * 1000))


# -- the AqlService ------------------------------------------------------------------------------


class AqlServicer:
    """The six AqlService methods.  Methods named like the RPCs run on grpcio's worker threads;
    methods starting with ``_r_`` run on the reactor thread.

    Every method is registered as request-streaming (:func:`_handlers`), so grpcio hands it the
    call before reading any request message: the call logs in first (one trip to the reactor), and
    only a logged-in call reads its message (as bytes, parsed here on the worker thread, never on
    grpcio's polling thread), then runs it (a second trip).  A refused call never reads its
    message: it takes in no more than the HTTP/2 stream window (:data:`STREAM_WINDOW_BYTES`).
    A unary call whose credentials logged in a moment ago (:class:`RecentLogins`) reads its message
    first and logs in on its request's trip instead.  The principal is logged out once the call
    has its answer."""

    _log = Logger()

    def __init__(self, owner: GrpcService) -> None:
        self.owner = owner
        self.reactor = owner.reactor
        self.pipeline: QueryPipeline = owner.pipeline
        self._ids = itertools.count(1)
        from amaters.auth.principal import AUTH_ANONYMOUS, Credentials

        self._credentials_type = Credentials
        self._anonymous = AUTH_ANONYMOUS

    # -- worker-thread helpers ------------------------------------------------------------------

    def _begin(self, context: grpc.ServicerContext) -> tuple[CallInfo, _Answers]:
        try:
            info = call_info(context, self._credentials_type, self.owner.client_certificates)
        except _CallRefused as e:
            context.abort(e.code, e.message)
        answers = _Answers()
        # A cancelled call (or one past its deadline) stops waiting at once.
        context.add_callback(answers.end)
        return info, answers

    def _wait(self, answers: _Answers, timeout: float | None, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the reactor and return what it returns (or its Deferred's result);
        raises what it raises, _Ended when the call ends first, queue.Empty after ``timeout``."""
        waiting = answers.fresh()
        self.reactor.callFromThread(self._r_call, waiting, fn, args)
        with self.owner.pool.holding():
            ok, value = waiting.get(timeout=timeout)
        if ok:
            return value
        raise value

    def _r_call(self, answers: queue.SimpleQueue[Any], fn: Any, args: tuple[Any, ...]) -> None:
        try:
            result = fn(*args)
        except Exception:
            answers.put((False, self._r_safe(Failure())))
            return
        if isinstance(result, defer.Deferred):
            value = immediate_result(result)
            if value is not NOT_YET:
                answers.put((True, value))
                return
            result.addCallbacks(
                lambda value: answers.put((True, value)),
                lambda failure: answers.put((False, self._r_safe(failure))),
            )
        else:
            answers.put((True, result))

    def _r_safe(self, failure: Failure) -> BaseException:
        """What the worker thread may show a client: our errors as they are; anything unexpected
        (a storage failure below the pipeline, a bug) logged here and replaced by SERVER_INTERNAL."""
        error = failure.value
        if isinstance(error, (AmatersError, _CallRefused)):
            return error
        self._log.failure("Unexpected error in a gRPC call", failure)
        return ServerError("internal server error; the server log has the details")

    def _timeouts(self, context: grpc.ServicerContext, timeout_ms: int | None) -> tuple[float, bool]:
        """(seconds to wait, whether the client's deadline is what limits it)."""
        server = self.pipeline.limits.request_timeout
        if timeout_ms:
            server = min(server, timeout_ms / 1000.0)
        remaining = context.time_remaining()
        if remaining is not None and remaining < server:
            return max(remaining, 0.0), True
        return server, False

    def _expired(self, context: grpc.ServicerContext, by_deadline: bool, what: str, seconds: float) -> Any:
        if by_deadline:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"the {what} request passed its deadline")
        self._log.warn(
            "A gRPC {what} request from {source} ran longer than {timeout} s",
            what=what,
            source=_source(context.peer()),
            timeout=round(seconds, 3),
        )
        return RequestTimeout(f"the {what} request did not finish within {seconds:g} s on the server")

    def _logout(self, principal: Any) -> None:
        logout = getattr(principal, "logout", None)
        if callable(logout):
            self.reactor.callFromThread(logout)

    def _run_last(
        self, answers: _Answers, seconds: float | None, run: Any, info: CallInfo, principal: Any, *args: Any
    ) -> Any:
        """``run(info, principal, *args)`` on the reactor, the call's last request: the principal
        logged out once its answer is ready, or, for a :class:`_LoginLater`, logged in first on the
        same trip."""
        if isinstance(principal, _LoginLater):
            return self._wait(answers, seconds, self._r_login_then, run, info, principal.key, *args)
        return self._wait(answers, seconds, self._r_then_logout, run, info, principal, *args)

    def _unary(
        self,
        context: grpc.ServicerContext,
        answers: _Answers,
        info: CallInfo,
        run: Any,
        request: Any,
        error_response: Callable[[AmatersError], Any],
        what: str,
        principal: Any,
        last: bool = False,
    ) -> Any:
        """One request of a logged-in call (``principal``), answered in-band; ``last``: the call's
        only request, the principal logged out on the reactor once its answer is ready (and
        ``principal`` may then be a :class:`_LoginLater`: logged in on the same trip)."""
        timeout_ms = request.timeout_ms if request.HasField("timeout_ms") else None
        seconds, by_deadline = self._timeouts(context, timeout_ms)
        try:
            if last:
                return self._run_last(answers, seconds, run, info, principal, request)
            return self._wait(answers, seconds, run, info, principal, request)
        except queue.Empty:
            error = self._expired(context, by_deadline, what, seconds)
            return self._set_request_id(error_response(error), request)
        except _Ended:
            context.abort(grpc.StatusCode.CANCELLED, "the call ended")
        except _CallRefused as e:
            context.abort(e.code, e.message)
        except AmatersError as e:
            return self._set_request_id(error_response(e), request)

    @staticmethod
    def _set_request_id(response: Any, request: Any) -> Any:
        if request.HasField("request_id"):
            response.request_id = request.request_id
        return response

    # -- RPCs (worker threads) ------------------------------------------------------------------

    def ExecuteQuery(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        info, answers = self._begin(context)
        principal = self._login_unary(context, answers, info)
        request = self._read_one(requests, context, "ExecuteQuery", aql_pb2.QueryRequest, principal)
        return self._unary(
            context, answers, info, self._r_query, request, _query_error, "query", principal, last=True
        )

    def ExecuteBatch(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        info, answers = self._begin(context)
        principal = self._login_unary(context, answers, info)
        request = self._read_one(requests, context, "ExecuteBatch", aql_pb2.BatchRequest, principal)
        return self._unary(
            context, answers, info, self._r_batch, request, _batch_error, "batch", principal, last=True
        )

    def HealthCheck(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        def operation(data: bytes) -> ops.Operation:
            request = _parse(context, aql_pb2.HealthCheckRequest, data)
            return ops.HealthCheck(request.service if request.HasField("service") else None)

        return self._simple(requests, context, "HealthCheck", operation, _health_response)

    def GetServerInfo(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        def operation(data: bytes) -> ops.Operation:
            _parse(context, aql_pb2.ServerInfoRequest, data)
            return ops.ServerInfo()

        return self._simple(requests, context, "GetServerInfo", operation, _server_info_response)

    def _simple(
        self,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
        method: str,
        operation: Callable[[bytes], ops.Operation],
        render: Callable[[Any], Any],
    ) -> Any:
        """HealthCheck and GetServerInfo: their responses have no error field, so a refusal (RBAC,
        rate limit, drain) is a gRPC status carrying the same message."""
        info, answers = self._begin(context)
        principal = self._login_unary(context, answers, info)
        try:
            op = operation(self._single_request(requests, context, method, None, principal))
        except BaseException:
            self._logout(principal)
            raise
        seconds, by_deadline = self._timeouts(context, None)
        try:
            return render(self._run_last(answers, seconds, self._r_simple, info, principal, op))
        except queue.Empty:
            error = self._expired(context, by_deadline, op.name, seconds)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, error.message)
        except _Ended:
            context.abort(grpc.StatusCode.CANCELLED, "the call ended")
        except _CallRefused as e:
            context.abort(e.code, e.message)
        except AmatersError as e:
            context.abort(_status_for(e), e.message)

    def _single_request(
        self,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
        method: str,
        message_type: Any,
        principal: Any = None,
    ) -> Any:
        """:func:`_single_request`, cancelled past ``limits.frame_timeout`` (the setting now).  With
        ``principal``, a message not arrived :data:`LATE_MESSAGE_SECONDS` after the read began
        makes the call count among the principal's waiting calls until it has (cancelled at once
        when the principal already has ``grpc.max_waiting_calls_per_principal``)."""
        timeout = self.pipeline.limits.frame_timeout
        watchdog = self.owner.read_watchdog
        if principal is None:
            return _single_request(requests, context, method, message_type, watchdog, timeout)
        late = _LateRead(self.owner.principal_waits, context, self._holder(context, principal))
        try:
            return _single_request(
                requests, context, method, message_type, watchdog, timeout, (LATE_MESSAGE_SECONDS, late)
            )
        finally:
            late.finished()

    def _read_one(
        self,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
        method: str,
        message_type: Any,
        principal: Any,
    ) -> Any:
        """:func:`_single_request` for a logged-in call; logs ``principal`` out when that fails."""
        try:
            return self._single_request(requests, context, method, message_type, principal)
        except BaseException:
            self._logout(principal)
            raise

    def _login(
        self, context: grpc.ServicerContext, answers: _Answers, info: CallInfo, stream: bool = False
    ) -> Any:
        """Log in for a whole stream; the caller logs out (:meth:`_logout`) when it ends.  A
        ``stream`` (ExecuteStream, ExecuteInteractive) then counts among its principal's waiting
        calls until it returns (:meth:`PrincipalWaits.leave`, from :func:`_handlers`); past
        ``grpc.max_waiting_calls_per_principal`` it is refused with RESOURCE_EXHAUSTED instead."""
        try:
            principal = self._wait(answers, self.pipeline.limits.request_timeout, self._r_login, info)
        except _CallRefused as e:
            context.abort(e.code, e.message)
        except queue.Empty:
            context.abort(grpc.StatusCode.UNAVAILABLE, "authentication did not finish in time")
        except _Ended:
            context.abort(grpc.StatusCode.CANCELLED, "the call ended")
        if not stream:
            return principal
        refusal = self.owner.principal_waits.enter(context, self._holder(context, principal))
        if refusal is not None:
            self._logout(principal)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{refusal}; retry when one has ended")
        return principal

    def _login_unary(self, context: grpc.ServicerContext, answers: _Answers, info: CallInfo) -> Any:
        """The principal of a unary call, logged in now; or, when its credentials logged in
        within :data:`RECENT_LOGIN_SECONDS` (:class:`RecentLogins`), a :class:`_LoginLater`: the
        call reads its message at once and logs in on the same trip to the reactor as its
        request, one trip instead of two."""
        recent = self.owner.recent_logins
        key = recent.key(info)
        who = recent.get(key)
        if who is not None:
            return _LoginLater(key, who)
        principal = self._login(context, answers, info)
        recent.remember(key, self._who(principal))
        return principal

    def _who(self, principal: Any) -> str:
        """Whose waiting calls ``principal``'s calls count among: ``principal ID``, or "" for the
        anonymous principal of auth off (every caller the same), whose calls count by address."""
        if getattr(principal, "auth_method", None) == self._anonymous:
            return ""
        return f"principal {getattr(principal, 'id', '')}"

    def _holder(self, context: grpc.ServicerContext, principal: Any) -> str:
        """Whose waiting calls a call counts among: its principal's, or with auth off (every
        caller the same anonymous principal) its client address's."""
        who = principal.who if isinstance(principal, _LoginLater) else self._who(principal)
        return who or f"address {client_address(context.peer())}"

    def ExecuteStream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        info, answers = self._begin(context)
        principal = self._login(context, answers, info, stream=True)
        try:
            request = self._single_request(requests, context, "ExecuteStream", aql_pb2.QueryRequest)
            kind = request.query.WhichOneof("query")
            if kind not in ("range", "get"):
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"ExecuteStream serves RANGE and GET queries, not {kind or 'an empty query'};"
                    " use ExecuteQuery",
                )
            yield from self._stream(context, answers, info, principal, request)
        finally:
            self._logout(principal)

    def _stream(
        self,
        context: grpc.ServicerContext,
        answers: _Answers,
        info: CallInfo,
        principal: Any,
        request: aql_pb2.QueryRequest,
    ) -> Iterator[Any]:
        timeout_ms = request.timeout_ms if request.HasField("timeout_ms") else None
        seconds, by_deadline = self._timeouts(context, timeout_ms)
        cursor: IRangeCursor | None = None
        sequence = sent = 0
        try:
            try:
                opened = self._wait(answers, seconds, self._r_open_stream, info, principal, request)
            except AmatersError as e:
                yield aql_pb2.StreamResponse(error=error_to_proto(e), sequence=0)
                return
            if not isinstance(opened, tuple):
                cursor = opened
            else:  # a GET: its value (if any) as one batch
                key, value = opened
                if value is not None:
                    response = aql_pb2.StreamResponse(sequence=0)
                    fill_key_values(response.batch.values, [(key, value)])
                    yield response
                    sequence, sent = 1, 1
                yield aql_pb2.StreamResponse(end=aql_pb2.StreamEnd(total_count=sent), sequence=sequence)
                return
            held: list[Any] | None = None
            while True:
                try:
                    chunk = self._wait(answers, seconds, cursor.next_chunk)
                except AmatersError as e:
                    yield aql_pb2.StreamResponse(error=error_to_proto(e), sequence=sequence)
                    return
                if held:
                    response = aql_pb2.StreamResponse(sequence=sequence)
                    batch = response.batch
                    fill_key_values(batch.values, held)
                    batch.has_more = bool(chunk)
                    yield response
                    sequence += 1
                    sent += len(held)
                if not chunk:
                    yield aql_pb2.StreamResponse(end=aql_pb2.StreamEnd(total_count=sent), sequence=sequence)
                    return
                held = chunk
        except queue.Empty:
            error = self._expired(context, by_deadline, "range", seconds)
            yield aql_pb2.StreamResponse(error=error_to_proto(error), sequence=sequence)
        except _Ended:
            return
        finally:
            if cursor is not None:
                self.reactor.callFromThread(cursor.close)

    def ExecuteInteractive(self, request_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        info, answers = self._begin(context)
        principal = self._login(context, answers, info, stream=True)
        try:
            for data in self._interactive_requests(request_iterator, context):
                request = _parse(context, aql_pb2.QueryRequest, data)
                yield self._unary(
                    context, answers, info, self._r_query, request, _query_error, "query", principal
                )
        finally:
            self._logout(principal)

    def _interactive_requests(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """An interactive stream's request messages; the stream is cancelled when the next one has
        not arrived ``limits.idle_timeout`` seconds (the setting now) after the last answer, as an
        idle native connection is closed: a stream waiting for its client holds a worker thread."""
        while True:
            timeout = self.pipeline.limits.idle_timeout
            with self.owner.read_watchdog.reading(context, timeout) as watched:
                data = next(requests, None)
            if watched.expired:
                context.abort(
                    grpc.StatusCode.CANCELLED,
                    f"no request arrived on this interactive stream for {timeout:g} s (limits.idle_timeout)",
                )
            if data is None:
                return
            yield data

    # -- reactor thread -------------------------------------------------------------------------

    def _r_login(self, info: CallInfo) -> Any:
        """The principal for the call's credentials (or a Deferred of it); raises _CallRefused."""
        if self.owner.shutting_down():
            raise _CallRefused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        try:
            d = self.owner.authenticate(info.credentials, info.peer_certificate, info.source)
        except Exception:
            d = defer.fail()
        principal = immediate_result(d)
        if principal is not NOT_YET:
            return principal
        return d.addErrback(self._r_refused, info)

    def _r_refused(self, failure: Failure, info: CallInfo) -> None:
        error = failure.value
        if isinstance(error, AuthError):
            self._log.info(
                "Refused gRPC call from {source}: {reason}", source=info.source, reason=error.message
            )
            raise _CallRefused(grpc.StatusCode.UNAUTHENTICATED, error.message)
        if isinstance(error, AmatersError):  # a login throttled, the auth service not started yet
            raise _CallRefused(_status_for(error), error.message)
        self._log.failure("Authentication failed unexpectedly for {source}", failure, source=info.source)
        raise _CallRefused(grpc.StatusCode.UNAUTHENTICATED, "authentication failed")

    def _r_login_then(self, run: Any, info: CallInfo, key: bytes, *args: Any) -> Any:
        """The call's login, then ``run(info, principal, *args)`` as :meth:`_r_then_logout` runs
        it: both on one trip.  A refused login forgets ``key`` (its next call logs in first)."""
        try:
            login = self._r_login(info)
        except _CallRefused:
            self.owner.recent_logins.forget(key)
            raise
        if not isinstance(login, defer.Deferred):
            return self._r_then_logout(run, info, login, *args)

        def refused(failure: Failure) -> Failure:
            self.owner.recent_logins.forget(key)
            return failure

        return login.addCallbacks(lambda principal: self._r_then_logout(run, info, principal, *args), refused)

    def _r_then_logout(self, run: Any, info: CallInfo, principal: Any, *args: Any) -> Any:
        """``run(info, principal, *args)``, then log ``principal`` out once its answer is ready (in
        this same reactor turn when the answer is immediate, the common case)."""
        logout = getattr(principal, "logout", None)
        if not callable(logout):
            return run(info, principal, *args)
        try:
            result = run(info, principal, *args)
        except BaseException:
            logout()
            raise
        if isinstance(result, defer.Deferred) and immediate_result(result) is NOT_YET:

            def finished(outcome: object) -> object:
                logout()
                return outcome

            return result.addBoth(finished)
        logout()
        return result

    def _r_context(self, info: CallInfo, principal: Any) -> RequestContext:
        if self.owner.shutting_down():
            raise ShuttingDown("the server is shutting down")
        ctx = RequestContext(next(self._ids), principal, info.source, self.reactor.seconds(), None, "grpc")
        if info.trace_context:
            ctx.annotations["trace_context"] = info.trace_context
        return ctx

    def _r_query(self, info: CallInfo, principal: Any, request: aql_pb2.QueryRequest) -> Any:
        ctx = self._r_context(info, principal)
        op = self.pipeline.decode_query(request.query)
        done, outcome = self.pipeline.run(ctx, op)
        if done:
            return self._r_query_response(outcome, ctx, op, request)
        return outcome.addCallback(self._r_query_response, ctx, op, request)

    def _r_query_response(self, result: Any, ctx: RequestContext, op: Any, request: Any) -> Any:
        response = aql_pb2.QueryResponse()
        if op.name == "get" and result is not None:
            fill_blob(response.result.single.value, result)
        else:
            fill_result(response.result, op.name, result)
        if request.HasField("request_id"):
            response.request_id = request.request_id
        response.execution_time_ms = _execution_ms(ctx, self.reactor)
        return response

    def _r_batch(self, info: CallInfo, principal: Any, request: aql_pb2.BatchRequest) -> Any:
        ctx = self._r_context(info, principal)
        op = self.pipeline.decode_batch(request)
        return self.pipeline.execute(ctx, op).addCallback(self._r_batch_response, ctx, op, request)

    def _r_batch_response(self, results: list[Any], ctx: RequestContext, op: ops.Batch, request: Any) -> Any:
        response = aql_pb2.BatchResponse()
        out = response.results
        out.SetInParent()
        add = out.results.add
        for item, result in zip(op.ops, results, strict=True):
            fill_result(add(), item.name, result)
        if request.HasField("request_id"):
            response.request_id = request.request_id
        response.execution_time_ms = _execution_ms(ctx, self.reactor)
        return response

    def _r_simple(self, info: CallInfo, principal: Any, op: ops.Operation) -> Any:
        return self.pipeline.execute(self._r_context(info, principal), op)

    def _r_open_stream(self, info: CallInfo, principal: Any, request: aql_pb2.QueryRequest) -> Any:
        ctx = self._r_context(info, principal)
        op = self.pipeline.decode_query(request.query)
        if isinstance(op, ops.Range):
            return self.pipeline.open_range(ctx, op)
        assert isinstance(op, ops.Get)
        return self.pipeline.execute(ctx, op).addCallback(lambda value: (op.key, value))


def _single_request(
    requests: Iterator[bytes],
    context: grpc.ServicerContext,
    method: str,
    message_type: Any,
    watchdog: ReadWatchdog,
    timeout: float,
    late: tuple[float, Callable[[_Watched], None]] | None = None,
) -> Any:
    """The one request message of a unary-request method, read now: parsed as ``message_type``
    (the bytes when None).  A call that sends no message ends with INVALID_ARGUMENT.  Anything
    sent after the first message is not read, as by grpcio's and tonic's own unary methods: looking
    for it cost a second wake-up of the worker thread per call, about a tenth of a call's CPU.  A
    call whose message has not arrived within ``timeout`` seconds (``limits.frame_timeout``; 0: no
    limit) is cancelled by ``watchdog``; ``late`` is ``(seconds, called)``: ``called(watched)`` on
    the watchdog's thread if the read is still going after those seconds."""
    with watchdog.reading(context, timeout, late) as watched:
        data: Any = next(requests, None)
    if watched.expired:
        context.abort(
            grpc.StatusCode.CANCELLED,
            f"the request message did not arrive within {timeout:g} s (limits.frame_timeout)",
        )
    if data is None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} takes one request message; none was sent")
    return data if message_type is None else _parse(context, message_type, data)


def _parse(context: grpc.ServicerContext, message_type: Any, data: bytes) -> Any:
    """``data`` parsed as ``message_type``; a message that does not parse ends the call with
    INVALID_ARGUMENT."""
    try:
        return message_type.FromString(data)
    except DecodeError:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid {message_type.DESCRIPTOR.full_name} message",
        )


def _query_error(error: AmatersError) -> aql_pb2.QueryResponse:
    return aql_pb2.QueryResponse(error=error_to_proto(error))


def _batch_error(error: AmatersError) -> aql_pb2.BatchResponse:
    return aql_pb2.BatchResponse(error=error_to_proto(error))


def _health_response(health: ops.HealthResult) -> aql_pb2.HealthCheckResponse:
    status = aql_pb2.HEALTH_SERVING if health.serving else aql_pb2.HEALTH_NOT_SERVING
    return aql_pb2.HealthCheckResponse(status=status, message=health.message)


def _server_info_response(info: ops.ServerInfoResult) -> aql_pb2.ServerInfoResponse:
    return aql_pb2.ServerInfoResponse(
        version=version_to_proto(info.version),
        supported_versions=[version_to_proto(v) for v in info.supported_versions],
        capabilities=info.capabilities,
        uptime_seconds=info.uptime_seconds,
    )


def _status_for(error: AmatersError) -> grpc.StatusCode:
    """The gRPC status for a refusal on a method whose response has no error field."""
    from amaters.errors import ErrorCode

    code = int(error.code)
    if code == int(ErrorCode.AUTH_INSUFFICIENT_PERMISSIONS):
        return grpc.StatusCode.PERMISSION_DENIED
    if 3000 <= code < 4000:
        return grpc.StatusCode.UNAUTHENTICATED
    if code == int(ErrorCode.SERVER_OVERLOADED):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if code in (int(ErrorCode.SERVER_SHUTTING_DOWN), int(ErrorCode.SERVER_UNAVAILABLE)):
        return grpc.StatusCode.UNAVAILABLE
    if code == int(ErrorCode.NETWORK_TIMEOUT):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


def _handlers(servicer: AqlServicer) -> grpc.GenericRpcHandler:
    """AqlService's methods, all registered request-streaming with raw bytes in: on the wire a
    request stream of one message is exactly a unary request (HTTP/2 framing does not tell them
    apart), so unary clients see no difference, and grpcio reads a message only when the method
    asks for it, which it does after the login."""
    waits = servicer.owner.principal_waits
    holding = servicer.owner.pool.holding

    def counted(method: Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[Any]]) -> Any:
        """``method``'s stream, given back to its principal's count when it returns."""

        def run(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                # A stream waits on its client (its next request, room to send) for its whole life.
                with holding():
                    yield from method(requests, context)
            finally:
                waits.leave(context)

        return run

    out_query = aql_pb2.QueryResponse.SerializeToString
    methods = {
        "ExecuteQuery": grpc.stream_unary_rpc_method_handler(servicer.ExecuteQuery, None, out_query),
        "ExecuteBatch": grpc.stream_unary_rpc_method_handler(
            servicer.ExecuteBatch, None, aql_pb2.BatchResponse.SerializeToString
        ),
        "ExecuteStream": grpc.stream_stream_rpc_method_handler(
            counted(servicer.ExecuteStream), None, aql_pb2.StreamResponse.SerializeToString
        ),
        "ExecuteInteractive": grpc.stream_stream_rpc_method_handler(
            counted(servicer.ExecuteInteractive), None, out_query
        ),
        "HealthCheck": grpc.stream_unary_rpc_method_handler(
            servicer.HealthCheck, None, aql_pb2.HealthCheckResponse.SerializeToString
        ),
        "GetServerInfo": grpc.stream_unary_rpc_method_handler(
            servicer.GetServerInfo, None, aql_pb2.ServerInfoResponse.SerializeToString
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)


# -- reads that must not wait forever ----------------------------------------------------------


class _Watched:
    """One read under a :class:`ReadWatchdog`: ``expired`` once its deadline passed (and its call
    was cancelled, or ``action`` called instead)."""

    __slots__ = ("action", "context", "expired")

    def __init__(self, context: grpc.ServicerContext, action: Callable[[], None] | None = None) -> None:
        self.context = context
        self.action = action
        self.expired = False


class ReadWatchdog:
    """Cancels the calls whose request message has not arrived in time, from one daemon thread.

    A call reads its message on a gRPC worker thread, and grpcio's read waits as long as the client
    likes; ``context.cancel()`` (thread-safe) is what ends it.  A read runs inside
    ``with watchdog.reading(context, seconds) as watched``.  Reads are kept per timeout in arrival
    order, so each queue's oldest read is the first to expire and a finished read is forgotten at
    once: the thread sleeps until the earliest deadline, woken early only by a read that expires
    before it (a finished read does not wake it).
    """

    _log = Logger()

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: Around every read: the worker pool's :meth:`~amaters.protocols.elastic.ElasticPool.holding`
        #: once the server runs (a thread waiting on its client is held).
        self.holding: Callable[[], AbstractContextManager[None]] = nullcontext
        self._changed = threading.Condition()
        #: timeout -> {watched: deadline}, oldest first.
        self._queues: dict[float, dict[_Watched, float]] = {}
        self._thread: threading.Thread | None = None
        #: When the thread wakes next (infinity: only when notified).
        self._wakes_at = float("inf")

    @contextmanager
    def reading(
        self,
        context: grpc.ServicerContext,
        seconds: float,
        late: tuple[float, Callable[[_Watched], None]] | None = None,
    ) -> Iterator[_Watched]:
        """Watch the read done inside the block (not at all when ``seconds`` is 0):
        ``watched.expired`` afterwards says whether its call was cancelled.  ``late``, ``(after,
        called)``: ``called(watched)`` runs on the watchdog's thread if the read is still going
        ``after`` seconds on (sooner than ``seconds``)."""
        watched = self.watch(context, seconds) if seconds > 0 else _Watched(context)
        flag = None
        if late is not None and (seconds <= 0 or late[0] < seconds):
            after, called = late
            flag = self.watch(context, after, lambda: called(watched))
        try:
            with self.holding():
                yield watched
        finally:
            if seconds > 0:
                self.done(watched)
            if flag is not None:
                self.done(flag)

    def watch(
        self, context: grpc.ServicerContext, seconds: float, action: Callable[[], None] | None = None
    ) -> _Watched:
        """Start watching a read of ``context``'s call; :meth:`done` when it has finished.  Past
        ``seconds`` the call is cancelled, or ``action()`` called instead when given."""
        watched = _Watched(context, action)
        with self._changed:
            deadline = self._clock() + seconds
            self._queues.setdefault(seconds, {})[watched] = deadline
            if deadline < self._wakes_at:
                self._wakes_at = deadline
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="grpc-read-watchdog", daemon=True)
                    self._thread.start()
                self._changed.notify()
        return watched

    def done(self, watched: _Watched) -> None:
        with self._changed:
            for pending in self._queues.values():
                if pending.pop(watched, None) is not None:
                    return

    def _run(self) -> None:
        while True:
            with self._changed:
                due = self._due()
                while not due:
                    wait = self._wait()
                    self._wakes_at = float("inf") if wait is None else self._clock() + wait
                    self._changed.wait(wait)
                    due = self._due()
            for watched in due:  # outside the lock: cancelling runs grpcio's callbacks
                if watched.action is None:
                    watched.context.cancel()
                else:
                    try:
                        watched.action()
                    except Exception:
                        self._log.failure("A late gRPC read could not be handled")

    def _due(self) -> list[_Watched]:
        # With the lock held: the reads past their deadline, taken out and marked.
        now = self._clock()
        due = []
        for pending in self._queues.values():
            while pending:
                watched, deadline = next(iter(pending.items()))
                if deadline > now:
                    break
                del pending[watched]
                watched.expired = True
                due.append(watched)
        return due

    def _wait(self) -> float | None:
        # With the lock held: seconds until the earliest deadline, None when nothing is watched.
        firsts = [next(iter(pending.values())) for pending in self._queues.values() if pending]
        return max(0.0, min(firsts) - self._clock()) if firsts else None


# -- services without a login ----------------------------------------------------------------


#: Largest request message the services without a login (health, reflection) take: theirs are tiny.
OPEN_MESSAGE_BYTES = 64 * 1024

#: Request messages of those services read at once, server-wide: a message being read may be as
#: large as ``limits.max_frame_bytes`` before its size shows, so this bounds what unauthenticated
#: callers can have the server hold.
OPEN_READ_SLOTS = 2

#: Seconds a call of those services waits for a read slot before RESOURCE_EXHAUSTED.
OPEN_READ_WAIT = 2.0

#: Seconds a message of those services may take to arrive once its read has a slot; past that the
#: call is cancelled (a real client sends its request with the call's headers).
OPEN_READ_TIMEOUT = 2.0

#: Calls of those services one client address may have reading (or waiting to read) at once; more
#: are refused at once.  A call reads on one of the ``grpc.max_workers`` threads, so without this
#: one client sending nothing held every worker and starved the logged-in calls.
OPEN_READS_PER_CLIENT = 4


def _count_up(counts: dict[str, int], key: str, limit: int) -> int | None:
    """One more for ``key`` in ``counts`` unless it already has ``limit`` (0: no limit): None when
    counted, else how many it has."""
    held = counts.get(key, 0)
    if 0 < limit <= held:
        return held
    counts[key] = held + 1
    return None


def _count_down(counts: dict[str, int], key: str) -> None:
    """One fewer for ``key`` in ``counts``, which keeps no key at zero."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def client_address(peer: str) -> str:
    """The client's address in a gRPC peer string (``ipv4:10.0.0.7:51234`` → ``10.0.0.7``,
    ``ipv6:[::1]:51234`` → ``::1``); ``unix`` for every Unix-socket peer."""
    scheme, _, rest = peer.partition(":")
    if scheme == "unix":
        return "unix"
    host = rest.rpartition(":")[0] or rest
    return host.replace("%5B", "[").replace("%5D", "]").strip("[]")


#: Seconds after which a logged-in call's request message is late: a client sends it with the
#: call's headers, so a call still waiting for it then counts among its principal's waiting calls.
LATE_MESSAGE_SECONDS = 1.0


#: Seconds for which a credential's successful login lets its next unary calls read their request
#: message before logging in, on the same trip to the reactor as the request.
RECENT_LOGIN_SECONDS = 30.0

#: Credentials :class:`RecentLogins` remembers at most; when full it forgets the expired ones, or,
#: when none has expired, all of them (their next calls log in first again).
RECENT_LOGINS = 4096


@attrs.frozen
class _LoginLater:
    """A unary call whose credentials logged in recently: it logs in with its request.  ``key``
    is their :meth:`RecentLogins.key`, ``who`` their principal's :meth:`AqlServicer._who`."""

    key: bytes
    who: str


class RecentLogins:
    """Credentials that logged in within the last ``seconds``, by a SHA-256 digest (the secret is
    not kept), with whose waiting calls theirs count among.

    A unary call logs in before its request message is read, so that a caller without valid
    credentials never has a message read (a refused call takes in no more than the HTTP/2 stream
    window).  That costs a second trip to the reactor per call, a fifth of a call's CPU.  A call
    presenting credentials that logged in successfully a moment ago reads its message at once and
    logs in on the same trip as its request instead; the login still decides (a key revoked, a
    token expired since: the call is refused, its message dropped, and the credentials forgotten).
    A reload forgets them all.  Thread-safe."""

    def __init__(
        self,
        seconds: float = RECENT_LOGIN_SECONDS,
        size: int = RECENT_LOGINS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self.size = size
        self._clock = clock
        self._lock = threading.Lock()
        self._logins: dict[bytes, tuple[float, str]] = {}

    @staticmethod
    def key(info: CallInfo) -> bytes:
        """A digest of the credentials and client certificate ``info`` presents."""
        digest = hashlib.sha256()
        credentials = info.credentials
        if credentials is not None:
            digest.update(f"{credentials.kind}\0{credentials.secret}".encode())
        if info.peer_certificate:
            from cryptography.hazmat.primitives import hashes

            digest.update(b"\0certificate\0")
            digest.update(info.peer_certificate[0].fingerprint(hashes.SHA256()))
        return digest.digest()

    def get(self, key: bytes) -> str | None:
        """``who`` of credentials that logged in within ``seconds``, else None."""
        with self._lock:
            found = self._logins.get(key)
        if found is None or found[0] < self._clock():
            return None
        return found[1]

    def remember(self, key: bytes, who: str) -> None:
        now = self._clock()
        with self._lock:
            logins = self._logins
            if len(logins) >= self.size and key not in logins:
                # Full: the expired go first; if none has, all of them (each logs in first again).
                for stale in [k for k, (until, _) in logins.items() if until < now]:
                    del logins[stale]
                if len(logins) >= self.size:
                    logins.clear()
            logins[key] = (now + self.seconds, who)

    def forget(self, key: bytes) -> None:
        with self._lock:
            self._logins.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._logins.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._logins)


class PrincipalWaits:
    """The calls each principal has waiting on its client, capped at ``limit`` (0: no cap): its
    streams (ExecuteStream, ExecuteInteractive) from login to return, and its unary calls whose
    request message is late (:data:`LATE_MESSAGE_SECONDS`) until it has come.  grpcio runs a call
    on one of ``grpc.max_workers`` threads for as long as it lasts, and such a call lasts as long
    as its client likes (an interactive stream between requests, a stream read slowly, a message
    that never comes, up to ``limits.frame_timeout``): without a cap, one principal's calls could
    hold every thread.  ``total_limit`` (0: none) caps the same calls over all principals, so that
    several principals within their caps cannot hold every thread either.  A unary call whose
    message comes in time is never counted, however many run at once.  Thread-safe."""

    def __init__(self, limit: int, total_limit: int = 0) -> None:
        self.limit = limit
        self.total_limit = total_limit
        #: Calls refused (or cancelled) for either cap since the start.
        self.refused = 0
        self._lock = threading.Lock()
        self._waiting: dict[str, int] = {}
        self._holders: dict[grpc.ServicerContext, str] = {}

    def enter(self, context: grpc.ServicerContext, holder: str) -> str | None:
        """Count ``context``'s call among ``holder``'s: None when it may wait, else why not."""
        with self._lock:
            if 0 < self.total_limit <= len(self._holders):
                self.refused += 1
                return (
                    f"{len(self._holders)} calls are waiting on their clients, every worker thread"
                    " but grpc.reserved_workers"
                )
            waiting = _count_up(self._waiting, holder, self.limit)
            if waiting is not None:
                self.refused += 1
                return (
                    f"{waiting} calls of this principal are waiting on their client"
                    " (grpc.max_waiting_calls_per_principal)"
                )
            self._holders[context] = holder
        return None

    def leave(self, context: grpc.ServicerContext) -> None:
        """``context``'s call no longer waits (nothing when it was never counted)."""
        with self._lock:
            holder = self._holders.pop(context, None)
            if holder is not None:
                _count_down(self._waiting, holder)

    def waiting(self, holder: str) -> int:
        with self._lock:
            return self._waiting.get(holder, 0)

    @property
    def total(self) -> int:
        with self._lock:
            return len(self._holders)


def waiting_calls_limit(workers: int, reserved: int) -> int:
    """The cap on calls waiting on their clients over all principals: every worker thread but the
    ``reserved`` ones, at least one (0, no cap, when none are reserved).  The configuration keeps
    ``reserved`` below ``workers``."""
    return max(workers - reserved, 1) if reserved else 0


class _LateRead:
    """A logged-in call's read of its request message, counted among its principal's waiting calls
    once it is late (``late``, called on the watchdog's thread) until :meth:`finished`.  The lock
    keeps a read that finishes as it turns late from being counted after it has finished."""

    def __init__(self, waits: PrincipalWaits, context: grpc.ServicerContext, holder: str) -> None:
        self.waits = waits
        self.context = context
        self.holder = holder
        self._lock = threading.Lock()
        self._over = False

    def __call__(self, watched: _Watched) -> None:
        with self._lock:
            if self._over or self.waits.enter(self.context, self.holder) is None:
                return
            watched.expired = True
        self.context.cancel()  # past the cap: this call waits no longer

    def finished(self) -> None:
        with self._lock:
            self._over = True
            self.waits.leave(self.context)


class _ReadGate:
    """Reads the request messages of the services that need no login: at most ``slots`` at a time
    (waiting up to ``wait`` seconds for one), at most ``per_client`` of one client address reading
    or waiting at once, each cancelled when it has not arrived ``timeout`` seconds after its slot
    was taken, and each refused past ``max_bytes`` before it is parsed."""

    def __init__(
        self,
        slots: int,
        max_bytes: int,
        wait: float,
        watchdog: ReadWatchdog,
        timeout: float = OPEN_READ_TIMEOUT,
        per_client: int = OPEN_READS_PER_CLIENT,
    ) -> None:
        self._slots = threading.BoundedSemaphore(slots)
        self.max_bytes = max_bytes
        self.wait = wait
        self.watchdog = watchdog
        self.timeout = timeout
        self.per_client = per_client
        self._lock = threading.Lock()
        self._reading: dict[str, int] = {}

    def read(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes | None:
        """The next message's bytes, or None at the end of the request stream."""
        client = client_address(context.peer())
        with self._lock:
            reading = _count_up(self._reading, client, self.per_client)
        if reading is not None:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{reading} requests from this address to the services that need no login are being"
                " read; retry later",
            )
        try:
            with self.watchdog.holding():
                slot = self._slots.acquire(timeout=self.wait)
            if not slot:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests are being read; retry later"
                )
            try:
                with self.watchdog.reading(context, self.timeout) as watched:
                    data = next(requests, None)
            finally:
                self._slots.release()
        finally:
            with self._lock:
                _count_down(self._reading, client)
        if watched.expired:
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request message did not arrive within {self.timeout:g} s",
            )
        if data is not None and len(data) > self.max_bytes:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request message is larger than this service takes ({self.max_bytes} bytes)",
            )
        return data

    def messages(self, requests: Iterator[bytes], context: grpc.ServicerContext, parse: Any) -> Iterator[Any]:
        while (data := self.read(requests, context)) is not None:
            yield _parse_with(context, parse, data)

    def single(
        self, requests: Iterator[bytes], context: grpc.ServicerContext, parse: Any, method: str
    ) -> Any:
        data = self.read(requests, context)
        problem = "none was sent" if data is None else None
        if problem is None and self.read(requests, context) is not None:
            problem = "more than one was sent"
        if problem is not None or data is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} takes one request message; {problem}")
            raise AssertionError("abort raises")
        return _parse_with(context, parse, data)


def _parse_with(context: grpc.ServicerContext, parse: Any, data: bytes) -> Any:
    try:
        return parse(data) if parse is not None else data
    except DecodeError:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request message does not parse")


class _Registrations:
    """Stands in for a grpc.Server to collect the method handlers a generated ``add_*_to_server``
    function (or grpcio's reflection) registers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, methods: dict[str, grpc.RpcMethodHandler]) -> None:
        self.services[service] = dict(methods)


def _gated(handler: grpc.RpcMethodHandler, gate: _ReadGate, method: str) -> grpc.RpcMethodHandler:
    """``handler`` registered request-streaming with bytes in, its messages read through ``gate``:
    the same calls on the wire, the same behaviour."""
    parse, out = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        unary = handler.unary_unary
        return grpc.stream_unary_rpc_method_handler(
            lambda requests, context: unary(gate.single(requests, context, parse, method), context), None, out
        )
    if handler.unary_stream is not None:
        streaming = handler.unary_stream
        if getattr(streaming, "experimental_non_blocking", False):
            # Health's Watch answers through a callback and holds no worker thread while it waits
            # for changes; it keeps doing so (the worker only reads the request).
            def watch(requests: Iterator[bytes], context: grpc.ServicerContext, send: Any = None) -> Any:
                return streaming(gate.single(requests, context, parse, method), context, send)

            watch.experimental_non_blocking = True  # type: ignore[attr-defined]
            watch.experimental_thread_pool = getattr(streaming, "experimental_thread_pool", None)  # type: ignore[attr-defined]
            return grpc.stream_stream_rpc_method_handler(watch, None, out)
        return grpc.stream_stream_rpc_method_handler(
            lambda requests, context: streaming(gate.single(requests, context, parse, method), context),
            None,
            out,
        )
    if handler.stream_unary is not None:
        consume = handler.stream_unary
        return grpc.stream_unary_rpc_method_handler(
            lambda requests, context: consume(gate.messages(requests, context, parse), context), None, out
        )
    both = handler.stream_stream
    return grpc.stream_stream_rpc_method_handler(
        lambda requests, context: both(gate.messages(requests, context, parse), context), None, out
    )


def _open_services(health: Any, reflected: tuple[str, ...], gate: _ReadGate) -> list[grpc.GenericRpcHandler]:
    """``grpc.health.v1.Health`` and server reflection, their request messages read through ``gate``."""
    registrations = _Registrations()
    health_pb2_grpc.add_HealthServicer_to_server(health, registrations)
    reflection.enable_server_reflection(reflected, registrations)
    return [
        grpc.method_handlers_generic_handler(
            service, {name: _gated(h, gate, name) for name, h in methods.items()}
        )
        for service, methods in registrations.services.items()
    ]


# -- grpc.health.v1 ------------------------------------------------------------------------------


class _Watch:
    """One health Watch stream: the status it still has to be sent, and whether a thread is sending
    to it (one at a time, so the client sees the changes in order)."""

    __slots__ = ("closed", "peer", "pending", "send", "sending")

    def __init__(self, send: Callable[[Any], Any], peer: str) -> None:
        self.send = send
        self.peer = peer
        self.pending: Any = None
        self.sending = False
        self.closed = False


class ReadinessHealth(grpc_health.HealthServicer):
    """``grpc.health.v1.Health`` for the whole server (``""``) and ``amaters.aql.AqlService``:
    SERVING while the server is ready, NOT_SERVING while it starts or drains.

    ``Check`` and ``Watch`` ask ``serving()`` each time; ``refresh()`` (called periodically on the
    reactor and at the start of a drain) pushes changes to ``Watch`` streams.

    A send to a Watch stream waits until the client's HTTP/2 flow control lets the message out,
    which a client that never reads (or announces a zero window) makes forever.  So nothing here
    sends on the caller's thread: a status change is handed to a daemon thread per stream that has
    one to send, which sends the latest status and ends (a stream stuck holds its thread until the
    call ends, at the latest when the server stops).  Neither the reactor nor a gRPC worker ever
    waits for a client.

    Watch needs no login, and an open stream costs the server memory (20-30 KiB) and, at each
    change, a thread; grpcio counts it against ``maximum_concurrent_rpcs`` only while its handler
    runs, not while it stays open.  So at most ``max_watches`` are open at once, and at most
    :data:`WATCHES_PER_CONNECTION` per TCP connection; a Watch over either gets RESOURCE_EXHAUSTED.
    (grpcio names every Unix-socket peer ``unix:``, so there only the total applies.)
    """

    SERVICES = ("", SERVICE_NAME)
    _gracefully_shutting_down: bool  # grpcio's HealthServicer sets it
    _UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

    def __init__(self, serving: Callable[[], bool], max_watches: int = 1000) -> None:
        super().__init__()
        self.serving = serving
        self.max_watches = max_watches
        self.refused = 0  # Watch streams refused for a cap, since the start
        self._watches: dict[str, set[_Watch]] = {}
        self._per_peer: dict[str, int] = {}
        self._sending = 0  # streams with a thread sending to them
        self._all_sent = threading.Condition(self._lock)
        self.refresh()

    def refresh(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.serving()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with self._lock:
            for name in self.SERVICES:
                if self._server_status.get(name) != status:
                    self.set(name, status)

    def Check(self, request: Any, context: Any) -> Any:
        self.refresh()
        return super().Check(request, context)

    def Watch(self, request: Any, context: Any, send_response_callback: Any = None) -> Any:
        if send_response_callback is None:  # a server without non-blocking handlers (not ours)
            return super().Watch(request, context)
        self.refresh()  # the status now, as Check answers it
        service = request.service
        peer = context.peer()  # ipv4:ADDRESS:PORT, one per TCP connection
        if peer.startswith("unix:"):
            peer = ""  # the same for every connection: not counted per connection
        watch = _Watch(send_response_callback, peer)
        with self._lock:
            refusal = self._refusal(peer)
            if refusal is None:
                self._watches.setdefault(service, set()).add(watch)
                self._post(watch, self._server_status.get(service, self._UNKNOWN))
            else:
                self.refused += 1
        if refusal is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        if not context.add_callback(lambda: self._closed(service, watch)):
            self._closed(service, watch)  # the call had already ended
        return None

    def _refusal(self, peer: str) -> str | None:
        # With the lock held: why one more Watch from ``peer`` may not open, or None (and then it
        # is counted for ``peer``).
        open_now = self.open_watches
        if open_now >= self.max_watches:
            return (
                f"{open_now} health Watch streams are open, the most grpc.max_health_watches"
                " allows; use Check, or retry later"
            )
        # Counted here when it may open (a Unix socket's connections, all ``""``, only in the total).
        if _count_up(self._per_peer, peer, WATCHES_PER_CONNECTION if peer else 0) is not None:
            return (
                f"this connection has {WATCHES_PER_CONNECTION} health Watch streams open, the most"
                " one connection may have"
            )
        return None

    @property
    def open_watches(self) -> int:
        """Health Watch streams open now (over the one or two service names watched)."""
        return sum(len(watches) for watches in self._watches.values())

    def set(self, service: str, status: Any) -> None:
        with self._lock:
            if self._gracefully_shutting_down:
                return
            self._server_status[service] = status
            for watch in self._watches.get(service, ()):
                self._post(watch, status)

    def wait_sent(self, timeout: float) -> bool:
        """Block (not on the reactor) until every Watch stream was sent its latest status, or
        ``timeout`` seconds passed: whether they all were."""
        with self._all_sent:
            return self._all_sent.wait_for(lambda: not self._sending, timeout)

    def _post(self, watch: _Watch, status: Any) -> None:
        # With the lock held.
        watch.pending = status
        if watch.sending or watch.closed:
            return
        thread = threading.Thread(target=self._deliver, args=(watch,), name="grpc-health-watch", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            # No thread to be had (the process is at its limit): the status stays pending, and the
            # next change tries again.  Nothing waits for it meanwhile.
            return
        watch.sending = True
        self._sending += 1

    def _deliver(self, watch: _Watch) -> None:
        while True:
            with self._lock:
                status, watch.pending = watch.pending, None
                if status is None or watch.closed:
                    watch.sending = False
                    self._sending -= 1
                    self._all_sent.notify_all()
                    return
            try:
                watch.send(health_pb2.HealthCheckResponse(status=status))
            except Exception:  # the call broke: it ends, and its close callback forgets it
                with self._lock:
                    watch.closed = True

    def _closed(self, service: str, watch: _Watch) -> None:
        with self._lock:
            watch.closed = True
            watches = self._watches.get(service)
            if watches is not None and watch in watches:
                watches.remove(watch)
                if not watches:
                    del self._watches[service]
                _count_down(self._per_peer, watch.peer)
        watch.send(None)  # ends the call (nothing is sent when the client went away)


# -- the service ---------------------------------------------------------------------------------


class GrpcService(service.Service):
    """The ``grpc`` service: binds ``grpc.listen`` (TLS from ``[tls]``) when it starts.  Once the
    server's stop begins it reports NOT_SERVING and refuses new calls (UNAVAILABLE; requests on an
    open interactive stream get SERVER_SHUTTING_DOWN in-band); its own stop waits for the calls in
    flight, then stops the grpcio server (HTTP/2 GOAWAY).

    ``readiness()`` says whether the whole server is ready; ``tls_provider(config)`` loads the TLS
    material (:func:`load_tls_material`).  The constructor does no I/O.
    """

    name = "grpc"
    _log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        pipeline: QueryPipeline,
        authenticate: Authenticator,
        readiness: Callable[[], bool],
        tls_provider: Callable[[Config], GrpcTLSMaterial] = load_tls_material,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.pipeline = pipeline
        self.authenticate = authenticate
        self.readiness = readiness
        self.tls_provider = tls_provider
        self.draining = False
        self._seen_ready = False
        self.server: grpc.Server | None = None
        self.port: int | None = None
        self.health = ReadinessHealth(self._serving, config.grpc.max_health_watches)
        #: Calls waiting on their client, by principal (``grpc.max_waiting_calls_per_principal``)
        #: and in all (``grpc.reserved_workers``).
        self.principal_waits = PrincipalWaits(
            config.grpc.max_waiting_calls_per_principal,
            waiting_calls_limit(config.grpc.max_workers, config.grpc.reserved_workers),
        )
        #: Worker threads of the pool (``grpc.max_workers`` when the service started).
        self.workers = config.grpc.max_workers
        #: Credentials whose unary calls log in on the same trip as their request.
        self.recent_logins = RecentLogins()
        #: Cancels calls whose request message does not arrive in time (its thread starts with
        #: the first read it watches).
        self.read_watchdog = ReadWatchdog()
        #: grpcio's worker threads: grpc.core_workers while they keep up, up to grpc.max_workers
        #: (a new pool each time the service starts; no thread before the first call).
        self.pool = self._new_pool()
        self._tls: GrpcTLSMaterial | None = None
        self._tls_lock = threading.Lock()
        self._tls_pending: Any = None
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._health_loop: task.LoopingCall | None = None
        self._calls: Any = None  # Counter children by (method, code) once observe() is called
        self._inflight_gauge: Any = None

    def _new_pool(self) -> ElasticPool:
        grpc_config = self.config.grpc
        pool = ElasticPool(
            min(grpc_config.core_workers, grpc_config.max_workers), grpc_config.max_workers, "grpc"
        )
        self.read_watchdog.holding = pool.holding
        return pool

    def _serving(self) -> bool:
        return (
            not self.shutting_down() and bool(self.running) and self.server is not None and self.readiness()
        )

    def shutting_down(self) -> bool:
        """Whether new calls are refused: this service is draining, or the server was ready and no
        longer is (its stop has begun; the native listener may still be draining before this one)."""
        if self.draining:
            return True
        if self.readiness():
            self._seen_ready = True
            return False
        return self._seen_ready

    @property
    def client_certificates(self) -> bool:
        """Whether TLS asks gRPC clients for a certificate (``tls.client_auth = "required"``)."""
        tls = self._tls
        return tls is not None and tls.require_client_auth

    @property
    def inflight(self) -> int:
        return self._inflight

    # -- metrics ---------------------------------------------------------------------------------

    def observe(self, registry: Any) -> None:
        """Register ``amaters_grpc_calls_total{method,code}``, ``amaters_grpc_calls_in_flight``,
        ``amaters_grpc_health_watches``, ``amaters_grpc_health_watches_refused_total`` and
        ``amaters_grpc_waiting_calls_refused_total`` on a prometheus registry (requests are also counted by the pipeline's metrics stage)."""
        from prometheus_client import Counter, Gauge

        self._calls = Counter(
            "amaters_grpc_calls",
            "gRPC calls finished, by method and gRPC status code.",
            ["method", "code"],
            registry=registry,
        )
        self._inflight_gauge = Gauge(
            "amaters_grpc_calls_in_flight", "gRPC AqlService calls running now.", registry=registry
        )
        registry.register(_RefusalCollector(self.health, self.principal_waits, lambda: self.pool))

    # -- lifecycle -------------------------------------------------------------------------------

    def startService(self) -> defer.Deferred[None]:
        super().startService()
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        config = self.config
        address = grpc_bind_address(config.grpc.listen)
        limits = config.limits
        if self.pool.closed:
            self.pool = self._new_pool()
        server = grpc.server(
            self.pool,
            handlers=[
                _handlers(AqlServicer(self)),
                *_open_services(
                    self.health,
                    (SERVICE_NAME, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME),
                    _ReadGate(OPEN_READ_SLOTS, OPEN_MESSAGE_BYTES, OPEN_READ_WAIT, self.read_watchdog),
                ),
            ],
            interceptors=[_CallCounter(self)],
            maximum_concurrent_rpcs=config.grpc.max_concurrent_calls,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_allowed_incoming_connections", config.grpc.max_connections),
                # What a call may send before the server reads it: a fixed HTTP/2 stream window
                # (BDP probing would grow it to megabytes), and a bounded number of calls open
                # per connection.  A call whose message is being read gets a window for all of it.
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                ("grpc.max_receive_message_length", limits.max_frame_bytes),
                # The native protocol's frame limit bounds every gRPC message too (a unary RANGE
                # bigger than that fails with RESOURCE_EXHAUSTED: ExecuteStream is for those).
                ("grpc.max_send_message_length", limits.max_frame_bytes),
            ],
        )
        try:
            if config.tls.enabled:
                self._tls = self.tls_provider(config)
                credentials = grpc.dynamic_ssl_server_credentials(
                    _certificate_configuration(self._tls),
                    self._fetch_certificate,
                    require_client_authentication=self._tls.require_client_auth,
                )
                port = server.add_secure_port(address, credentials)
            else:
                self._log.warn(
                    "TLS is disabled (tls.enabled = false): gRPC traffic is not encrypted in transit"
                )
                port = server.add_insecure_port(address)
        except RuntimeError:
            raise ConfigError(
                [f"grpc.listen: cannot listen on {address}: {_bind_problem(address)}"]
            ) from None
        server.start()
        self.server, self.port = server, port
        self.health.refresh()
        self._health_loop = task.LoopingCall(self._refresh_health)
        self._health_loop.clock = self.reactor
        self._health_loop.start(0.5, now=False).addErrback(
            lambda f: self._log.failure("Health refresh stopped", f)
        )
        self._log.info(
            "Listening for gRPC (amaters.aql.AqlService) on {address} ({security})",
            address=address.rsplit(":", 1)[0] + f":{port}",
            security="TLS" if config.tls.enabled else "plain TCP",
        )

    def _refresh_health(self) -> None:
        try:
            self.health.refresh()
        except Exception:
            self._log.failure("Could not refresh the gRPC health status")

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        server = self.server
        self.draining = True
        if self._health_loop is not None and self._health_loop.running:
            self._health_loop.stop()
        self.health.refresh()  # Watch streams see NOT_SERVING now
        if server is None:
            return
        timeout = self.config.server.shutdown_timeout
        budget = timeout * 0.8  # the rest is for what stops after (storage flush)
        started = self.reactor.seconds()
        if self._inflight:
            self._log.info("Draining {count} gRPC call(s)", count=self._inflight)
        while self._inflight and self.reactor.seconds() - started < budget:
            await task.deferLater(self.reactor, 0.05, lambda: None)
        if self._inflight:
            self._log.warn(
                "Shutdown timeout: cancelling {count} gRPC call(s) still running", count=self._inflight
            )
        self.health.enter_graceful_shutdown()
        pool = self.reactor.getThreadPool()
        grace = max(0.0, min(1.0, budget - (self.reactor.seconds() - started)))
        if grace > 0:
            # Watch streams are told NOT_SERVING before the GOAWAY (those whose clients read).
            await threads.deferToThreadPool(self.reactor, pool, self.health.wait_sent, grace)
            grace = max(0.0, min(1.0, budget - (self.reactor.seconds() - started)))
        stopped = server.stop(grace)  # GOAWAY; calls still open after the grace are cancelled
        await threads.deferToThreadPool(self.reactor, pool, stopped.wait, grace + 5)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.server = None

    # -- TLS rotation ------------------------------------------------------------------------------

    def _fetch_certificate(self) -> Any:
        """grpcio asks before each TLS handshake: new material once, then None (no change)."""
        with self._tls_lock:
            pending, self._tls_pending = self._tls_pending, None
        return pending

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        """Reload hook: load and check the new TLS material now, swap it in on commit (new
        connections use it; open ones keep theirs); a new ``grpc.max_health_watches`` applies to
        the Watch streams opened from then on, a new ``grpc.max_waiting_calls_per_principal`` or
        ``grpc.reserved_workers`` to the calls that start waiting from then on.  Every reload
        forgets the recent logins (:class:`RecentLogins`): keys or roles may have changed."""
        watches = new.grpc.max_health_watches
        per_principal = new.grpc.max_waiting_calls_per_principal
        total = waiting_calls_limit(self.workers, new.grpc.reserved_workers)  # the pool running now

        def set_caps() -> None:
            self.recent_logins.clear()
            self.health.max_watches = watches
            self.principal_waits.limit = per_principal
            self.principal_waits.total_limit = total

        if self.server is None or not new.tls.enabled or not old.tls.enabled:
            return set_caps
        material = self.tls_provider(new)
        if material.require_client_auth != (self._tls is not None and self._tls.require_client_auth):
            self._log.warn("tls.client_auth changes apply to gRPC after a restart")

        def commit() -> None:
            set_caps()
            with self._tls_lock:
                self._tls = material
                self._tls_pending = _certificate_configuration(material)
            self._log.info("gRPC TLS certificate reloaded; new connections use it")

        return commit

    # -- call accounting (worker threads) ------------------------------------------------------------

    def _call_started(self) -> None:
        with self._inflight_lock:
            self._inflight += 1
        if self._inflight_gauge is not None:
            self._inflight_gauge.inc()

    def _call_finished(self, method: str, code: grpc.StatusCode) -> None:
        with self._inflight_lock:
            self._inflight -= 1
        if self._inflight_gauge is not None:
            self._inflight_gauge.dec()
        if self._calls is not None:
            self._calls.labels(method=method, code=code.name).inc()


class _RefusalCollector:
    """The health Watch streams open now, and those refused for ``grpc.max_health_watches`` or the
    per-connection cap since the start; the calls refused for ``grpc.max_waiting_calls_per_principal``;
    the worker pool's threads."""

    def __init__(
        self, health: ReadinessHealth, principal_waits: PrincipalWaits, pool: Callable[[], ElasticPool]
    ) -> None:
        self.health = health
        self.principal_waits = principal_waits
        self.pool = pool

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily(
            "amaters_grpc_health_watches",
            "grpc.health.v1 Watch streams open now.",
            value=self.health.open_watches,
        )
        yield CounterMetricFamily(
            "amaters_grpc_health_watches_refused",
            "grpc.health.v1 Watch streams refused (grpc.max_health_watches, or 4 per connection).",
            value=self.health.refused,
        )
        yield CounterMetricFamily(
            "amaters_grpc_waiting_calls_refused",
            "Streams refused, and calls whose request message was late cancelled, because their"
            " principal had grpc.max_waiting_calls_per_principal calls waiting on its client, or"
            " all principals together every worker thread but grpc.reserved_workers.",
            value=self.principal_waits.refused,
        )
        pool = self.pool()
        yield GaugeMetricFamily(
            "amaters_grpc_worker_threads",
            "gRPC worker threads running now (grpc.core_workers, more while calls wait behind held ones).",
            value=pool.threads,
        )
        yield CounterMetricFamily(
            "amaters_grpc_worker_threads_grown",
            "gRPC worker threads started beyond grpc.core_workers, for calls waiting behind threads"
            " held by their clients or by slow operations.",
            value=pool.grown,
        )


def _bind_problem(address: str) -> str:
    """Why grpcio could not bind ``address`` (it does not say): try a plain socket for the reason."""
    if address.startswith("unix:"):
        return "the socket path is not usable"
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, int(port)))
    except OSError as e:
        return e.strerror or str(e)
    return "grpcio refused the address"


class _CallCounter(grpc.ServerInterceptor):
    """Counts AqlService calls in flight (the drain waits for them) and their final status."""

    def __init__(self, owner: GrpcService) -> None:
        self.owner = owner
        self.prefix = f"/{SERVICE_NAME}/"

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.prefix):
            return handler
        name = method[len(self.prefix) :]
        owner = self.owner
        unary_response = handler.unary_unary or handler.stream_unary
        if unary_response is not None:
            inner = unary_response

            def unary(request: Any, context: Any) -> Any:
                owner._call_started()
                code = grpc.StatusCode.OK
                try:
                    return inner(request, context)
                except BaseException:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    owner._call_finished(
                        name, code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
                    )

            if handler.unary_unary is not None:
                return handler._replace(unary_unary=unary)
            return handler._replace(stream_unary=unary)
        streaming = handler.unary_stream or handler.stream_stream
        if streaming is None:
            return handler

        def stream(request: Any, context: Any) -> Any:
            owner._call_started()
            code: Any = grpc.StatusCode.OK
            try:
                yield from streaming(request, context)
            except BaseException:
                code = context.code() or grpc.StatusCode.CANCELLED
                raise
            finally:
                owner._call_finished(
                    name, code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
                )

        if handler.unary_stream is not None:
            return handler._replace(unary_stream=stream)
        return handler._replace(stream_stream=stream)


__all__ = [
    "API_KEY_METADATA",
    "SERVICE_NAME",
    "AqlServicer",
    "GrpcService",
    "GrpcTLSMaterial",
    "ReadinessHealth",
    "load_tls_material",
]
