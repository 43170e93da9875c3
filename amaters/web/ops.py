"""The Klein ops site on ``web.listen``: ``/health``, ``/healthz``, ``/livez``, ``/readyz``.

Probes follow Kubernetes conventions: ``/livez`` (and ``/healthz``) say the process is alive;
``/readyz`` answers 200 only when every service has started and no stop has begun, so a load balancer
stops sending traffic the moment a drain begins.  Errors are JSON; tracebacks are never shown.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from klein import Klein
from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from amaters import __version__
from amaters.config import Config


class Root(Protocol):
    """What the ops site reads from the root service."""

    config: Config
    started_at: float | None

    @property
    def ready(self) -> bool: ...

    @property
    def draining(self) -> bool: ...

    @property
    def state(self) -> str: ...

    def getServiceNamed(self, name: str) -> Any: ...


def _json(request: IRequest, status: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, sort_keys=True).encode() + b"\n"


class OpsAPI:
    """The ops routes, bound to the state they report on (no global app object)."""

    app = Klein()
    _log = Logger()

    def __init__(self, root: Root, clock: Any) -> None:
        self.root = root
        self.clock = clock

    # -- helpers ---------------------------------------------------------------------------

    def components(self) -> dict[str, dict[str, str]]:
        """Each named service's status, for /health."""
        found: dict[str, dict[str, str]] = {}
        for name in ("storage", "listener", "web"):
            try:
                child = self.root.getServiceNamed(name)
            except KeyError:
                continue
            running = bool(getattr(child, "running", False))
            status = "healthy" if running else "unhealthy"
            message = "running" if running else "not running"
            if name == "storage" and not getattr(child, "is_open", running):
                status, message = "unhealthy", "storage not open"
            if name == "listener" and running and not getattr(child, "is_accepting", True):
                status, message = "unhealthy", "not accepting connections"
            found[name] = {"status": status, "message": message}
        return found

    def overall(self) -> str:
        if self.root.draining or (self.root.state in ("stopping", "stopped") and self.root.started_at):
            return "shutting_down"
        if self.root.state == "starting":
            return "starting"
        statuses = {c["status"] for c in self.components().values()}
        if "unhealthy" in statuses:
            return "unhealthy"
        if "degraded" in statuses:
            return "degraded"
        return "healthy"

    # -- routes ----------------------------------------------------------------------------

    @app.route("/healthz", methods=["GET", "HEAD"])
    @app.route("/livez", methods=["GET", "HEAD"])
    def livez(self, request: IRequest) -> bytes:
        return _json(request, 200, {"status": "alive"})

    @app.route("/readyz", methods=["GET", "HEAD"])
    def readyz(self, request: IRequest) -> bytes:
        if self.root.ready:
            return _json(request, 200, {"status": "ready"})
        reason = "draining" if self.root.draining else self.root.state
        return _json(request, 503, {"status": "not_ready", "reason": reason})

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        status = self.overall()
        uptime = 0.0
        if self.root.started_at is not None:
            uptime = max(0.0, self.clock.seconds() - self.root.started_at)
        body = {
            "status": status,
            "version": __version__,
            "uptime_seconds": round(uptime, 3),
            "components": self.components(),
        }
        return _json(request, 200 if status in ("healthy", "degraded") else 503, body)

    @app.handle_errors(Exception)
    def errors(self, request: IRequest, failure: Any) -> bytes:
        from werkzeug.exceptions import HTTPException

        exc = failure.value
        if isinstance(exc, HTTPException):
            code = exc.code or 500
            return _json(request, code, {"error": exc.name.lower().replace(" ", "_"), "status": code})
        self._log.failure("Ops site request failed", failure)
        return _json(request, 500, {"error": "internal_error", "status": 500})


class OpsService(service.Service):
    """Serves :class:`OpsAPI` on ``web.listen``; binds when started, stops listening when stopped."""

    name = "web"
    _log = Logger()

    def __init__(self, config: Config, reactor: Any, root: Root) -> None:
        self.config = config
        self.reactor = reactor
        self.api = OpsAPI(root, reactor)
        self.port: IListeningPort | None = None

    def site(self) -> Site:
        resource = self.api.app.resource()
        site = Site(resource)
        site.displayTracebacks = False
        site.noisy = False
        return site

    def startService(self) -> defer.Deferred[None]:  # type: ignore[override]
        super().startService()
        endpoint = serverFromString(self.reactor, self.config.web.listen)
        d = endpoint.listen(self.site())

        def listening(port: IListeningPort) -> None:
            self.port = port
            self._log.info("Ops site listening on {address}", address=str(port.getHost()))

        d.addCallback(listening)
        return d

    def stopService(self) -> defer.Deferred[None]:  # type: ignore[override]
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)  # type: ignore[call-overload]
