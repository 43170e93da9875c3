"""The reference server: a minimal Twisted key-value server, the pure-Python ceiling.

It speaks amaters' wire protocol with amaters' own pieces: the same :class:`FrameReceiver` framing
(answers of one read batched into one write, as the real server does), the same ``Envelope``
protobuf, the same TLS setup (``server_tls_options`` in a ``BatchedWritesTLSFactory``), the same
TCP transport (answers sent from ``write``, :func:`~amaters.protocols.transport.send_eagerly`) and
the same default reactor.  It does only what a key-value server cannot skip: parse the envelope,
look the key up in a dict, build and serialize the answer.  No validation, checksums, limits,
pipeline stages, authentication, metrics or durability, which is exactly what the ratio against it
prices.

It understands the handshake, GET, SET, DELETE, PING and a small BATCH of those; anything else gets
an error answer.

With ``--rocksdb DIR`` it keeps the keys in RocksDB instead of a dict (one database, the collection
name prefixed to the key), and with ``--sync always`` as well it answers a read's writes only once
a ``flush_wal(True)`` that started after them has finished, in a thread of its own, one at a time,
every read that arrives meanwhile waiting for the next: the least a Python server must add to make
a write durable.  The durable block prices what amaters' synced write costs against that floor.  ``python -m bench.reference_server --port 21000 [--tls-dir DIR]`` runs it (TLS
files are generated in DIR when missing); SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from twisted.internet.protocol import Factory

from amaters import PROTOCOL_VERSION
from amaters.proto import envelope_pb2, errors_pb2
from amaters.protocols.framing import FrameReceiver, frame_header
from amaters.protocols.transport import send_eagerly

Envelope = envelope_pb2.Envelope
_MALFORMED = 2002  # ERROR_PROTOCOL_MALFORMED_MESSAGE
_UNSUPPORTED = 2002


class ReferenceProtocol(FrameReceiver):
    """One connection: a dict lookup per request, answers flushed once per read."""

    def __init__(self, store: dict[str, dict[bytes, bytes]]) -> None:
        self.store = store
        self._out: list[bytes] = []

    def stringReceived(self, frame: bytes) -> None:
        request = Envelope()
        try:
            request.ParseFromString(frame)
        except DecodeError:
            self._error(0, _MALFORMED, "not an Envelope")
            return
        kind = request.WhichOneof("body")
        response = Envelope(request_id=request.request_id)
        if kind == "query":
            if not self._query(request.query.query, response.query_response.result):
                self._error(request.request_id, _UNSUPPORTED, "unsupported query")
                return
        elif kind == "batch":
            results = response.batch_response.results
            results.SetInParent()
            for query in request.batch.queries:
                if not self._query(query, results.results.add()):
                    self._error(request.request_id, _UNSUPPORTED, "unsupported query in batch")
                    return
        elif kind == "handshake":
            answer = response.handshake_response
            answer.version.major, answer.version.minor, answer.version.patch = PROTOCOL_VERSION
            answer.principal_name = "anonymous"
            answer.server_name = "bench-reference"
        elif kind == "ping":
            response.pong.payload = request.ping.payload
        else:
            self._error(request.request_id, _UNSUPPORTED, f"{kind} is not supported by the reference")
            return
        self._write(response)

    def _query(self, query: Any, result: Any) -> bool:
        which = query.WhichOneof("query")
        if which == "get":
            get = query.get
            stored = self.store.get(get.collection, {}).get(get.key.data)
            if stored is None:
                result.single.SetInParent()
            else:
                result.single.value.ParseFromString(stored)
        elif which == "set":
            put = query.set
            self.store.setdefault(put.collection, {})[put.key.data] = put.value.SerializeToString()
            result.success.affected_rows = 1
        elif which == "delete":
            delete = query.delete
            existed = self.store.get(delete.collection, {}).pop(delete.key.data, None) is not None
            result.success.affected_rows = 1 if existed else 0
        else:
            return False
        return True

    def _error(self, request_id: int, code: int, message: str) -> None:
        self._write(
            Envelope(request_id=request_id, error=errors_pb2.ErrorResponse(code=code, message=message))
        )

    def _write(self, envelope: Any) -> None:
        payload = envelope.SerializeToString()
        self._out.append(frame_header(len(payload)))
        self._out.append(payload)

    def framesDelivered(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


class ReferenceFactory(Factory):
    noisy = False

    def __init__(self) -> None:
        self.store: dict[str, dict[bytes, bytes]] = {}

    def buildProtocol(self, addr: Any) -> ReferenceProtocol:
        protocol = ReferenceProtocol(self.store)
        protocol.factory = self
        return protocol


class WalSyncer:
    """Group commit at its barest: one thread runs ``flush_wal(True)``; a request made while none
    runs starts one, requests made while one runs share the next.  ``done`` callables are called on
    the reactor thread once a sync that started after their request has finished."""

    def __init__(self, db: Any, reactor: Any) -> None:
        self._db = db
        self._reactor = reactor
        self._waiting: list[Callable[[], None]] = []
        self._running = False
        self._groups: queue.SimpleQueue[list[Callable[[], None]]] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="reference-wal", daemon=True).start()

    def request(self, done: Callable[[], None]) -> None:
        self._waiting.append(done)
        if not self._running:
            self._start()

    def _start(self) -> None:
        group, self._waiting = self._waiting, []
        self._running = True
        self._groups.put(group)

    def _loop(self) -> None:
        while True:
            group = self._groups.get()
            self._db.flush_wal(True)
            self._reactor.callFromThread(self._synced, group)

    def _synced(self, group: list[Callable[[], None]]) -> None:
        self._running = False
        for done in group:
            done()
        if self._waiting:
            self._start()


class RocksDBReferenceProtocol(ReferenceProtocol):
    """:class:`ReferenceProtocol` on RocksDB; with a syncer, a read's answers wait for its writes'
    WAL sync."""

    def __init__(self, db: Any, write_options: Any, syncer: WalSyncer | None) -> None:
        super().__init__({})
        self._db = db
        self._write_options = write_options
        self._syncer = syncer
        self._wrote = False

    def _query(self, query: Any, result: Any) -> bool:
        which = query.WhichOneof("query")
        if which == "get":
            get = query.get
            stored = self._db.get(get.collection.encode() + b"\0" + get.key.data)
            if stored is None:
                result.single.SetInParent()
            else:
                result.single.value.ParseFromString(stored)
        elif which == "set":
            put = query.set
            self._db.put(
                put.collection.encode() + b"\0" + put.key.data,
                put.value.SerializeToString(),
                self._write_options,
            )
            self._wrote = True
            result.success.affected_rows = 1
        else:
            return False
        return True

    def framesDelivered(self) -> None:
        if not self._wrote or self._syncer is None:
            super().framesDelivered()
            return
        self._wrote = False
        out, self._out = self._out, []
        self._syncer.request(lambda: self._send(out))

    def _send(self, out: list[bytes]) -> None:
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


class RocksDBReferenceFactory(Factory):
    noisy = False

    def __init__(self, path: Path, sync: bool, reactor: Any) -> None:
        import rocksdict

        self.db = rocksdict.Rdict(str(path), options=rocksdict.Options(raw_mode=True))
        self.write_options = rocksdict.WriteOptions()
        self.write_options.sync = False
        self.syncer = WalSyncer(self.db, reactor) if sync else None

    def buildProtocol(self, addr: Any) -> ReferenceProtocol:
        protocol = RocksDBReferenceProtocol(self.db, self.write_options, self.syncer)
        protocol.factory = self
        return protocol


def tls_factory(factory: Factory, tls_dir: Path, reactor: Any) -> Any:
    """Wrap ``factory`` in TLS exactly as amaters' listener does (generating files when missing)."""
    from amaters.tls.certs import generate_server_tls
    from amaters.tls.context import BatchedWritesTLSFactory, ReloadableServerTLS, server_tls_options

    if not (tls_dir / "server.pem").exists():
        generate_server_tls(tls_dir)
    options = server_tls_options(tls_dir / "server.pem", tls_dir / "server.key")
    return BatchedWritesTLSFactory(ReloadableServerTLS(options), factory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-dir", type=Path, default=None, help="TLS files (plain TCP when omitted)")
    parser.add_argument(
        "--rocksdb", type=Path, default=None, help="keep the keys in RocksDB in this directory"
    )
    parser.add_argument(
        "--sync",
        choices=("always", "none"),
        default="none",
        help="with --rocksdb: sync the WAL before answering",
    )
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    factory: Any = (
        ReferenceFactory()
        if args.rocksdb is None
        else RocksDBReferenceFactory(args.rocksdb, args.sync == "always", reactor)
    )
    if args.tls_dir is not None:
        factory = tls_factory(factory, args.tls_dir, reactor)
    # The same endpoint string (and so the same listen backlog) as amaters' ``server.listen``.
    endpoint = serverFromString(reactor, f"tcp:{args.port}:interface=127.0.0.1")
    d = endpoint.listen(factory)
    d.addCallback(send_eagerly)

    def failed(failure: Any) -> None:
        print(f"reference server failed to listen: {failure.getErrorMessage()}", flush=True)
        reactor.stop()

    d.addErrback(failed)
    reactor.run()


if __name__ == "__main__":
    main()
