"""twistd Options and makeService: validation before the reactor runs, and wiring without I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from amaters.tap import AmatersService, Options, build_service, makeService


def test_options_collect_every_problem(capsys: pytest.CaptureFixture[str]) -> None:
    """postOptions prints every config problem on stderr and exits 2 before anything runs."""
    options = Options()
    with pytest.raises(SystemExit) as info:
        options.parseOptions(["--set", "storage.sync=bad", "--set", "server.nope=1"])
    assert info.value.code == 2
    text = capsys.readouterr().err
    assert "storage.sync" in text and "server.nope: unknown key" in text


def test_options_config_file_and_sets(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[server]\nshutdown_timeout = 3\n")
    options = Options()
    options.parseOptions(["--config", str(path), "--set", "logging.level=debug", "-s", "web.enabled=false"])
    assert options.config is not None
    assert options.config.server.shutdown_timeout == 3
    assert options.config.logging.level == "debug"
    assert options.sources is not None and options.sources.overrides == (
        "logging.level=debug",
        "web.enabled=false",
    )


def test_make_service_does_no_io(tmp_path: Path) -> None:
    """Wiring binds nothing, creates no files and starts nothing."""
    data_dir = tmp_path / "data"
    options = Options()
    options.parseOptions(["--set", f"server.data_dir={data_dir}"])
    reactor = MemoryReactorClock()
    root = makeService(options, reactor)
    assert isinstance(root, AmatersService)
    assert not data_dir.exists()
    assert reactor.tcpServers == []
    assert not root.running
    names = [child.name for child in root]
    assert names.index("pools") < names.index("storage") < names.index("web") < names.index("listener")
    assert names[-1] == "reloader"


def test_tree_start_and_stop_on_memory_reactor(tmp_path: Path) -> None:
    """The tree starts every child in order on a fake reactor, becomes ready, and stops cleanly."""
    from amaters.config import load_config

    config = load_config(
        None, [f"server.data_dir={tmp_path}", "storage.backend=memory", "grpc.enabled=false"], {}
    )
    reactor = MemoryReactorClock()
    root = build_service(config, reactor, synchronous_pools=True)
    d = root.startService()
    assert d.called, "memory reactor listens synchronously"
    assert root.ready
    ports = [port for port, *_ in reactor.tcpServers]
    assert 7879 in ports
    stopped = root.stopService()
    assert not root.ready
    assert stopped.called
