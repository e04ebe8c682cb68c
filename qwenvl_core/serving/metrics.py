"""Prometheus metrics of the serving engine, labelled per adapter, on a registry the caller passes in.

This module owns the metric names and labels. Every metric carries ``adapter`` (the adapter id, or
``__base__`` for the base model); the registry is never the global one, so each engine (and each test) has its
own. A replica serves thousands of adapters over its life, so the series are bounded: those of the
``max_adapter_series`` most recently active adapters are kept, the least recently active adapter's are removed
beyond that (its counters restart if it comes back, which Prometheus' ``rate`` / ``increase`` read as a reset),
and a deleted adapter's at once (``forget``). ``ServingMetrics`` also implements the adapter cache's
``CacheObserver``; ``merge_expositions`` combines several registries' expositions (engines, replicas) into the one a
``/metrics`` endpoint returns.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

BASE_LABEL = "__base__"
MAX_ADAPTER_SERIES = 256  # ~17 KiB of series an adapter: ~4 MiB a replica
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def adapter_label(adapter_id: str | None) -> str:
    return adapter_id or BASE_LABEL


class ServingMetrics:
    """Per-adapter request, latency, token and adapter-cache metrics."""

    def __init__(self, registry: CollectorRegistry, namespace: str = "qwenvl_serving",
                 max_adapter_series: int = MAX_ADAPTER_SERIES) -> None:
        self.registry, self.max_adapter_series = registry, max_adapter_series
        # adapter label -> the (metric, label values) series it has, least recently active first
        self._series: OrderedDict[str, set[tuple[MetricWrapperBase, tuple[str, ...]]]] = OrderedDict()
        self._lock = threading.Lock()
        label = ["adapter"]
        ns = {"namespace": namespace, "registry": registry}
        self.requests = Counter("requests", "Requests finished, by outcome", [*label, "outcome"], **ns)
        self.ttft = Histogram("time_to_first_token_seconds", "Request arrival to first token", label,
                              buckets=_LATENCY_BUCKETS, **ns)
        self.itl = Histogram("inter_token_latency_seconds", "Time between consecutive tokens", label,
                             buckets=_ITL_BUCKETS, **ns)
        self.e2e = Histogram("request_latency_seconds", "Request arrival to last token", label,
                             buckets=_LATENCY_BUCKETS, **ns)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed", label, **ns)
        self.generated_tokens = Counter("generated_tokens", "Tokens generated", label, **ns)
        self.cache_hits = Counter("adapter_cache_hits", "Adapter cache hits", label, **ns)
        self.cache_misses = Counter("adapter_cache_misses", "Adapter cache misses", label, **ns)
        self.adapter_load = Histogram("adapter_load_seconds", "Adapter fetch + load latency", label,
                                      buckets=_LATENCY_BUCKETS, **ns)
        self.evictions = Counter("adapter_evictions", "Adapters evicted from the cache", label, **ns)
        self.running = Gauge("running_requests", "Requests in the running batch", **ns)
        self.waiting = Gauge("waiting_requests", "Requests waiting for the batch (queue depth)", **ns)
        self.adapter_slots_pinned = Gauge("adapter_slots_pinned", "Device adapter slots used by running rows", **ns)
        self.adapter_slots_resident = Gauge("adapter_slots_resident", "Device adapter slots holding an adapter", **ns)
        self.kv_slots_used = Gauge("kv_cache_slots_used", "KV cache slots held by running requests", **ns)

    def series(self, metric: MetricWrapperBase, adapter: str, *more: str) -> MetricWrapperBase:
        """``metric``'s child for ``adapter`` (an adapter label) and ``more`` label values; marks the adapter active
        and removes the series of the least recently active one beyond ``max_adapter_series``. (Children are made
        and removed under the lock, so none is left in the registry untracked; a child removed while its caller
        still holds it only loses that caller's update.)"""
        with self._lock:
            known = self._series.get(adapter)
            if known is None:
                known = self._series[adapter] = set()
                while len(self._series) > self.max_adapter_series:
                    oldest = next(label for label in self._series if label != BASE_LABEL)
                    _remove(self._series.pop(oldest))
            else:
                self._series.move_to_end(adapter)
            known.add((metric, (adapter, *more)))
            return metric.labels(adapter, *more)

    def forget(self, adapter_id: str) -> None:
        """Remove an adapter's series (it was deleted)."""
        with self._lock:
            _remove(self._series.pop(adapter_id, set()))

    # CacheObserver
    def cache_hit(self, adapter_id: str) -> None:
        self.series(self.cache_hits, adapter_id).inc()

    def cache_miss(self, adapter_id: str) -> None:
        self.series(self.cache_misses, adapter_id).inc()

    def adapter_loaded(self, adapter_id: str, seconds: float) -> None:
        self.series(self.adapter_load, adapter_id).observe(seconds)

    def adapter_evicted(self, adapter_id: str) -> None:
        """Counted on the adapter's series without marking it active (leaving the cache is not activity); not at
        all once its series were dropped."""
        with self._lock:
            known = self._series.get(adapter_id)
            if known is None:
                return
            known.add((self.evictions, (adapter_id,)))
            self.evictions.labels(adapter_id).inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (for a ``/metrics`` endpoint)."""
        return generate_latest(self.registry)


def _remove(series: Iterable[tuple[MetricWrapperBase, tuple[str, ...]]]) -> None:
    for metric, values in series:
        metric.remove(*values)  # absent values are ignored


def merge_expositions(parts: Iterable[tuple[Mapping[str, str], bytes]]) -> bytes:
    """One Prometheus text exposition from several (extra labels, exposition) pairs.

    Used where one endpoint reports several registries: the engines of an in-process backend (labelled
    ``base_model``) or the replicas of Serve deployments (labelled ``base_model`` and ``replica``). Families with
    the same name are merged into one; every sample gets the pair's labels, so series stay distinct.
    """
    families: dict[str, Metric] = {}
    for labels, text in parts:
        for family in text_string_to_metric_families(text.decode("utf-8")):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
            merged.samples.extend(s._replace(labels={**s.labels, **labels}) for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families
