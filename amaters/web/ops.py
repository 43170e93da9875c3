"""The Klein ops site on ``web.listen``: probes, ``/health`` and Prometheus ``/metrics``.

Probes follow Kubernetes conventions:

- ``/livez`` (and its older name ``/healthz``): the process is alive.  200 unless the reactor is
  wedged: the event loop's lag (:class:`amaters.ops.lag.LagMonitor`) above ``web.liveness_max_lag``
  gives 503, so a liveness probe restarts a server stuck in a blocking call.
- ``/readyz``: 200 only while the service tree is running, storage is open and the listener is
  accepting; 503 while starting and from the moment a drain begins, so a load balancer stops
  sending traffic before connections close.
- ``/health``: JSON with the overall status (healthy, degraded, unhealthy, starting, shutting_down),
  version, uptime and each component's status and message; 200 when healthy or degraded, else 503.
- ``/metrics``: the project's own ``CollectorRegistry`` in Prometheus text format (OpenMetrics when
  the scraper asks for it).
- ``/`` and ``/console/...``: the operator console, a static page shipped in the package that reads
  the admin API and ``/metrics`` from the browser (see ``docs/console.md``).

Every answer is JSON except ``/metrics``; unknown paths are 404 and wrong methods 405 (with
``Allow``), as JSON.  The site is a :class:`~amaters.web.guard.GuardedSite`: request bodies are
capped and admin requests screened before a body is read, and ``web.max_connections`` bounds the
open connections while keeping room for probes.  Tracebacks are never shown.  CORS: a request whose ``Origin`` is in
``web.cors.allowed_origins`` (or any origin with ``"*"``) gets ``Access-Control-Allow-Origin``; a
preflight ``OPTIONS`` is answered 204 for an allowed origin and 403 otherwise.  Settings read on
each request (CORS origins, the lag limit) follow a configuration reload.  CORS never applies to
``/admin/``: its answers carry no ``Access-Control-Allow-*`` header whatever the settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from klein import Klein
from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from amaters import __version__
from amaters.config import Config
from amaters.ops.identity import identity
from amaters.tls.certs import ensure_server_tls
from amaters.tls.context import server_tls_options
from amaters.web.assets import HEADERS as CONSOLE_HEADERS
from amaters.web.assets import ConsoleAssets
from amaters.web.guard import ConnectionGate, GuardedSite

#: Methods each route answers (besides OPTIONS, which every known path answers).
ROUTE_METHODS = ("GET", "HEAD")
_ALLOW = ", ".join((*ROUTE_METHODS, "OPTIONS"))
#: Request headers a browser may send cross-origin (the probes take none of their own).
_CORS_HEADERS = "Accept, Content-Type"
_PREFLIGHT_MAX_AGE = "600"


class LiveSettings(Protocol):
    """The configuration in effect (:class:`amaters.config.LiveConfig`)."""

    current: Config


class ServerLifecycle(Protocol):
    """Where the server is in its life (:class:`amaters.service.Lifecycle`)."""

    state: str
    started_at: float | None

    @property
    def ready(self) -> bool: ...

    @property
    def draining(self) -> bool: ...


#: Finds a component of the tree by name (``storage``, ``flusher``, ``listener``), or None.
ComponentLookup = Callable[[str], Any]


class LagSource(Protocol):
    """The reactor lag, in seconds (:class:`amaters.ops.lag.LagMonitor`)."""

    def current_lag(self) -> float: ...


class MetricsSource(Protocol):
    """The Prometheus exposition (:class:`amaters.ops.metrics.Metrics`)."""

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]: ...


def _json(request: IRequest, status: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, sort_keys=True).encode() + b"\n"


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


class OpsAPI:
    """The ops routes, bound to the state they report on (no global app object).

    ``components`` finds the services whose state the probes report; without ``metrics``
    ``/metrics`` answers 503, without ``lag`` liveness does not check the lag, and without
    ``admin`` there is no ``/admin/``.
    """

    app = Klein()
    _log = Logger()

    def __init__(
        self,
        live: LiveSettings,
        lifecycle: ServerLifecycle,
        clock: Any,
        components: ComponentLookup = lambda name: None,
        metrics: MetricsSource | None = None,
        lag: LagSource | None = None,
        admin: Any = None,
    ) -> None:
        self.live = live
        self.lifecycle = lifecycle
        self.clock = clock
        self._components = components
        self.metrics = metrics
        self.lag = lag
        self.admin = admin
        self.assets = ConsoleAssets()

    # -- state -----------------------------------------------------------------------------

    def _child(self, name: str) -> Any:
        return self._components(name)

    def reactor_lag(self) -> float | None:
        """The current reactor lag, or None when no monitor is attached."""
        return self.lag.current_lag() if self.lag is not None else None

    def wedged(self) -> bool:
        """Whether the reactor lag is above ``web.liveness_max_lag`` (0 disables the check)."""
        limit = self.live.current.web.liveness_max_lag
        lag = self.reactor_lag()
        return limit > 0 and lag is not None and lag > limit

    def components(self) -> dict[str, dict[str, str]]:
        """Each component's status and message, for /health."""
        # The ops site is answering this request: it is up.
        found: dict[str, dict[str, str]] = {"web": {"status": "healthy", "message": "running"}}
        for name in ("storage", "flusher", "listener"):
            child = self._child(name)
            if child is None:
                continue
            running = bool(getattr(child, "running", False))
            status = "healthy" if running else "unhealthy"
            message = "running" if running else "not running"
            if name == "storage" and not getattr(child, "is_open", running):
                status, message = "unhealthy", "storage not open"
            elif name == "storage" and getattr(child, "write_problem", None):
                status, message = "degraded", f"writes fail: {child.write_problem}"
            if name == "listener" and running and not getattr(child, "is_accepting", True):
                status, message = "unhealthy", "not accepting connections"
            found[name] = {"status": status, "message": message}
        lag = self.reactor_lag()
        if lag is not None:
            limit = self.live.current.web.liveness_max_lag
            if self.wedged():
                found["reactor"] = {
                    "status": "unhealthy",
                    "message": f"event loop lag {lag:.3f} s exceeds web.liveness_max_lag ({limit:g} s)",
                }
            elif limit > 0 and lag > limit / 2:
                found["reactor"] = {"status": "degraded", "message": f"event loop lag {lag:.3f} s"}
            else:
                found["reactor"] = {"status": "healthy", "message": f"event loop lag {lag:.3f} s"}
        return found

    def overall(self, components: dict[str, dict[str, str]]) -> str:
        if self.lifecycle.draining or (
            self.lifecycle.state in ("stopping", "stopped") and self.lifecycle.started_at
        ):
            return "shutting_down"
        if self.lifecycle.state == "starting":
            return "starting"
        statuses = {c["status"] for c in components.values()}
        if "unhealthy" in statuses:
            return "unhealthy"
        if "degraded" in statuses:
            return "degraded"
        return "healthy"

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): running, storage open and listener accepting."""
        if not self.lifecycle.ready:
            return False, "draining" if self.lifecycle.draining else self.lifecycle.state
        storage = self._child("storage")
        if storage is not None and not getattr(storage, "is_open", True):
            return False, "storage_not_open"
        if storage is not None and getattr(storage, "write_problem", None):
            return False, "storage_full"
        listener = self._child("listener")
        if listener is not None and not getattr(listener, "is_accepting", True):
            return False, "listener_not_accepting"
        cluster = self._child("cluster")
        if cluster is not None and not cluster.quorum_ok():
            return False, "etcd_quorum_unreachable"
        return True, "ready"

    # -- CORS ------------------------------------------------------------------------------

    def _allowed_origin(self, request: IRequest) -> str | None:
        """The Access-Control-Allow-Origin value for this request's Origin, or None."""
        origin = _header(request, b"origin")
        if origin is None:
            return None
        allowed = self.live.current.web.cors.allowed_origins
        if "*" in allowed:
            return "*"
        return origin if origin in allowed else None

    def _cors(self, request: IRequest) -> None:
        request.setHeader(b"vary", b"Origin")
        allow = self._allowed_origin(request)
        if allow is not None:
            request.setHeader(b"access-control-allow-origin", allow.encode("latin-1"))

    # -- routes ----------------------------------------------------------------------------

    @app.route("/healthz", methods=list(ROUTE_METHODS))
    @app.route("/livez", methods=list(ROUTE_METHODS))
    def livez(self, request: IRequest) -> bytes:
        self._cors(request)
        if self.wedged():
            lag = self.reactor_lag() or 0.0
            return _json(request, 503, {"status": "wedged", "reactor_lag_seconds": round(lag, 3)})
        return _json(request, 200, {"status": "alive"})

    @app.route("/readyz", methods=list(ROUTE_METHODS))
    def readyz(self, request: IRequest) -> bytes:
        self._cors(request)
        ready, reason = self.readiness()
        if ready:
            return _json(request, 200, {"status": "ready", **identity()})
        return _json(request, 503, {"status": "not_ready", "reason": reason, **identity()})

    @app.route("/health", methods=list(ROUTE_METHODS))
    def health(self, request: IRequest) -> bytes:
        self._cors(request)
        components = self.components()
        status = self.overall(components)
        uptime = 0.0
        if self.lifecycle.started_at is not None:
            uptime = max(0.0, self.clock.seconds() - self.lifecycle.started_at)
        body = {
            "status": status,
            "version": __version__,
            "uptime_seconds": round(uptime, 3),
            "components": components,
            **identity(),
        }
        cluster = self._child("cluster")
        if cluster is not None:
            body["cluster"] = cluster.health()
        return _json(request, 200 if status in ("healthy", "degraded") else 503, body)

    @app.route("/metrics", methods=list(ROUTE_METHODS))
    def metrics_route(self, request: IRequest) -> bytes:
        self._cors(request)
        if self.metrics is None:
            return _json(request, 503, {"error": "metrics_unavailable", "status": 503})
        body, content_type = self.metrics.exposition(_header(request, b"accept"))
        request.setResponseCode(200)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        request.setHeader(b"cache-control", b"no-store")
        return body

    def screen(self, request: Any) -> tuple[int, str, dict[str, Any]] | None:
        """Refuse a request on its headers alone (before its body is read): admin requests that the
        admin API would refuse without looking at the body."""
        path = request.early[1]
        if self.admin is None or not path.startswith(b"/admin/"):
            return None
        return self.admin.screen(request)

    @app.route("/", methods=list(ROUTE_METHODS))
    @app.route("/console/", methods=list(ROUTE_METHODS))
    def console_index(self, request: IRequest) -> bytes:
        """The operator console's page (:mod:`amaters.web.assets`)."""
        return self.console_asset(request, "index.html")

    @app.route("/console/<path:name>", methods=list(ROUTE_METHODS))
    def console_asset(self, request: IRequest, name: str) -> bytes:
        """One of the console's packaged files; 404 for any other name."""
        found = self.assets.get(name)
        if found is None:
            return _json(request, 404, {"error": "not_found", "status": 404})
        body, content_type = found
        request.setResponseCode(200)
        request.setHeader(b"content-type", content_type.encode())
        for header, value in CONSOLE_HEADERS.items():
            request.setHeader(header, value)
        return body

    @app.route("/admin/", branch=True)
    def admin_route(self, request: IRequest) -> Any:
        """The admin API (:mod:`amaters.web.admin`): through the request pipeline like any query."""
        if self.admin is None:
            return _json(request, 404, {"error": "not_found", "status": 404})
        return self.admin.app.resource()

    @app.route("/health", methods=["OPTIONS"])
    @app.route("/healthz", methods=["OPTIONS"])
    @app.route("/livez", methods=["OPTIONS"])
    @app.route("/readyz", methods=["OPTIONS"])
    @app.route("/metrics", methods=["OPTIONS"])
    def preflight(self, request: IRequest) -> bytes:
        """CORS preflight (or a plain OPTIONS): which methods and headers a browser may use."""
        request.setHeader(b"allow", _ALLOW.encode())
        request.setHeader(b"vary", b"Origin")
        if _header(request, b"origin") is None:
            request.setResponseCode(204)
            return b""
        allow = self._allowed_origin(request)
        if allow is None:
            return _json(request, 403, {"error": "origin_not_allowed", "status": 403})
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-origin", allow.encode("latin-1"))
        request.setHeader(b"access-control-allow-methods", _ALLOW.encode())
        request.setHeader(b"access-control-allow-headers", _CORS_HEADERS.encode())
        request.setHeader(b"access-control-max-age", _PREFLIGHT_MAX_AGE.encode())
        return b""

    @app.handle_errors(Exception)
    def errors(self, request: IRequest, failure: Any) -> bytes:
        self._cors(request)
        exc = failure.value
        if isinstance(exc, HTTPException):
            code = exc.code or 500
            if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
                request.setHeader(b"allow", ", ".join(exc.valid_methods).encode())
            return _json(request, code, {"error": exc.name.lower().replace(" ", "_"), "status": code})
        self._log.failure("Ops site request failed", failure)
        return _json(request, 500, {"error": "internal_error", "status": 500})


class OpsService(service.Service):
    """Serves :class:`OpsAPI` on ``web.listen`` (HTTPS with ``web.tls.enabled``); binds when started."""

    name = "web"
    _log = Logger()

    def __init__(self, config: Config, reactor: Any, api: OpsAPI) -> None:
        self.config = config
        self.reactor = reactor
        self.api = api
        self.port: IListeningPort | None = None

    def site(self) -> GuardedSite:
        api = self.api
        return GuardedSite(api.app.resource(), lambda: api.live.current, self.reactor, api.screen)

    def _factory(self) -> Any:
        site = self.site()
        settings = self.config.web.tls
        if not settings.enabled:
            return ConnectionGate(site, site)
        if settings.cert or settings.key:
            for name in ("cert", "key"):
                value = getattr(settings, name)
                if not value or not Path(value).is_file():
                    raise ValueError(
                        f"web.tls.{name}: {value!r} is not a readable file (set both web.tls.cert and"
                        " web.tls.key, or neither to use the native listener's certificate)"
                    )
            cert, key = settings.cert, settings.key
        else:
            files = ensure_server_tls(self.config)
            cert, key = str(files.cert), str(files.key)
        options = server_tls_options(cert, key)
        return ConnectionGate(TLSMemoryBIOFactory(options, False, site, clock=self.reactor), site)

    def startService(self) -> defer.Deferred[None]:
        super().startService()
        try:
            endpoint = serverFromString(self.reactor, self.config.web.listen)
            factory = self._factory()
        except Exception as e:
            self._log.error("Cannot serve the ops site: {error}", error=str(e))
            return defer.fail()
        d = endpoint.listen(factory)

        def listening(port: IListeningPort) -> None:
            self.port = port
            host = port.getHost()
            self._log.info(
                "Ops site listening on {host}:{port} ({scheme})",
                host=getattr(host, "host", str(host)),
                port=getattr(host, "port", ""),
                scheme="https" if self.config.web.tls.enabled else "http",
            )

        d.addCallback(listening)
        return d

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)  # type: ignore[call-overload]
