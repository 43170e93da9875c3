"""The registry's custom collectors, apart from :mod:`amaters.ops.metrics`.

That module is compiled in a wheel (:mod:`amaters.compiled`), and a compiled module cannot hold
classes derived from ``prometheus_client``'s: they are here, interpreted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Flush", "StorageCollector", "WithoutCreated"]


class Flush(Collector):
    """Registered first: a collection starts by flushing the request tallies (and yields nothing)."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        self._flush()
        return []


class StorageCollector(Collector):
    """``amaters_storage_keys{collection}`` and ``amaters_storage_bytes`` from the latest storage stats.

    The storage flusher hands every ``backend.stats()`` reading to :meth:`update`; a scrape reports
    the most recent one (nothing before the first).  Only the ``max_collections`` largest collections
    get their own label; the others are summed under ``collection="other"``, so a deployment with
    thousands of collections does not produce thousands of series.
    """

    def __init__(self, max_collections: int = 20) -> None:
        self.max_collections = max_collections
        self._stats: Mapping[str, Any] | None = None

    def update(self, stats: Mapping[str, Any]) -> None:
        """Remember a ``backend.stats()`` result (called on the reactor thread)."""
        self._stats = stats

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily("amaters_storage_keys", _KEYS_HELP, labels=["collection"]),
            GaugeMetricFamily("amaters_storage_bytes", _BYTES_HELP),
        ]

    def collect(self) -> Iterable[Metric]:
        stats = self._stats
        if stats is None:
            return []
        keys = GaugeMetricFamily("amaters_storage_keys", _KEYS_HELP, labels=["collection"])
        counts = stats.get("keys") or {}
        ranked = sorted(counts.items(), key=lambda item: (-int(item[1]), item[0]))
        named, rest = ranked[: self.max_collections], ranked[self.max_collections :]
        for name, count in named:
            # A real collection named "other" would collide with the overflow bucket; summing them
            # keeps the series well-formed (one sample per label value).
            if name == "other" and rest:
                rest.append((name, count))
                continue
            keys.add_metric([name], float(count))
        if rest:
            keys.add_metric(["other"], float(sum(int(count) for _, count in rest)))
        size = GaugeMetricFamily("amaters_storage_bytes", _BYTES_HELP)
        size.add_metric([], float(stats.get("bytes") or 0))
        return [keys, size]


_KEYS_HELP = "Keys stored per collection (an estimate for rocksdb), as of the last storage reading."
_BYTES_HELP = "Bytes the storage uses (SST files and memtables for rocksdb), as of the last reading."


class WithoutCreated(Collector):
    """A view of a registry without the ``_created`` samples of counters and histograms."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self.registry.collect():
            if metric.type in ("counter", "histogram", "summary", "gaugehistogram"):
                kept = [s for s in metric.samples if not s.name.endswith("_created")]
                if len(kept) != len(metric.samples):
                    copy = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                    copy.samples = kept
                    metric = copy
            yield metric
