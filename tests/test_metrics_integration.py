"""Per model, version and API request metrics of a real ``twistd -n inference``, read back
with prometheus_client's own parser: REST, Open Inference Protocol and gRPC requests, answered
and refused, counted exactly as sent; the latency histograms count the same requests; a
model the server does not have adds no label value; the monitoring path serves the same;
and every metric the Grafana dashboard queries is one the server exports.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from harness.twistd import TwistdServer, poll
from service.request_metrics import NO_VERSION, UNKNOWN_MODEL
from service.tensor_proto import to_proto
from tests import models
from tests.metrics_text import Labels, labels, samples
from tests.test_grafana_dashboard import dashboard_metric_names

pytestmark = pytest.mark.integration

MONITORING_PATH = "/monitoring/prometheus/metrics"
PREDICT = {"instances": [[1.0, 1.0, 1.0]]}
BAD_PREDICT = {"instances": [[1.0, 1.0]]}  # x is [None, 3]
INFER = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]}]}
BAD_INFER = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [1, 1, 1]}]}
REST = {"api": "tfserving_rest", "method": "predict"}
V2 = {"api": "v2_rest", "method": "infer"}
GRPC = {"api": "tfserving_grpc", "method": "predict"}
V2_GRPC = {"api": "v2_grpc", "method": "infer"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    root = tmp_path_factory.mktemp("models")
    models.make_linear(root / "linear")
    monitoring = root / "monitoring.config"
    monitoring.write_text(f'prometheus_config {{ enable: true path: "{MONITORING_PATH}" }}\n')
    started = TwistdServer(
        [
            "--model_name=linear",
            f"--model_base_path={root / 'linear'}",
            "--enable_batching",
            f"--monitoring_config_file={monitoring}",
        ],
        tmp_path_factory.mktemp("logs"),
    ).start()
    try:
        yield started.wait_ready()
    finally:
        started.stop()


def grpc_predict(server: TwistdServer, model: str, x: np.ndarray) -> grpc.StatusCode:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["x"].CopyFrom(to_proto(x, "x"))
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            stub.Predict(request, timeout=30)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def v2_grpc_infer(server: TwistdServer, model: str, x: np.ndarray) -> grpc.StatusCode:
    """One Open Inference Protocol ModelInfer call (``service.v2_grpc``), raw contents."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=model)
    datatype = {np.float32: "FP32", np.float64: "FP64"}[x.dtype.type]
    request.inputs.add(name="x", datatype=datatype, shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def scrape(server: TwistdServer, path: str = "/metrics") -> str:
    status, headers, body = server.request("GET", path)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return body.decode()


def model_requests(server: TwistdServer) -> dict[Labels, float]:
    return samples(scrape(server), "kleinserve_model_requests_total")


@pytest.fixture(scope="module")
def sent(server: TwistdServer) -> dict[Labels, float]:
    """Send REST, v2 and gRPC requests, answered and refused; the counts they should make."""
    expected: Counter[Labels] = Counter()

    def rest(path: str, doc: Any, status: int, model: str, version: str, api: dict) -> None:
        got, body = server.post_json(path, doc)
        assert got == status, body
        expected[labels(model=model, version=version, code=str(status), **api)] += 1

    for _ in range(3):
        rest("/v1/models/linear:predict", PREDICT, 200, "linear", "1", REST)
    rest("/v1/models/linear/versions/1:predict", PREDICT, 200, "linear", "1", REST)
    rest("/v1/models/linear:predict", BAD_PREDICT, 400, "linear", "1", REST)
    rest("/v1/models/nope:predict", PREDICT, 404, UNKNOWN_MODEL, NO_VERSION, REST)
    rest("/v1/models/linear/versions/7:predict", PREDICT, 404, "linear", NO_VERSION, REST)
    rest("/v2/models/linear/infer", INFER, 200, "linear", "1", V2)
    rest("/v2/models/linear/infer", BAD_INFER, 400, "linear", "1", V2)
    rest("/v2/models/nope-v2/infer", INFER, 404, UNKNOWN_MODEL, NO_VERSION, V2)
    assert server.get("/v1/models/linear")[0] == 200  # status: not an inference request
    assert server.get("/v2/models/linear/ready")[0] == 200  # nor is readiness
    ones = np.ones((1, 3), np.float32)
    calls = [
        ("linear", ones, grpc.StatusCode.OK, "linear", "1", "200"),
        ("linear", ones, grpc.StatusCode.OK, "linear", "1", "200"),
        ("linear", ones.astype(np.float64), grpc.StatusCode.INVALID_ARGUMENT, "linear", "1", "400"),
        ("nope-grpc", ones, grpc.StatusCode.NOT_FOUND, UNKNOWN_MODEL, NO_VERSION, "404"),
    ]
    for model, x, code, model_label, version, status in calls:
        assert grpc_predict(server, model, x) == code
        expected[labels(model=model_label, version=version, code=status, **GRPC)] += 1
        assert v2_grpc_infer(server, model, x) == code
        expected[labels(model=model_label, version=version, code=status, **V2_GRPC)] += 1
    return dict(expected)


def test_requests_are_counted_by_model_version_api_and_status(
    server: TwistdServer, sent: dict[Labels, float]
) -> None:
    """/metrics counts each inference request once, under the model, version, front door
    and status it was answered with (gRPC's are counted on the reactor after the answer,
    hence the wait)."""
    found = poll(lambda: model_requests(server), lambda found: found == sent, timeout=10)
    assert found == sent


def test_the_latency_histograms_count_the_same_requests(
    server: TwistdServer, sent: dict[Labels, float]
) -> None:
    """Each (model, version, api, method) histogram counts as many requests as its
    counters, across statuses, and its +Inf bucket holds them all."""
    poll(lambda: model_requests(server), lambda found: found == sent, timeout=10)
    text = scrape(server)
    per_series: Counter[Labels] = Counter()
    for key, value in sent.items():
        per_series[frozenset((k, v) for k, v in key if k != "code")] += value
    assert samples(text, "kleinserve_model_request_seconds_count") == dict(per_series)
    infinite = {
        frozenset((k, v) for k, v in key if k != "le"): value
        for key, value in samples(text, "kleinserve_model_request_seconds_bucket").items()
        if dict(key)["le"] == "+Inf"
    }
    assert infinite == dict(per_series)
    sums = samples(text, "kleinserve_model_request_seconds_sum")
    assert all(value > 0 for value in sums.values())


def test_an_unknown_model_adds_no_label_value(
    server: TwistdServer, sent: dict[Labels, float]
) -> None:
    """Requests for models the server lacks are counted under the placeholder: their names
    appear nowhere in /metrics, and the model labels are the served model's and the
    placeholder's only."""
    poll(lambda: model_requests(server), lambda found: found == sent, timeout=10)
    text = scrape(server)
    assert "nope" not in text
    models_seen = {dict(key)["model"] for key in samples(text, "kleinserve_model_requests_total")}
    assert models_seen == {"linear", UNKNOWN_MODEL}


def test_queue_wait_and_batch_size_are_per_model_version(
    server: TwistdServer, sent: dict[Labels, float]
) -> None:
    """The batching queue's wait (one per request that ran) and batch sizes are labelled
    with the version that ran them; the inference threads are exported beside them."""
    text = scrape(server)
    key = labels(model="linear", version="1", signature="serving_default")
    ran = sum(
        value
        for series, value in sent.items()
        if dict(series)["code"] == "200" and dict(series)["model"] == "linear"
    )
    assert samples(text, "kleinserve_queue_seconds_count")[key] >= ran
    assert samples(text, "kleinserve_batch_size_sum")[key] >= ran
    assert samples(text, "kleinserve_inference_threads")[labels(model="linear", version="1")] >= 1
    assert key in samples(text, "kleinserve_inference_threads_busy")


def test_the_monitoring_path_serves_the_same_counts(
    server: TwistdServer, sent: dict[Labels, float]
) -> None:
    """TF Serving's monitoring path (--monitoring_config_file) serves the same metrics."""
    poll(lambda: model_requests(server), lambda found: found == sent, timeout=10)
    text = scrape(server, MONITORING_PATH)
    assert samples(text, "kleinserve_model_requests_total") == sent


def test_every_metric_the_dashboard_queries_is_exported(
    server: TwistdServer, sent: dict[Labels, float]
) -> None:
    """Each metric name in deploy/grafana/kleinserve.json is a sample name the server
    exports (a family with no series yet counts by its type's sample names)."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
    }
    exported = set()
    for family in text_string_to_metric_families(scrape(server)):
        exported.update(sample.name for sample in family.samples)
        exported.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    missing = dashboard_metric_names() - exported
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"


def test_a_scrape_is_valid_prometheus_text(server: TwistdServer) -> None:
    """The whole exposition parses, and names each family once."""
    from prometheus_client.parser import text_string_to_metric_families

    names = [family.name for family in text_string_to_metric_families(scrape(server))]
    assert len(names) == len(set(names)) and "kleinserve_model_requests" in names


@pytest.fixture(scope="module")
def swapping(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TwistdServer, Path]]:
    """A server of linear version 1 that scans its folder every 0.5 s; version 2 waits in
    a staging folder of its own."""
    root = tmp_path_factory.mktemp("swap")
    models.make_linear(root / "linear", version=1)
    models.make_linear(root / "staging", version=2, scale=2)
    started = TwistdServer(
        [
            "--model_name=linear",
            f"--model_base_path={root / 'linear'}",
            "--file_system_poll_wait_seconds=0.5",
            "--enable_batching",
        ],
        tmp_path_factory.mktemp("logs"),
    ).start()
    try:
        yield started.wait_ready(), root
    finally:
        started.stop()


def versions_in(text: str, name: str) -> set[str]:
    return {dict(key)["version"] for key in samples(text, name)}


def test_an_unloaded_version_leaves_metrics(swapping: tuple[TwistdServer, Path]) -> None:
    """Once version 2 has taken over and version 1 has unloaded, no request, queue or thread
    series names version 1 any more; requests are counted under version 2."""
    server, root = swapping
    assert server.post_json("/v1/models/linear:predict", PREDICT)[0] == 200
    text = scrape(server)
    assert versions_in(text, "kleinserve_model_requests_total") == {"1"}
    shutil.copytree(root / "staging" / "2", root / "linear" / "2")  # as a user does

    def states() -> dict[str, str]:
        doc = server.get("/v1/models/linear")[1]
        return {s["version"]: s["state"] for s in doc["model_version_status"]}

    poll(states, lambda found: found == {"2": "AVAILABLE", "1": "END"}, timeout=60)
    assert server.post_json("/v1/models/linear:predict", PREDICT)[0] == 200
    text = scrape(server)
    assert samples(text, "kleinserve_model_requests_total") == {
        labels(model="linear", version="2", code="200", **REST): 1
    }
    for name in (
        "kleinserve_model_request_seconds_count",
        "kleinserve_queue_seconds_count",
        "kleinserve_batch_size_count",
        "kleinserve_queued_rows",
        "kleinserve_inference_threads_busy",
        "kleinserve_inference_threads",
    ):
        assert versions_in(text, name) == {"2"}, name
