"""A small etcd v3 client over etcd's JSON gateway (``/v3/...``), on treq.

No maintained Twisted client speaks to etcd 3.4; the gateway that every etcd member serves next to
gRPC does, with keys and values in base64 and 64-bit integers as strings.

Every request has a short deadline (``request_timeout``, about 1 s: a member that lost its leader
answers slowly rather than not at all) and goes to the member that answered last; on failure the
client moves to the next member.  Whether the same request is sent again depends on what the failure
says about it:

- the connection was never made (refused, unreachable): the member never saw the request, so any
  request is sent to the next member;
- etcd refused it before proposing it (``no leader``, ``too many requests``): likewise;
- anything else (a deadline passed, the connection dropped, ``leader changed``, ``request timed
  out``): the request may have been applied.  Only requests the caller marked ``idempotent`` (reads,
  and writes guarded by a compare on a revision) are sent again; others fail with
  :class:`EtcdAmbiguous`, and the caller decides (the storage backend reads its write back).

Nothing here blocks the reactor: all I/O is asynchronous.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseFailed, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

__all__ = [
    "EtcdAmbiguous",
    "EtcdClient",
    "EtcdError",
    "EtcdUnavailable",
    "b64",
    "prefix_end",
    "unb64",
]

#: Errors etcd returns before a request reaches Raft: safe to send again anywhere.
_NOT_APPLIED_MESSAGES = (
    "etcdserver: no leader",
    "etcdserver: too many requests",
    "etcdserver: not capable",
    "etcdserver: server stopped",
)
#: gRPC codes that mean the request itself is wrong (sending it again fails the same way).
_REQUEST_ERRORS = {3, 5, 6, 7, 9, 11, 12, 16}


_JSON_HEADERS = Headers({b"content-type": [b"application/json"]})


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False


class EtcdError(Exception):
    """etcd answered with an error (``code`` is the gRPC status code, ``message`` etcd's text)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class EtcdUnavailable(EtcdError):
    """No member answered within the attempts allowed; the request was not applied."""


class EtcdAmbiguous(EtcdError):
    """The request may or may not have been applied (a deadline passed or a member went away)."""


def b64(data: bytes) -> str:
    """Base64 text of ``data`` as the gateway wants keys and values."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | None) -> bytes:
    """Bytes of a base64 field the gateway sent (absent fields are empty)."""
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's ``range_end``)."""
    raw = bytearray(prefix)
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\x00"  # every key


class _Attempt(Exception):
    """One attempt failed; ``applied`` is False when the request surely was not applied."""

    def __init__(self, reason: str, applied: bool | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.applied = applied


class EtcdClient:
    """Requests to one etcd cluster, failing over between its members.

    ``endpoints`` are client URLs such as ``http://127.0.0.1:2379``.  ``attempts`` bounds how many
    members are tried per request (default: each member twice), ``total_timeout`` the time after
    which no new attempt starts (default: three request timeouts).  ``agent`` (an ``IAgent``) is
    built on a persistent connection pool when not given.  The constructor does no I/O.
    """

    _log = Logger()

    def __init__(
        self,
        endpoints: Sequence[str],
        reactor: Any,
        *,
        request_timeout: float = 1.0,
        attempts: int | None = None,
        total_timeout: float | None = None,
        agent: Any = None,
    ) -> None:
        if not endpoints:
            raise ValueError("an etcd client needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.reactor = reactor
        self.request_timeout = request_timeout
        self.attempts = attempts if attempts is not None else 2 * len(self.endpoints)
        #: No new attempt starts after this many seconds (a caller's own deadline is a few seconds).
        self.total_timeout = total_timeout if total_timeout is not None else 3 * request_timeout
        if agent is None:
            self._pool: HTTPConnectionPool | None = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = 16
            self._pool.retryAutomatically = False
            # One log line per pooled connection opened or closed would drown the log.
            self._pool._factory = _QuietHTTP11ClientFactory
            agent = Agent.usingEndpointFactory(
                reactor, _EndpointFactory(reactor, request_timeout), pool=self._pool
            )
        else:
            self._pool = None
        self._agent = agent
        self._current = 0
        self._closed = False
        #: Highest cluster revision seen in any response header.
        self.revision = 0

    @property
    def current_endpoint(self) -> str:
        """The member requests go to first."""
        return self.endpoints[self._current]

    async def close(self) -> None:
        """Close pooled connections (waits until they are closed)."""
        self._closed = True
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    # -- transport ----------------------------------------------------------------------------

    async def call(self, path: str, body: dict[str, Any], *, idempotent: bool) -> dict[str, Any]:
        """POST ``body`` to ``path`` (e.g. ``/v3/kv/range``) and return the decoded answer.

        Fails with :class:`EtcdError` for an error etcd answered (not retried), with
        :class:`EtcdUnavailable` when no member took the request, with :class:`EtcdAmbiguous` when a
        non-idempotent request may have been applied.
        """
        payload = json.dumps(body).encode("ascii")
        last = "no attempt"
        give_up = self.reactor.seconds() + self.total_timeout
        for attempt in range(self.attempts):
            if attempt and self.reactor.seconds() >= give_up:
                break
            endpoint = self.endpoints[self._current]
            try:
                answer = await self._once(endpoint + path, payload)
            except _Attempt as failed:
                last = f"{endpoint}: {failed.reason}"
                self._current = (self._current + 1) % len(self.endpoints)
                if failed.applied is not False and not idempotent:
                    raise EtcdAmbiguous(f"etcd request {path} may have been applied ({last})") from None
                if attempt >= len(self.endpoints) - 1:
                    # Every member has been tried once: give the cluster a moment (an election).
                    await _sleep(self.reactor, min(0.05 * (attempt + 1), 0.25))
                continue
            header = answer.get("header") or {}
            revision = int(header.get("revision", 0))
            if revision > self.revision:
                self.revision = revision
            return answer
        raise EtcdUnavailable(f"no etcd member answered {path} ({last})", code=14)

    async def _once(self, url: str, payload: bytes) -> dict[str, Any]:
        d = defer.Deferred.fromCoroutine(self._post(url, payload))
        timer = self.reactor.callLater(self.request_timeout, d.cancel)
        try:
            status, raw = await d
        except defer.CancelledError:
            raise _Attempt(f"no answer within {self.request_timeout}s", None) from None
        except (error.ConnectError, error.ConnectionRefusedError, error.DNSLookupError) as e:
            raise _Attempt(f"cannot connect ({type(e).__name__})", False) from None
        except (ResponseFailed, error.ConnectionLost, error.ConnectionDone) as e:
            raise _Attempt(f"connection lost ({type(e).__name__})", None) from None
        finally:
            if timer.active():
                timer.cancel()
            if self._closed and self._pool is not None:
                # A request that was in flight when the client closed: do not keep its connection.
                self._pool.closeCachedConnections().addErrback(lambda f: None)
        try:
            answer = json.loads(raw)
        except ValueError:
            raise _Attempt(f"unreadable answer (HTTP {status})", None) from None
        if not isinstance(answer, dict):
            raise _Attempt(f"unexpected answer (HTTP {status})", None)
        if "error" in answer or status != 200:
            message = str(answer.get("message") or answer.get("error") or f"HTTP {status}")
            code = int(answer.get("code", 2))
            if message.startswith(_NOT_APPLIED_MESSAGES):
                raise _Attempt(message, False)
            if code in _REQUEST_ERRORS:
                raise EtcdError(message, code)
            raise _Attempt(message, None)
        return answer

    async def _post(self, url: str, payload: bytes) -> tuple[int, bytes]:
        response = await self._agent.request(
            b"POST",
            url.encode("ascii"),
            _JSON_HEADERS,
            _BytesProducer(payload),
        )
        collected = _Collected()
        response.deliverBody(collected)
        body = await collected.finished
        return int(response.code), body

    # -- key-value ----------------------------------------------------------------------------

    async def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        limit: int = 0,
        revision: int = 0,
        serializable: bool = False,
        keys_only: bool = False,
        count_only: bool = False,
    ) -> dict[str, Any]:
        """Keys in ``[key, range_end)`` (or just ``key``); linearizable unless ``serializable``."""
        body: dict[str, Any] = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        if limit:
            body["limit"] = str(limit)
        if revision:
            body["revision"] = str(revision)
        if serializable:
            body["serializable"] = True
        if keys_only:
            body["keys_only"] = True
        if count_only:
            body["count_only"] = True
        return await self.call("/v3/kv/range", body, idempotent=True)

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
        *,
        idempotent: bool = False,
    ) -> dict[str, Any]:
        """One transaction; ``idempotent`` only when a compare makes a second application impossible."""
        body: dict[str, Any] = {"compare": compare, "success": success}
        if failure:
            body["failure"] = failure
        return await self.call("/v3/kv/txn", body, idempotent=idempotent)

    async def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id."""
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl)}, idempotent=False)
        return int(answer["ID"])

    async def lease_keepalive(self, lease: int) -> int:
        """Refresh a lease; returns the remaining TTL (0 or less: the lease is gone)."""
        answer = await self.call("/v3/lease/keepalive", {"ID": str(lease)}, idempotent=True)
        result = answer.get("result", answer)
        return int(result.get("TTL", 0))

    async def lease_revoke(self, lease: int) -> None:
        """Revoke a lease (its keys are deleted)."""
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)}, idempotent=True)
        except EtcdError as e:
            if "not found" not in e.message:
                raise

    async def status(self, endpoint: str) -> dict[str, Any]:
        """One member's status (leader id, raft term, database size), asked of that member only."""
        return await self._once(endpoint.rstrip("/") + "/v3/maintenance/status", b"{}")

    def watch(
        self,
        key: bytes,
        range_end: bytes | None,
        start_revision: int,
        on_events: Any,
    ) -> Watch:
        """Watch ``[key, range_end)`` from ``start_revision``: ``on_events(events, revision)`` is
        called on the reactor thread for every batch of events, in order.  The watch moves to another
        member when its member goes away and resumes after the last revision it delivered.  Stop it
        with :meth:`Watch.stop`.  If the revisions it needs were compacted, ``on_events`` is called with
        ``None`` (the caller reloads) and the watch resumes from the current revision.
        """
        watch = Watch(self, key, range_end, start_revision, on_events)
        watch.start()
        return watch

    async def members(self) -> list[dict[str, Any]]:
        """The cluster's members (``ID``, ``name``, ``clientURLs``)."""
        answer = await self.call("/v3/cluster/member/list", {}, idempotent=True)
        return list(answer.get("members", []))


class _Collected(Protocol):
    """Collects a response body; ``finished`` fires with it (or fails if the connection broke)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.finished: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if reason is not None and not reason.check(ResponseDone, PotentialDataLoss):
            self.finished.errback(reason)
        else:
            self.finished.callback(b"".join(self._parts))


class _JSONStream(Protocol):
    """Receives a streamed gateway answer: concatenated JSON objects, each handed to ``on_message``."""

    def __init__(self, on_message: Any) -> None:
        self._on_message = on_message
        self._buffer = ""
        self._decoder = json.JSONDecoder()
        self.finished: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data.decode("utf-8")
        while True:
            text = self._buffer.lstrip()
            if not text:
                self._buffer = ""
                return
            try:
                message, end = self._decoder.raw_decode(text)
            except ValueError:
                self._buffer = text
                return
            self._buffer = text[end:]
            self._on_message(message)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.finished.called:
            self.finished.callback(None)

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


class Watch:
    """One watch kept alive across members (see :meth:`EtcdClient.watch`)."""

    _log = Logger()

    def __init__(
        self, client: EtcdClient, key: bytes, range_end: bytes | None, start_revision: int, on_events: Any
    ) -> None:
        self._client = client
        self._key = key
        self._range_end = range_end
        self._next_revision = start_revision
        self._on_events = on_events
        self._stopped = False
        self._stream: _JSONStream | None = None
        self._request: defer.Deferred[Any] | None = None
        self._loop: defer.Deferred[None] | None = None
        self._sleep: Any = None
        self._waiting: defer.Deferred[None] | None = None
        #: Fires each time the watch is established on a member (for tests and readiness).
        self.established = 0

    def start(self) -> None:
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: self._log.failure("etcd watch ended", f))

    async def stop(self) -> None:
        """Stop watching; fires once the connection is closed."""
        self._stopped = True
        if self._sleep is not None and self._sleep.active():
            self._sleep.cancel()
            waiting, self._waiting = self._waiting, None
            if waiting is not None and not waiting.called:
                waiting.callback(None)
        if self._request is not None:
            self._request.cancel()
        if self._stream is not None:
            self._stream.stop()
        if self._loop is not None:
            await self._loop

    async def _run(self) -> None:
        client = self._client
        pool = HTTPConnectionPool(client.reactor, persistent=False)
        pool._factory = _QuietHTTP11ClientFactory
        agent = Agent.usingEndpointFactory(
            client.reactor, _EndpointFactory(client.reactor, client.request_timeout), pool=pool
        )
        while not self._stopped:
            endpoint = client.endpoints[client._current]
            create: dict[str, Any] = {"key": b64(self._key), "start_revision": str(self._next_revision)}
            if self._range_end is not None:
                create["range_end"] = b64(self._range_end)
            body = json.dumps({"create_request": create}).encode("ascii")
            try:
                self._request = agent.request(
                    b"POST", (endpoint + "/v3/watch").encode("ascii"), _JSON_HEADERS, _BytesProducer(body)
                )
                timer = client.reactor.callLater(client.request_timeout, self._request.cancel)
                try:
                    response = await self._request
                finally:
                    if timer.active():
                        timer.cancel()
                self._request = None
                stream = _JSONStream(self._message)
                self._stream = stream
                response.deliverBody(stream)
                self.established += 1
                await stream.finished
                self._stream = None
            except Exception:
                self._request = None
            if self._stopped:
                return
            client._current = (client._current + 1) % len(client.endpoints)
            waiting: defer.Deferred[None] = defer.Deferred()
            self._waiting = waiting
            self._sleep = client.reactor.callLater(0.1, waiting.callback, None)
            await waiting
            self._waiting = None

    def _message(self, message: dict[str, Any]) -> None:
        result = message.get("result") or {}
        if "error" in message:
            if self._stream is not None:
                self._stream.stop()
            return
        compacted = int(result.get("compact_revision", 0))
        if compacted:
            self._next_revision = compacted
            self._on_events(None, compacted)
            return
        events = result.get("events")
        if events:
            revision = int((result.get("header") or {}).get("revision", 0))
            last = max(int((e.get("kv") or {}).get("mod_revision", 0)) for e in events)
            self._next_revision = max(self._next_revision, last + 1)
            self._on_events(events, revision)


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """Plain TCP to an address literal without a resolver round trip; names go through the resolver."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("ascii")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        return TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory, written in one go."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _sleep(reactor: IReactorTime, seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def kv_of(item: dict[str, Any]) -> tuple[bytes, bytes, int]:
    """``(key, value, mod_revision)`` of one kv the gateway sent."""
    return unb64(item.get("key")), unb64(item.get("value")), int(item.get("mod_revision", 0))


def put_op(key: bytes, value: bytes, *, lease: int = 0, prev_kv: bool = False) -> dict[str, Any]:
    """A ``request_put`` for a transaction."""
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    if prev_kv:
        body["prev_kv"] = True
    return {"request_put": body}


def delete_op(key: bytes, range_end: bytes | None = None, *, prev_kv: bool = False) -> dict[str, Any]:
    """A ``request_delete_range`` for a transaction."""
    body: dict[str, Any] = {"key": b64(key)}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    if prev_kv:
        body["prev_kv"] = True
    return {"request_delete_range": body}


def range_op(
    key: bytes, range_end: bytes | None = None, *, limit: int = 0, serializable: bool = False
) -> dict[str, Any]:
    """A ``request_range`` for a transaction (all ranges serializable: the member answers alone)."""
    body: dict[str, Any] = {"key": b64(key)}
    if serializable:
        body["serializable"] = True
    if range_end is not None:
        body["range_end"] = b64(range_end)
    if limit:
        body["limit"] = str(limit)
    return {"request_range": body}


def compare_version(key: bytes, result: str, version: int) -> dict[str, Any]:
    """Compare a key's version (0: absent) with ``result`` EQUAL/GREATER/LESS/NOT_EQUAL."""
    return {"key": b64(key), "target": "VERSION", "result": result, "version": str(version)}


def compare_mod(key: bytes, result: str, revision: int) -> dict[str, Any]:
    """Compare a key's last-modified revision."""
    return {"key": b64(key), "target": "MOD", "result": result, "mod_revision": str(revision)}


def compare_value(key: bytes, result: str, value: bytes) -> dict[str, Any]:
    """Compare a key's value."""
    return {"key": b64(key), "target": "VALUE", "result": result, "value": b64(value)}
