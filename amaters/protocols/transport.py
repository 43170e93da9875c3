"""A TCP server transport that sends a write at once when nothing is queued before it.

Twisted's TCP transport never sends from ``write``: it queues the bytes, asks the reactor to watch
the socket for writability, and sends on the next iteration of the reactor, which then stops
watching.  For a server answering one request per read that is, for every answer, two
``epoll_ctl`` calls, one more return from the poll and one more dispatch through the reactor's
logging and context wrappers: about a tenth of the CPU a small request costs over TLS here.

:class:`EagerWriteServer` tries the ``send`` in ``write`` when nothing is queued (the usual case: the
kernel's socket buffer has room).  Whatever the socket does not take (a full buffer, an error) goes
to Twisted's queue as before, so back-pressure, producers, ``loseConnection`` and error handling are
Twisted's own.  Order is kept: an eager send happens only with nothing queued ahead of it.

:func:`send_eagerly` makes a listening port's new connections use it, and :func:`tcp_transport`
finds the one under a connection (through TLS), for a protocol that accounts for what its
transport still holds.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


class EagerWriteServer(tcp.Server):
    """:class:`twisted.internet.tcp.Server` whose ``write`` sends at once when nothing is queued."""

    #: Whether the last write was sent whole from ``write``, leaving nothing queued (an attribute,
    #: not a property: a protocol reads it after every write).
    drained = True

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for the reactor to send them (none after a write the socket took whole)."""
        return len(self.dataBuffer) - self.offset + self._tempDataLen

    def write(self, data: bytes) -> None:
        if (
            not self._tempDataLen
            and not self.dataBuffer
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnecting
            and not self._aborting
            and not self.TLS
            and type(data) is bytes
        ):
            try:
                sent = self.socket.send(data)
            except OSError:
                # Would block, interrupted, or a real error: the queued path below retries the send
                # from the reactor and handles the error as Twisted always does.
                sent = 0
            if sent == len(data):
                self.drained = True
                return
            data = data[sent:]
        self.drained = False
        super().write(data)


def tcp_transport(transport: Any) -> EagerWriteServer | None:
    """The :class:`EagerWriteServer` a protocol writes to through ``transport`` (directly or
    through TLS), or None."""
    if isinstance(transport, EagerWriteServer):
        return transport
    inner = getattr(transport, "transport", None)
    return inner if isinstance(inner, EagerWriteServer) else None


def send_eagerly(port: Any) -> bool:
    """Make the connections ``port`` accepts from now on use :class:`EagerWriteServer`.

    Only a plain TCP port (``tcp:`` endpoints) is changed; any other is left alone.  Whether it was
    changed is returned.
    """
    if type(port) is tcp.Port and port.transport is tcp.Server:
        port.transport = EagerWriteServer
        return True
    return False


__all__ = ["EagerWriteServer", "send_eagerly", "tcp_transport"]
