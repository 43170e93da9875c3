"""Configuration reload: SIGHUP (or ``amaters reload``, or the admin API) applies a new config.

Reload is all or nothing.  It re-reads the same sources the server started from (file, environment,
``--set``), validates everything, then asks every reconfigurable component to *prepare* the new
settings (load the new certificate, parse the roles file, ...) without applying them.  Every
reload consults every component, even when no setting changed, because the files settings point at
(certificates, API keys, roles) may have been replaced in place.  Only when
every component has prepared does it *commit* them all; one failure anywhere leaves everything as it
was.  Settings that cannot change in a running process (listen endpoints, data dir, backend) are
reported as needing a restart and left alone.

The signal handler only schedules the reload on the reactor thread; reloads are serialized.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from amaters.config import (
    Config,
    ConfigError,
    LiveConfig,
    Sources,
    iter_settings,
    load_config,
    reloadable_differences,
)
from amaters.interfaces import IAuditSink

Commit = Callable[[], None]


class Reconfigurable(Protocol):
    """A component whose settings a reload may change.

    ``prepare`` builds everything the new config needs (reading files, parsing keys) and raises
    (ideally :class:`ConfigError`) if it cannot; it must not change the running component.  It returns
    the function that applies what it prepared (which must not fail), or None when there is nothing
    to apply.  It is called on every reload, changed settings or not: files may change in place.
    """

    def prepare_reload(self, old: Config, new: Config) -> Commit | None: ...


@attrs.frozen
class ReloadResult:
    """What a reload did: ``applied`` keys, keys that ``need_restart``, or the ``errors`` that stopped it."""

    ok: bool
    applied: tuple[str, ...] = ()
    need_restart: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "applied": list(self.applied),
            "need_restart": list(self.need_restart),
            "errors": list(self.errors),
        }


class Reloader:
    """Reloads the configuration in effect (``live``) through its registered components.

    ``loader`` reads ``live.sources`` again (the composition root passes one that runs the same
    checks as the start); config changes are audited to ``audit`` when given.
    """

    _log = Logger()

    def __init__(
        self,
        live: LiveConfig,
        audit: IAuditSink | None = None,
        environ: Mapping[str, str] | None = None,
        loader: Callable[[Sources, Mapping[str, str]], Any] | None = None,
    ) -> None:
        self.live = live
        self.audit = audit
        self._environ = environ
        self._loader = loader or _load_from_sources
        self.components: list[Reconfigurable] = []
        self._running: defer.Deferred[ReloadResult] | None = None
        self.last: ReloadResult | None = None

    def register(self, component: Reconfigurable) -> None:
        self.components.append(component)

    def reload(self, principal: str = "operator (signal)") -> defer.Deferred[ReloadResult]:
        """Reload now, or after the reload already running (reloads never overlap).

        ``principal`` names who asked, for the audit log.
        """
        if self._running is not None:
            previous = self._running
            d: defer.Deferred[ReloadResult] = defer.Deferred()

            def again(_: object) -> None:
                self.reload(principal).chainDeferred(d)

            previous.addBoth(again)
            return d
        running = defer.Deferred.fromCoroutine(self._reload(principal))
        if not running.called:
            self._running = running

            def done(result: object) -> object:
                self._running = None
                return result

            running.addBoth(done)
        return running

    def _audit(self, result: ReloadResult, principal: str) -> None:
        audit = self.audit
        if audit is None:
            return
        event = {
            "event_type": "config_change",
            "result": "success" if result.ok else "failure",
            "action": "reload",
            # Setting names only (never values): what changed.
            "resource": "config:" + (",".join(result.applied) or "-"),
            "principal": principal,
            "auth_method": "local",
            "error": "; ".join(result.errors) or None,
        }
        try:
            audit.emit(event)
        except Exception:
            self._log.failure("Could not write the reload audit event")

    async def _reload(self, principal: str) -> ReloadResult:
        old: Config = self.live.current
        environ = os.environ if self._environ is None else self._environ
        try:
            new = await defer.maybeDeferred(self._loader, self.live.sources, environ)
        except ConfigError as e:
            result = ReloadResult(ok=False, errors=tuple(e.problems))
            self._log.error(
                "Reload refused, configuration invalid; nothing changed: {problems}",
                problems="; ".join(e.problems),
            )
            return self._finish(result, principal)
        reloadable, restart = reloadable_differences(old, new)
        # Settings that need a restart keep their running values; apply only the reloadable ones.
        effective = _merge_reloadable(old, new, reloadable)
        commits: list[Commit] = []
        errors: list[str] = []
        for component in self.components:
            try:
                commit = component.prepare_reload(old, effective)
            except ConfigError as e:
                errors.extend(e.problems)
            except Exception as e:
                self._log.failure("Reload: {component} could not prepare", component=type(component).__name__)
                errors.append(f"{type(component).__name__}: {e}")
            else:
                if commit is not None:
                    commits.append(commit)
        if errors:
            result = ReloadResult(ok=False, errors=tuple(errors), need_restart=tuple(restart))
            self._log.error("Reload refused; nothing changed: {problems}", problems="; ".join(errors))
            return self._finish(result, principal)
        for commit in commits:
            try:
                commit()
            except Exception:
                # Commits are built not to fail; if one does, say so loudly.
                self._log.failure("Reload: applying a prepared setting failed")
        self.live.current = effective
        result = ReloadResult(ok=True, applied=tuple(reloadable), need_restart=tuple(restart))
        self._log.info(
            "Reloaded configuration; changed: {applied}; files re-read by {count} component(s){restart}",
            applied=", ".join(reloadable) or "no settings",
            count=len(commits),
            restart=f"; needs restart to apply: {', '.join(restart)}" if restart else "",
        )
        return self._finish(result, principal)

    def preview(self) -> defer.Deferred[dict[str, Any]]:
        """What a reload would change now, without changing anything.

        Re-reads the sources like :meth:`reload` and compares them with the configuration in effect:
        ``{"ok", "reloadable": [{"key", "current", "new"}], "need_restart": [...], "errors": [...]}``.
        Secret values are shown as ``<redacted>``; files the settings point at are not re-read.
        """
        return defer.Deferred.fromCoroutine(self._preview())

    async def _preview(self) -> dict[str, Any]:
        old: Config = self.live.current
        environ = os.environ if self._environ is None else self._environ
        try:
            new = await defer.maybeDeferred(self._loader, self.live.sources, environ)
        except ConfigError as e:
            return {"ok": False, "reloadable": [], "need_restart": [], "errors": list(e.problems)}
        reloadable, restart = reloadable_differences(old, new)
        secret = {dotted for dotted, attribute in iter_settings() if attribute.metadata.get("secret")}

        def change(dotted: str) -> dict[str, Any]:
            parts = dotted.split(".")
            if dotted in secret:
                return {"key": dotted, "current": "<redacted>", "new": "<redacted>"}
            return {"key": dotted, "current": _get_path(old, parts), "new": _get_path(new, parts)}

        return {
            "ok": True,
            "reloadable": [change(k) for k in reloadable],
            "need_restart": [change(k) for k in restart],
            "errors": [],
        }

    def _finish(self, result: ReloadResult, principal: str) -> ReloadResult:
        self.last = result
        self._audit(result, principal)
        return result


def _load_from_sources(sources: Sources, environ: Mapping[str, str]) -> Config:
    return load_config(sources.path, sources.overrides, environ)


def _merge_reloadable(old: Config, new: Config, reloadable: list[str]) -> Config:
    """``old`` with only the ``reloadable`` dotted keys taken from ``new``."""
    result = old
    for dotted in reloadable:
        parts = dotted.split(".")
        result = _set_path(result, parts, _get_path(new, parts))
    return attrs.evolve(result, source=new.source)


def _get_path(obj: Any, parts: list[str]) -> Any:
    for part in parts:
        obj = getattr(obj, part)
    return obj


def _set_path(obj: Any, parts: list[str], value: Any) -> Any:
    if len(parts) == 1:
        return attrs.evolve(obj, **{parts[0]: value})
    child = getattr(obj, parts[0])
    return attrs.evolve(obj, **{parts[0]: _set_path(child, parts[1:], value)})


class ReloaderService(service.Service):
    """Installs the SIGHUP handler while running; the handler only schedules a reload."""

    name = "reloader"
    _log = Logger()

    def __init__(self, reloader: Reloader, reactor: Any, install_signal: bool = True) -> None:
        self.reloader = reloader
        self.reactor = reactor
        self.install_signal = install_signal
        self._previous: Any = None

    def _on_sighup(self, signum: int, frame: Any) -> None:
        # Signal context: do nothing but hand the work to the reactor thread.
        self.reactor.callFromThread(self._reload_from_signal)

    def _reload_from_signal(self) -> None:
        self._log.info("SIGHUP received; reloading configuration")
        d = self.reloader.reload()
        d.addErrback(lambda f: self._log.failure("Reload failed", f))

    def startService(self) -> None:
        super().startService()
        if self.install_signal and hasattr(signal, "SIGHUP"):
            self._previous = signal.signal(signal.SIGHUP, self._on_sighup)

    def stopService(self) -> None:
        super().stopService()
        if self.install_signal and hasattr(signal, "SIGHUP") and self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
