"""The composition root: the tree and the pipeline it builds match docs/architecture.md, it does no
I/O, and every front end shares one pipeline and one authenticator."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from amaters.compose import build_service
from amaters.config import load_config
from amaters.interfaces import IPipelineStage, IServerAdmin

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def documented_children() -> list[str]:
    text = DOC.read_text()
    block = text.split("amaters (AmatersService, an AsyncMultiService)", 1)[1].split("```", 1)[0]
    return re.findall(r"[├└]─ (\w+)", block)


def documented_stages() -> list[str]:
    line = re.search(r"^\s+(tracing → .*)$", DOC.read_text(), re.MULTILINE)
    assert line is not None
    return [name.strip() for name in line.group(1).split("→")]


def build(tmp_path: Path, *overrides: str) -> object:
    config = load_config(
        None,
        [
            f"server.data_dir={tmp_path / 'data'}",
            "storage.backend=rocksdb",
            "snapshot.interval=60",
            "tracing.enabled=true",
            "tls.watch=true",
            *overrides,
        ],
        {},
    )
    return build_service(config, MemoryReactorClock(), synchronous_pools=True)


def test_tree_is_the_documented_tree(tmp_path: Path) -> None:
    """With every optional service on, the children are exactly the documented ones, in order."""
    root = build(tmp_path)
    assert [child.name for child in root] == documented_children()  # type: ignore[attr-defined]
    assert not (tmp_path / "data").exists()  # building does no I/O


def test_pipeline_is_the_documented_pipeline(tmp_path: Path) -> None:
    """With auth, audit and tracing on, the stages are exactly the documented ones, in order."""
    root = build(
        tmp_path,
        "auth.enabled=true",
        "auth.jwt.secret=" + "s" * 40,
        "audit.enabled=true",
        f"audit.path={tmp_path / 'audit.log'}",
    )
    pipeline = root.components.pipeline  # type: ignore[attr-defined]
    assert [stage.name for stage in pipeline.stages] == documented_stages()
    for stage in pipeline.stages:
        assert verifyObject(IPipelineStage, stage)
    assert verifyObject(IServerAdmin, root.components.executor.admin)  # type: ignore[attr-defined]


def test_front_ends_share_one_pipeline_and_one_authenticator(tmp_path: Path) -> None:
    """The native listener and the admin API are handed the same pipeline and the same login."""
    root = build(tmp_path)
    components = root.components  # type: ignore[attr-defined]
    listener = components.listener
    admin = components.web.api.admin
    assert listener.pipeline is components.pipeline is admin.pipeline
    assert listener.factory.authenticate is components.authenticate is admin.authenticate


def test_no_component_holds_the_root(tmp_path: Path) -> None:
    """No service or component keeps a reference to the root service (besides Twisted's own
    ``parent`` link of a child service)."""
    root = build(tmp_path)
    seen: set[int] = set()

    def walk(obj: object, depth: int) -> None:
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        for name, value in getattr(obj, "__dict__", {}).items():
            if name == "parent":
                continue
            assert value is not root or obj is root, f"{type(obj).__name__} holds the root"
            if hasattr(value, "__dict__") and type(value).__module__.startswith("amaters"):
                walk(value, depth + 1)

    for child in root:  # type: ignore[attr-defined]
        walk(child, 0)


@pytest.mark.interpreted_only
def test_a_get_goes_down_the_layers_once(tmp_path: Path) -> None:
    """A GET through the composed tree (auth, RBAC, audit, metrics, cache all on), from the frame to
    the backend: every call between the project's modules goes down the request path, protocol →
    pipeline → stages → executor (through the cache) → storage; nothing below the protocol calls
    back up into it, and nothing below the pipeline calls back into the pipeline."""
    import sys
    import time

    import jwt
    from twisted.internet.testing import StringTransport

    from amaters.proto import envelope_pb2, types_pb2
    from amaters.protocols.framing import encode_frame

    secret = "s" * 40
    root = build(
        tmp_path,
        "storage.backend=memory",
        "snapshot.interval=0",
        "tracing.enabled=false",
        "tls.watch=false",
        "grpc.enabled=false",  # grpcio binds real sockets, not the memory reactor's
        "auth.enabled=true",
        f"auth.jwt.secret={secret}",
        "audit.enabled=true",
        f"audit.path={tmp_path / 'audit.log'}",
    )
    started = root.startService()  # type: ignore[attr-defined]
    assert started.called and started.result is None  # type: ignore[attr-defined]
    try:
        protocol = root.components.listener.factory.buildProtocol(None)  # type: ignore[attr-defined]
        transport = StringTransport()
        protocol.makeConnection(transport)
        token = jwt.encode({"sub": "u", "roles": ["admin"], "exp": int(time.time()) + 60}, secret, "HS256")
        handshake = envelope_pb2.Handshake(version=types_pb2.Version(major=1), client_name="test")
        handshake.credentials.bearer_token = token
        protocol.dataReceived(
            encode_frame(envelope_pb2.Envelope(request_id=1, handshake=handshake).SerializeToString())
        )
        from protocol_helpers import q_get, q_set

        protocol.dataReceived(encode_frame(q_set(2, "c", b"k", b"v").SerializeToString()))
        transport.clear()
        get = encode_frame(q_get(3, "c", b"k").SerializeToString())

        edges: set[tuple[str, str]] = set()

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event != "call" or frame.f_back is None:
                return
            callee = frame.f_globals.get("__name__", "")
            caller = frame.f_back.f_globals.get("__name__", "")
            if callee.startswith("amaters.") and caller.startswith("amaters.") and callee != caller:
                edges.add((caller, callee))

        sys.setprofile(profile)
        try:
            protocol.dataReceived(get)
        finally:
            sys.setprofile(None)
        assert b"v" in transport.value()  # answered, synchronously, from the memory backend

        modules = {m for edge in edges for m in edge}
        assert {"amaters.protocols.server", "amaters.query.pipeline", "amaters.query.executor"} <= modules
        assert any(callee.startswith("amaters.storage.") for _, callee in edges)
        into_protocol = {caller for caller, callee in edges if callee == "amaters.protocols.server"}
        assert into_protocol <= {"amaters.protocols.framing"}, into_protocol
        into_pipeline = {caller for caller, callee in edges if callee == "amaters.query.pipeline"}
        # The native protocol's request path: its protocol class, and the calls it makes for it.
        assert into_pipeline <= {"amaters.protocols.server", "amaters.protocols.keyed"}, into_pipeline
        storage_callers = {caller for caller, callee in edges if callee.startswith("amaters.storage.")}
        assert not {c for c in storage_callers if c.startswith(("amaters.protocols", "amaters.web"))}
    finally:
        protocol.transport.loseConnection()
        protocol.connectionLost(None)
        root.stopService()  # type: ignore[attr-defined]
