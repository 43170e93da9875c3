"""Guards of the ops site that act before a request's body is read, and its connection cap.

:class:`GuardedSite` is the ops site's ``Site``:

- **Request bodies.**  No route takes a body.  A request whose ``Content-Length`` is above
  ``web.max_request_body_bytes`` is answered 413 and the connection closed as soon as its headers
  are in, before any of the body is read or buffered; a chunked body is cut the same way once it
  passes the limit.  (Twisted would otherwise write the whole body to a temporary file before any
  route, method or credential is looked at.)
- **Admin requests are screened on their headers** (:func:`amaters.web.admin.admin_refusal`):
  the loopback, ``Host`` and ``X-Amaters-Admin`` checks with auth off, the presence of
  credentials with auth on.  A refused request is answered (403 or 401) without its body being
  read.
- **Connections.**  At most ``web.max_connections`` are open.  A new connection over the cap takes
  the place of the open connection that has been idle longest (one not in the middle of answering
  a request); it is refused only when every connection is busy.  So a flood of idle or slow
  connections cannot keep ``/readyz`` or the admin API from answering: each probe gets a
  connection.  Idle connections are also closed after ``web.idle_timeout``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http, server

from amaters.config import Config

#: Seconds between two log lines about ops site connections that were closed to make room.
LOG_INTERVAL = 10.0


def _raw_response(status: int, reason: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body, sort_keys=True).encode() + b"\n"
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        "Cache-Control: no-store\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + payload


class GuardedRequest(server.Request):
    """A request screened when its headers are complete, before its body is read."""

    #: (method, path) from the request line, set by :class:`GuardedChannel`.
    early: tuple[bytes, bytes] = (b"", b"")
    _refused = False
    _body_bytes = 0

    def gotLength(self, length: int | None) -> None:
        site: GuardedSite = self.channel.site  # type: ignore[attr-defined]
        limit = site.config().web.max_request_body_bytes
        if length is not None and length > limit:
            self._refuse(
                413,
                "Payload Too Large",
                {
                    "error": "payload_too_large",
                    "status": 413,
                    "message": f"request body of {length} bytes; web.max_request_body_bytes is {limit}",
                },
            )
            return
        refusal = site.screen(self)
        if refusal is not None:
            self._refuse(*refusal)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(data)
        limit = self.channel.site.config().web.max_request_body_bytes  # type: ignore[attr-defined]
        if self._body_bytes > limit:
            self._refuse(
                413,
                "Payload Too Large",
                {
                    "error": "payload_too_large",
                    "status": 413,
                    "message": f"request body over web.max_request_body_bytes ({limit})",
                },
            )
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        channel = self.channel
        if isinstance(channel, GuardedChannel):
            channel.busy += 1
            self.notifyFinish().addBoth(channel.request_done)
        super().requestReceived(command, path, version)

    def _refuse(self, status: int, reason: str, body: dict[str, Any]) -> None:
        """Answer now and close: the rest of this connection's input is never read."""
        self._refused = True
        self.content = None
        transport = self.channel.transport
        if transport is None:
            return
        transport.write(_raw_response(status, reason, body))
        transport.loseConnection()


class GuardedChannel(http.HTTPChannel):
    """Notes each request's method and path from its request line, and its own activity."""

    site: GuardedSite
    busy = 0
    last_activity = 0.0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channel_opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.channel_closed(self)
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        self.last_activity = self.site.clock.seconds()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        count = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > count:
            parts = line.split(b" ")
            if len(parts) == 3:
                self.requests[-1].early = (parts[0], parts[1].split(b"?", 1)[0])

    def request_done(self, _: object) -> None:
        self.busy = max(0, self.busy - 1)
        self.last_activity = self.site.clock.seconds()


class GuardedSite(server.Site):
    """The ops site's ``Site``: header-time screening, body cap and connection cap (module doc).

    ``screen(request)`` returns (status, reason, body) to refuse a request on its headers, or None.
    """

    protocol = GuardedChannel  # type: ignore[assignment]  # HTTP/1.1 only: no HTTP/2 negotiation
    requestFactory = GuardedRequest
    displayTracebacks = False
    noisy = False
    _log = Logger()

    def __init__(
        self,
        resource: Any,
        config: Callable[[], Config],
        clock: Any,
        screen: Callable[[GuardedRequest], tuple[int, str, dict[str, Any]] | None] = lambda request: None,
    ) -> None:
        super().__init__(resource, timeout=config().web.idle_timeout)
        self.config = config
        self.clock = clock
        self.screen = screen
        self.channels: set[GuardedChannel] = set()
        self._closing: set[GuardedChannel] = set()
        #: Connections closed to make room, and connections refused because all were busy.
        self.evicted = 0
        self.refused = 0
        self._unlogged = 0
        self._last_log = float("-inf")

    def channel_opened(self, channel: GuardedChannel) -> None:
        channel.last_activity = self.clock.seconds()
        self.channels.add(channel)

    def channel_closed(self, channel: GuardedChannel) -> None:
        self.channels.discard(channel)
        self._closing.discard(channel)

    def admit(self) -> bool:
        """Whether one more connection may open, closing the longest-idle one to make room."""
        cap = self.config().web.max_connections
        if len(self.channels) - len(self._closing) < cap:
            return True
        idle = [c for c in self.channels if not c.busy and c not in self._closing]
        if not idle:
            self.refused += 1
            self._note("refused a connection: every ops site connection is busy")
            return False
        victim = min(idle, key=lambda c: c.last_activity)
        self._closing.add(victim)
        self.evicted += 1
        self._note("closed idle ops site connections to make room")
        transport: Any = victim.transport
        if transport is not None:
            transport.abortConnection()
        return True

    def _note(self, what: str) -> None:
        self._unlogged += 1
        now = self.clock.seconds()
        if now - self._last_log < LOG_INTERVAL:
            return
        self._log.warn(
            "Ops site at web.max_connections ({cap}): {what} ({count} time(s))",
            cap=self.config().web.max_connections,
            what=what,
            count=self._unlogged,
        )
        self._last_log = now
        self._unlogged = 0

    def log(self, request: Any) -> None:
        # Probes polled every few seconds would fill the log: each request is a debug event.
        self._log.debug(
            "Ops site {method} {path} {code}",
            method=request.method.decode("latin-1", "replace"),
            path=request.path.decode("latin-1", "replace")[:200],
            code=request.code,
        )


class ConnectionGate(WrappingFactory):
    """Outermost factory of the ops listener (outside TLS): asks the site to admit each connection;
    a refused one is closed at once."""

    noisy = False

    def __init__(self, wrapped: Any, site: GuardedSite) -> None:
        super().__init__(wrapped)
        self.site = site

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if not self.site.admit():
            return None
        return self.wrappedFactory.buildProtocol(addr)


__all__ = ["ConnectionGate", "GuardedChannel", "GuardedRequest", "GuardedSite"]
