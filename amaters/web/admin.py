"""The admin API under ``/admin/`` on the ops site.

Every route needs an authenticated principal with the ``admin`` permission on ``server``:
``Authorization: Bearer <JWT>`` or ``Authorization: ApiKey <key>`` (or ``X-API-Key: <key>``),
checked by the same portal and RBAC policy as the native protocol.  With ``auth.enabled = false``
the admin API answers only requests from loopback addresses (the protocol's protected mode, applied
to the ops site).  Every call is an audit ``admin`` event.

Routes: ``GET status``, ``GET collections``, ``GET stats``, ``POST compact``, ``POST reload``,
``GET snapshots``, ``POST snapshots`` (optionally ``?upload=1``).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from amaters import __version__
from amaters.errors import AmatersError, AuthError, InvalidOperation, PermissionDenied


def _json(request: IRequest, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, sort_keys=True, default=str).encode() + b"\n"


_HTTP_STATUS = {
    "AUTH_FAILED": 401,
    "AUTH_EXPIRED": 401,
    "AUTH_INVALID_CERTIFICATE": 401,
    "AUTH_INSUFFICIENT_PERMISSIONS": 403,
    "STORAGE_NOT_FOUND": 404,
    "COMPUTE_INVALID_OPERATION": 409,
    "SERVER_OVERLOADED": 429,
    "SERVER_UNAVAILABLE": 503,
    "SERVER_SHUTTING_DOWN": 503,
}


def _error_body(error: AmatersError) -> dict[str, Any]:
    body: dict[str, Any] = {
        "error": error.code.name.lower(),
        "code": int(error.code),
        "category": error.category.name,
        "message": error.message,
    }
    if error.retry_after_ms is not None:
        body["retry_after_ms"] = error.retry_after_ms
    return body


def _plain(item: Any) -> Any:
    """A JSON-able view of an attrs record (paths and manifests as text/dicts)."""
    import attrs

    if hasattr(item, "to_dict"):
        return item.to_dict()
    if attrs.has(type(item)):
        return {k: _plain(v) for k, v in attrs.asdict(item, recurse=False).items()}
    if isinstance(item, (str, int, float, bool)) or item is None:
        return item
    return str(item)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminAPI:
    """Admin routes bound to the running server (the root service)."""

    app = Klein()
    _log = Logger()

    def __init__(self, root: Any) -> None:
        self.root = root

    # -- authentication and authorization ---------------------------------------------------------

    def _credentials(self, request: IRequest) -> Any:
        from amaters.protocols.server import Credentials

        header = request.getHeader(b"authorization")
        if header:
            scheme, _, value = header.decode("latin-1").partition(" ")
            value = value.strip()
            if scheme.lower() == "bearer" and value:
                return Credentials("bearer_token", value)
            if scheme.lower() == "apikey" and value:
                return Credentials("api_key", value)
            raise AuthError("unsupported Authorization scheme; use 'Bearer <token>' or 'ApiKey <key>'")
        key = request.getHeader(b"x-api-key")
        if key:
            return Credentials("api_key", key.decode("latin-1").strip())
        return None

    async def _principal(self, request: IRequest, action: str) -> Any:
        config = self.root.config
        source = request.getClientAddress()
        host = getattr(source, "host", "")
        auth = getattr(self.root, "auth", None)
        if not config.auth.enabled:
            if not _is_loopback(host):
                raise PermissionDenied(
                    "the admin API answers only loopback clients while auth.enabled is false"
                )
            from amaters.protocols.server import ANONYMOUS

            return ANONYMOUS
        if auth is None:
            raise AuthError("authentication is not available")
        credentials = self._credentials(request)
        if credentials is None:
            raise AuthError("the admin API needs 'Authorization: Bearer <token>' or 'ApiKey <key>'")
        principal = await auth.authenticate(credentials, None, f"{host}:{getattr(source, 'port', '')}")
        from amaters.auth.rbac import SERVER, Permission

        if not auth.authorization.policy.allowed(principal.roles, SERVER, Permission.ADMIN):
            self._audit(principal, action, "denied", host, "admin permission on server required")
            raise PermissionDenied(
                f"{principal.name!r} may not {action}: it needs admin permission on server"
            )
        return principal

    def _audit(self, principal: Any, action: str, result: str, source: str, error: str | None = None) -> None:
        audit = getattr(self.root, "audit", None)
        if audit is None:
            return
        audit.emit(
            {
                "event_type": "admin",
                "result": result,
                "principal": getattr(principal, "name", None),
                "auth_method": getattr(principal, "auth_method", None),
                "action": action,
                "resource": "server",
                "source": source,
                "error": error,
            }
        )

    async def _run(self, request: IRequest, action: str, work: Any) -> bytes:
        host = getattr(request.getClientAddress(), "host", "")
        try:
            principal = await self._principal(request, action)
        except AmatersError as e:
            return _json(request, _HTTP_STATUS.get(e.code.name, 400), _error_body(e))
        try:
            body = await work(principal)
        except AmatersError as e:
            self._audit(principal, action, "failure", host, e.message)
            return _json(
                request,
                _HTTP_STATUS.get(e.code.name, 500 if e.category.name == "SERVER_ERROR" else 400),
                _error_body(e),
            )
        except Exception:
            self._log.failure("Admin {action} failed", action=action)
            self._audit(principal, action, "failure", host, "internal error")
            return _json(request, 500, {"error": "internal_error", "message": "see the server log"})
        self._audit(principal, action, "success", host)
        return _json(request, 200, body)

    def _backend(self) -> Any:
        from amaters.storage import innermost

        return innermost(self.root.backend)

    @app.handle_errors(Exception)
    def errors(self, request: IRequest, failure: Any) -> bytes:
        from werkzeug.exceptions import HTTPException

        exc = failure.value
        if isinstance(exc, HTTPException):
            code = exc.code or 500
            return _json(
                request, code, {"error": (exc.name or "error").lower().replace(" ", "_"), "status": code}
            )
        self._log.failure("Admin request failed", failure)
        return _json(request, 500, {"error": "internal_error", "status": 500})

    # -- routes ---------------------------------------------------------------------------------

    @app.route("/status", methods=["GET"])
    async def status(self, request: IRequest) -> bytes:
        async def work(principal: Any) -> Any:
            root = self.root
            reloader = getattr(root, "reloader", None)
            last = reloader.last.to_dict() if reloader is not None and reloader.last else None
            listener = root.getServiceNamed("listener")
            uptime = root.reactor.seconds() - root.started_at if root.started_at else 0.0
            return {
                "version": __version__,
                "state": root.state,
                "ready": root.ready,
                "uptime_seconds": round(uptime, 3),
                "config_file": root.config.source or None,
                "backend": root.config.storage.backend,
                "sync": root.config.storage.sync,
                "connections": len(listener.factory.connections),
                "auth_enabled": root.config.auth.enabled,
                "last_reload": last,
            }

        return await self._run(request, "admin status", work)

    @app.route("/collections", methods=["GET"])
    async def collections(self, request: IRequest) -> bytes:
        async def work(principal: Any) -> Any:
            backend = self.root.backend
            names = await backend.list_collections()
            stats = await backend.stats()
            keys = stats.get("keys", {})
            return {"collections": [{"name": n, "keys": keys.get(n)} for n in names]}

        return await self._run(request, "admin collections", work)

    @app.route("/stats", methods=["GET"])
    async def stats(self, request: IRequest) -> bytes:
        async def work(principal: Any) -> Any:
            return await self.root.backend.stats()

        return await self._run(request, "admin stats", work)

    @app.route("/compact", methods=["POST"])
    async def compact(self, request: IRequest) -> bytes:
        async def work(principal: Any) -> Any:
            backend = self._backend()
            compact = getattr(backend, "compact", None)
            if compact is None:
                raise InvalidOperation(f"the {backend.name} backend has nothing to compact")
            before = await backend.stats()
            await compact()
            after = await backend.stats()
            return {"compacted": True, "bytes_before": before.get("bytes"), "bytes_after": after.get("bytes")}

        return await self._run(request, "admin compact", work)

    @app.route("/reload", methods=["POST"])
    async def reload(self, request: IRequest) -> bytes:
        async def work(principal: Any) -> Any:
            result = await self.root.reloader.reload(principal=f"{principal.name} (admin API)")
            return result.to_dict()

        return await self._run(request, "admin reload", work)

    @app.route("/snapshots", methods=["GET"])
    async def list_snapshots(self, request: IRequest) -> bytes:
        async def work(principal: Any) -> Any:
            from amaters.storage.snapshot import list_archives, snapshot_dir

            pools = self.root.getServiceNamed("pools")
            config = self.root.config
            if request.args.get(b"remote", [b"0"])[0] in (b"1", b"true", b"yes"):
                from amaters.storage.s3 import S3Store

                store = S3Store.from_config(config.snapshot.s3)
                remote = await pools.io.run(store.list_blocking)
                return {"remote": [_plain(item) for item in remote]}
            items = await pools.io.run(list_archives, snapshot_dir(config))
            return {"snapshots": [_plain(item) for item in items]}

        return await self._run(request, "admin snapshot list", work)

    @app.route("/snapshots", methods=["POST"])
    async def create_snapshot(self, request: IRequest) -> bytes:
        upload = request.args.get(b"upload", [b"0"])[0] in (b"1", b"true", b"yes")

        async def work(principal: Any) -> Any:
            from amaters.storage.snapshot import create_snapshot

            root = self.root
            pools = root.getServiceNamed("pools")
            info = await create_snapshot(root.backend, root.config, pools, upload=upload)
            return info.to_dict() if hasattr(info, "to_dict") else info

        return await self._run(request, "admin snapshot create", work)
