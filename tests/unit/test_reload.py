"""Reload: all or nothing across components, restart-only keys reported, reloads serialized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer

from amaters.config import Config, ConfigError, LiveConfig, Sources, load_config
from amaters.ops.reload import Reloader, ReloadResult


class FakeRoot(LiveConfig):
    """The live config, with the audit sink beside it."""

    def __init__(self, config: Config, sources: Sources) -> None:
        super().__init__(config, sources)
        self.audit = FakeAudit()

    @property
    def config(self) -> Config:
        return self.current


class FakeAudit:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)


class Component:
    """Records what it prepared and committed; may refuse."""

    def __init__(self, refuse: str | None = None) -> None:
        self.refuse = refuse
        self.applied: list[Config] = []
        self.prepared = 0

    def prepare_reload(self, old: Config, new: Config) -> Any:
        self.prepared += 1
        if self.refuse:
            raise ConfigError([self.refuse])
        return lambda: self.applied.append(new)


def setup(tmp_path: Path, text: str) -> tuple[Path, FakeRoot]:
    path = tmp_path / "s.toml"
    path.write_text(text)
    sources = Sources(str(path))
    return path, FakeRoot(load_config(path, [], {}), sources)


def result_of(d: defer.Deferred[ReloadResult]) -> ReloadResult:
    assert d.called
    return d.result  # type: ignore[attr-defined,no-any-return]


def test_applies_reloadable_changes_to_every_component(tmp_path: Path) -> None:
    path, root = setup(tmp_path, '[logging]\nlevel = "info"\n')
    a, b = Component(), Component()
    reloader = Reloader(root, root.audit, environ={})
    reloader.register(a)
    reloader.register(b)
    path.write_text('[logging]\nlevel = "debug"\n')
    result = result_of(reloader.reload())
    assert result.ok and result.applied == ("logging.level",)
    assert root.config.logging.level == "debug"
    assert a.applied[0].logging.level == "debug" and b.applied[0].logging.level == "debug"
    assert root.audit.events[-1]["event_type"] == "config_change"
    assert root.audit.events[-1]["result"] == "success"


def test_invalid_file_changes_nothing(tmp_path: Path) -> None:
    """An invalid file is refused with every problem, and no component is touched."""
    path, root = setup(tmp_path, '[logging]\nlevel = "info"\n')
    a = Component()
    reloader = Reloader(root, root.audit, environ={})
    reloader.register(a)
    before = root.config
    path.write_text('[logging]\nlevel = "loud"\n[limits]\nmax_key_bytes = 0\n')
    result = result_of(reloader.reload())
    assert not result.ok
    assert len(result.errors) == 2
    assert root.config is before
    assert a.prepared == 0 and a.applied == []
    assert root.audit.events[-1]["result"] == "failure"


def test_one_component_refusing_applies_nothing(tmp_path: Path) -> None:
    """If one component cannot prepare (e.g. a broken certificate), no component commits."""
    path, root = setup(tmp_path, '[logging]\nlevel = "info"\n')
    good, bad = Component(), Component(refuse="tls.cert: broken certificate")
    reloader = Reloader(root, root.audit, environ={})
    reloader.register(good)
    reloader.register(bad)
    path.write_text('[logging]\nlevel = "debug"\n')
    result = result_of(reloader.reload())
    assert not result.ok and result.errors == ("tls.cert: broken certificate",)
    assert good.applied == []
    assert root.config.logging.level == "info"


def test_restart_only_keys_are_reported_not_applied(tmp_path: Path) -> None:
    path, root = setup(tmp_path, '[logging]\nlevel = "info"\n')
    reloader = Reloader(root, root.audit, environ={})
    path.write_text('[logging]\nlevel = "warn"\n[server]\nlisten = "tcp:7000:interface=127.0.0.1"\n')
    result = result_of(reloader.reload())
    assert result.ok
    assert result.applied == ("logging.level",)
    assert result.need_restart == ("server.listen",)
    assert root.config.logging.level == "warn"
    assert root.config.server.listen == "tcp:7878:interface=127.0.0.1"  # unchanged until restart


def test_reloads_do_not_overlap(tmp_path: Path) -> None:
    """A reload requested while one is running runs after it, not beside it."""
    path, root = setup(tmp_path, '[logging]\nlevel = "info"\n')
    gate: defer.Deferred[Config] = defer.Deferred()
    calls: list[str] = []

    def slow_loader(sources: Sources, environ: Any) -> Any:
        calls.append("load")
        if len(calls) == 1:
            return gate
        return load_config(sources.path, [], {})

    reloader = Reloader(root, root.audit, environ={}, loader=slow_loader)
    path.write_text('[logging]\nlevel = "debug"\n')
    first = reloader.reload()
    second = reloader.reload()
    assert calls == ["load"]
    assert not second.called
    gate.callback(load_config(path, [], {}))
    assert calls == ["load", "load"]
    assert first.called and second.called


def preview_of(reloader: Reloader) -> Any:
    d = reloader.preview()
    assert d.called
    return getattr(d, "result")  # noqa: B009


def test_preview_says_what_a_reload_would_change_and_changes_nothing(tmp_path: Path) -> None:
    """The preview lists reloadable and restart-only changes with both values, secrets redacted,
    or the problems of an invalid file; no component is asked and nothing is audited."""
    secret = "preview-secret-0123456789abcdef-0123"
    path, root = setup(tmp_path, '[logging]\nlevel = "info"\n')
    a = Component()
    reloader = Reloader(root, root.audit, environ={})
    reloader.register(a)
    assert preview_of(reloader) == {"ok": True, "reloadable": [], "need_restart": [], "errors": []}
    path.write_text(
        f'[logging]\nlevel = "debug"\n[server]\nlisten = "tcp:7000:interface=127.0.0.1"\n'
        f'[auth.jwt]\nsecret = "{secret}"\n'
    )
    before = root.config
    preview = preview_of(reloader)
    assert preview["ok"] is True
    changes = {c["key"]: c for c in preview["reloadable"]}
    assert changes["logging.level"] == {"key": "logging.level", "current": "info", "new": "debug"}
    assert changes["auth.jwt.secret"] == {
        "key": "auth.jwt.secret",
        "current": "<redacted>",
        "new": "<redacted>",
    }
    assert [c["key"] for c in preview["need_restart"]] == ["server.listen"]
    assert secret not in repr(preview)
    assert root.config is before and a.prepared == 0 and root.audit.events == []

    path.write_text('[logging]\nlevel = "loud"\n')
    refused = preview_of(reloader)
    assert refused["ok"] is False and refused["errors"] and "logging.level" in refused["errors"][0]
