"""gRPC deadlines, request timeouts, trace context and metrics, with the whole service tree
in-process (real reactor, real grpcio server over TLS on loopback) and a pipeline stage that holds
requests on one collection: the client is still the one generated from AmateRS's protos."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from grpc_upstream import UpstreamClient, error_code, generate_stubs, get_q, query, set_q, single_value
from twisted.internet import reactor, task, threads

from amaters.config import load_config
from amaters.query.pipeline import PipelineStage, RequestContext
from amaters.tap import build_service

pytestmark = pytest.mark.integration

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class HoldStage(PipelineStage):
    """Holds requests on collection ``slow`` for ``delay`` seconds; records what it saw."""

    name = "hold"

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.seen: list[tuple[str, Any]] = []
        self.finished: list[str] = []
        self.pending: list[Any] = []

    def before(self, ctx: RequestContext, op: Any) -> object:
        self.seen.append((ctx.protocol, ctx.annotations.get("trace_context")))
        if op.collection == "slow":
            d = task.deferLater(reactor, self.delay, lambda: None)
            self.pending.append(d)
            return d
        return None

    def after(self, ctx: RequestContext, op: Any, outcome: object) -> None:
        self.finished.append(op.name)


@attrs.define
class InProcess:
    root: Any
    client: UpstreamClient
    hold: HoldStage

    @property
    def grpc(self) -> Any:
        return self.root.getServiceNamed("grpc")

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """Run a driver call on a thread so the reactor (the server) keeps running."""
        return threads.deferToThread(self.client.call, *args, **kwargs)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_stubs(tmp_path_factory.mktemp("upstream-stubs"))


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path, stubs: Path) -> AsyncIterator[InProcess]:
    config = load_config(
        None,
        [
            "server.listen=tcp:0:interface=127.0.0.1",
            "grpc.listen=tcp:0:interface=127.0.0.1",
            "web.enabled=false",
            "storage.backend=memory",
            f"server.data_dir={tmp_path}",
            "server.shutdown_timeout=10",
            "limits.request_timeout=0.6",
        ],
        {},
    )
    root = build_service(config, reactor)
    await root.startService()
    hold = HoldStage(delay=2.0)
    root.components.pipeline.add_stage(hold)
    client = UpstreamClient(stubs)
    client.connect(root.getServiceNamed("grpc").port, tmp_path / "tls" / "ca.pem")
    try:
        yield InProcess(root, client, hold)
    finally:
        client.close()
        for d in hold.pending:  # let held requests finish before the tree stops
            if not d.called:
                await task.deferLater(reactor, hold.delay, lambda: None)
                break
        await root.stopService()


@pytest_twisted.ensureDeferred
async def test_deadline_shorter_than_a_slow_request(server: InProcess) -> None:
    """A call whose grpc-timeout passes while the pipeline still holds it ends with
    DEADLINE_EXCEEDED; its worker thread is released at once (the call no longer counts in flight)
    and other calls keep working."""
    answer = await server.call("ExecuteQuery", query(get_q("slow", b"k")), timeout=0.3)
    assert answer["ok"] is False and answer["code"] == "DEADLINE_EXCEEDED", answer
    for _ in range(50):  # the server notices the deadline on its own side (bounded wait)
        if server.grpc.inflight == 0:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert server.grpc.inflight == 0
    assert "get" not in server.hold.finished  # the held request is still running on the server
    fast = await server.call("ExecuteQuery", query(set_q("fast", b"k", b"v")), timeout=5)
    assert "success" in fast["response"]["result"]


@pytest_twisted.ensureDeferred
async def test_request_timeout_and_timeout_ms_answer_in_band(server: InProcess) -> None:
    """Without a client deadline, limits.request_timeout (0.6 s here) bounds the wait and answers
    NETWORK_TIMEOUT in-band, as on the native protocol; QueryRequest.timeout_ms shortens it."""
    answer = await server.call("ExecuteQuery", query(get_q("slow", b"k"), "t1"), timeout=30)
    response = answer["response"]
    assert error_code(response) == "ERROR_NETWORK_TIMEOUT" and response["request_id"] == "t1"
    assert response["error"]["category"] == "CATEGORY_RETRYABLE"
    short = query(get_q("slow", b"k"), "t2")
    short["timeout_ms"] = 100
    answer = await server.call("ExecuteQuery", short, timeout=30)
    assert error_code(answer["response"]) == "ERROR_NETWORK_TIMEOUT"
    assert "0.1 s" in answer["response"]["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_trace_context_protocol_label_and_metrics(server: InProcess) -> None:
    """traceparent metadata reaches the pipeline as the request's trace context; requests say
    protocol "grpc"; amaters_grpc_calls_total counts calls by method and status."""
    answer = await server.call(
        "ExecuteQuery", query(set_q("traced", b"k", b"v")), metadata=[("traceparent", TRACEPARENT)], timeout=5
    )
    assert answer["ok"], answer
    protocol, trace = server.hold.seen[-1]
    assert protocol == "grpc" and trace == {"traceparent": TRACEPARENT}
    got = await server.call("ExecuteQuery", query(get_q("traced", b"k")), timeout=5)
    assert single_value(got["response"]) == b"v"
    registry = server.root.components.metrics.registry
    ok = registry.get_sample_value("amaters_grpc_calls_total", {"method": "ExecuteQuery", "code": "OK"})
    assert ok is not None and ok >= 2
    assert registry.get_sample_value("amaters_requests_total", {"op": "set", "status": "ok"}) >= 1


class BrokenCursor:
    """A range cursor whose storage read fails the way a disk error would."""

    def next_chunk(self) -> Any:
        from twisted.internet import defer

        return defer.fail(OSError(5, "Input/output error", "/secret/path/000123.sst"))

    def close(self) -> None:
        pass


@pytest.mark.interpreted_only
@pytest_twisted.ensureDeferred
async def test_unexpected_storage_failure_mid_stream_is_a_generic_in_band_error(
    server: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure below the pipeline (a storage read error while streaming) reaches the client as
    SERVER_INTERNAL with a generic message, never the exception's text; the server logs it."""
    executor = server.root.components.pipeline.executor
    opened = executor.open_range
    monkeypatch.setattr(
        executor, "open_range", lambda op: BrokenCursor() if op.collection == "broken" else opened(op)
    )
    answer = await server.call("ExecuteStream", query({"range": {"collection": "broken"}}), timeout=10)
    assert answer["ok"], answer
    (message,) = answer["responses"]
    assert message["error"]["code"] == "ERROR_SERVER_INTERNAL"
    assert "secret" not in message["error"]["message"] and "Input/output" not in message["error"]["message"]
