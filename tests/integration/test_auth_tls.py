"""Authentication, RBAC and audit over the real listener: real TLS, the real client, loopback.

Each test starts the whole service tree in-process (``amaters.tap.build_service``) with auth
enabled: JWT (HS256), API keys, and client certificates (``tls.client_auth = optional``) from a
test CA; audit on.  Every test ends with both sides of every connection closed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
import pytest_twisted
from inprocess import JWT_SECRET, PEPPER, InProcessServer
from inprocess import start_auth_server as start_server

from amaters.client import BatchOp
from amaters.errors import (
    AuthError,
    AuthExpired,
    ErrorCode,
    NetworkError,
    PermissionDenied,
)

pytestmark = pytest.mark.integration

AuthServer = InProcessServer


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[AuthServer]:
    s = await start_server(tmp_path)
    try:
        yield s
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_reader_can_get_but_not_set(server: AuthServer) -> None:
    """A reader's GET works; its SET gets AUTH_INSUFFICIENT_PERMISSIONS naming the operation and
    collection; the denial is in the audit log; the connection stays usable."""
    writer = await server.client(token=server.token("ulla", ["user"]))
    await writer.set("orders", b"o1", b"ciphertext")
    reader = await server.client(token=server.token("rita", ["reader"]))
    assert reader.handshake.roles == ("reader",)
    assert await reader.get("orders", b"o1") == b"ciphertext"
    with pytest.raises(PermissionDenied) as caught:
        await reader.set("orders", b"o1", b"overwrite")
    assert caught.value.code == ErrorCode.AUTH_INSUFFICIENT_PERMISSIONS
    assert "set" in caught.value.message and "collection:orders" in caught.value.message
    assert await reader.get("orders", b"o1") == b"ciphertext"
    denials = [line for line in server.audit_lines() if line["result"] == "denied"]
    assert len(denials) == 1
    assert denials[0]["principal"] == "rita" and denials[0]["action"] == "set"
    assert denials[0]["resource"] == "collection:orders" and denials[0]["auth_method"] == "jwt"
    assert denials[0]["source"].startswith("127.0.0.1:")


@pytest_twisted.ensureDeferred
async def test_user_cannot_drop_a_collection_but_admin_can(server: AuthServer) -> None:
    """Dropping a collection needs admin: a user is refused (and audited), an admin succeeds (audited)."""
    user = await server.client(token=server.token("ulla", ["user"]))
    await user.set("tmp", b"k", b"v")
    with pytest.raises(PermissionDenied, match="drop_collection"):
        await user.drop_collection("tmp")
    admin = await server.client(token=server.token("ada", ["admin"]))
    assert await admin.drop_collection("tmp") is True
    lines = server.audit_lines()
    denied = [(x["principal"], x["action"]) for x in lines if x["result"] == "denied"]
    assert denied == [("ulla", "drop_collection")]
    admin_ops = [(x["principal"], x["action"], x["result"]) for x in lines if x["event_type"] == "admin"]
    assert admin_ops == [("ada", "drop_collection", "success")]


@pytest_twisted.ensureDeferred
async def test_anonymous_client_is_refused(server: AuthServer) -> None:
    """With auth enabled a client with no token, key or certificate is refused with AUTH_FAILED."""
    error = await server.refused()
    assert error.code == ErrorCode.AUTH_FAILED
    assert "authentication required" in error.message
    failures = [x for x in server.audit_lines() if x["event_type"] == "authentication"]
    assert failures and failures[-1]["result"] == "failure"


@pytest_twisted.ensureDeferred
async def test_every_denial_is_audited_without_keys_or_values(server: AuthServer) -> None:
    """Three denied requests give three audit lines; no key, value or token appears in the log."""
    token = server.token("rita", ["reader"])
    reader = await server.client(token=token)
    for op in (
        reader.set("c", b"secret-key-1", b"secret-value-1"),
        reader.delete("c", b"secret-key-2"),
        reader.batch([BatchOp.set("c", b"secret-key-3", b"secret-value-3")]),
    ):
        with pytest.raises(PermissionDenied):
            await op
    with pytest.raises(PermissionDenied):
        await reader.create_collection("newone")
    lines = server.audit_lines()
    assert [x["action"] for x in lines if x["result"] == "denied"] == [
        "set",
        "delete",
        "batch (set)",
        "create_collection",
    ]
    text = server.audit_path.read_text()
    for secret in ("secret-key", "secret-value", token, JWT_SECRET, PEPPER):
        assert secret not in text


@pytest_twisted.ensureDeferred
async def test_mtls_only_login_with_a_client_certificate(server: AuthServer) -> None:
    """A client presenting only a certificate logs in as its CN with mapped roles; no certificate
    and no credentials is refused; a certificate of a disallowed organization is refused."""
    carol = await server.client(**server.cert("carol"))
    assert carol.handshake.principal == "carol"
    assert set(carol.handshake.roles) == {"user", "reader"}
    await carol.set("c", b"k", b"v")
    dave = await server.client(**server.cert("dave"))
    assert dave.handshake.roles == ("reader",)
    assert await dave.get("c", b"k") == b"v"
    with pytest.raises(PermissionDenied):
        await dave.set("c", b"k", b"w")
    error = await server.refused(**server.cert("eve"))
    assert error.code == ErrorCode.AUTH_INVALID_CERTIFICATE and "organization" in error.message
    logins = [
        x for x in server.audit_lines() if x["event_type"] == "authentication" and x["result"] == "success"
    ]
    assert {(x["principal"], x["auth_method"]) for x in logins} == {("carol", "mtls"), ("dave", "mtls")}


@pytest_twisted.ensureDeferred
async def test_untrusted_and_expired_certificates_fail_the_tls_handshake(server: AuthServer) -> None:
    """OpenSSL refuses certificates from another CA and expired ones before any frame is read."""
    for name in ("mallory", "expired"):
        with pytest.raises(NetworkError):
            await server.client(**server.cert(name))
    await server.settle()


@pytest_twisted.ensureDeferred
async def test_jwt_and_api_key_logins(server: AuthServer) -> None:
    """A valid JWT and a valid API key log in with their roles; an expired token gets AUTH_EXPIRED,
    a wrong key AUTH_FAILED; disconnecting logs every session out."""
    by_token = await server.client(token=server.token("ada", ["admin"], name="Ada L."))
    assert by_token.handshake.principal == "Ada L."
    by_key = await server.client(api_key=server.api_key)
    assert by_key.handshake.principal == "service"
    assert by_key.handshake.roles == ("user",)
    await by_key.set("c", b"k", b"v")
    assert await by_token.get("c", b"k") == b"v"
    expired = await server.refused(token=server.token("ada", ["admin"], exp=int(time.time()) - 3600))
    assert isinstance(expired, AuthExpired)
    wrong = await server.refused(api_key=server.api_key[:-2] + "xx")
    assert wrong.code == ErrorCode.AUTH_FAILED and wrong.message == "invalid API key"
    forged = jwt.encode({"sub": "x", "roles": ["admin"], "exp": int(time.time()) + 60}, "not-the-secret" * 4)
    assert (await server.refused(token=forged)).code == ErrorCode.AUTH_FAILED
    assert server.root.components.auth.realm.session_count == 2
    await by_token.close()
    await by_key.close()
    await server.settle()
    assert server.root.components.auth.realm.session_count == 0


@pytest_twisted.ensureDeferred
async def test_brute_force_is_throttled(tmp_path: Path) -> None:
    """After auth.max_failures_per_minute failures from an address, even a valid key is refused with
    a retryable AUTH_FAILED carrying retry_after, and the throttling is audited."""
    server = await start_server(tmp_path, "auth.max_failures_per_minute=3")
    try:
        for attempt in range(3):
            error = await server.refused(api_key=f"svc.guess-{attempt}")
            assert error.code == ErrorCode.AUTH_FAILED and not error.retryable
        error = await server.refused(api_key=server.api_key)
        assert isinstance(error, AuthError) and error.code == ErrorCode.AUTH_FAILED
        assert error.retryable and error.retry_after_ms is not None
        assert 0 < error.retry_after_ms <= 60_000
        violations = [x for x in server.audit_lines() if x["event_type"] == "security_violation"]
        assert violations and violations[-1]["result"] == "denied"
    finally:
        await server.close()
