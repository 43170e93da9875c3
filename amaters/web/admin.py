"""The admin API under ``/admin/`` on the ops site: a front end of the request pipeline.

Each route only translates HTTP into an administration operation (:mod:`amaters.query.operations`)
and the answer back into JSON.  Authentication is the same authenticator the native protocol's
handshake uses (``Authorization: Bearer <JWT>``, ``Authorization: ApiKey <key>`` or
``X-API-Key: <key>``); authorization, rate limits, metrics and audit are the pipeline's stages, the
same that decide a protocol request: every operation here needs ``admin`` on ``server``, a denial
is answered 403 and audited by the RBAC stage, and every call is an ``admin`` audit event.

With ``auth.enabled = false`` nothing proves who is asking, so the admin API answers only requests
that cannot come from a web page (:func:`admin_refusal`):

- from a loopback address (the protocol's protected mode, applied to the ops site);
- carrying the header ``X-Amaters-Admin`` (any value): a page in a browser cannot add a custom
  header to a cross-site request without a CORS preflight, which the admin API never grants
  (CSRF); the console, served from the ops site itself, is same-origin and sends it;
- naming ``localhost``, ``127.0.0.1``, ``[::1]`` or a host in ``web.allowed_hosts`` in ``Host``:
  a page whose own DNS name was rebound to 127.0.0.1 sends its own name (DNS rebinding).

With auth on, the credentials are headers a page cannot send cross-site either.  CORS never
applies to ``/admin/``.  The ops site screens these headers before it reads a request's body.

Routes: ``GET status``, ``GET collections``, ``GET stats``, ``POST compact``, ``POST reload``,
``GET snapshots``, ``POST snapshots`` (optionally ``?upload=1``), ``POST snapshots/<name>/verify``,
``GET config`` (secrets redacted, with what a reload would change), ``GET audit?limit=N`` (the
audit log's last events), ``GET resources`` (data dir usage, TLS certificates), and in clustered
mode ``GET cluster``, ``POST cluster/shards?name=N&endpoint=URL...``, ``POST cluster/move?vshard=V&to=N``.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import attrs
from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from amaters.auth.principal import ANONYMOUS, Authenticator, Credentials
from amaters.config import LiveConfig
from amaters.errors import AmatersError, AuthError, PermissionDenied
from amaters.query import operations as ops
from amaters.query.pipeline import QueryPipeline, RequestContext


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
    if hasattr(item, "to_dict"):
        return item.to_dict()
    if attrs.has(type(item)):
        return {k: _plain(v) for k, v in attrs.asdict(item, recurse=False).items()}
    if isinstance(item, dict):
        return {str(k): _plain(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return [_plain(v) for v in item]
    if isinstance(item, (str, int, float, bool)) or item is None:
        return item
    return str(item)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Host names the admin API accepts with auth off, besides web.allowed_hosts.
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
#: The header a request with auth off must carry (a browser cannot send it cross-site unasked).
ADMIN_HEADER = b"x-amaters-admin"


def _host_name(value: str) -> str:
    """The host part of a Host header: ``[::1]:7879`` -> ``::1``, ``Example.COM:80`` -> ``example.com``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def admin_refusal(request: IRequest, config: Any) -> AmatersError | None:
    """Why the admin API refuses ``request`` on its address and headers alone (None: it does not).

    Auth on: a request without credentials (AUTH_FAILED).  Auth off: one from a non-loopback address,
    one whose ``Host`` is not local or in ``web.allowed_hosts``, or one without ``X-Amaters-Admin``
    (AUTH_INSUFFICIENT_PERMISSIONS).
    """
    if config.auth.enabled:
        if request.getHeader(b"authorization") or request.getHeader(b"x-api-key"):
            return None
        return AuthError("the admin API needs 'Authorization: Bearer <token>' or 'ApiKey <key>'")
    host = getattr(request.getClientAddress(), "host", "")
    if not _is_loopback(host):
        return PermissionDenied("the admin API answers only loopback clients while auth.enabled is false")
    raw_host = request.getHeader(b"host")
    name = _host_name(raw_host.decode("latin-1") if isinstance(raw_host, bytes) else str(raw_host or ""))
    allowed = LOCAL_HOSTS | {h.lower() for h in config.web.allowed_hosts}
    if name not in allowed:
        shown = name[:100].encode("ascii", "backslashreplace").decode()
        return PermissionDenied(
            f"the admin API does not answer requests for host {shown!r} while auth.enabled is false;"
            " use localhost, or add the name to web.allowed_hosts"
        )
    if not request.getHeader(ADMIN_HEADER):
        return PermissionDenied(
            "the admin API needs the header 'X-Amaters-Admin: 1' while auth.enabled is false"
            " (a page from another site cannot send it; the amaters CLI and the console do)"
        )
    return None


class AdminAPI:
    """Admin routes: credentials in, an operation through ``pipeline``, JSON out."""

    app = Klein()
    _log = Logger()

    def __init__(
        self, pipeline: QueryPipeline, authenticate: Authenticator, live: LiveConfig, clock: Any
    ) -> None:
        self.pipeline = pipeline
        self.authenticate = authenticate
        self.live = live
        self.clock = clock

    # -- authentication -------------------------------------------------------------------------

    def _credentials(self, request: IRequest) -> Credentials | None:
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

    def screen(self, request: IRequest) -> tuple[int, str, dict[str, Any]] | None:
        """(status, reason, JSON body) refusing ``request`` on its headers, or None (the ops site
        calls this before reading a body)."""
        error = admin_refusal(request, self.live.current)
        if error is None:
            return None
        status = _HTTP_STATUS.get(error.code.name, 403)
        return status, "Unauthorized" if status == 401 else "Forbidden", _error_body(error)

    async def _principal(self, request: IRequest, source: str, host: str) -> Any:
        refusal = admin_refusal(request, self.live.current)
        if refusal is not None:
            raise refusal
        if not self.live.current.auth.enabled:
            return ANONYMOUS
        credentials = self._credentials(request)
        if credentials is None:
            raise AuthError("the admin API needs 'Authorization: Bearer <token>' or 'ApiKey <key>'")
        return await self.authenticate(credentials, None, source)

    async def _run(self, request: IRequest, make: Any) -> bytes:
        """Log in, build the operation (``make(principal)``), run it through the pipeline."""
        address = request.getClientAddress()
        host = getattr(address, "host", "")
        source = f"{host}:{getattr(address, 'port', '')}"
        try:
            principal = await self._principal(request, source, host)
            op = make(principal)
            ctx = RequestContext(0, principal, source, self.clock.seconds(), protocol="http")
            body = await self.pipeline.execute(ctx, op)
        except AmatersError as e:
            status = _HTTP_STATUS.get(e.code.name, 500 if e.category.name == "SERVER_ERROR" else 400)
            return _json(request, status, _error_body(e))
        return _json(request, 200, _plain(body))

    @app.handle_errors(Exception)
    def errors(self, request: IRequest, failure: Any) -> bytes:
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
        return await self._run(request, lambda principal: ops.ServerStatus())

    @app.route("/collections", methods=["GET"])
    async def collections(self, request: IRequest) -> bytes:
        return await self._run(request, lambda principal: ops.CollectionStats())

    @app.route("/stats", methods=["GET"])
    async def stats(self, request: IRequest) -> bytes:
        return await self._run(request, lambda principal: ops.StorageStats())

    @app.route("/compact", methods=["POST"])
    async def compact(self, request: IRequest) -> bytes:
        return await self._run(request, lambda principal: ops.Compact())

    @app.route("/reload", methods=["POST"])
    async def reload(self, request: IRequest) -> bytes:
        return await self._run(
            request, lambda principal: ops.ReloadConfig(requested_by=f"{principal.name} (admin API)")
        )

    @app.route("/cluster", methods=["GET"])
    async def cluster(self, request: IRequest) -> bytes:
        return await self._run(request, lambda principal: ops.ClusterStatus())

    @app.route("/cluster/shards", methods=["POST"])
    async def cluster_add_shard(self, request: IRequest) -> bytes:
        name = request.args.get(b"name", [b""])[0].decode("utf-8", "replace")
        endpoints = tuple(e.decode("utf-8", "replace") for e in request.args.get(b"endpoint", []))
        return await self._run(request, lambda principal: ops.ClusterAddShard(name, endpoints))

    @app.route("/cluster/shards/<string:shard>", methods=["DELETE"])
    async def cluster_remove_shard(self, request: IRequest, shard: str) -> bytes:
        return await self._run(request, lambda principal: ops.ClusterRemoveShard(shard))

    @app.route("/cluster/move", methods=["POST"])
    async def cluster_move(self, request: IRequest) -> bytes:
        raw = request.args.get(b"vshard", [b""])[0]
        to = request.args.get(b"to", [b""])[0].decode("utf-8", "replace")
        if not raw.isdigit():
            return _json(request, 400, {"error": "invalid_value", "message": "vshard must be a number"})
        return await self._run(request, lambda principal: ops.ClusterMove(int(raw), to))

    @app.route("/snapshots", methods=["GET"])
    async def list_snapshots(self, request: IRequest) -> bytes:
        remote = _flag(request, b"remote")
        return await self._run(request, lambda principal: ops.ListSnapshots(remote=remote))

    @app.route("/snapshots", methods=["POST"])
    async def create_snapshot(self, request: IRequest) -> bytes:
        upload = _flag(request, b"upload")
        return await self._run(request, lambda principal: ops.CreateSnapshot(upload=upload))

    @app.route("/snapshots/<string:archive>/verify", methods=["POST"])
    async def verify_snapshot(self, request: IRequest, archive: str) -> bytes:
        return await self._run(request, lambda principal: ops.VerifySnapshot(archive=archive))

    @app.route("/fhe/keys", methods=["GET"])
    async def fhe_key_sets(self, request: IRequest) -> bytes:
        return await self._run(request, lambda principal: ops.ListKeySets())

    @app.route("/fhe/keys/<string:key_set_id>", methods=["DELETE"])
    async def delete_fhe_key_set(self, request: IRequest, key_set_id: str) -> bytes:
        return await self._run(request, lambda principal: ops.DeleteKeySet(key_set_id))

    @app.route("/config", methods=["GET"])
    async def config(self, request: IRequest) -> bytes:
        return await self._run(request, lambda principal: ops.ConfigView())

    @app.route("/audit", methods=["GET"])
    async def audit_tail(self, request: IRequest) -> bytes:
        raw = request.args.get(b"limit", [b"100"])[0]
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            return _json(request, 400, {"error": "bad_request", "message": "limit must be 1 to 1000"})
        limit = int(raw)
        return await self._run(request, lambda principal: ops.AuditTail(limit=limit))

    @app.route("/resources", methods=["GET"])
    async def resources(self, request: IRequest) -> bytes:
        return await self._run(request, lambda principal: ops.ServerResources())


def _flag(request: IRequest, name: bytes) -> bool:
    return request.args.get(name, [b"0"])[0] in (b"1", b"true", b"yes")


__all__ = ["AdminAPI"]
