"""Prometheus metrics of the protection layer, as a collector for the ops site's registry.

:class:`ProtectionCollector` reads the counters the components keep (nothing is counted twice) and
is registered on ``root.metrics.registry`` when the observability wiring has created one
(:func:`amaters.protect.wiring.install_protection` does it when the service starts):

- ``amaters_cache_requests_total{result="hit"|"miss"}``, ``amaters_cache_evictions_total``,
  ``amaters_cache_invalidations_total``, ``amaters_cache_entries``, ``amaters_cache_bytes``,
  ``amaters_cache_max_bytes``;
- ``amaters_protection_refused_total{reason}``: requests and connections refused, by reason:
  ``client_rate``, ``global_rate``, ``shed_lag``, ``shed_queue`` (answered ``SERVER_OVERLOADED``),
  ``max_connections``, ``max_connections_per_ip`` (closed on accept);
- ``amaters_requests_in_progress``: requests admitted by the shedder and not yet answered;
- ``amaters_rate_limit_buckets``: client buckets held.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class ProtectionCollector(Collector):
    """Collects from whichever of ``cache``, ``limiter``, ``shedder``, ``connections`` exist."""

    def __init__(
        self,
        cache: Any = None,
        limiter: Any = None,
        shedder: Any = None,
        connections: Any = None,
    ) -> None:
        self.cache = cache
        self.limiter = limiter
        self.shedder = shedder
        self.connections = connections

    def describe(self) -> Iterable[Metric]:
        return list(self.collect())

    def collect(self) -> Iterable[Metric]:
        found: list[Metric] = []
        cache = self.cache
        if cache is not None:
            stats = cache.stats()
            requests = CounterMetricFamily(
                "amaters_cache_requests", "GETs looked up in the query cache, by result.", labels=["result"]
            )
            requests.add_metric(["hit"], stats["hits"])
            requests.add_metric(["miss"], stats["misses"])
            found.append(requests)
            found.append(
                CounterMetricFamily(
                    "amaters_cache_evictions",
                    "Query cache entries evicted for space.",
                    value=stats["evictions"],
                )
            )
            found.append(
                CounterMetricFamily(
                    "amaters_cache_invalidations",
                    "Query cache entries dropped by writes and collection drops.",
                    value=stats["invalidations"],
                )
            )
            found.append(
                GaugeMetricFamily("amaters_cache_entries", "Query cache entries.", value=stats["entries"])
            )
            found.append(
                GaugeMetricFamily("amaters_cache_bytes", "Query cache size in bytes.", value=stats["bytes"])
            )
            found.append(
                GaugeMetricFamily(
                    "amaters_cache_max_bytes",
                    "Query cache bound (cache.max_bytes; 0: off).",
                    value=stats["max_bytes"],
                )
            )
        refused = CounterMetricFamily(
            "amaters_protection_refused",
            "Requests (SERVER_OVERLOADED) and connections (closed on accept) refused by a limit.",
            labels=["reason"],
        )
        any_refused = False
        if self.limiter is not None:
            refused.add_metric(["client_rate"], self.limiter.refused_client)
            refused.add_metric(["global_rate"], self.limiter.refused_global)
            found.append(
                GaugeMetricFamily(
                    "amaters_rate_limit_buckets",
                    "Client rate-limit buckets held.",
                    value=self.limiter.bucket_count,
                )
            )
            any_refused = True
        if self.shedder is not None:
            refused.add_metric(["shed_lag"], self.shedder.shed_lag)
            refused.add_metric(["shed_queue"], self.shedder.shed_queue)
            found.append(
                GaugeMetricFamily(
                    "amaters_requests_in_progress",
                    "Requests admitted and not yet answered, server-wide.",
                    value=self.shedder.in_progress,
                )
            )
            any_refused = True
        if self.connections is not None:
            refused.add_metric(["max_connections"], self.connections.refused_total)
            refused.add_metric(["max_connections_per_ip"], self.connections.refused_per_ip)
            any_refused = True
        if any_refused:
            found.append(refused)
        return found


__all__ = ["ProtectionCollector"]
