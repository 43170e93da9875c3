"""Connection limits: ``limits.max_connections`` in total and ``limits.max_connections_per_ip``.

:class:`ConnectionLimitFactory` wraps the listener's factory *outside* TLS, so a connection over a
limit is closed the moment it is accepted, before any TLS work: a flood of connections costs the
server an ``accept`` and a ``close`` each, and the connections already open keep being served.  The
refused client sees its connection closed during the TLS handshake (the Python client reports a
retryable ``NETWORK_CONNECTION_RESET``); refusals are counted for metrics and logged at most once
every :data:`LOG_INTERVAL` seconds.

Sources are counted by IP address (the port is ignored); unix sockets count as one source.  Limits
of 0 mean no limit; a reload changes them for the next accepted connection and never closes open
ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory

from amaters.config import Config, LimitsConfig

#: Seconds between two log lines about refused connections.
LOG_INTERVAL = 10.0


def source_of(address: IAddress) -> str:
    """The source an address counts against: its IP address, or its string form."""
    host = getattr(address, "host", None)
    return str(host) if host else str(address)


class ConnectionLimiter:
    """Counts open connections per source and decides whether one more may open."""

    _log = Logger()

    def __init__(self, limits: LimitsConfig, clock: Any) -> None:
        self.limits = limits
        self.clock = clock
        self.total = 0
        self.per_source: dict[str, int] = {}
        #: Connections refused by the total limit, and by the per-address limit.
        self.refused_total = 0
        self.refused_per_ip = 0
        self._unlogged = 0
        self._last_log = float("-inf")

    def admit(self, source: str) -> bool:
        """Count a new connection from ``source``, or refuse it (and count the refusal)."""
        limits = self.limits
        if limits.max_connections and self.total >= limits.max_connections:
            self.refused_total += 1
            self._refused("limits.max_connections", limits.max_connections)
            return False
        count = self.per_source.get(source, 0)
        if limits.max_connections_per_ip and count >= limits.max_connections_per_ip:
            self.refused_per_ip += 1
            self._refused("limits.max_connections_per_ip", limits.max_connections_per_ip)
            return False
        self.total += 1
        self.per_source[source] = count + 1
        return True

    def release(self, source: str) -> None:
        """A connection admitted from ``source`` has closed."""
        self.total -= 1
        count = self.per_source.get(source, 0) - 1
        if count > 0:
            self.per_source[source] = count
        else:
            self.per_source.pop(source, None)

    def _refused(self, setting: str, limit: int) -> None:
        self._unlogged += 1
        now = self.clock.seconds()
        if now - self._last_log < LOG_INTERVAL:
            return
        self._log.warn(
            "Refused {count} connection(s) at {setting} = {limit} ({total} open)",
            count=self._unlogged,
            setting=setting,
            limit=limit,
            total=self.total,
        )
        self._last_log = now
        self._unlogged = 0

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        limits = new.limits
        current = self.limits
        if (limits.max_connections, limits.max_connections_per_ip) == (
            current.max_connections,
            current.max_connections_per_ip,
        ):
            return None

        def commit() -> None:
            self.limits = limits

        return commit


def _release_on_close(protocol: Any, limiter: ConnectionLimiter, source: str) -> None:
    """Make ``protocol.connectionLost`` release its slot in ``limiter`` (once), then run as before.

    Only ``connectionLost`` is hooked (an instance attribute shadowing the method): reads and writes
    go straight to the protocol, with no wrapper layer in between.
    """
    lost = protocol.connectionLost
    released = False

    def connectionLost(reason: Any = None) -> None:
        nonlocal released
        if not released:
            released = True
            limiter.release(source)
            # Unhook: breaks the protocol -> hook -> protocol cycle once the connection is gone.
            vars(protocol).pop("connectionLost", None)
        lost(reason)

    protocol.connectionLost = connectionLost


class ConnectionLimitFactory(WrappingFactory):
    """Wraps a listening factory; ``buildProtocol`` returns None (close now) over a limit.

    An admitted connection is the wrapped factory's own protocol (no ProtocolWrapper in the data
    path); only its ``connectionLost`` is hooked to release the slot, exactly once.
    """

    noisy = False

    def __init__(self, wrapped: IProtocolFactory, limiter: ConnectionLimiter) -> None:
        super().__init__(wrapped)
        self.limiter = limiter

    @classmethod
    def wrapper(cls, limiter: ConnectionLimiter) -> Callable[[IProtocolFactory], ConnectionLimitFactory]:
        """A function wrapping a factory with ``limiter`` (the listener's ``gate_factory``)."""
        return lambda wrapped: cls(wrapped, limiter)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        source = source_of(addr) if addr is not None else "unknown"
        limiter = self.limiter
        if not limiter.admit(source):
            return None
        try:
            protocol = self.wrappedFactory.buildProtocol(addr)
        except BaseException:
            limiter.release(source)
            raise
        if protocol is None:
            limiter.release(source)
            return None
        _release_on_close(protocol, limiter, source)
        return protocol


__all__ = ["LOG_INTERVAL", "ConnectionLimitFactory", "ConnectionLimiter", "source_of"]
