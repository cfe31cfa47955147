"""Prometheus metrics of one server, on a registry of its own (injected, so tests do not share)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.batching import BatchingQueue, BatchRecord
from service.request_metrics import ModelRequestMetrics

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# 0.5 ms to 10 s: a small model's lone request to one that waited behind long batches.
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # process_cpu_seconds_total, process_resident_memory_bytes, open fds … (from /proc).
        ProcessCollector(registry=self.registry)
        self.model_requests = ModelRequestMetrics(self.registry, _SECONDS_BUCKETS)
        labels = ("model", "version", "signature")
        self.requests = Counter(
            "kleinserve_requests",
            "HTTP requests answered, by route kind and status code",
            ("route", "code"),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kleinserve_batch_size",
            "Real rows per batch the model ran",
            labels,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.padded_batch_size = Histogram(
            "kleinserve_padded_batch_size",
            "Rows per batch including padding",
            labels,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "kleinserve_queue_seconds",
            "Time a request waited from enqueue to its batch starting",
            labels,
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.run_seconds = Histogram(
            "kleinserve_batch_run_seconds",
            "Time of the model call for one batch",
            labels,
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_failures = Counter(
            "kleinserve_batch_failures",
            "Batches whose model call failed",
            labels,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "kleinserve_in_flight_requests",
            "HTTP requests received and not yet answered",
            registry=self.registry,
        )
        self.open_connections = Gauge(
            "kleinserve_open_connections",
            "HTTP connections being served (counted against --max_connections)",
            registry=self.registry,
        )
        self.refused_connections = Counter(
            "kleinserve_refused_connections",
            "HTTP connections refused past --max_connections: answered 503 (how=503), or, while "
            "too many refusals are still being answered, closed at once (how=closed)",
            ("how",),
            registry=self.registry,
        )
        self.request_body_bytes = Gauge(
            "kleinserve_request_body_bytes",
            "Request body bytes being received or decoded (held in --max_inflight_request_bytes)",
            registry=self.registry,
        )
        self.queued_rows = Gauge(
            "kleinserve_queued_rows", "Rows waiting for a batch", labels, registry=self.registry
        )
        self.threads_busy = Gauge(
            "kleinserve_inference_threads_busy",
            "Batches of the signature's queue running on (or handed to) the version's "
            "inference threads",
            labels,
            registry=self.registry,
        )
        self.threads = Gauge(
            "kleinserve_inference_threads",
            "Inference threads of the model version (num_batch_threads), shared by its signatures",
            ("model", "version"),
            registry=self.registry,
        )
        self.model_loads = Counter(
            "kleinserve_model_loads",
            "Attempts to load (and warm up) a model version, by outcome (success, failure)",
            ("model", "outcome"),
            registry=self.registry,
        )
        self.model_load_seconds = Histogram(
            "kleinserve_model_load_seconds",
            "Time from starting to load a version to it being AVAILABLE (load + warm-up)",
            ("model",),
            buckets=_LOAD_BUCKETS,
            registry=self.registry,
        )

    def watch_versions(self, versions: Callable[[], Iterable[tuple[str, int, str]]]) -> None:
        """Export ``kleinserve_model_version_state``: 1 per (model, version) in its current state."""
        self.registry.register(_VersionStates(versions))

    def batch_observer(self, model: str, version: int, signature: str) -> _BatchMetrics:
        return _BatchMetrics(self, (model, str(version), signature))

    def watch_queue(self, model: str, version: int, signature: str, queue: BatchingQueue) -> None:
        labels = (model, str(version), signature)
        self.queued_rows.labels(*labels).set_function(lambda: queue.queued_rows)
        self.threads_busy.labels(*labels).set_function(lambda: queue.busy_threads)
        self.threads.labels(model, str(version)).set(queue.params.num_batch_threads)

    def forget(self, model: str, version: int, signature: str) -> None:
        """Drop an unloaded version's series: they would report it forever, and hold its queue."""
        labels = (model, str(version), signature)
        for metric in (
            self.queued_rows,
            self.threads_busy,
            self.batch_size,
            self.padded_batch_size,
            self.queue_seconds,
            self.run_seconds,
            self.batch_failures,
        ):
            try:
                metric.remove(*labels)
            except KeyError:  # never observed
                pass
        try:
            self.threads.remove(model, str(version))
        except KeyError:  # removed with the version's other signature
            pass


class _VersionStates(Collector):
    """Read at scrape time, so a version's state is never stale or left behind."""

    def __init__(self, versions: Callable[[], Iterable[tuple[str, int, str]]]) -> None:
        self._versions = versions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "kleinserve_model_version_state",
            "1 for each model version, labelled with its state (LOADING, AVAILABLE, UNLOADING, END)",
            labels=("model", "version", "state"),
        )
        for model, version, state in self._versions():
            family.add_metric((model, str(version), state), 1)
        yield family


class _BatchMetrics:
    def __init__(self, metrics: Metrics, labels: tuple[str, str, str]) -> None:
        self._size = metrics.batch_size.labels(*labels)
        self._padded = metrics.padded_batch_size.labels(*labels)
        self._queue = metrics.queue_seconds.labels(*labels)
        self._run = metrics.run_seconds.labels(*labels)
        self._failures = metrics.batch_failures.labels(*labels)

    def batch_finished(self, record: BatchRecord) -> None:
        if record.failed:
            self._failures.inc()
            return
        self._size.observe(record.rows)
        self._padded.observe(record.padded_rows)
        self._run.observe(record.run_seconds)
        for seconds in record.queue_seconds:
            self._queue.observe(seconds)
