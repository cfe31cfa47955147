"""Inference requests per model, version, API and status (``service.request_metrics``):
closed label sets, series dropped on unload, and the Site counting what its access log says."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.task import Clock

from service.batching import BatchingParameters, BatchingQueue
from service.metrics import Metrics
from service.request_metrics import (
    API_VALUES,
    GRPC_METHODS,
    HTTP_ROUTES,
    METHOD_VALUES,
    NO_VERSION,
    UNKNOWN_MODEL,
    ModelRequestMetrics,
)
from tests.metrics_text import labels, samples
from tests.test_http_limits import Connection, request

REST = HTTP_ROUTES["predict"]
BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)


def fresh(models: frozenset[str] = frozenset({"m"})) -> ModelRequestMetrics:
    metrics = ModelRequestMetrics(CollectorRegistry(), BUCKETS)
    metrics.watch_models(models)
    return metrics


def text_of(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_the_readme_documents_every_label_value() -> None:
    """Each api and method value, each gRPC method counted and both placeholders are named
    in the README's metrics section: the closed sets are documented as they are."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Metrics") :]
    section = section[: section.index("\n### ")]
    assert API_VALUES == {
        "tfserving_rest",
        "tfserving_grpc",
        "v2_rest",
        "v2_grpc",
        "image_upload",
        "hooks_invoke",
    }
    for value in (*API_VALUES, *METHOD_VALUES, UNKNOWN_MODEL, NO_VERSION):
        assert f"`{value}`" in section, value
    assert "PredictionService" in section and set(GRPC_METHODS) == {
        "Predict",
        "Classify",
        "Regress",
        "MultiInference",
        "ModelInfer",
    }


def test_labels_name_only_configured_models_and_loaded_versions() -> None:
    """An unknown model is the placeholder; a configured one without a loaded version is
    ``:none``; a loaded version is its number."""
    metrics = fresh()
    assert metrics.labels("nope", 1) == (UNKNOWN_MODEL, NO_VERSION)
    assert metrics.labels(None, None) == (UNKNOWN_MODEL, NO_VERSION)
    assert metrics.labels("m", None) == ("m", NO_VERSION)
    assert metrics.labels("m", 3) == ("m", NO_VERSION)
    metrics.serving("m", 3)
    assert metrics.labels("m", 3) == ("m", "3")
    assert metrics.labels("nope", 3) == (UNKNOWN_MODEL, NO_VERSION)


@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.text(max_size=8)),
            st.one_of(st.none(), st.integers(-2, 2**63 - 1)),
            st.sampled_from([*HTTP_ROUTES.values(), *GRPC_METHODS.values()]),
            st.sampled_from([200, 400, 404, 503]),
        ),
        max_size=40,
    )
)
def test_whatever_clients_name_the_label_values_stay_closed(
    requests: list[tuple[str | None, int | None, tuple[str, str], int]],
) -> None:
    """Any model names and versions requests carry: the model label is a configured model or
    the placeholder, the version a loaded one or ``:none``; every request is counted once."""
    registry = CollectorRegistry()
    metrics = ModelRequestMetrics(registry, BUCKETS)
    metrics.watch_models({"m", "n"})
    metrics.serving("m", 1)
    for model, version, api, code in requests:
        metrics.observe(api, model, version, code, 0.01)
    text = text_of(registry)
    counted = samples(text, "kleinserve_model_requests_total")
    for series in counted:
        values = dict(series)
        assert values["model"] in {"m", "n", UNKNOWN_MODEL}
        assert values["version"] in {"1", NO_VERSION}
        assert (values["api"], values["method"]) in {*HTTP_ROUTES.values(), *GRPC_METHODS.values()}
    assert sum(counted.values()) == len(requests)
    assert sum(samples(text, "kleinserve_model_request_seconds_count").values()) == len(requests)


def test_an_unloaded_version_loses_its_series_for_good() -> None:
    """forget_version removes the version's counters and histograms; a request answered after
    that is counted under ``:none``, never bringing the series back."""
    registry = CollectorRegistry()
    metrics = ModelRequestMetrics(registry, BUCKETS)
    metrics.watch_models({"m"})
    metrics.serving("m", 3)
    metrics.observe(REST, "m", 3, 200, 0.002)
    metrics.observe(REST, "m", 3, 400, 0.001)
    metrics.observe(REST, "m", None, 400, 0.001)
    three = labels(model="m", version="3", api="tfserving_rest", method="predict", code="200")
    assert samples(text_of(registry), "kleinserve_model_requests_total")[three] == 1
    metrics.forget_version("m", 3)
    metrics.observe(REST, "m", 3, 200, 0.002)
    text = text_of(registry)
    versions = {dict(s)["version"] for s in samples(text, "kleinserve_model_requests_total")}
    assert versions == {NO_VERSION}
    assert {
        dict(s)["version"] for s in samples(text, "kleinserve_model_request_seconds_count")
    } == {NO_VERSION}
    none_400 = labels(
        model="m", version=NO_VERSION, api="tfserving_rest", method="predict", code="400"
    )
    assert samples(text, "kleinserve_model_requests_total")[none_400] == 1


def test_a_model_removed_from_the_config_loses_its_series() -> None:
    """forget_model drops the model's ``:none`` series, and its later requests are the
    placeholder's."""
    registry = CollectorRegistry()
    models = {"m"}
    metrics = ModelRequestMetrics(registry, BUCKETS)
    metrics.watch_models(models)
    metrics.observe(REST, "m", None, 503, 0.001)
    models.discard("m")
    metrics.forget_model("m")
    metrics.observe(REST, "m", None, 404, 0.001)
    found = samples(text_of(registry), "kleinserve_model_requests_total")
    assert {dict(s)["model"] for s in found} == {UNKNOWN_MODEL}


def test_a_refusal_by_the_channel_is_counted_under_the_model_its_url_names() -> None:
    """A 413 refused before any route ran still names the model of its URL (the version:
    none reached it)."""
    big = Connection(max_body_bytes=10)
    big.send(request(b"/v1/models/m:predict"))
    assert big.refused()[0] == 413
    text = text_of(big.metrics.registry)
    assert samples(text, "kleinserve_model_requests_total") == {
        labels(model="m", version=NO_VERSION, api="tfserving_rest", method="predict", code="413"): 1
    }


def test_one_site_counts_each_request_under_its_labels() -> None:
    """On one server: two predicts and a bad body on version 3, and a 404 for a model it
    does not have, counted by model, version and code; the latency histogram counts four."""
    connection = Connection()
    for raw in (
        request(b"/v1/models/m:predict"),
        request(b"/v1/models/m/versions/3:predict"),
        request(b"/v1/models/m:predict", b"{not json"),
        request(b"/v1/models/nope:predict"),
        b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\n\r\n",  # status: not an inference request
    ):
        connection.send(raw)
    text = text_of(connection.metrics.registry)
    rest = {"api": "tfserving_rest", "method": "predict"}
    assert samples(text, "kleinserve_model_requests_total") == {
        labels(model="m", version="3", code="200", **rest): 2,
        labels(model="m", version="3", code="400", **rest): 1,
        labels(model=UNKNOWN_MODEL, version=NO_VERSION, code="404", **rest): 1,
    }
    assert samples(text, "kleinserve_model_request_seconds_count") == {
        labels(model="m", version="3", **rest): 3,
        labels(model=UNKNOWN_MODEL, version=NO_VERSION, **rest): 1,
    }


def test_inference_threads_are_exported_per_queue_and_dropped_on_unload() -> None:
    """A queue's busy threads show under its model, version and signature, the version's
    threads under its model and version, until the version is forgotten."""
    metrics = Metrics()
    queue = BatchingQueue(
        lambda inputs: inputs,
        BatchingParameters(num_batch_threads=3),
        clock=Clock(),
        executor=lambda f, *a: None,  # type: ignore[arg-type,return-value]
    )
    metrics.watch_queue("m", 2, "serving_default", queue)
    text = text_of(metrics.registry)
    key = labels(model="m", version="2", signature="serving_default")
    assert samples(text, "kleinserve_inference_threads") == {labels(model="m", version="2"): 3}
    assert samples(text, "kleinserve_inference_threads_busy") == {key: 0}
    metrics.forget("m", 2, "serving_default")
    text = text_of(metrics.registry)
    assert samples(text, "kleinserve_inference_threads") == {}
    assert samples(text, "kleinserve_inference_threads_busy") == {}


def test_process_cpu_and_memory_are_exported() -> None:
    """The process's CPU seconds and resident memory are on the server's own registry."""
    text = text_of(Metrics().registry)
    assert samples(text, "process_cpu_seconds_total")
    assert samples(text, "process_resident_memory_bytes")
