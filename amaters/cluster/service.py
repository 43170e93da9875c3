"""A node's membership in the cluster: registration under a lease, leader election, singleton duties.

Every ``lease_ttl / 3`` seconds the node:

1. keeps its lease alive (granting a new one and registering again if it expired): its registry
   entry ``P n/<node_name>`` (name, advertised address, version) is bound to the lease, so a node
   that dies disappears from ``amaters cluster nodes`` within ``lease_ttl`` seconds;
2. campaigns for ``P e/leader`` with one transaction (create the key bound to its lease if nobody
   holds it) — etcd's lease + compare-and-swap election; the key vanishes with its holder's lease,
   so leadership moves within ``lease_ttl`` seconds of the leader's death;
3. if it is the leader: finishes any virtual-shard move whose node died mid-way (its lease is no
   longer among the registered nodes'; see :mod:`amaters.storage.sharded`), and when a duty is due
   runs the singleton duties: deleting orphaned value chunks and compacting etcd's history (keeping
   the revisions of the last ``duty_interval``);
4. refreshes its view of every shard's etcd members (which is leader, database size) and of the
   shard map, which ``/health`` and ``amaters cluster shards`` show.

``/readyz`` reports not ready when the last lease keep-alive that reached a quorum is older than the
lease TTL.  The loop never overlaps itself and never dies: a failed tick is logged and the next one
runs.  No I/O happens in the constructor.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from amaters import __version__
from amaters.cluster.etcd import (
    EtcdClient,
    EtcdError,
    compare_version,
    kv_of,
    prefix_end,
    put_op,
    range_op,
)


def advertised_address(listen: str, advertise: str) -> str:
    """``advertise`` or, when empty, host:port taken from a ``tcp:PORT:interface=HOST`` listener."""
    if advertise:
        return advertise
    parts = listen.split(":")
    port = next((p for p in parts[1:] if p.isdigit()), "7878")
    host = "127.0.0.1"
    for part in parts:
        if part.startswith("interface="):
            host = part.split("=", 1)[1] or host
    return f"{host}:{port}"


class ClusterService(Service):
    """Registration, election and duties of one node (see the module docstring).

    ``backend`` is the node's etcd backend (its ``clean_orphans`` is a duty).
    """

    name = "cluster"
    _log = Logger()

    def __init__(
        self,
        client: EtcdClient,
        cluster_config: Any,
        reactor: Any,
        *,
        node_name: str,
        advertise: str,
        backend: Any = None,
        duty_interval: float = 60.0,
    ) -> None:
        self.client = client
        self.config = cluster_config
        self.reactor = reactor
        self.node_name = node_name
        self.advertise = advertise
        self.backend = backend
        self.duty_interval = duty_interval
        self.prefix = cluster_config.prefix.encode("utf-8")
        self.lease = 0
        self.leader: str | None = None
        self.last_quorum = -1e18
        self.members: list[dict[str, Any]] = []
        self.shard_members: dict[str, list[dict[str, Any]]] = {"0": []}
        self.nodes: list[dict[str, Any]] = []
        #: The leader as of the reading that gave :attr:`nodes` (what ``/health`` shows with them).
        self.nodes_leader: str | None = None
        self.duties_run = 0
        self._next_duty = 0.0
        self._compact_to = 0
        self._loop: task.LoopingCall | None = None
        self._resuming: defer.Deferred[None] | None = None
        self._loop_done: defer.Deferred[Any] | None = None

    @property
    def interval(self) -> float:
        return max(0.5, self.config.lease_ttl / 3)

    @property
    def is_leader(self) -> bool:
        return self.leader == self.node_name

    def _node_key(self, name: str) -> bytes:
        return self.prefix + b"n/" + name.encode("utf-8")

    @property
    def _leader_key(self) -> bytes:
        return self.prefix + b"e/leader"

    # -- lifecycle ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._next_duty = self.reactor.seconds() + self.duty_interval
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop_done = self._loop.start(self.interval, now=True)
        self._loop_done.addErrback(lambda f: self._log.failure("The cluster loop stopped", f))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._loop_done is not None:
            await self._loop_done
        lease, self.lease = self.lease, 0
        if lease:
            try:
                # Leaving at once: the registry entry and any leadership go with the lease.
                await self.client.lease_revoke(lease)
            except EtcdError:
                self._log.info("Could not revoke the node lease; it expires by itself")
        await self.client.close()

    # -- the loop -------------------------------------------------------------------------------

    def _tick(self) -> defer.Deferred[None]:
        d = defer.Deferred.fromCoroutine(self.tick())
        d.addErrback(lambda f: self._log.failure("Cluster upkeep failed; retrying next tick", f))
        return d

    async def tick(self) -> None:
        """One round of upkeep (see the module docstring)."""
        try:
            await self._keep_registered()
            await self._campaign()
        except EtcdError as e:
            self._log.warn("Cannot reach an etcd quorum: {error}", error=e.message)
            return
        fenced = getattr(getattr(self.backend, "map", None), "fenced", None)
        if self.is_leader and fenced and self._resuming is None:
            # In the background: a move takes a while, and the loop must keep the lease alive.
            self._resuming = defer.Deferred.fromCoroutine(self._resume_moves())
            self._resuming.addBoth(self._resumed)
        if self.is_leader and self.reactor.seconds() >= self._next_duty:
            self._next_duty = self.reactor.seconds() + self.duty_interval
            await self.run_duties()
        await self._refresh_view()

    async def _keep_registered(self) -> None:
        if self.lease:
            ttl = await self.client.lease_keepalive(self.lease)
            if ttl > 0:
                self.last_quorum = self.reactor.seconds()
                return
            self._log.warn("The node lease expired; registering again")
            self.lease = 0
        self.lease = await self.client.lease_grant(self.config.lease_ttl)
        if self.backend is not None and hasattr(self.backend, "mover"):
            self.backend.mover = {"by": self.node_name, "lease": self.lease}
        entry = {
            "name": self.node_name,
            "advertise": self.advertise,
            "version": __version__,
            "registered_at": self.reactor.seconds(),
        }
        await self.client.txn(
            [], [put_op(self._node_key(self.node_name), json.dumps(entry).encode(), lease=self.lease)]
        )
        self.last_quorum = self.reactor.seconds()
        self._log.info("Registered node {node} as {address}", node=self.node_name, address=self.advertise)

    async def _campaign(self) -> None:
        key = self._leader_key
        answer = await self.client.txn(
            [compare_version(key, "EQUAL", 0)],
            [put_op(key, self.node_name.encode("utf-8"), lease=self.lease)],
            [range_op(key)],
            idempotent=True,
        )
        previous = self.leader
        if answer.get("succeeded"):
            self.leader = self.node_name
        else:
            kvs = answer["responses"][0]["response_range"].get("kvs") or []
            self.leader = kv_of(kvs[0])[1].decode("utf-8") if kvs else None
        if self.leader != previous:
            self._log.info("Cluster leader is now {leader}", leader=self.leader)

    async def _resume_moves(self) -> None:
        base = self.prefix + b"n/"
        try:
            answer = await self.client.range(base, prefix_end(base))
            live = {int(item.get("lease", 0)) for item in answer.get("kvs", [])}
            await self.backend.resume_interrupted_moves(live - {0})
        except Exception:
            self._log.failure("Finishing an interrupted virtual-shard move failed; retrying next tick")

    def _resumed(self, result: object) -> None:
        self._resuming = None

    async def run_duties(self) -> None:
        """The leader's singleton duties: orphaned chunks, then history compaction."""
        self.duties_run += 1
        if self.backend is not None and hasattr(self.backend, "clean_orphans"):
            try:
                removed = await self.backend.clean_orphans()
                if removed:
                    self._log.info("Deleted {count} orphaned value chunk groups", count=removed)
            except Exception:
                self._log.failure("Orphaned chunk cleanup failed")
        # Compact to the revision seen one duty interval ago: cursors younger than that keep working.
        target, self._compact_to = self._compact_to, self.client.revision
        if target:
            try:
                await self.client.call("/v3/kv/compaction", {"revision": str(target)}, idempotent=True)
            except EtcdError as e:
                if "compacted" not in e.message:
                    self._log.warn("etcd compaction failed: {error}", error=e.message)

    async def _refresh_view(self) -> None:
        base = self.prefix + b"n/"
        try:
            answer = await self.client.range(base, prefix_end(base))
        except EtcdError:
            return
        nodes = []
        for item in answer.get("kvs", []):
            try:
                entry = json.loads(kv_of(item)[1])
            except ValueError:
                continue
            entry["leader"] = entry.get("name") == self.leader
            nodes.append(entry)
        # Published together: a campaign that moved the leadership earlier in this tick must not
        # show the new leader beside the node list read before (the dead leader still in it).
        self.nodes, self.nodes_leader = nodes, self.leader
        clients = {"0": self.client}
        if self.backend is not None and hasattr(self.backend, "shard_clients"):
            clients = {**self.backend.shard_clients(), "0": self.client}
        self.shard_members = {name: await self._members(client) for name, client in sorted(clients.items())}
        self.members = self.shard_members["0"]

    async def _members(self, client: EtcdClient) -> list[dict[str, Any]]:
        members = []
        for endpoint in client.endpoints:
            try:
                status = await client.status(endpoint)
            except Exception:
                members.append({"endpoint": endpoint, "reachable": False})
                continue
            header = status.get("header", {})
            members.append(
                {
                    "endpoint": endpoint,
                    "reachable": True,
                    "id": header.get("member_id"),
                    "leader": status.get("leader") == header.get("member_id"),
                    "raft_term": int(header.get("raft_term", 0)),
                    "db_size": int(status.get("dbSize", 0)),
                    "version": status.get("version"),
                }
            )
        return members

    # -- probes ---------------------------------------------------------------------------------

    def quorum_ok(self) -> bool:
        """Whether a lease keep-alive reached an etcd quorum within the last lease TTL."""
        return self.reactor.seconds() - self.last_quorum <= self.config.lease_ttl

    def health(self) -> dict[str, Any]:
        """The cluster as this node last saw it: shards with their members and leader, nodes.

        ``leader_node`` and ``nodes`` come from the same tick's reading, so they always agree.
        """
        view = self.backend.view() if self.backend is not None and hasattr(self.backend, "view") else {}
        shards = []
        for name, members in sorted(self.shard_members.items()):
            leader = next((m["endpoint"] for m in members if m.get("leader")), None)
            reachable = sum(1 for m in members if m.get("reachable"))
            shards.append(
                {
                    "name": name,
                    "members": members,
                    "leader": leader,
                    "healthy": leader is not None and reachable * 2 > len(members),
                    "vshards": view.get("shards", {}).get(name, {}).get("vshards", []),
                }
            )
        return {
            "node": self.node_name,
            "leader_node": self.nodes_leader,
            "quorum": self.quorum_ok(),
            "vshards": view.get("vshards"),
            "fenced": view.get("fenced", []),
            "shards": shards,
            "nodes": self.nodes,
        }


def build_cluster_service(config: Any, reactor: Any, backend: Any) -> ClusterService:
    """The node's ClusterService for a clustered ``config`` (no I/O until it starts).

    ``backend`` is the etcd backend itself (unwrapped).  The node name defaults to ``<host name>-<advertised port>``, so two nodes on one machine differ.
    """
    import socket

    cluster = config.cluster
    advertise = advertised_address(config.server.listen, cluster.advertise)
    name = cluster.node_name or f"{socket.gethostname()}-{advertise.rpartition(':')[2]}"
    client = EtcdClient(cluster.endpoints, reactor, request_timeout=cluster.request_timeout)
    return ClusterService(client, cluster, reactor, node_name=name, advertise=advertise, backend=backend)
