"""Inference requests per model, version and API: counts by status, and latency histograms.

Fed from the request's access-log record (``service.access_log.RequestRecord``) at the moment
its line is written, for HTTP (``service.http_site``) and gRPC (``service.grpc_api``) alike,
so the metrics and the access log never disagree about a request's model, version, status or
latency (``finished - record.started``, as ``latency_ms``).

Every label has a closed set of values, whatever clients send:

- ``api``: the front door (``API_VALUES``); ``method``: the call (``METHOD_VALUES``). Only the
  inference calls are counted here: status, metadata and readiness requests are counted by
  route in ``kleinserve_requests_total``.
- ``model``: a configured model's name, else ``UNKNOWN_MODEL`` (a request for a model the
  server does not have never makes a label value of its own).
- ``version``: the version that answered (or that the request named) while it is loaded, else
  ``NO_VERSION`` (refused before reaching a version, or naming one that is not loaded).
- ``code``: the HTTP status (for gRPC, the status the REST API would answer, as the access log).

When a version unloads its series are removed (``forget_version``), as its batching and hook
metrics are; a request answered after that moment is counted under ``NO_VERSION``, so a
removed series is never made again. A model removed from the config loses its ``NO_VERSION``
series the same way (``forget_model``).

Cost per request, on the reactor thread: two dict lookups to check the labels, one for the
cached series, a counter increment and a histogram observation; ``labels()`` (which locks and
hashes the label values) runs only the first time a series is used.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = [
    "API_VALUES",
    "GRPC_METHODS",
    "HTTP_ROUTES",
    "METHOD_VALUES",
    "NO_VERSION",
    "UNKNOWN_MODEL",
    "ModelRequestMetrics",
]

#: The ``model`` label of a request for a model the server does not have. Model names never
#: hold ':' (``wire.paths``), so it is never a real model's name.
UNKNOWN_MODEL = ":unknown"
#: The ``version`` label of a request no loaded version answered.
NO_VERSION = ":none"

#: HTTP route label (``service.http_request.counted``) -> (api, method).
HTTP_ROUTES: Mapping[str, tuple[str, str]] = {
    "predict": ("tfserving_rest", "predict"),
    "classify": ("tfserving_rest", "classify"),
    "regress": ("tfserving_rest", "regress"),
    "v2_infer": ("v2_rest", "infer"),
    "classify_image": ("image_upload", "classify_image"),
    "invoke": ("hooks_invoke", "invoke"),
}
#: gRPC method of ``tensorflow.serving.PredictionService`` -> (api, method).
GRPC_METHODS: Mapping[str, tuple[str, str]] = {
    "Predict": ("tfserving_grpc", "predict"),
    "Classify": ("tfserving_grpc", "classify"),
    "Regress": ("tfserving_grpc", "regress"),
    "MultiInference": ("tfserving_grpc", "multi_inference"),
    "ModelInfer": ("v2_grpc", "infer"),  # the Open Inference Protocol's (service.v2_grpc)
}
API_VALUES = frozenset(api for api, _ in (*HTTP_ROUTES.values(), *GRPC_METHODS.values()))
METHOD_VALUES = frozenset(m for _, m in (*HTTP_ROUTES.values(), *GRPC_METHODS.values()))


class ModelRequestMetrics:
    """``kleinserve_model_requests_total`` and ``kleinserve_model_request_seconds``.

    Reactor thread only. ``watch_models`` gives it the configured model names (a live view);
    the loader says which versions serve (``serving``) and which have unloaded
    (``forget_version``).
    """

    def __init__(self, registry: CollectorRegistry, buckets: Sequence[float]) -> None:
        labels = ("model", "version", "api", "method")
        self.requests = Counter(
            "kleinserve_model_requests",
            "Inference requests answered, by model, version, front door (api), call (method) "
            "and HTTP status (code)",
            (*labels, "code"),
            registry=registry,
        )
        self.seconds = Histogram(
            "kleinserve_model_request_seconds",
            "Inference requests' latency, from the request's arrival to its answer written, "
            "by model, version, front door (api) and call (method); errors included",
            labels,
            buckets=buckets,
            registry=registry,
        )
        self._models: Container[str] = ()
        self._versions: dict[tuple[str, int], str] = {}  # loaded (model, version) -> label
        self._series: dict[tuple[str, str, str, str], _Series] = {}

    def watch_models(self, models: Container[str]) -> None:
        """The names of the configured models, read at each request (a live view)."""
        self._models = models

    def serving(self, model: str, version: int) -> None:
        """``version`` of ``model`` is loaded: requests it answers get its own label."""
        self._versions[(model, version)] = str(version)

    def forget_version(self, model: str, version: int) -> None:
        """``version`` of ``model`` has unloaded: drop its series (see the module's doc)."""
        label = self._versions.pop((model, version), None)
        if label is not None:
            self._drop(lambda key: key[0] == model and key[1] == label)

    def forget_model(self, model: str) -> None:
        """``model`` left the config: drop the series of its requests no version answered."""
        self._drop(lambda key: key[0] == model and key[1] == NO_VERSION)

    def labels(self, model: str | None, version: int | None) -> tuple[str, str]:
        """The ``model`` and ``version`` labels of a request that named them."""
        if version is not None and model is not None:
            label = self._versions.get((model, version))
            if label is not None:
                return model, label
        if model is not None and model in self._models:
            return model, NO_VERSION
        return UNKNOWN_MODEL, NO_VERSION

    def observe(
        self,
        api: tuple[str, str],
        model: str | None,
        version: int | None,
        code: int,
        seconds: float,
    ) -> None:
        """Count one answered request of ``api`` (``HTTP_ROUTES`` or ``GRPC_METHODS`` value)."""
        if seconds < 0:  # the wall clock stepped back
            seconds = 0.0
        model_label, version_label = self.labels(model, version)
        key = (model_label, version_label, *api)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self, key)
        series.observe(code, seconds)

    def _drop(self, matches: Callable[[tuple[str, str, str, str]], bool]) -> None:
        for key in [key for key in self._series if matches(key)]:
            series = self._series.pop(key)
            self.seconds.remove(*key)
            for code in series.codes:
                self.requests.remove(*key, str(code))


class _Series:
    """The cached children of one (model, version, api, method)."""

    __slots__ = ("_key", "_requests", "codes", "seconds")

    def __init__(self, metrics: ModelRequestMetrics, key: tuple[str, str, str, str]) -> None:
        self._key = key
        self._requests = metrics.requests
        self.seconds = metrics.seconds.labels(*key)
        self.codes: dict[int, Counter] = {}

    def observe(self, code: int, seconds: float) -> None:
        counter = self.codes.get(code)
        if counter is None:
            counter = self.codes[code] = self._requests.labels(*self._key, str(code))
        counter.inc()
        self.seconds.observe(seconds)
