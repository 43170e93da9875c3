"""Several etcd clusters as shards of one store: virtual shards placed by a shard map, moved online.

Every ``(collection, key)`` belongs to one of :data:`VSHARDS` virtual shards (a hash of the two, so
keys spread evenly and a key's virtual shard never changes).  The shard map — kept in the first
etcd cluster (shard ``"0"``) under ``P shardmap`` — assigns each virtual shard to a shard (an etcd
cluster) and records each shard's fencing epoch and the virtual shards being moved.  Every node
watches the map.

Each shard is an :class:`~amaters.storage.etcd.EtcdBackend` whose reads and writes check, in their
own transaction, that the shard's epoch key still has the version the node's map says.  Moving a
virtual shard ``v`` from shard A to shard B (:meth:`ShardedBackend.move`):

1. the map marks ``v`` fenced and raises A's epoch (compare-and-swap on the map), then A's epoch key
   is bumped: from then on A refuses every node still holding an older map, and nodes with the new
   map refuse requests for ``v`` (briefly: they wait, re-read the map and retry, up to 3 s, then
   answer the retryable ``SERVER_UNAVAILABLE``).  No write to ``v`` can land anywhere;
2. ``v``'s keys are copied from A to B;
3. the map assigns ``v`` to B and lifts the fence (compare-and-swap); requests for ``v`` go to B;
4. ``v``'s keys are deleted from A.

Nothing acknowledged is lost: writes to ``v`` stop before the copy and resume only on B after it.
The map records each move in progress (target, and the node and node lease running it).  A move
whose node died (its lease, and so its registry entry, expired) is finished by the cluster leader
(:meth:`ShardedBackend.resume_interrupted_moves`); a fence without a record (left by a release that
kept none) is lifted, leaving ``v`` where it was.  Running the same move again also finishes it.

RANGE reads every shard that owns part of the collection and merges the pages in key order,
keeping from each shard only keys of virtual shards the map assigns to it.  A BATCH is atomic when
its keys live on one shard; one spanning shards is refused (``COMPUTE_INVALID_OPERATION``) rather
than applied in parts.  A conditional write (``compare_and_write``, which UPDATE uses) is split by
shard instead: each shard's part is one conditional transaction there, atomic on that shard, and
the result says which parts were not applied.  Collections exist on every shard (created on shard 0 first, dropped on it
last).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from amaters import __version__
from amaters.cluster.etcd import EtcdError, compare_mod, compare_version, kv_of, put_op, range_op
from amaters.errors import AmatersError, InvalidOperation, StorageIOError, Unavailable
from amaters.interfaces import IRangeCursor, IStorageBackend
from amaters.storage.etcd import EtcdBackend, StaleEpoch, _translate
from amaters.types import CipherBlob, ConditionalResult, Expect, KeyValue, WriteOp

#: Virtual shards.  Fixed for the life of a deployment: it is part of every key's placement.
VSHARDS = 64
#: How long a request waits for a moving virtual shard before answering SERVER_UNAVAILABLE.
MOVE_WAIT = 3.0

#: The layout of a cluster's data in etcd (every key under ``cluster.prefix``), recorded in shard 0
#: under ``P format``.  A release that changes the layout raises it; a node refuses to serve a cluster
#: whose recorded format is newer than the one it reads (docs/upgrading.md, clustered mode).
CLUSTER_FORMAT = 1


def vshard_of(collection: str, key: bytes, count: int = VSHARDS) -> int:
    """The virtual shard of ``(collection, key)``."""
    digest = hashlib.blake2b(collection.encode("utf-8") + b"\x00" + key, digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


@attrs.frozen
class ShardMap:
    """Which shard holds each virtual shard, the shards' endpoints and fencing epochs."""

    shards: dict[str, tuple[str, ...]]
    assign: tuple[str, ...]
    epochs: dict[str, int] = attrs.field(factory=dict)
    fenced: frozenset[int] = frozenset()
    #: Moves in progress: virtual shard -> {"to": shard, "by": node name, "lease": the node's lease}.
    moving: dict[int, dict[str, Any]] = attrs.field(factory=dict)

    @classmethod
    def single(cls, endpoints: Iterable[str]) -> ShardMap:
        return cls({"0": tuple(endpoints)}, ("0",) * VSHARDS)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "shards": {name: list(eps) for name, eps in self.shards.items()},
                "assign": list(self.assign),
                "epochs": self.epochs,
                "fenced": sorted(self.fenced),
                "moving": {str(v): record for v, record in self.moving.items()},
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ShardMap:
        data = json.loads(raw)
        return cls(
            {name: tuple(eps) for name, eps in data["shards"].items()},
            tuple(data["assign"]),
            {name: int(e) for name, e in data.get("epochs", {}).items()},
            frozenset(int(v) for v in data.get("fenced", [])),
            {int(v): dict(record) for v, record in data.get("moving", {}).items()},
        )

    def split(
        self, expected: Iterable[Expect], ops: Iterable[WriteOp]
    ) -> tuple[dict[str, tuple[list[Expect], list[WriteOp]]], tuple[list[Expect], list[WriteOp]]]:
        """``expected`` and ``ops`` grouped by the shard holding each key, and apart from those the
        ones whose virtual shard is fenced (moving)."""
        parts: dict[str, tuple[list[Expect], list[WriteOp]]] = {}
        waiting: tuple[list[Expect], list[WriteOp]] = ([], [])

        def part_of(collection: str, key: bytes) -> tuple[list[Expect], list[WriteOp]]:
            vshard = vshard_of(collection, key)
            if vshard in self.fenced:
                return waiting
            return parts.setdefault(self.assign[vshard], ([], []))

        for e in expected:
            part_of(e.collection, e.key)[0].append(e)
        for op in ops:
            part_of(op.collection, op.key)[1].append(op)
        return parts, waiting

    def owned(self) -> dict[str, list[int]]:
        """Virtual shards per shard (every shard listed, even with none)."""
        found: dict[str, list[int]] = {name: [] for name in self.shards}
        for vshard, name in enumerate(self.assign):
            found.setdefault(name, []).append(vshard)
        return found


@implementer(IRangeCursor)
class MergedCursor:
    """A RANGE over every shard, merged in key order (see the module docstring)."""

    def __init__(
        self,
        owner: ShardedBackend,
        collection: str,
        start: bytes,
        end: bytes | None,
        limit: int | None,
        size: int,
    ) -> None:
        self._owner = owner
        self._collection = collection
        self._remaining = limit
        self._size = max(1, size)
        shard_map = owner.map
        self._assign = shard_map.assign
        self._cursors = {
            name: owner.backends[name].scan(collection, start, end, None, self._size)
            for name, vshards in shard_map.owned().items()
            if vshards and name in owner.backends
        }
        self._buffers: dict[str, list[KeyValue]] = {name: [] for name in self._cursors}
        self._exhausted: set[str] = set()
        self._done = limit is not None and limit <= 0

    def next_chunk(self) -> defer.Deferred[list[KeyValue]]:
        if self._done:
            return defer.succeed([])
        return defer.Deferred.fromCoroutine(self._next())

    async def _next(self) -> list[KeyValue]:
        want = self._size if self._remaining is None else min(self._size, self._remaining)
        out: list[KeyValue] = []
        try:
            while len(out) < want:
                for name, cursor in self._cursors.items():
                    while not self._buffers[name] and name not in self._exhausted:
                        page = await cursor.next_chunk()
                        if not page:
                            self._exhausted.add(name)
                        kept = [kv for kv in page if self._assign[vshard_of(self._collection, kv[0])] == name]
                        self._buffers[name].extend(kept)
                heads = [(buf[0][0], name) for name, buf in self._buffers.items() if buf]
                if not heads:
                    self._done = True
                    break
                _, name = min(heads)
                out.append(self._buffers[name].pop(0))
        except StaleEpoch:
            self.close()
            raise Unavailable("the range's shards are being rebalanced; retry") from None
        except BaseException:
            self.close()
            raise
        if self._remaining is not None:
            self._remaining -= len(out)
            if self._remaining <= 0:
                self._done = True
        return out

    def close(self) -> None:
        self._done = True
        for cursor in self._cursors.values():
            cursor.close()


@implementer(IStorageBackend)
class ShardedBackend:
    """The store over shard ``"0"`` (``home``) and the shards the map adds.

    ``make_shard(name, endpoints)`` builds an (unopened) EtcdBackend for another etcd cluster.
    """

    name = "etcd"
    #: The collection list is a cache other nodes change: a keyed read or delete of a collection
    #: missing from it asks etcd rather than answering absent (the executor reads this).
    collections_remote = True
    _log = Logger()

    def __init__(
        self, home: EtcdBackend, reactor: Any, make_shard: Callable[[str, list[str]], EtcdBackend]
    ) -> None:
        self.home = home
        self.reactor = reactor
        self.make_shard = make_shard
        self.backends: dict[str, EtcdBackend] = {"0": home}
        self.map = ShardMap.single(home.client.endpoints)
        self.map_revision = 0
        self.map_key = home.prefix + b"shardmap"
        self._watch: Any = None
        self._loading: defer.Deferred[None] | None = None
        #: Who runs the moves this node starts: its name and current lease (set by the node's
        #: cluster membership once registered), recorded in the map with each move.
        self.mover: dict[str, Any] = {"by": "", "lease": 0}
        #: Virtual shards this node is moving right now.
        self._moving_here: set[int] = set()

    # -- the map --------------------------------------------------------------------------------

    async def load_map(self) -> ShardMap:
        """Read the shard map from shard 0 (linearizable) and apply it."""
        answer = await self.home.client.range(self.map_key)
        kvs = answer.get("kvs") or []
        if kvs:
            _, raw, revision = kv_of(kvs[0])
            await self._apply(ShardMap.from_json(raw), revision)
        return self.map

    async def _apply(self, shard_map: ShardMap, revision: int) -> None:
        if revision < self.map_revision:
            return
        for name, endpoints in shard_map.shards.items():
            if name not in self.backends:
                backend = self.make_shard(name, list(endpoints))
                await backend.open()
                if name in self.backends:  # another reload opened it meanwhile
                    await backend.close()
                else:
                    self.backends[name] = backend
        if revision < self.map_revision:
            return  # a newer map was applied while shards were opening
        for name, backend in self.backends.items():
            backend.epoch = shard_map.epochs.get(name, 0)
        self.map, self.map_revision = shard_map, revision
        for name in [n for n in self.backends if n != "0" and n not in shard_map.shards]:
            await self.backends.pop(name).close()  # a removed shard: no virtual shard routes there

    def _map_changed(self, events: list[dict[str, Any]] | None, revision: int) -> None:
        d = defer.Deferred.fromCoroutine(self.load_map())
        d.addErrback(lambda f: self._log.failure("Could not reload the shard map", f))

    async def _cas_map(self, new: ShardMap) -> None:
        """Replace the map if nobody changed it since it was read (else Unavailable)."""
        answer = await self.home.client.txn(
            [compare_mod(self.map_key, "EQUAL", self.map_revision)],
            [put_op(self.map_key, new.to_json())],
            idempotent=True,
        )
        if not answer.get("succeeded"):
            await self.load_map()
            raise Unavailable("the shard map changed meanwhile; run the command again")
        await self._apply(new, int(answer["header"]["revision"]))

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._open())

    async def _open(self) -> None:
        await self.home.open()
        try:
            await self._check_format()
            await self.load_map()
        except EtcdError as e:
            raise StorageIOError(
                f"cannot read the cluster format and shard map from etcd: {e.message}"
            ) from None
        if self._watch is None:
            self._watch = self.home.client.watch(
                self.map_key, None, self.home.client.revision + 1, self._map_changed
            )

    async def _check_format(self) -> None:
        """Record this release's cluster format if none is recorded; refuse a newer one."""
        key = self.home.prefix + b"format"
        mine = json.dumps({"format": CLUSTER_FORMAT, "written_by": f"amaters {__version__}"}).encode()
        answer = await self.home.client.txn(
            [compare_version(key, "EQUAL", 0)], [put_op(key, mine)], [range_op(key)], idempotent=True
        )
        if answer.get("succeeded"):
            return
        kvs = answer["responses"][0]["response_range"].get("kvs") or []
        try:
            recorded = json.loads(kv_of(kvs[0])[1])
            found, written_by = int(recorded["format"]), str(recorded.get("written_by", "an unknown release"))
        except (IndexError, KeyError, TypeError, ValueError):
            raise StorageIOError(
                f"the cluster's format record {key.decode(errors='replace')!r} is unreadable"
            ) from None
        if found > CLUSTER_FORMAT:
            raise StorageIOError(
                f"the cluster has data format {found} (written by {written_by}), newer than format"
                f" {CLUSTER_FORMAT} that amaters {__version__} reads; run that release or a newer one on"
                " this node (a rolling upgrade goes forward, never back)"
            )

    def close(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.stop()
        for backend in list(self.backends.values()):
            await backend.close()

    # -- routing --------------------------------------------------------------------------------

    async def _routed(self, vshards: set[int], call: Callable[[EtcdBackend], Any]) -> Any:
        """Run ``call`` on the shard holding ``vshards``, waiting out a move of one of them."""
        give_up = time.monotonic() + MOVE_WAIT
        while True:
            shard_map = self.map
            if not vshards & shard_map.fenced:
                shards = {shard_map.assign[v] for v in vshards}
                if len(shards) > 1:
                    raise InvalidOperation(
                        f"the batch's keys live on shards {', '.join(sorted(shards))}; with several shards"
                        " a BATCH must keep to one (it would not be atomic)"
                    )
                try:
                    return await call(self.backends[shards.pop()])
                except StaleEpoch:
                    pass
            if time.monotonic() >= give_up:
                raise Unavailable("the key's virtual shard is moving to another shard; retry")
            await task.deferLater(self.reactor, 0.05, lambda: None)
            try:
                await self.load_map()
            except EtcdError as e:
                raise _translate(e) from None

    def get(self, collection: str, key: bytes) -> defer.Deferred[CipherBlob | None]:
        return defer.Deferred.fromCoroutine(
            self._routed({vshard_of(collection, key)}, lambda b: b.get(collection, key))
        )

    def put(self, collection: str, key: bytes, value: CipherBlob) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(
            self._routed({vshard_of(collection, key)}, lambda b: b.put(collection, key, value))
        )

    def delete(self, collection: str, key: bytes) -> defer.Deferred[bool]:
        return defer.Deferred.fromCoroutine(
            self._routed({vshard_of(collection, key)}, lambda b: b.delete(collection, key))
        )

    def write_batch(self, ops: Iterable[WriteOp]) -> defer.Deferred[None]:
        ops = list(ops)
        if not ops:
            return defer.succeed(None)
        vshards = {vshard_of(op.collection, op.key) for op in ops}
        return defer.Deferred.fromCoroutine(self._routed(vshards, lambda b: b.write_batch(ops)))

    def compare_and_write(
        self, expected: Iterable[Expect], ops: Iterable[WriteOp]
    ) -> defer.Deferred[ConditionalResult]:
        """Per shard: the expectations and writes whose keys live on one shard are one conditional
        transaction there (see the module docstring)."""
        return defer.Deferred.fromCoroutine(self._compare_and_write(list(expected), list(ops)))

    async def _compare_and_write(self, expected: list[Expect], ops: list[WriteOp]) -> ConditionalResult:
        changed: set[tuple[str, bytes]] = set()
        not_applied: set[tuple[str, bytes]] = set()
        written: list[str] = []
        give_up = time.monotonic() + MOVE_WAIT
        while expected or ops:
            shard_map = self.map
            parts, waiting = shard_map.split(expected, ops)
            for shard, (some_expected, some_ops) in sorted(parts.items()):
                try:
                    result = await self.backends[shard].compare_and_write(some_expected, some_ops)
                except StaleEpoch:
                    waiting[0].extend(some_expected)
                    waiting[1].extend(some_ops)
                    continue
                except AmatersError as e:
                    if written:
                        raise e.partly_applied(
                            f"the writes on shard(s) {', '.join(written)} were already applied"
                        ) from None
                    raise
                changed |= result.changed
                not_applied |= result.not_applied
                if some_ops and result.applied:
                    written.append(shard)
            expected, ops = waiting
            if not (expected or ops):
                break
            if time.monotonic() >= give_up:
                # Virtual shards still moving: those parts are reported as not applied, unchanged.
                not_applied |= {(op.collection, op.key) for op in ops}
                break
            await task.deferLater(self.reactor, 0.05, lambda: None)
            try:
                await self.load_map()
            except EtcdError as e:
                raise _translate(e) from None
        return ConditionalResult(frozenset(changed), frozenset(not_applied))

    def scan(
        self, collection: str, start: bytes, end: bytes | None, limit: int | None, chunk_size: int
    ) -> Any:
        if len(self.backends) == 1:
            return self.home.scan(collection, start, end, limit, chunk_size)
        self.home.scan(collection, start, end, 0, 1).close()  # raises NotFound for a missing collection
        return MergedCursor(self, collection, start, end, limit, chunk_size)

    # -- collections ----------------------------------------------------------------------------

    def create_collection(self, name: str) -> defer.Deferred[bool]:
        async def create() -> bool:
            created = bool(await self.home.create_collection(name))
            for shard, backend in self.backends.items():
                if shard != "0":
                    await backend.create_collection(name)
            return created

        return defer.Deferred.fromCoroutine(create())

    def drop_collection(self, name: str) -> defer.Deferred[bool]:
        async def drop() -> bool:
            for shard, backend in self.backends.items():
                if shard != "0":
                    await backend.drop_collection(name)
            return bool(await self.home.drop_collection(name))

        return defer.Deferred.fromCoroutine(drop())

    def list_collections(self) -> defer.Deferred[list[str]]:
        return self.home.list_collections()

    def has_collection(self, name: str) -> bool:
        return self.home.has_collection(name)

    def collection_count(self) -> int:
        return self.home.collection_count()

    def sync(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def flush(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def stats(self) -> defer.Deferred[dict[str, Any]]:
        async def stats() -> dict[str, Any]:
            total: dict[str, Any] = {"backend": self.name, "keys": {}, "bytes": 0, "shards": {}}
            for shard, backend in self.backends.items():
                one = await backend.stats()
                total["shards"][shard] = one
                total["bytes"] += one["bytes"]
                for name, count in one["keys"].items():
                    total["keys"][name] = total["keys"].get(name, 0) + count
            return total

        return defer.Deferred.fromCoroutine(stats())

    def snapshot(self, destination: str) -> defer.Deferred[None]:
        return self.home.snapshot(destination)

    def clean_orphans(self) -> defer.Deferred[int]:
        async def clean() -> int:
            return sum([await backend.clean_orphans() for backend in list(self.backends.values())])

        return defer.Deferred.fromCoroutine(clean())

    def shard_clients(self) -> dict[str, Any]:
        """Each shard's etcd client (for health views)."""
        return {name: backend.client for name, backend in self.backends.items()}

    # -- rebalancing ----------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """The map in plain form: each shard's endpoints, virtual shards and epoch."""
        owned = self.map.owned()
        return {
            "vshards": VSHARDS,
            "fenced": sorted(self.map.fenced),
            "moving": {str(v): record for v, record in sorted(self.map.moving.items())},
            "shards": {
                name: {
                    "endpoints": list(eps),
                    "vshards": owned.get(name, []),
                    "epoch": self.map.epochs.get(name, 0),
                }
                for name, eps in self.map.shards.items()
            },
        }

    async def add_shard(self, name: str, endpoints: list[str], *, rebalance: bool = True) -> dict[str, Any]:
        """Add the etcd cluster at ``endpoints`` as shard ``name`` and (``rebalance``) move it an even
        share of virtual shards, one at a time, online."""
        await self.load_map()
        if name in self.map.shards:
            raise InvalidOperation(f"shard {name!r} already exists")
        if not endpoints:
            raise InvalidOperation("a shard needs at least one etcd endpoint")
        backend = self.make_shard(name, list(endpoints))
        await backend.open()
        try:
            epoch = await self._epoch_version(backend)
            for collection in await self.home.list_collections():
                await backend.create_collection(collection)
        except BaseException:
            await backend.close()
            raise
        self.backends[name] = backend
        shards = {**self.map.shards, name: tuple(endpoints)}
        await self._cas_map(attrs.evolve(self.map, shards=shards, epochs={**self.map.epochs, name: epoch}))
        moved: list[int] = []
        if rebalance:
            share = VSHARDS // len(shards)
            while len(self.map.owned().get(name, [])) < share:
                owned = self.map.owned()
                donor = max((s for s in owned if s != name), key=lambda s: len(owned[s]))
                vshard = owned[donor][-1]
                await self.move(vshard, name)
                moved.append(vshard)
        return {"shard": name, "moved": moved, **self.view()}

    async def remove_shard(self, name: str) -> dict[str, Any]:
        """Move every virtual shard off shard ``name`` (each to the shard holding fewest), one at a
        time and online, then drop it from the map.  Shard ``"0"`` holds the map and stays."""
        await self.load_map()
        if name == "0":
            raise InvalidOperation(
                "shard '0' holds the shard map and the node registry; it cannot be removed"
            )
        if name not in self.map.shards:
            raise InvalidOperation(f"shard {name!r} does not exist")
        moved: list[int] = []
        while owned := self.map.owned().get(name, []):
            counts = {s: len(v) for s, v in self.map.owned().items() if s != name}
            target = min(sorted(counts), key=lambda s: counts[s])
            await self.move(owned[-1], target)
            moved.append(owned[-1])
        shards = {s: eps for s, eps in self.map.shards.items() if s != name}
        epochs = {s: e for s, e in self.map.epochs.items() if s != name}
        await self._cas_map(attrs.evolve(self.map, shards=shards, epochs=epochs))
        backend = self.backends.pop(name, None)
        if backend is not None:
            await backend.close()
        self._log.info(
            "Removed shard {shard} ({count} virtual shards moved off it)", shard=name, count=len(moved)
        )
        return {"removed": name, "moved": moved, **self.view()}

    async def _epoch_version(self, backend: EtcdBackend) -> int:
        answer = await backend.client.range(backend.epoch_key)
        kvs = answer.get("kvs") or []
        return int(kvs[0].get("version", 0)) if kvs else 0

    async def move(self, vshard: int, to: str) -> dict[str, Any]:
        """Move one virtual shard to shard ``to`` online (see the module docstring); resumable."""
        if vshard in self._moving_here:
            raise InvalidOperation(f"virtual shard {vshard} is being moved by this node already")
        self._moving_here.add(vshard)
        try:
            return await self._move(vshard, to)
        finally:
            self._moving_here.discard(vshard)

    async def _move(self, vshard: int, to: str) -> dict[str, Any]:
        await self.load_map()
        if not 0 <= vshard < VSHARDS:
            raise InvalidOperation(f"virtual shard {vshard} does not exist (0..{VSHARDS - 1})")
        if to not in self.map.shards:
            raise InvalidOperation(f"shard {to!r} does not exist")
        underway = self.map.moving.get(vshard)
        if underway is not None and underway.get("to") != to:
            raise InvalidOperation(
                f"virtual shard {vshard} is being moved to shard {underway.get('to')!r}; finish that move"
                f" first (amaters cluster move {vshard} {underway.get('to')})"
            )
        source_name = self.map.assign[vshard]
        if source_name == to:
            return {"vshard": vshard, "from": to, "to": to, "copied": 0}
        source, target = self.backends[source_name], self.backends[to]
        record = {"to": to, **self.mover}
        # 1. Fence: the map first, then the source's epoch key, which the source's transactions check.
        if vshard not in self.map.fenced:
            epoch = self.map.epochs.get(source_name, 0) + 1
            await self._cas_map(
                attrs.evolve(
                    self.map,
                    fenced=self.map.fenced | {vshard},
                    epochs={**self.map.epochs, source_name: epoch},
                    moving={**self.map.moving, vshard: record},
                )
            )
        elif underway != record:  # resuming a move: it is this node's now
            await self._cas_map(attrs.evolve(self.map, moving={**self.map.moving, vshard: record}))
        epoch = self.map.epochs.get(source_name, 0)
        while (current := await self._epoch_version(source)) < epoch:
            await source.client.txn(
                [compare_version(source.epoch_key, "EQUAL", current)],
                [put_op(source.epoch_key, b"")],
                idempotent=True,
            )
        source.epoch = epoch
        # 2. Copy the virtual shard's keys.
        copied = 0
        moved_keys: list[tuple[str, bytes]] = []
        for collection in await self.home.list_collections():
            cursor = source.scan(collection, b"", None, None, 200)
            while True:
                page = await cursor.next_chunk()
                if not page:
                    break
                mine = [(k, v) for k, v in page if vshard_of(collection, k) == vshard]
                if mine:
                    await target.write_batch([WriteOp.put(collection, k, v) for k, v in mine])
                    moved_keys.extend((collection, k) for k, _ in mine)
                    copied += len(mine)
        # 3. Switch the map and lift the fence.
        assign = list(self.map.assign)
        assign[vshard] = to
        moving = {v: r for v, r in self.map.moving.items() if v != vshard}
        await self._cas_map(
            attrs.evolve(self.map, assign=tuple(assign), fenced=self.map.fenced - {vshard}, moving=moving)
        )
        # 4. Clean up the source.
        for start in range(0, len(moved_keys), 200):
            batch = moved_keys[start : start + 200]
            await source.write_batch([WriteOp.delete(c, k) for c, k in batch])
        self._log.info(
            "Moved virtual shard {vshard} from shard {source} to {target} ({count} keys)",
            vshard=vshard,
            source=source_name,
            target=to,
            count=copied,
        )
        return {"vshard": vshard, "from": source_name, "to": to, "copied": copied}

    async def resume_interrupted_moves(self, live_leases: set[int]) -> list[dict[str, Any]]:
        """Finish every move whose node lease is not in ``live_leases`` (the node died mid-move),
        and lift a fence that has no move record; what was done, one entry per virtual shard.
        Run by one node at a time (the cluster leader)."""
        await self.load_map()
        done: list[dict[str, Any]] = []
        for vshard in sorted(self.map.fenced - self._moving_here):
            record = self.map.moving.get(vshard)
            if record is None:
                fenced = self.map.fenced - {vshard}
                await self._cas_map(attrs.evolve(self.map, fenced=fenced))
                self._log.warn(
                    "Lifted the fence on virtual shard {vshard}, left by a move with no record; it"
                    " stays on shard {shard}",
                    vshard=vshard,
                    shard=self.map.assign[vshard],
                )
                done.append({"vshard": vshard, "fence_lifted": True})
                continue
            if int(record.get("lease", 0)) in live_leases:
                continue  # its node is alive and (presumably) still copying
            self._log.info(
                "Finishing the move of virtual shard {vshard} to shard {target}, interrupted when node"
                " {node} stopped",
                vshard=vshard,
                target=record.get("to"),
                node=record.get("by") or "(unknown)",
            )
            done.append(await self.move(vshard, str(record["to"])))
        return done


def build_sharded_backend(cluster: Any, reactor: Any) -> ShardedBackend:
    """The clustered store for a ``[cluster]`` section: shard 0 from ``cluster.endpoints``, further
    shards as the shard map names them (no I/O until ``open``)."""
    from amaters.cluster.etcd import EtcdClient

    prefix = cluster.prefix.encode("utf-8")

    def make(name: str, endpoints: list[str]) -> EtcdBackend:
        client = EtcdClient(endpoints, reactor, request_timeout=cluster.request_timeout)
        return EtcdBackend(
            client, reactor, prefix=prefix, shard=name, serializable_reads=cluster.serializable_reads
        )

    home = make("0", list(cluster.endpoints))
    return ShardedBackend(home, reactor, make)


__all__ = ["VSHARDS", "MergedCursor", "ShardMap", "ShardedBackend", "build_sharded_backend", "vshard_of"]
