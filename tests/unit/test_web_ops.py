"""The ops site driven in memory with treq's StubTreq: every route and status, CORS, lag, metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.application import service
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, Logger, LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.test.requesthelper import DummyRequest

from amaters.config import Config, ConfigError, default_config, load_config
from amaters.ops.identity import identity
from amaters.ops.lag import LagMonitor
from amaters.ops.metrics import Metrics
from amaters.web.guard import ConnectionGate, GuardedSite
from amaters.web.ops import OpsAPI, OpsService


class FakeRoot(service.MultiService):
    """Stands in for the live config (``current``), the lifecycle and the component lookup."""

    def __init__(self, state: str = "running", config: Config | None = None) -> None:
        super().__init__()
        self.config = config or default_config()
        self.state = state
        self.started_at: float | None = 0.0

    @property
    def current(self) -> Config:
        return self.config

    def lookup(self, name: str) -> Any:
        return self.namedServices.get(name)

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


def client(root: FakeRoot, clock: Clock | None = None, **kwargs: Any) -> StubTreq:
    return StubTreq(api(root, clock, **kwargs).app.resource())


def api(root: FakeRoot, clock: Clock | None = None, **kwargs: Any) -> OpsAPI:
    return OpsAPI(root, root, clock or Clock(), root.lookup, **kwargs)


def fetch(
    treq: StubTreq, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one request."""
    d = treq.request(method, "http://ops" + path, headers=headers or {})
    treq.flush()
    response = d.result  # type: ignore[attr-defined]
    body = treq.content(response)
    treq.flush()
    raw: bytes = body.result  # type: ignore[attr-defined]
    found = {
        name.decode().lower(): b", ".join(values).decode()
        for name, values in response.headers.getAllRawHeaders()
    }
    return response.code, found, raw


def get(treq: StubTreq, path: str, method: str = "GET") -> tuple[int, Any]:
    code, _, raw = fetch(treq, path, method)
    return code, json.loads(raw) if raw else None


def config_with(*overrides: str) -> Config:
    return load_config(None, list(overrides), {})


# -- readiness -------------------------------------------------------------------------------------


def test_readyz_follows_state() -> None:
    """/readyz is 200 only while running; 503 while starting and while draining."""
    root = FakeRoot("starting")
    treq = client(root)
    assert get(treq, "/readyz") == (503, {"status": "not_ready", "reason": "starting", **identity()})
    root.state = "running"
    assert get(treq, "/readyz")[0] == 200
    root.state = "stopping"
    assert get(treq, "/readyz") == (503, {"status": "not_ready", "reason": "draining", **identity()})


def test_readyz_needs_open_storage_and_an_accepting_listener() -> None:
    """Even with the tree running, /readyz is 503 while storage is not open or the listener is not
    accepting, and 200 when both are."""
    root = FakeRoot()
    storage = FakeChild("storage", is_open=False)
    listener = FakeChild("listener", is_accepting=False)
    storage.setServiceParent(root)
    listener.setServiceParent(root)
    treq = client(root)
    assert get(treq, "/readyz") == (503, {"status": "not_ready", "reason": "storage_not_open", **identity()})
    storage.is_open = True  # type: ignore[attr-defined]
    assert get(treq, "/readyz") == (
        503,
        {"status": "not_ready", "reason": "listener_not_accepting", **identity()},
    )
    listener.is_accepting = True  # type: ignore[attr-defined]
    assert get(treq, "/readyz") == (200, {"status": "ready", **identity()})


# -- liveness --------------------------------------------------------------------------------------


def test_liveness_probes() -> None:
    """/livez and /healthz answer 200 while alive, even while starting."""
    treq = client(FakeRoot("starting"))
    for path in ("/healthz", "/livez"):
        assert get(treq, path) == (200, {"status": "alive"})


def test_liveness_fails_while_the_reactor_lags() -> None:
    """With the lag monitor measuring a stall above web.liveness_max_lag (5 s), /livez and /healthz
    answer 503 and /health reports the reactor unhealthy; once probes run on time again, 200."""
    clock = Clock()
    lag = LagMonitor(clock, 0.5)
    lag.startService()
    root = FakeRoot()
    treq = client(root, clock, lag=lag)
    clock.advance(0.5)
    assert get(treq, "/livez") == (200, {"status": "alive"})
    clock.advance(10.5)  # the probe due at 1.0 runs at 11.0: 10 s late
    for path in ("/livez", "/healthz"):
        assert get(treq, path) == (503, {"status": "wedged", "reactor_lag_seconds": 10.0})
    code, body = get(treq, "/health")
    assert code == 503 and body["status"] == "unhealthy"
    assert body["components"]["reactor"]["status"] == "unhealthy"
    clock.advance(0.5)
    assert get(treq, "/livez") == (200, {"status": "alive"})
    lag.stopService()


def test_zero_liveness_max_lag_disables_the_check() -> None:
    """web.liveness_max_lag = 0 never fails liveness, whatever the lag."""
    clock = Clock()
    lag = LagMonitor(clock, 0.5)
    lag.startService()
    treq = client(FakeRoot(config=config_with("web.liveness_max_lag=0")), clock, lag=lag)
    clock.advance(100)
    assert get(treq, "/livez") == (200, {"status": "alive"})
    lag.stopService()


# -- /health ---------------------------------------------------------------------------------------


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


def test_health_states_while_starting_and_shutting_down() -> None:
    """/health says starting (503) while starting, shutting_down (503) while draining, and degraded
    (200) when the reactor lags more than half the liveness limit."""
    clock = Clock()
    lag = LagMonitor(clock, 0.5)
    lag.startService()
    root = FakeRoot("starting")
    treq = client(root, clock, lag=lag)
    assert get(treq, "/health")[0] == 503
    assert get(treq, "/health")[1]["status"] == "starting"
    root.state = "running"
    clock.advance(3.5)  # 3 s late: above 2.5, below 5
    code, body = get(treq, "/health")
    assert (code, body["status"]) == (200, "degraded")
    assert body["components"]["reactor"]["status"] == "degraded"
    root.state = "stopping"
    assert get(treq, "/health")[1]["status"] == "shutting_down"
    assert get(treq, "/health")[0] == 503
    lag.stopService()


# -- /metrics --------------------------------------------------------------------------------------


def test_metrics_route_serves_the_registry() -> None:
    """/metrics is 200 Prometheus text that parses and carries the attached metrics; HEAD has no body."""
    metrics = Metrics(process=False)
    metrics.request_finished("get", 0.001, None)
    treq = client(FakeRoot(), metrics=metrics)
    code, headers, body = fetch(treq, "/metrics")
    assert code == 200
    assert headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "amaters_requests" in names
    assert b'amaters_requests_total{op="get",status="ok"} 1.0' in body
    head = fetch(treq, "/metrics", "HEAD")
    assert head[0] == 200 and head[2] == b""


def test_metrics_route_without_metrics_is_503() -> None:
    """Before metrics are attached, /metrics answers 503 in JSON."""
    assert get(client(FakeRoot()), "/metrics") == (503, {"error": "metrics_unavailable", "status": 503})


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_path_and_wrong_method_are_json() -> None:
    """Unknown paths are 404 and wrong methods 405 with an Allow header, both JSON."""
    treq = client(FakeRoot())
    assert get(treq, "/nope") == (404, {"error": "not_found", "status": 404})
    assert get(treq, "/readyz", "POST") == (405, {"error": "method_not_allowed", "status": 405})
    code, headers, _ = fetch(treq, "/metrics", "DELETE")
    assert code == 405
    assert set(headers["allow"].replace(" ", "").split(",")) >= {"GET", "HEAD", "OPTIONS"}
    assert fetch(treq, "/nope", "OPTIONS")[0] == 404


def test_internal_errors_show_no_traceback() -> None:
    """An exception inside a route is logged and answered 500 JSON without any traceback text."""

    class BrokenRoot(FakeRoot):
        @property
        def ready(self) -> bool:
            raise RuntimeError("secret internal detail")

    events: list[LogEvent] = []
    broken = api(BrokenRoot())
    broken._log = Logger(observer=events.append)  # type: ignore[misc]
    code, _, body = fetch(StubTreq(broken.app.resource()), "/readyz")
    assert code == 500
    assert json.loads(body) == {"error": "internal_error", "status": 500}
    assert b"Traceback" not in body and b"secret internal detail" not in body
    assert [e["log_failure"].value.args for e in events if "log_failure" in e] == [
        ("secret internal detail",)
    ]


# -- CORS ------------------------------------------------------------------------------------------


def test_cors_off_by_default() -> None:
    """With no allowed origins, a cross-origin request gets its answer but no Allow-Origin, and a
    preflight is refused with 403."""
    treq = client(FakeRoot())
    code, headers, _ = fetch(treq, "/readyz", headers={"Origin": "https://dash.example"})
    assert code == 200
    assert "access-control-allow-origin" not in headers
    assert headers["vary"] == "Origin"
    code, headers, body = fetch(
        treq,
        "/metrics",
        "OPTIONS",
        {"Origin": "https://dash.example", "Access-Control-Request-Method": "GET"},
    )
    assert code == 403
    assert json.loads(body) == {"error": "origin_not_allowed", "status": 403}
    assert "access-control-allow-origin" not in headers


def test_cors_allowed_origin_and_preflight() -> None:
    """An allowed origin is echoed on answers (errors included) and its preflight is 204 with the
    allowed methods and headers; another origin gets nothing."""
    root = FakeRoot(config=config_with('web.cors.allowed_origins=["https://dash.example"]'))
    treq = client(root, metrics=Metrics(process=False))
    allowed = {"Origin": "https://dash.example"}
    for path in ("/health", "/healthz", "/livez", "/readyz", "/metrics", "/nope"):
        _, headers, _ = fetch(treq, path, headers=allowed)
        assert headers["access-control-allow-origin"] == "https://dash.example", path
    _, headers, _ = fetch(treq, "/readyz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in headers
    code, headers, body = fetch(
        treq,
        "/metrics",
        "OPTIONS",
        {**allowed, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "accept"},
    )
    assert (code, body) == (204, b"")
    assert headers["access-control-allow-origin"] == "https://dash.example"
    assert set(headers["access-control-allow-methods"].replace(" ", "").split(",")) == {
        "GET",
        "HEAD",
        "OPTIONS",
    }
    assert "Accept" in headers["access-control-allow-headers"]
    assert int(headers["access-control-max-age"]) > 0


def test_cors_wildcard_and_plain_options() -> None:
    """With "*" any origin gets Allow-Origin "*"; OPTIONS without an Origin is 204 with Allow."""
    treq = client(FakeRoot(config=config_with('web.cors.allowed_origins=["*"]')))
    _, headers, _ = fetch(treq, "/livez", headers={"Origin": "https://anything.example"})
    assert headers["access-control-allow-origin"] == "*"
    code, headers, _ = fetch(treq, "/livez", "OPTIONS")
    assert code == 204
    assert "GET" in headers["allow"] and "access-control-allow-origin" not in headers


def test_cors_follows_a_reloaded_config() -> None:
    """The allowed origins are read per request, so a reload that changes root.config applies."""
    root = FakeRoot()
    treq = client(root)
    origin = {"Origin": "https://dash.example"}
    assert "access-control-allow-origin" not in fetch(treq, "/livez", headers=origin)[1]
    root.config = config_with('web.cors.allowed_origins=["https://dash.example"]')
    assert fetch(treq, "/livez", headers=origin)[1]["access-control-allow-origin"] == "https://dash.example"


# -- the site and the service ----------------------------------------------------------------------


def test_site_logs_requests_at_debug_only() -> None:
    """The ops site logs each request as a debug event (twisted.web's info access line is off)."""
    events: list[LogEvent] = []
    ops = api(FakeRoot())
    site = GuardedSite(ops.app.resource(), lambda: ops.live.current, Clock())
    site._log = Logger(observer=events.append)  # type: ignore[misc]
    request = DummyRequest([b"readyz"])
    request.method = b"GET"
    request.path = b"/readyz"
    request.code = 200
    site.log(request)  # type: ignore[arg-type]
    assert [(e["log_level"], e["path"], e["code"]) for e in events] == [(LogLevel.debug, "/readyz", 200)]
    assert site.displayTracebacks is False


def test_service_listens_on_web_listen_and_stops() -> None:
    """OpsService binds web.listen when started (plain HTTP by default) and unbinds on stop."""
    reactor = MemoryReactorClock()
    config = config_with("web.listen=tcp:7979:interface=127.0.0.1")
    ops = OpsService(config, reactor, api(FakeRoot(config=config), reactor))
    d = ops.startService()
    assert d.called
    port, factory, _, interface = reactor.tcpServers[0]
    assert (port, interface) == (7979, "127.0.0.1")
    assert isinstance(factory, ConnectionGate) and isinstance(factory.wrappedFactory, GuardedSite)
    ops.stopService()
    assert ops.port is None


def test_service_serves_https_with_web_tls(tmp_path: Path) -> None:
    """With web.tls.enabled and no certificate of its own, the ops site serves TLS with the native
    listener's certificate (generated under <data_dir>/tls/)."""
    reactor = MemoryReactorClock()
    config = config_with(f"server.data_dir={tmp_path}", "web.tls.enabled=true")
    ops = OpsService(config, reactor, api(FakeRoot(config=config), reactor))
    d = ops.startService()
    assert d.called
    factory = reactor.tcpServers[0][1]
    assert isinstance(factory, ConnectionGate)
    assert isinstance(factory.wrappedFactory, TLSMemoryBIOFactory)
    assert isinstance(factory.wrappedFactory.wrappedFactory, GuardedSite)
    assert (tmp_path / "tls" / "server.pem").exists()
    ops.stopService()


def test_service_with_bad_certificate_files_fails_to_start(tmp_path: Path) -> None:
    """A web.tls certificate that is not PEM, or a key that is missing, fails the start with a
    logged error (no port is bound)."""
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    # A certificate without its key is already refused by config validation.
    with pytest.raises(ConfigError, match=r"web\.tls\.cert/web\.tls\.key: both must be set"):
        config_with(f"web.tls.cert={cert}", "web.tls.enabled=true")
    for settings, message in (([f"web.tls.cert={cert}", f"web.tls.key={cert}"], ""),):
        reactor = MemoryReactorClock()
        config = config_with(*settings, "web.tls.enabled=true")
        ops = OpsService(config, reactor, api(FakeRoot(config=config), reactor))
        events: list[LogEvent] = []
        ops._log = Logger(observer=events.append)  # type: ignore[misc]
        d = ops.startService()
        failures: list[Any] = []
        d.addErrback(failures.append)
        assert failures
        assert reactor.tcpServers == []
        assert [e["log_level"] for e in events] == [LogLevel.error]
        assert message in events[0]["error"]
        ops.stopService()


def test_console_is_served_from_the_package() -> None:
    """``/`` and ``/console/`` give the console's page; its listed assets are served with a
    Content-Security-Policy that allows this origin only; any other name is a JSON 404."""
    treq = client(FakeRoot())
    for path in ("/", "/console/"):
        code, headers, body = fetch(treq, path)
        assert code == 200 and headers["content-type"].startswith("text/html")
        assert b"<title>amaters console</title>" in body
        assert "default-src 'none'" in headers["content-security-policy"]
        assert "connect-src 'self'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    code, headers, body = fetch(treq, "/console/vendor/uPlot.iife.min.js")
    assert code == 200 and headers["content-type"].startswith("text/javascript") and b"uPlot" in body
    code, _, body = fetch(treq, "/console/console.js")
    assert code == 200 and b"sessionStorage" in body and b"document.cookie" not in body
    for path in (
        "/console/../ops.py",
        "/console/missing.js",
        "/console/vendor/../../ops.py",
        "/console/vendor",
    ):
        code, headers, body = fetch(treq, path)
        assert code == 404 and json.loads(body)["error"] == "not_found", path
    code, _, _ = fetch(treq, "/", method="POST")
    assert code == 405


def test_console_references_only_packaged_assets() -> None:
    """Every script and stylesheet the page loads is a file the ops site serves (no CDN)."""
    import re

    from amaters.web.assets import CONSOLE_FILES, ConsoleAssets

    page = ConsoleAssets().get("index.html")
    assert page is not None
    html = page[0].decode()
    refs = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert refs and all(ref.startswith("/console/") for ref in refs), refs
    assert {ref.removeprefix("/console/") for ref in refs} <= set(CONSOLE_FILES)
    for name in CONSOLE_FILES:
        assert ConsoleAssets().get(name) is not None
