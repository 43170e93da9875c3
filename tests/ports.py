"""Free loopback ports for servers the tests start."""

from __future__ import annotations

import random
import socket

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 below 32768 that nothing listens on right now and that this process
    has not handed out before.

    Below 32768 because the ephemeral range above it is where clients' source ports come from. A port
    is never handed out twice: a caller that asks for several ports before starting anything on them
    (an etcd cluster's client and peer ports) would otherwise get the same one twice now and then.
    """
    for _ in range(500):
        port = random.randint(20000, 32000)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port found below 32768")
