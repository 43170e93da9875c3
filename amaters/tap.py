"""twistd entry point: ``Options`` parses and validates, ``makeService`` wires the service tree.

``makeService`` does no I/O: binding ports, opening storage and generating TLS files all happen when
the services start.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from amaters import __version__
from amaters.config import Config, ConfigError, Sources, load_config
from amaters.ops.reload import Reloader, ReloaderService
from amaters.service import AsyncMultiService, ThreadPoolService
from amaters.storage import build_backend
from amaters.storage.service import StorageService


class Options(usage.Options):
    """``twistd amaters [--config FILE] [--set section.key=value ...]``."""

    synopsis = "[--config FILE] [--set section.key=value ...]"
    longdesc = (
        "Run the amaters encrypted key-value server. Settings come from built-in defaults, the TOML"
        " file, AMATERS_<SECTION>__<KEY> environment variables and --set, in that order."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.overrides: list[str] = []
        self.config: Config | None = None
        self.sources: Sources | None = None

    def opt_set(self, value: str) -> None:
        """Override one setting: section.key=value (repeatable)."""
        self.overrides.append(value)

    opt_s = opt_set

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"amaters {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        self.sources = Sources(self["config"], tuple(self.overrides), None)
        try:
            self.config = load_config(self["config"], self.overrides, os.environ)
        except ConfigError as e:
            raise usage.UsageError("invalid configuration:\n  " + "\n  ".join(e.problems)) from None


def _exit_with(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class AmatersService(AsyncMultiService):
    """The root of the service tree.  Ready when every child has started and no stop has begun."""

    _log = Logger()

    def __init__(self, config: Config, reactor: Any, sources: Sources | None = None) -> None:
        super().__init__()
        self.config = config
        self.sources = sources or Sources(config.source or None)
        self.reactor = reactor
        self.started_at: float | None = None
        self.reloader: Reloader | None = None

    @property
    def ready(self) -> bool:
        return self.state == "running"

    @property
    def draining(self) -> bool:
        return self.state == "stopping"

    #: Set by makeService: a start failure stops the reactor and the process exits 1.
    exit_on_failure = False

    def startService(self) -> Any:
        self.started_at = self.reactor.seconds()
        d = super().startService()
        d.addErrback(self._start_failed)
        return d

    def _start_failed(self, failure: Failure) -> None:
        self._log.critical("amaters failed to start: {error}", error=failure.getErrorMessage())
        self._fail_process()

    def _fail_process(self) -> None:
        if not self.exit_on_failure:
            return
        self.exit_on_failure = False  # once
        # twistd exits 0 after the reactor stops; make a failed start or stop exit 1.
        atexit.register(_exit_with, 1)
        if self.reactor.running:
            self.reactor.callLater(0, self.reactor.stop)

    def stopService(self) -> Any:
        """Stop every child in reverse order, bounded by ``server.shutdown_timeout``."""
        d = super().stopService()
        timeout = self.config.server.shutdown_timeout
        if timeout > 0:
            d.addTimeout(timeout, self.reactor)

        def failed(failure: Failure) -> None:
            if failure.check(defer.TimeoutError):
                self._log.error(
                    "Shutdown did not finish within server.shutdown_timeout={timeout}s",
                    timeout=timeout,
                )
            else:
                self._log.error("Shutdown failed: {error}", error=failure.getErrorMessage())
            self._fail_process()

        def succeeded(result: object) -> object:
            if self.exit_on_failure and hasattr(self.reactor, "_exitSignal"):
                # twistd re-raises SIGTERM/SIGINT on itself after shutdown so the exit status says
                # "killed by signal"; a drain that finished cleanly is a successful exit (0).
                self.reactor._exitSignal = None
            return result

        d.addCallbacks(succeeded, failed)
        return d


class PoolsService(AsyncMultiService):
    """The thread pools for blocking and CPU-heavy work, started first and stopped last."""

    name = "pools"

    def __init__(self, reactor: Any, synchronous: bool = False) -> None:
        super().__init__()
        #: fsync and other blocking file I/O (group commit waits here, not on the reactor).
        self.io = ThreadPoolService(reactor, "io", 0, 4, synchronous)
        #: CPU-heavy work: compression of large blobs, snapshots, FHE evaluation.
        self.cpu = ThreadPoolService(reactor, "cpu", 0, 2, synchronous)
        self.io.setServiceParent(self)
        self.cpu.setServiceParent(self)


def build_service(
    config: Config,
    reactor: Any = None,
    sources: Sources | None = None,
    *,
    synchronous_pools: bool = False,
) -> AmatersService:
    """Wire the whole service tree for ``config``.  No I/O happens until it starts.

    Children, started in this order and stopped in reverse: pools, storage, flusher, web, listener.
    The ops site starts before the listener and stops after it, so ``/readyz`` answers 503 while the
    listener drains.  ``synchronous_pools`` runs pool work inline (unit tests on fake reactors).
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    root = AmatersService(config, reactor, sources)
    # Components whose settings SIGHUP may change register here (see amaters.ops.reload).
    root.reloader = Reloader(root)
    pools = PoolsService(reactor, synchronous_pools)
    pools.setServiceParent(root)
    backend = build_backend(config, reactor, pools)
    root.backend = backend  # type: ignore[attr-defined]
    storage = StorageService(backend)
    storage.setServiceParent(root)

    # -- storage flusher (storage issue) --------------------------------------------------
    from amaters.storage.flusher import FlusherService

    FlusherService.from_config(backend, config.storage, reactor).setServiceParent(root)
    # -- end storage flusher ---------------------------------------------------------------

    # -- snapshots (operations issue) -----------------------------------------------------
    # Scheduled snapshots every snapshot.interval seconds; stops (awaiting a running snapshot)
    # before the storage closes.
    if config.storage.backend == "rocksdb" and config.snapshot.interval > 0:
        from amaters.storage.snapshot import SnapshotScheduler

        SnapshotScheduler(backend, config, pools, reactor).setServiceParent(root)
    # -- end snapshots ---------------------------------------------------------------------

    from amaters.web.ops import OpsService

    if config.web.enabled:
        OpsService(config, reactor, root).setServiceParent(root)

    # -- auth (auth issue): portal, RBAC and audit, attached to root before the listener --
    # "audit" and "auth" start before the listener (keys and roles are loaded when they start) and
    # stop after it.  root.audit is the audit sink; root.authenticator the handshake's login hook.
    from amaters.auth.service import build_auth

    auth = build_auth(config, reactor, root)
    # -- end auth --------------------------------------------------------------------------

    # -- protocol listener (protocol issue) -----------------------------------------------
    # The native protocol: QueryExecutor over the backend, behind root.pipeline (later issues add
    # pipeline stages there), served by the "listener" service.  Last to start, first to stop.
    from amaters.protocols.server import build_listener

    build_listener(config, reactor, root).setServiceParent(root)  # type: ignore[no-untyped-call]
    # -- end protocol listener -------------------------------------------------------------

    # -- protection (protection issue) ----------------------------------------------------
    # Query cache in front of the executor, shedding and rate-limit stages first in
    # root.pipeline, compressed-blob checks, connection limits outside TLS, per-frame compression;
    # all registered with root.reloader.  docs/limits.md lists every limit.
    from amaters.protect.wiring import install_protection

    install_protection(root, config, reactor)
    # -- end protection --------------------------------------------------------------------

    # -- auth stages (auth issue): RBAC after admission stages in root.pipeline; audit; login --
    auth.install(root.pipeline, root.getServiceNamed("listener"))  # type: ignore[attr-defined]
    # -- end auth stages -------------------------------------------------------------------

    # -- observability (observability issue): metrics, logging, tracing --------------------
    # After the listener: it adds pipeline stages to root.pipeline and hooks the listener.  It
    # places its services itself: "logging" first (starts first, stops last), "lagmonitor",
    # "tracing" and "metrics" just before the listener (they stop after it has drained).
    from amaters.ops.observability import install_observability

    install_observability(root, config, reactor)
    # -- end observability -----------------------------------------------------------------

    # -- gRPC front end: AqlService on root.pipeline, logins through the listener's hook ------
    # Just before the listener: it stops (drains, then GOAWAY) after the native listener and
    # before metrics, tracing and the storage; new calls are refused as soon as the stop begins.
    if config.grpc.enabled:
        from amaters.ops.observability import _insert_before
        from amaters.protocols.grpc_service import GrpcService

        listener = root.getServiceNamed("listener")
        grpc_service = GrpcService(
            config,
            reactor,
            root.pipeline,  # type: ignore[attr-defined]
            lambda *args: listener.factory.authenticate(*args),
            lambda: bool(root.ready),
        )
        _insert_before(root, grpc_service, "listener")
        root.reloader.register(grpc_service)
        metrics = getattr(root, "metrics", None)
        if metrics is not None:
            grpc_service.observe(metrics.registry)
    # -- end gRPC front end ------------------------------------------------------------------

    # TLS rotation on reload, and on file change with tls.watch.
    from amaters.ops.tlsreload import CertificateWatcher, TLSReloader

    root.reloader.register(TLSReloader(root.getServiceNamed("listener")))
    if config.tls.enabled and config.tls.watch:
        CertificateWatcher(lambda: root.config, root.reloader.reload, reactor).setServiceParent(root)

    # Last to start, first to stop: SIGHUP reloads only while everything else runs.
    ReloaderService(root.reloader, reactor).setServiceParent(root)
    return root


def makeService(options: Options, reactor: Any = None) -> service.IService:
    """twistd's hook: the service tree for the parsed options."""
    assert options.config is not None, "postOptions validates the config"
    root = build_service(options.config, reactor, options.sources)
    root.exit_on_failure = True
    return root
