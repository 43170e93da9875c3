"""The admin API on the ops site, over real HTTP against an in-process server with auth on."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.web.client import HTTPConnectionPool

from amaters.auth.apikeys import generate_api_key, hash_api_key
from amaters.client import connect
from amaters.config import Sources, load_config
from amaters.errors import AmatersError, ErrorCode
from amaters.tap import build_service

pytestmark = pytest.mark.integration

JWT_SECRET = "admin-api-test-secret-0123456789abcdef"
PEPPER = "admin-api-pepper-0123456789"


@attrs.define
class Admin:
    root: Any
    base: str
    port: int
    admin_key: str
    user_key: str
    directory: Path
    pool: HTTPConnectionPool

    def token(self, roles: list[str]) -> str:
        claims = {"sub": "op", "roles": roles, "exp": int(time.time()) + 300}
        return jwt.encode(claims, JWT_SECRET, algorithm="HS256")

    async def call(self, method: str, path: str, auth: str | None = None) -> tuple[int, Any]:
        headers = {b"authorization": [auth.encode()]} if auth else {}
        response = await treq.request(method, self.base + path, headers=headers, pool=self.pool)
        body = await response.content()
        return response.code, json.loads(body)

    def audit(self) -> list[dict[str, Any]]:
        self.root.components.audit.flush()
        path = self.directory / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest_twisted.async_yield_fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    admin_id, admin_key = generate_api_key("ops")
    user_id, user_key = generate_api_key("app")
    (tmp_path / "keys.toml").write_text(
        f'[[keys]]\nid = "{admin_id}"\nname = "ops"\nkey_hash = "{hash_api_key(PEPPER.encode(), admin_key)}"\n'
        'roles = ["admin"]\n'
        f'[[keys]]\nid = "{user_id}"\nname = "app"\nkey_hash = "{hash_api_key(PEPPER.encode(), user_key)}"\n'
        'roles = ["user"]\n'
    )
    overrides = (
        "server.listen=tcp:0:interface=127.0.0.1",
        "web.listen=tcp:0:interface=127.0.0.1",
        "storage.backend=rocksdb",
        "storage.sync=none",
        f"server.data_dir={tmp_path / 'data'}",
        "grpc.listen=tcp:0:interface=127.0.0.1",
        "auth.enabled=true",
        f"auth.jwt.secret={JWT_SECRET}",
        f"auth.api_keys_file={tmp_path / 'keys.toml'}",
        f"auth.api_key_pepper={PEPPER}",
        "audit.enabled=true",
        f"audit.path={tmp_path / 'audit.log'}",
        "snapshot.compression=none",
    )
    config = load_config(None, overrides, {})
    # The same sources the server started from: a reload reads them again.
    root = build_service(config, reactor, Sources(None, overrides, None))
    await root.startService()
    web_port = root.getServiceNamed("web").port.getHost().port
    port = root.getServiceNamed("listener").port.getHost().port
    pool = HTTPConnectionPool(reactor, persistent=True)
    try:
        yield Admin(root, f"http://127.0.0.1:{web_port}/admin", port, admin_key, user_key, tmp_path, pool)
    finally:
        await pool.closeCachedConnections()
        await task.deferLater(reactor, 0.1, lambda: None)  # the server side sees the close
        await root.stopService()


@pytest_twisted.ensureDeferred
async def test_admin_routes_need_an_admin(admin: Admin) -> None:
    """No credentials: 401; a user's key: 403 (audited as denied); bad scheme: 401; JSON bodies."""
    code, body = await admin.call("GET", "/status")
    assert code == 401 and body["error"] == "auth_failed"
    code, body = await admin.call("GET", "/status", f"ApiKey {admin.user_key}")
    assert code == 403 and body["error"] == "auth_insufficient_permissions"
    code, _ = await admin.call("GET", "/status", "Basic dXNlcjpwdw==")
    assert code == 401
    code, _ = await admin.call("GET", "/status", f"Bearer {admin.token(['reader'])}")
    assert code == 403
    denied = [e for e in admin.audit() if e["event_type"] == "admin" and e["result"] == "denied"]
    assert denied and denied[-1]["action"] == "admin status"
    assert admin.user_key not in json.dumps(admin.audit())


@pytest_twisted.ensureDeferred
async def test_admin_operations(admin: Admin) -> None:
    """An admin (API key or JWT) reads status, collections and stats, compacts, reloads and takes
    and lists snapshots; each call is audited."""
    client = await connect(
        reactor,
        "127.0.0.1",
        admin.port,
        ca_cert=str(admin.directory / "data/tls/ca.pem"),
        api_key=admin.admin_key,
    )
    try:
        for i in range(20):
            await client.set("orders", b"k%02d" % i, b"v")
    finally:
        await client.close()
    key = f"ApiKey {admin.admin_key}"
    code, status = await admin.call("GET", "/status", key)
    assert code == 200 and status["ready"] and status["backend"] == "rocksdb"
    code, collections = await admin.call("GET", "/collections", f"Bearer {admin.token(['admin'])}")
    assert code == 200 and collections["collections"][0]["name"] == "orders"
    code, stats = await admin.call("GET", "/stats", key)
    assert code == 200 and stats["backend"] == "rocksdb"
    code, compacted = await admin.call("POST", "/compact", key)
    assert code == 200 and compacted["compacted"] is True
    code, reloaded = await admin.call("POST", "/reload", key)
    assert code == 200 and reloaded["ok"] is True, reloaded
    code, created = await admin.call("POST", "/snapshots", key)
    assert code == 200 and created["keys"] == 20, created
    assert created["collections"] == {"orders": 20}, created
    code, listed = await admin.call("GET", "/snapshots", key)
    assert code == 200 and [s["name"] for s in listed["snapshots"]] == [created["name"]]
    code, missing = await admin.call("GET", "/nothing-here", key)
    assert code == 404 and missing["error"] == "not_found"
    actions = {e["action"] for e in admin.audit() if e["event_type"] == "admin" and e["result"] == "success"}
    assert {"admin status", "admin compact", "admin reload", "admin snapshot create"} <= actions
    reloads = [e for e in admin.audit() if e["event_type"] == "config_change"]
    assert reloads and reloads[-1]["principal"].startswith("ops")


def requests_counted(admin: Admin, op: str, status: str) -> float:
    """``amaters_requests_total{op, status}`` as the ops site's /metrics would show it."""
    text = admin.root.components.metrics.exposition()[0].decode()
    found = re.search(
        rf'^amaters_requests_total\{{op="{re.escape(op)}",status="{status}"\}} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


@pytest_twisted.ensureDeferred
async def test_admin_operations_pass_the_same_stages_as_protocol_requests(admin: Admin) -> None:
    """A reader's compact and snapshot are refused by the pipeline's RBAC stage (403 here,
    AUTH_INSUFFICIENT_PERMISSIONS on the native protocol), audited by the same stages and counted by
    the same request metrics as a protocol request; nothing is compacted or written."""
    reader = f"Bearer {admin.token(['reader'])}"
    for method, path, op in (
        ("POST", "/compact", "admin compact"),
        ("POST", "/snapshots", "admin snapshot create"),
    ):
        before = requests_counted(admin, op, "error")
        code, body = await admin.call(method, path, reader)
        assert code == 403 and body["error"] == "auth_insufficient_permissions", body
        assert "needs admin permission" in body["message"] and "server" in body["message"]
        assert requests_counted(admin, op, "error") == before + 1
        denied = [e for e in admin.audit() if e["result"] == "denied" and e["action"] == op]
        assert denied and denied[-1]["event_type"] == "admin" and denied[-1]["resource"] == "server"
    assert not list((admin.directory / "data" / "snapshots").glob("amaters-*"))

    # The same principal over the native protocol: the same stage refuses the same way.
    client = await connect(
        reactor,
        "127.0.0.1",
        admin.port,
        ca_cert=str(admin.directory / "data/tls/ca.pem"),
        token=admin.token(["reader"]),
    )
    try:
        with pytest.raises(AmatersError) as caught:
            await client.create_collection("fresh")
        assert caught.value.code == ErrorCode.AUTH_INSUFFICIENT_PERMISSIONS
    finally:
        await client.close()
    assert requests_counted(admin, "create_collection", "error") == 1
    denied = [e for e in admin.audit() if e["result"] == "denied" and e["action"] == "create_collection"]
    assert denied

    # An admin's compact is counted as a success by the same metric.
    code, _ = await admin.call("POST", "/compact", f"ApiKey {admin.admin_key}")
    assert code == 200
    assert requests_counted(admin, "admin compact", "ok") == 1


async def _raw_http(base: str, head: bytes, timeout: float = 10.0) -> bytes:
    """Send ``head`` on a raw non-blocking socket (the server runs on this reactor) and collect the
    answer until the server closes the connection."""
    import socket
    from urllib.parse import urlsplit

    port = urlsplit(base).port
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setblocking(False)
    s.sendall(head)
    answer = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                await task.deferLater(reactor, 0.02, lambda: None)
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    finally:
        s.close()
    return answer


@pytest_twisted.ensureDeferred
async def test_requests_without_credentials_are_refused_before_their_body(admin: Admin) -> None:
    """With auth on, an admin POST announcing a body but carrying no credentials gets 401 without
    the server waiting for the body; one announcing 512 MB gets 413, credentials or not."""
    answer = await _raw_http(
        admin.base, b"POST /admin/compact HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
    head = (
        b"POST /admin/compact HTTP/1.1\r\nHost: x\r\nAuthorization: ApiKey "
        + admin.admin_key.encode()
        + b"\r\nContent-Length: 536870912\r\n\r\n"
    )
    answer = await _raw_http(admin.base, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]


@pytest_twisted.ensureDeferred
async def test_console_routes(admin: Admin) -> None:
    """The routes the operator console reads: configuration (secrets redacted) with what a reload
    would change, the audit tail, data dir and certificates, snapshot verification; each needs
    admin (a reader gets 403) and bad input gets a one-line 4xx."""
    key = f"ApiKey {admin.admin_key}"
    reader = f"Bearer {admin.token(['reader'])}"
    for method, path in (
        ("GET", "/config"),
        ("GET", "/audit"),
        ("GET", "/resources"),
        ("POST", "/snapshots/amaters-20260101T000000Z.tar/verify"),
    ):
        code, body = await admin.call(method, path, reader)
        assert code == 403 and body["error"] == "auth_insufficient_permissions", (path, body)

    code, config = await admin.call("GET", "/config", key)
    assert code == 200
    text = json.dumps(config)
    assert JWT_SECRET not in text and PEPPER not in text
    assert config["config"]["auth"]["jwt"]["secret"] == "<redacted>"
    assert config["reload_preview"] == {"ok": True, "reloadable": [], "need_restart": [], "errors": []}

    code, resources = await admin.call("GET", "/resources", key)
    assert code == 200 and resources["data_dir"]["bytes"] > 0 and resources["data_dir"]["files"] > 0
    assert resources["data_dir"]["filesystem_free_bytes"] > 0
    (cert,) = resources["tls"]["certificates"]
    assert cert["use"] == "native protocol" and cert["issuer"] == "CN=amaters private CA"
    assert cert["not_after_epoch"] > time.time()

    code, tail = await admin.call("GET", "/audit?limit=5", key)
    assert code == 200 and tail["enabled"] is True and 1 <= len(tail["events"]) <= 5
    # The newest event besides the audit call's own login: the resources call just before it.
    assert [e for e in tail["events"] if e["action"] != "login"][-1]["action"] == "admin resources"
    code, bad = await admin.call("GET", "/audit?limit=0", key)
    assert code == 400 and "limit" in bad["message"]

    code, created = await admin.call("POST", "/snapshots", key)
    assert code == 200
    code, verified = await admin.call("POST", f"/snapshots/{created['name']}/verify", key)
    assert code == 200 and verified["ok"] is True and verified["manifest"]["files"], verified
    archive = admin.directory / "data" / "snapshots" / created["name"]
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    code, damaged = await admin.call("POST", f"/snapshots/{created['name']}/verify", key)
    assert code == 200 and damaged["ok"] is False and damaged["error"], damaged
    code, missing = await admin.call("POST", "/snapshots/amaters-20200101T000000.000Z.tar/verify", key)
    assert code == 404, missing
    code, invalid = await admin.call("POST", "/snapshots/passwd/verify", key)
    assert code == 400 and "not a snapshot archive name" in invalid["message"], invalid
