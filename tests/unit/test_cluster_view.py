"""What /health shows of the cluster's nodes: the leader and the node list from the same reading.

A campaign that moves the leadership runs before the tick reads the node list again; until that
reading, /health keeps showing the previous leader with the previous list, never the new leader
beside a list that still holds the dead one."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from amaters.cluster.service import ClusterService
from amaters.config import ClusterConfig


def kv(key: bytes, value: bytes) -> dict[str, Any]:
    return {"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode()}


class FakeEtcd:
    """The election key held by ``holder``; the registry holding ``registered``."""

    endpoints: list[str] = []

    def __init__(self, holder: str, registered: list[str]) -> None:
        self.holder = holder
        self.registered = registered

    async def txn(self, compare: Any, success: Any, failure: Any = (), idempotent: bool = False) -> Any:
        kvs = [kv(b"amaters/e/leader", self.holder.encode())]
        return {"succeeded": False, "responses": [{"response_range": {"kvs": kvs}}]}

    async def range(self, start: bytes, end: bytes) -> Any:
        entries = [json.dumps({"name": name}).encode() for name in self.registered]
        return {"kvs": [kv(b"amaters/n/" + e, e) for e in entries]}


def node(etcd: FakeEtcd) -> ClusterService:
    config = ClusterConfig(endpoints=["http://127.0.0.1:2379"])
    return ClusterService(etcd, config, Clock(), node_name="a", advertise="127.0.0.1:7878")  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_health_shows_the_leader_with_the_node_list_of_the_same_reading() -> None:
    etcd = FakeEtcd(holder="b", registered=["a", "b"])
    cluster = node(etcd)
    await cluster._campaign()
    await cluster._refresh_view()
    health = cluster.health()
    assert health["leader_node"] == "b"
    assert [n["name"] for n in health["nodes"]] == ["a", "b"]
    assert [n["leader"] for n in health["nodes"]] == [False, True]

    # b dies: its lease takes the election key and its registration with it; a wins the campaign.
    etcd.holder, etcd.registered = "a", ["a"]
    await cluster._campaign()
    assert cluster.is_leader
    health = cluster.health()  # between the campaign and the next reading of the node list
    assert health["leader_node"] == "b" and [n["name"] for n in health["nodes"]] == ["a", "b"]
    await cluster._refresh_view()
    health = cluster.health()
    assert health["leader_node"] == "a"
    assert [(n["name"], n["leader"]) for n in health["nodes"]] == [("a", True)]
