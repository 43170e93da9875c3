"""The ops site's probes, driven in memory with treq's StubTreq."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.application import service
from twisted.internet.task import Clock

from amaters.config import default_config
from amaters.web.ops import OpsAPI


class FakeRoot(service.MultiService):
    def __init__(self, state: str = "running") -> None:
        super().__init__()
        self.config = default_config()
        self.state = state
        self.started_at: float | None = 0.0

    @property
    def ready(self) -> bool:
        return self.state == "running"

    @property
    def draining(self) -> bool:
        return self.state == "stopping"


class FakeChild(service.Service):
    def __init__(self, name: str, running: bool = True, **attrs: Any) -> None:
        self.name = name
        self.running = running
        for k, v in attrs.items():
            setattr(self, k, v)


def client(root: FakeRoot, clock: Clock | None = None) -> StubTreq:
    return StubTreq(OpsAPI(root, clock or Clock()).app.resource())


def get(treq: StubTreq, path: str, method: str = "GET") -> tuple[int, Any]:
    d = treq.request(method, "http://ops" + path)
    treq.flush()
    response = d.result  # type: ignore[attr-defined]
    body = treq.content(response)
    treq.flush()
    raw = body.result  # type: ignore[attr-defined]
    return response.code, json.loads(raw) if raw else None


def test_readyz_follows_state() -> None:
    """/readyz is 200 only while running; 503 while starting and while draining."""
    root = FakeRoot("starting")
    treq = client(root)
    assert get(treq, "/readyz") == (503, {"status": "not_ready", "reason": "starting"})
    root.state = "running"
    assert get(treq, "/readyz")[0] == 200
    root.state = "stopping"
    assert get(treq, "/readyz") == (503, {"status": "not_ready", "reason": "draining"})


def test_liveness_probes() -> None:
    treq = client(FakeRoot("starting"))
    for path in ("/healthz", "/livez"):
        assert get(treq, path) == (200, {"status": "alive"})


def test_health_reports_components() -> None:
    """/health lists components; an unhealthy one makes the whole 503."""
    root = FakeRoot()
    clock = Clock()
    clock.advance(12.5)
    storage = FakeChild("storage", is_open=True)
    storage.setServiceParent(root)
    treq = client(root, clock)
    code, body = get(treq, "/health")
    assert code == 200
    assert body["status"] == "healthy"
    assert body["uptime_seconds"] == 12.5
    assert body["components"]["storage"] == {"status": "healthy", "message": "running"}
    storage.is_open = False  # type: ignore[attr-defined]
    code, body = get(treq, "/health")
    assert code == 503
    assert body["components"]["storage"]["status"] == "unhealthy"


def test_unknown_path_and_wrong_method_are_json() -> None:
    treq = client(FakeRoot())
    assert get(treq, "/nope") == (404, {"error": "not_found", "status": 404})
    assert get(treq, "/readyz", "POST") == (405, {"error": "method_not_allowed", "status": 405})
