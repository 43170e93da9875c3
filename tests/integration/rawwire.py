"""Raw native-protocol sockets for tests that play misbehaving clients against a real server.

Blocking sockets with timeouts (the server runs in a subprocess); every read is bounded.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

from amaters import PROTOCOL_VERSION
from amaters.proto import envelope_pb2
from amaters.proto.convert import version_to_proto
from amaters.protocols.framing import encode_frame

Envelope = envelope_pb2.Envelope


def handshake_frame(token: str | None = None, api_key: str | None = None, name: str = "raw") -> bytes:
    credentials = envelope_pb2.Credentials()
    if token:
        credentials.bearer_token = token
    elif api_key:
        credentials.api_key = api_key
    envelope = Envelope(
        request_id=1,
        handshake=envelope_pb2.Handshake(
            version=version_to_proto(PROTOCOL_VERSION), client_name=name, credentials=credentials
        ),
    )
    return encode_frame(envelope.SerializeToString())


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def read_frame(s: socket.socket, timeout: float = 10.0) -> envelope_pb2.Envelope | None:
    """The next frame from the server, or None when it closed the connection."""
    s.settimeout(timeout)
    header = _read_exactly(s, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    payload = _read_exactly(s, length)
    if payload is None:
        return None
    envelope = Envelope()
    envelope.ParseFromString(payload)
    return envelope


def _read_exactly(s: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = s.recv(n - len(data))
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE):
                return None
            raise
        if not chunk:
            return None
        data += chunk
    return data


def logged_in(port: int, source: str = "127.0.0.1", **credentials: str) -> socket.socket:
    """A raw connection that has completed the handshake."""
    s = connect(port, source)
    s.sendall(handshake_frame(**credentials))
    answer = read_frame(s)
    assert answer is not None and answer.WhichOneof("body") == "handshake_response", answer
    return s


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(condition: object, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(step)
    return False
