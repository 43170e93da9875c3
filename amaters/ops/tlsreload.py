"""TLS certificate rotation without a restart.

:class:`TLSReloader` takes part in configuration reload: it loads the certificate, key and client CA
the new configuration names (or the same files again, which is how a rotation in place is picked
up), builds the OpenSSL context to prove the material is good (key matching certificate, readable
CA), and only then swaps it into the listener.  New connections get the new certificate; open
connections keep the one they were made with.  A broken file leaves the old certificate serving and
the reload refused with a clear error.

:class:`CertificateWatcher` (``tls.watch = true``) polls the files' modification times and asks for a
reload when they change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from amaters.config import Config, ConfigError
from amaters.tls.certs import ensure_server_tls
from amaters.tls.context import server_tls_options


def _tls_settings(config: Config) -> tuple[Any, ...]:
    t = config.tls
    return (t.cert, t.key, t.ca, t.client_auth, t.crl)


def build_server_options(config: Config) -> Any:
    """The server's TLS options for ``config`` from the files on disk; raises ConfigError if bad."""
    try:
        files = ensure_server_tls(config)
        options = server_tls_options(
            files.cert,
            files.key,
            client_ca=config.tls.ca or None,
            client_auth=config.tls.client_auth,
            crl=config.tls.crl or None,
        )
        options.getContext()  # loads and cross-checks certificate, key and CA now
    except ConfigError:
        raise
    except Exception as e:  # OpenSSL.SSL.Error, OSError, ValueError: all mean "bad material"
        detail = str(e) or type(e).__name__
        raise ConfigError(
            [f"tls: cannot use the new certificate material ({detail}); kept the old one"]
        ) from None
    return options


class TLSReloader:
    """Swaps the listener's TLS material on reload (a :class:`amaters.ops.reload.Reconfigurable`)."""

    _log = Logger()

    def __init__(self, listener: Any) -> None:
        self.listener = listener

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        creator = getattr(self.listener, "tls", None)
        if creator is None or not new.tls.enabled:
            return None  # plain TCP listener: nothing to rotate
        options = build_server_options(new)

        def commit() -> None:
            creator.swap(options)
            self._log.info("TLS certificate reloaded; new connections use it")

        return commit


def watched_files(config: Config) -> list[Path]:
    """The TLS files whose change triggers a reload."""
    names = [config.tls.cert, config.tls.key, config.tls.ca, config.tls.crl]
    paths = [Path(n) for n in names if n]
    if not config.tls.cert:
        tls_dir = config.data_dir / "tls"
        paths += [tls_dir / "server.pem", tls_dir / "server.key"]
    return paths


class CertificateWatcher(service.Service):
    """Polls the TLS files every ``interval`` seconds; a change asks ``reload`` to run.

    The poll never raises out of the timer (a failing tick is logged and the next one runs), and
    waits for a reload it started before looking again.
    """

    name = "certwatch"
    _log = Logger()

    def __init__(
        self,
        config_source: Callable[[], Config],
        reload: Callable[[], defer.Deferred[Any]],
        clock: Any,
        interval: float = 2.0,
    ) -> None:
        self.config_source = config_source
        self.reload = reload
        self.clock = clock
        self.interval = interval
        self._seen: dict[Path, tuple[float, int] | None] = {}
        self._loop: task.LoopingCall | None = None

    def _stamp(self, path: Path) -> tuple[float, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def snapshot(self) -> dict[Path, tuple[float, int] | None]:
        return {path: self._stamp(path) for path in watched_files(self.config_source())}

    def startService(self) -> None:
        super().startService()
        self._seen = self.snapshot()
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.clock
        d = self._loop.start(self.interval, now=False)
        d.addErrback(lambda f: self._log.failure("Certificate watcher stopped", f))

    def check(self) -> defer.Deferred[Any] | None:
        try:
            current = self.snapshot()
        except Exception:
            self._log.failure("Could not check the TLS files")
            return None
        if current == self._seen:
            return None
        self._seen = current
        self._log.info("TLS files changed; reloading")
        d = self.reload()
        d.addErrback(lambda f: self._log.failure("Reload after a certificate change failed", f))
        return d

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
