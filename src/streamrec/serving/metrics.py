"""The server's Prometheus metrics: latency by stage, queue depth, batch sizes, cache hit rates.

Owns: ``ServingMetrics``, one private ``CollectorRegistry`` per server (two servers in one
process, as in the tests, never share or clash), and its text exposition for ``/metrics``. It
must not decide anything: the orchestrator and the app record into it.

Stages (``streamrec_serving_stage_seconds{stage=...}``): ``queue`` (admitted -> preprocessing
starts), ``preprocess`` (features and history), ``batch_wait`` (prepared -> its batch starts),
``model`` (the model call of its batch), ``response`` (encoding the answer), and ``total``.

Caches (``streamrec_serving_cache_hit_rate{cache=...}``): ``history`` (requests whose encoded
history was current), ``history_events`` (history events served from a cached encoding, whole or
extended, over all events requests needed), ``embedding_items`` and ``embedding_users``.

Thread safety: prometheus_client's metrics lock themselves; record from any thread. Cache hit
rates are read from the caches when scraped.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServingMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_SIZE_BUCKETS = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class ServingMetrics:
    """The metrics of one server (module doc)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stage = Histogram("streamrec_serving_stage_seconds", "Latency of each stage of a request",
                               ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("streamrec_serving_requests", "Requests answered, by HTTP status",
                                ["status"], registry=r)
        self.batch_candidates = Histogram("streamrec_serving_batch_candidates", "Candidates per model call",
                                          buckets=_SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("streamrec_serving_batch_requests",
                                        "Requests (or chunks of one) per model call",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_candidates = Gauge("streamrec_serving_queue_candidates",
                                      "Candidates admitted and not yet answered", registry=r)
        self.queue_requests = Gauge("streamrec_serving_queue_requests",
                                    "Requests admitted and not yet answered", registry=r)
        self.cache_hit_rate = Gauge("streamrec_serving_cache_hit_rate", "Hits over lookups, by cache",
                                    ["cache"], registry=r)
        self.cache_lookups = Gauge("streamrec_serving_cache_lookups", "Lookups so far, by cache", ["cache"],
                                   registry=r)
        self.model_version = Gauge("streamrec_serving_model_version", "The version serving now", registry=r)
        self.swaps = Counter("streamrec_serving_model_swaps", "Model versions swapped in", registry=r)
        self._caches: dict[str, Callable[[], tuple[int, int]]] = {}

    def watch_cache(self, name: str, stats: Callable[[], tuple[int, int]]) -> None:
        """Report ``stats() -> (hits, lookups)`` as cache ``name`` at each scrape."""
        self._caches[name] = stats

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric, caches read now."""
        for name, stats in self._caches.items():
            hits, lookups = stats()
            self.cache_lookups.labels(name).set(lookups)
            self.cache_hit_rate.labels(name).set(hits / lookups if lookups else 0.0)
        return generate_latest(self.registry)
