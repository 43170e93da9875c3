"""Collection creation as a permission, limits.max_collections and filtered listings through the
real server (in-process service tree) over TLS, with API keys and JWTs."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from inprocess import start_auth_server as start_server

from amaters.errors import AmatersError, ErrorCode

pytestmark = pytest.mark.integration

ROLES = """
[roles.tenant_a]
permissions = [
    { resource = "collection:a_*", permission = "create" },
    { resource = "server", permission = "read" },
]
"""


async def _error(d: object) -> AmatersError:
    try:
        await d  # type: ignore[misc]
    except AmatersError as e:
        return e
    raise AssertionError("the request succeeded")


@pytest_twisted.ensureDeferred
async def test_writers_cannot_create_collections_unless_granted(tmp_path: Path) -> None:
    """A 'user' key cannot create a collection by a first SET (nothing is created) but writes to one
    an admin created; a role with create on collection:a_* auto-creates a_x but not b_x; listings
    show each caller only what it may read; past limits.max_collections nobody creates more."""
    (tmp_path / "roles.toml").write_text(ROLES)
    server = await start_server(
        tmp_path, f"auth.roles_file={tmp_path / 'roles.toml'}", "limits.max_collections=6"
    )
    try:
        user = await server.client(api_key=server.api_key)
        admin = await server.client(token=server.token("root", ["admin"]))
        tenant = await server.client(token=server.token("tia", ["tenant_a"]))

        error = await _error(user.set("fresh", b"k", b"v"))
        assert error.code == ErrorCode.AUTH_INSUFFICIENT_PERMISSIONS
        assert "collection:fresh" in error.message and "create permission" in error.message
        assert "fresh" not in await admin.list_collections()

        assert await admin.create_collection("shared") is True
        await user.set("shared", b"k", b"v")
        assert await user.get("shared", b"k") == b"v"

        await tenant.set("a_x", b"k", b"v")
        error = await _error(tenant.set("b_x", b"k", b"v"))
        assert error.code == ErrorCode.AUTH_INSUFFICIENT_PERMISSIONS
        assert await tenant.list_collections() == ["a_x"]
        # c, orders and tmp were created when the server started.
        assert await admin.list_collections() == ["a_x", "c", "orders", "shared", "tmp"]

        await admin.set("third", b"k", b"v")  # admin auto-creates: 6 collections now
        error = await _error(admin.create_collection("fourth"))
        assert error.code == ErrorCode.VALIDATION_SIZE_EXCEEDED and "limits.max_collections" in error.message
        error = await _error(tenant.set("a_y", b"k", b"v"))
        assert error.code == ErrorCode.VALIDATION_SIZE_EXCEEDED
        assert len(await admin.list_collections()) == 6
    finally:
        await server.close()
