"""The protection layer's pieces as the composition root holds them, its reload adapter for the
listener's limits, and the service that publishes its metrics.

:mod:`amaters.compose` builds the query cache (wrapping the executor), the ``shed``, ``ratelimit``
and ``compression`` stages, the connection limits outside TLS and the per-frame compression policy,
and registers each with the reloader.  ``docs/limits.md`` lists every limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service

from amaters.config import Config
from amaters.protect.cache import QueryCache
from amaters.protect.compression import BlobCompressionStage, FrameCompressionPolicy
from amaters.protect.connlimit import ConnectionLimiter
from amaters.protect.metrics import ProtectionCollector
from amaters.protect.ratelimit import RateLimiter
from amaters.protect.shedding import LoadShedder


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
    """The protection layer's components (tests and the reloader look here)."""

    cache: QueryCache
    limiter: RateLimiter
    shedder: LoadShedder
    connections: ConnectionLimiter
    frames: FrameCompressionPolicy
    blobs: BlobCompressionStage
    collector: ProtectionCollector


class ProtectionService(service.Service):
    """Publishes the protection metrics in the ops registry while running."""

    name = "protection"

    def __init__(self, registry: Any, collector: ProtectionCollector) -> None:
        self.registry = registry
        self.collector = collector

    def startService(self) -> None:
        super().startService()
        self.registry.register(self.collector)

    def stopService(self) -> None:
        super().stopService()
        self.registry.unregister(self.collector)


__all__ = ["ListenerLimits", "Protection", "ProtectionService"]
