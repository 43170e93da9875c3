"""The protection layer in the service tree: what build_service wires, and a SIGHUP-style reload
reaching every protection component (on a memory reactor, no I/O)."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock

from amaters.config import Sources, load_config
from amaters.protect.cache import CachingExecutor
from amaters.protect.wiring import ListenerLimits
from amaters.tap import build_service


def build(tmp_path: Path, text: str) -> tuple[object, Path]:
    path = tmp_path / "server.toml"
    path.write_text(text)
    config = load_config(
        path, [f"server.data_dir={tmp_path}", "storage.backend=memory", "grpc.enabled=false"], {}
    )
    root = build_service(
        config,
        MemoryReactorClock(),
        Sources(str(path), (f"server.data_dir={tmp_path}", "storage.backend=memory", "grpc.enabled=false")),
    )
    return root, path


def test_build_service_wires_protection(tmp_path: Path) -> None:
    """The cache wraps the executor; shed and ratelimit run before compression and every later
    stage; the connection gate and frame policy are on the listener; a protection service exists."""
    root, _ = build(tmp_path, "")
    pipeline = root.components.pipeline  # type: ignore[attr-defined]
    assert isinstance(pipeline.executor, CachingExecutor)
    names = [stage.name for stage in pipeline.stages]
    assert names.index("shed") < names.index("ratelimit") < names.index("compression")
    listener = root.getServiceNamed("listener")  # type: ignore[attr-defined]
    assert listener.gate_factory is not None
    assert listener.factory.frame_compression is root.components.protection.frames  # type: ignore[attr-defined]
    assert root.getServiceNamed("protection") is not None  # type: ignore[attr-defined]
    assert pipeline.executor is root.components.executor  # type: ignore[attr-defined]
    assert any(isinstance(c, ListenerLimits) for c in root.components.reloader.components)  # type: ignore[attr-defined]


def test_reload_reaches_every_protection_component(tmp_path: Path) -> None:
    """Changing limits, rate limits, cache and compression in the file and reloading applies them all."""
    root, path = build(tmp_path, "")
    protection = root.components.protection  # type: ignore[attr-defined]
    path.write_text(
        "[limits]\nmax_connections = 7\nshed_lag_ms = 250\nmax_key_bytes = 100\n"
        "[rate_limit]\nper_client_rps = 50.0\n"
        "[cache]\nmax_bytes = 4096\n"
        '[compression]\nframes = ["lz4"]\n'
    )
    d = root.components.reloader.reload()  # type: ignore[attr-defined]
    result = d.result  # type: ignore[attr-defined]
    assert result.ok, result.errors
    assert protection.connections.limits.max_connections == 7
    assert protection.shedder.limits.shed_lag_ms == 250
    assert protection.limiter.config.per_client_rps == 50.0 and protection.limiter.enabled
    assert protection.cache.max_bytes == 4096
    assert protection.frames.negotiate(["lz4"]) == "lz4"
    listener = root.getServiceNamed("listener")  # type: ignore[attr-defined]
    assert listener.factory.limits.max_key_bytes == 100
    assert root.components.pipeline.limits.max_key_bytes == 100  # type: ignore[attr-defined]


def test_protection_metrics_are_exported_while_running(tmp_path: Path) -> None:
    """While the protection service runs, cache and refusal counters are in the ops registry."""
    from amaters.ops.metrics import Metrics
    from amaters.protect.wiring import ProtectionService

    root, _ = build(tmp_path, "")
    protection = root.components.protection  # type: ignore[attr-defined]
    metrics = Metrics(process=False)
    protection.cache.hits = 3
    protection.limiter.refused_client = 2
    service = ProtectionService(metrics.registry, protection.collector)
    service.startService()
    text = metrics.exposition()[0].decode()
    assert 'amaters_cache_requests_total{result="hit"} 3.0' in text
    assert 'amaters_protection_refused_total{reason="client_rate"} 2.0' in text
    assert "amaters_requests_in_progress 0.0" in text
    service.stopService()
    assert "amaters_cache_requests_total" not in metrics.exposition()[0].decode()
