"""The one in-process server harness: the whole service tree built by the composition root, started
on the test's reactor with real TLS on loopback port 0, and real clients.

:func:`start_server` runs a server on the memory backend with auth off; :func:`start_auth_server`
adds JWT (HS256), API keys and client certificates (``tls.client_auth = optional``) from a test CA,
with the audit log on.  :meth:`InProcessServer.close` closes every client, waits until the server
has seen each connection go, then stops the tree, so no test leaves the reactor dirty.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor, task

from amaters.auth.apikeys import generate_api_key, hash_api_key
from amaters.client import AmatersClient, connect
from amaters.compose import build_service
from amaters.config import Config, load_config
from amaters.errors import AmatersError
from amaters.tls.certs import generate_ca, issue_certificate

JWT_SECRET = "integration-test-secret-0123456789abcdef"
PEPPER = "integration-pepper-0123456789"

#: Settings every in-process server gets: loopback ports chosen by the OS, no ops site.
BASE_SETTINGS = (
    "server.listen=tcp:0:interface=127.0.0.1",
    "web.enabled=false",
    "storage.backend=memory",
    "grpc.listen=tcp:0:interface=127.0.0.1",
    "server.shutdown_timeout=10",
)


@attrs.define
class InProcessServer:
    root: Any
    port: int
    ca: str | None
    directory: Path
    api_key: str = ""
    clients: list[AmatersClient] = attrs.Factory(list)

    @property
    def listener(self) -> Any:
        return self.root.getServiceNamed("listener")

    @property
    def audit_path(self) -> Path:
        return self.directory / "audit.log"

    def token(self, subject: str, roles: list[str], **claims: Any) -> str:
        body = {"sub": subject, "roles": roles, "exp": int(time.time()) + 300, **claims}
        return jwt.encode(body, JWT_SECRET, algorithm="HS256")

    def cert(self, name: str) -> dict[str, str]:
        return {
            "client_cert": str(self.directory / f"{name}.pem"),
            "client_key": str(self.directory / f"{name}.key"),
        }

    async def client(self, **kwargs: Any) -> AmatersClient:
        options: dict[str, Any] = {"ca_cert": self.ca, "plaintext": self.ca is None, "timeout": 30}
        options.update(kwargs)
        client = await connect(reactor, "127.0.0.1", self.port, **options)
        self.clients.append(client)
        return client

    async def refused(self, **kwargs: Any) -> AmatersError:
        """Connect expecting the handshake to be refused; return the error."""
        try:
            client = await self.client(**kwargs)
        except AmatersError as e:
            return e
        raise AssertionError(f"the server accepted {client!r}")

    def audit_lines(self) -> list[dict[str, Any]]:
        self.root.components.audit.flush()
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    async def settle(self) -> None:
        """Wait until the server has seen every closed connection go (both sides closed)."""
        for _ in range(250):
            open_clients = [c for c in self.clients if not c.closed]
            if len(self.listener.factory.connections) <= len(open_clients):
                return
            await task.deferLater(reactor, 0.02, lambda: None)
        raise AssertionError("server connections did not close")

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        if self.root.running:
            await self.settle()
            await self.root.stopService()


async def _start(config: Config, directory: Path, api_key: str = "") -> InProcessServer:
    root = build_service(config, reactor)
    await root.startService()
    port = root.getServiceNamed("listener").port.getHost().port
    ca = str(config.data_dir / "tls" / "ca.pem") if config.tls.enabled else None
    return InProcessServer(root, port, ca, directory, api_key)


async def start_server(tmp_path: Path, *overrides: str) -> InProcessServer:
    """A server on the memory backend, auth off, data dir ``tmp_path``."""
    config = load_config(None, [*BASE_SETTINGS, f"server.data_dir={tmp_path}", *overrides], {})
    return await _start(config, tmp_path)


def write_client_pki(directory: Path) -> None:
    """A client CA and certificates: carol, dave (Acme), eve (Evil), mallory (another CA), expired."""
    ca_key, ca = generate_ca("integration client CA")
    (directory / "client-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    other_key, other_ca = generate_ca("a CA the server does not trust")
    certs = {
        "carol": issue_certificate(ca_key, ca, "carol", client=True, organization="Acme"),
        "dave": issue_certificate(ca_key, ca, "dave", client=True, organization="Acme"),
        "eve": issue_certificate(ca_key, ca, "eve", client=True, organization="Evil"),
        "mallory": issue_certificate(other_key, other_ca, "mallory", client=True, organization="Acme"),
        "expired": issue_certificate(
            ca_key,
            ca,
            "old",
            client=True,
            organization="Acme",
            not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10),
            days=1,
        ),
    }
    for name, (key, cert) in certs.items():
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


async def start_auth_server(tmp_path: Path, *overrides: str) -> InProcessServer:
    """A server with auth on (JWT, an API key with role ``user``, client certificates) and audit on;
    collections ``c``, ``orders`` and ``tmp`` exist (an administrator made them)."""
    write_client_pki(tmp_path)
    key_id, api_key = generate_api_key("svc")
    (tmp_path / "keys.toml").write_text(
        f'[[keys]]\nid = "{key_id}"\nname = "service"\n'
        f'key_hash = "{hash_api_key(PEPPER.encode(), api_key)}"\nroles = ["user"]\n'
    )
    config = load_config(
        None,
        [
            *BASE_SETTINGS,
            f"server.data_dir={tmp_path / 'data'}",
            "auth.enabled=true",
            f"auth.jwt.secret={JWT_SECRET}",
            f"auth.api_keys_file={tmp_path / 'keys.toml'}",
            f"auth.api_key_pepper={PEPPER}",
            "tls.client_auth=optional",
            f"tls.ca={tmp_path / 'client-ca.pem'}",
            'auth.mtls.allowed_organizations=["Acme"]',
            "audit.enabled=true",
            f"audit.path={tmp_path / 'audit.log'}",
            *overrides,
        ],
        {},
    )
    # auth.mtls.role_map is a table: it has no --set form, so it is added to the loaded config.
    config = attrs.evolve(
        config,
        auth=attrs.evolve(
            config.auth,
            mtls=attrs.evolve(config.auth.mtls, role_map={"id:carol": ["user"], "org:Acme": ["reader"]}),
        ),
    )
    server = await _start(config, tmp_path, api_key)
    for name in ("c", "orders", "tmp"):
        await server.root.components.backend.create_collection(name)
    return server
