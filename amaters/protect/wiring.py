"""Putting the protection layer into the service tree (called from ``amaters.tap``).

:func:`install_protection` runs once the listener and ``root.pipeline`` exist.  It only wires
objects (no I/O):

- the query cache in front of the pipeline's executor (after every stage, RBAC included);
- pipeline stages ``shed`` and ``ratelimit`` first (cheap refusals before any other work; a stage
  another feature puts first later still runs before them), and ``compression`` (blob checks);
- the connection limits outside TLS (``listener.gate_factory``) and per-frame compression on the
  listener's factory;
- reload: every component above and the listener's limits (``update_limits``) register with
  ``root.reloader``;
- a ``protection`` service that, when it starts, finds the reactor lag monitor for the shedder and
  registers the protection metrics on ``root.metrics`` (when the ops site has one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service

from amaters.config import Config, cache_settings
from amaters.protect.cache import QueryCache, install_cache
from amaters.protect.compression import BlobCompressionStage, FrameCompressionPolicy
from amaters.protect.connlimit import ConnectionLimiter, ConnectionLimitFactory
from amaters.protect.metrics import ProtectionCollector
from amaters.protect.ratelimit import RateLimiter, RateLimitStage
from amaters.protect.shedding import LagSource, LoadShedder


class ListenerLimits:
    """Reload adapter: new ``[limits]`` reach the listener's factory and the pipeline's validator."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        if new.limits == self.factory.limits:
            return None
        limits = new.limits
        return lambda: self.factory.update_limits(limits)


@attrs.define
class Protection:
    """What :func:`install_protection` built (tests and the admin API look here)."""

    cache: QueryCache
    limiter: RateLimiter
    shedder: LoadShedder
    connections: ConnectionLimiter
    frames: FrameCompressionPolicy
    blobs: BlobCompressionStage
    lag: LagSource
    collector: ProtectionCollector


class ProtectionService(service.Service):
    """Starts the shedder's lag source and publishes the protection metrics while running."""

    name = "protection"

    def __init__(self, root: Any, protection: Protection) -> None:
        self.root = root
        self.protection = protection
        self._registry: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.protection.lag.start()
        metrics = getattr(self.root, "metrics", None)
        registry = getattr(metrics, "registry", None)
        if registry is not None:
            registry.register(self.protection.collector)
            self._registry = registry

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.protection.lag.stop()
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.unregister(self.protection.collector)


def install_protection(root: Any, config: Config, reactor: Any) -> Protection:
    """Wire the protection layer into ``root`` (see the module docstring)."""
    pipeline = root.pipeline
    listener = root.getServiceNamed("listener")

    cache = install_cache(pipeline, cache_settings(config))

    lag = LagSource(root, reactor)
    shedder = LoadShedder(config.limits, lag, reactor)
    limiter = RateLimiter(config.rate_limit, reactor)
    first = pipeline.stages[0].name if pipeline.stages else None
    pipeline.add_stage(shedder, before=first)
    pipeline.add_stage(RateLimitStage(limiter), after=shedder.name)
    blobs = BlobCompressionStage(config.compression, config.limits, root.getServiceNamed("pools").cpu)
    pipeline.add_stage(blobs, after="ratelimit")

    connections = ConnectionLimiter(config.limits, reactor)
    listener.gate_factory = ConnectionLimitFactory.wrapper(connections)
    frames = FrameCompressionPolicy(config.compression)
    listener.factory.frame_compression = frames

    collector = ProtectionCollector(cache, limiter, shedder, connections)
    protection = Protection(cache, limiter, shedder, connections, frames, blobs, lag, collector)
    reloader = getattr(root, "reloader", None)
    if reloader is not None:
        for component in (
            ListenerLimits(listener.factory),
            limiter,
            shedder,
            connections,
            cache,
            frames,
            blobs,
        ):
            reloader.register(component)
    ProtectionService(root, protection).setServiceParent(root)
    root.protection = protection
    return protection


__all__ = ["ListenerLimits", "Protection", "ProtectionService", "install_protection"]
