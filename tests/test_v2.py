"""The v2 (Open Inference Protocol) routes through StubTreq: no sockets, no threads, no TensorFlow.

A hand-built AVAILABLE version whose "model" is numpy behind a real ``BatchingQueue``, as in
``tests/test_http.py``; v2 and TF Serving requests reach the same queue.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from service.batching import BatchingParameters, BatchingQueue
from service.dataplane import ModelTarget
from service.errors import InvalidArgument
from service.http import InferenceAPI
from service.metrics import Metrics
from service.repository import AVAILABLE, LOADING, LoadedVersion, ModelConfig, ModelRepository
from service.signature import Signature, TensorInfo
from tests.deferreds import result_of

SIGNATURE = Signature(
    "serving_default",
    inputs={
        "x": TensorInfo("x", "DT_FLOAT", (None, 2)),
        "n": TensorInfo("n", "DT_INT64", (None,)),
        "s": TensorInfo("s", "DT_STRING", (None,)),
    },
    outputs={
        "y": TensorInfo("y", "DT_FLOAT", (None, 2)),
        "twice": TensorInfo("twice", "DT_INT64", (None,)),
        "upper": TensorInfo("upper", "DT_STRING", (None,)),
    },
)


class FakeServable:
    signatures = {"serving_default": SIGNATURE}
    signature_defs = {"serving_default": {"method_name": "tensorflow/serving/predict"}}
    labels = None
    platform = "tensorflow_savedmodel"

    def signature(self, name: str | None) -> Signature:
        if name not in (None, "serving_default"):
            raise InvalidArgument(f"serving signature name: {name!r} not found")
        return SIGNATURE


def model(inputs):
    upper = np.array([s.upper() for s in inputs["s"]], dtype=object)
    return {"y": inputs["x"] * 2, "twice": inputs["n"] * 2, "upper": upper}


BATCHES = BatchingParameters(max_batch_size=8)


def make_api(executor=maybeDeferred, params=BATCHES):
    repository = ModelRepository([ModelConfig("m", Path("/nonexistent"))], reactor=Clock())
    version = LoadedVersion("m", 3, state=AVAILABLE, servable=FakeServable())  # type: ignore[arg-type]
    metrics = Metrics()
    version.queues["serving_default"] = BatchingQueue(
        model, params, clock=Clock(), executor=executor,
        observer=metrics.batch_observer("m", 3, "serving_default"),
    )  # fmt: skip
    repository.add_version(version)
    api = InferenceAPI(repository, metrics=metrics)
    return api, StubTreq(api.resource()), repository


def call(treq, method, path, body=None, headers=None):
    response = result_of(
        treq.request(method, "http://server" + path, data=body, headers=headers or {})
    )
    return response, result_of(response.content())


def doc_of(content: bytes):
    return json.loads(content)


INPUTS = [
    {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4.5]]},
    {"name": "n", "shape": [2], "datatype": "INT64", "data": [5, -6]},
    {"name": "s", "shape": [2], "datatype": "BYTES", "data": ["ab", "é"]},
]


def test_infer_json_in_json_out() -> None:
    """JSON tensors in; every output as JSON, with the id echoed and the version named."""
    _, treq, _ = make_api()
    body = json.dumps({"id": "r1", "inputs": INPUTS}).encode()
    response, content = call(treq, "POST", "/v2/models/m/infer", body)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert doc_of(content) == {
        "model_name": "m",
        "model_version": "3",
        "id": "r1",
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [2.0, 4.0, 6.0, 9.0]},
            {"name": "twice", "datatype": "INT64", "shape": [2], "data": [10, -12]},
            {"name": "upper", "datatype": "BYTES", "shape": [2], "data": ["AB", "é"]},
        ],
    }


def test_infer_binary_in_binary_out_for_requested_outputs() -> None:
    """Binary inputs after the JSON; the requested outputs in the order asked, binary where
    asked, with Inference-Header-Content-Length and binary_data_size."""
    _, treq, _ = make_api()
    x = np.array([[1, 2], [3, 4]], np.float32)
    strings = struct.pack("<I", 1) + b"a" + struct.pack("<I", 0)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 16},
                },
                {"name": "n", "shape": [2], "datatype": "INT64", "data": [1, 2]},
                {
                    "name": "s",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(strings)},
                },
            ],
            "outputs": [{"name": "upper", "parameters": {"binary_data": True}}, {"name": "y"}],
        }  # fmt: skip
    ).encode()
    response, content = call(
        treq, "POST", "/v2/models/m/versions/3/infer", header + x.tobytes() + strings,
        {"Inference-Header-Content-Length": [str(len(header))],
         "Content-Type": ["application/octet-stream"]},
    )  # fmt: skip
    assert response.code == 200
    (length,) = response.headers.getRawHeaders("inference-header-content-length")
    doc = doc_of(content[: int(length)])
    assert [o["name"] for o in doc["outputs"]] == ["upper", "y"]
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": len(strings)}
    assert doc["outputs"][1]["data"] == [2.0, 4.0, 6.0, 8.0]
    assert content[int(length) :] == struct.pack("<I", 1) + b"A" + struct.pack("<I", 0)


def test_binary_data_output_applies_unless_an_output_says_otherwise() -> None:
    _, treq, _ = make_api()
    body = json.dumps(
        {"inputs": INPUTS, "parameters": {"binary_data_output": True},
         "outputs": [{"name": "twice"}, {"name": "y", "parameters": {"binary_data": False}}]}
    ).encode()  # fmt: skip
    response, content = call(treq, "POST", "/v2/models/m/infer", body)
    (length,) = response.headers.getRawHeaders("inference-header-content-length")
    doc = doc_of(content[: int(length)])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert doc["outputs"][1]["data"] == [2.0, 4.0, 6.0, 9.0]
    assert np.frombuffer(content[int(length) :], "<i8").tolist() == [10, -12]


def test_v2_and_tf_serving_requests_share_a_batch() -> None:
    """A v2 infer and a :predict for the same model wait in the same queue and run as one
    batch; each gets its own rows back."""
    held: list = []

    def hold(f, *args):
        d: Deferred = Deferred()
        held.append((d, f, args))
        return d

    _, treq, repository = make_api(executor=hold)
    queue = repository.lookup("m", version=3).queues["serving_default"]
    post = lambda path, doc: treq.request(  # noqa: E731
        "POST", "http://server" + path, data=json.dumps(doc).encode()
    )
    first = post("/v2/models/m/infer", {"inputs": INPUTS})  # runs at once, held
    v1 = post("/v1/models/m:predict", {"instances": [{"x": [1, 1], "n": 1, "s": "v1"}]})
    v2 = post("/v2/models/m/infer", {"inputs": [
        {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [7, 7]},
        {"name": "n", "shape": [1], "datatype": "INT64", "data": [7]},
        {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["v2"]}]})  # fmt: skip
    assert len(held) == 1 and queue.queued_rows == 2  # v1's row and v2's wait together
    for _ in range(2):
        d, f, args = held.pop(0)
        d.callback(f(*args))
        treq.flush()
    assert held == [] and queue.queued_rows == 0
    responses = [result_of(request) for request in (first, v1, v2)]
    assert [response.code for response in responses] == [200, 200, 200]
    v2_doc = doc_of(result_of(responses[2].content()))
    assert v2_doc["outputs"][0]["data"] == [14.0, 14.0]
    assert v2_doc["outputs"][2]["data"] == ["V2"]
    assert doc_of(result_of(responses[1].content()))["predictions"] == [
        {"y": [2.0, 2.0], "twice": 2, "upper": "V1"}
    ]
    assert [part.rows for part in args[0]] == [1, 1]  # the second batch: both requests


def test_metadata_health_and_ready_routes() -> None:
    api, treq, repository = make_api()
    response, content = call(treq, "GET", "/v2")
    assert response.code == 200
    doc = doc_of(content)
    assert doc["name"] == "kleinserve" and "binary_tensor_data" in doc["extensions"]
    assert isinstance(doc["version"], str) and doc["version"]
    response, content = call(treq, "GET", "/v2/models/m/versions/3")
    assert (response.code, doc_of(content)) == (
        200,
        {
            "name": "m",
            "versions": ["3"],
            "platform": "tensorflow_savedmodel",
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [-1, 2]},
                {"name": "n", "datatype": "INT64", "shape": [-1]},
                {"name": "s", "datatype": "BYTES", "shape": [-1]},
            ],
            "outputs": [
                {"name": "y", "datatype": "FP32", "shape": [-1, 2]},
                {"name": "twice", "datatype": "INT64", "shape": [-1]},
                {"name": "upper", "datatype": "BYTES", "shape": [-1]},
            ],
        },
    )
    for path, body in [
        ("/v2/health/live", {"live": True}),
        ("/v2/health/ready", {"ready": True}),
        ("/v2/models/m/ready", {"name": "m", "ready": True}),
        ("/v2/models/m/versions/3/ready", {"name": "m", "ready": True}),
    ]:
        response, content = call(treq, "GET", path)
        assert (response.code, doc_of(content)) == (200, body), path
    repository.lookup("m", version=3).state = LOADING
    for path, key in [("/v2/health/ready", "ready"), ("/v2/models/m/ready", "ready")]:
        response, content = call(treq, "GET", path)
        assert response.code == 503 and doc_of(content)[key] is False, path
        assert doc_of(content)["error"]
    api.health.draining = True
    response, content = call(treq, "GET", "/v2/health/ready")
    assert response.code == 503 and "draining" in doc_of(content)["error"]
    assert call(treq, "GET", "/v2/health/live")[0].code == 200  # stopping is not dying


def test_errors_have_the_spec_statuses_and_say_what_was_wrong() -> None:
    _, treq, repository = make_api()
    body = json.dumps({"inputs": INPUTS}).encode()
    cases = [
        ("POST", "/v2/models/other/infer", body, 404, "other"),
        ("POST", "/v2/models/m/versions/9/infer", body, 404, "9"),
        ("GET", "/v2/models/other", None, 404, "other"),
        ("GET", "/v2/models/m/versions/9/ready", None, 404, "9"),
        ("GET", "/v2/models/m/versions/x1", None, 400, "must be a decimal number"),
        ("POST", "/v2/models/m/infer", b"{", 400, "malformed JSON"),
        ("POST", "/v2/models/m/infer",
         json.dumps({"inputs": INPUTS, "outputs": [{"name": "nope"}]}).encode(), 400,
         "unknown output(s) 'nope' requested; the model's outputs are 'y', 'twice', 'upper'"),
        ("POST", "/v2/models/m/infer", json.dumps({"inputs": INPUTS[:2]}).encode(), 400,
         "missing input(s) 's'"),
        ("POST", "/v2/models/m/infer",
         json.dumps({"inputs": [{**INPUTS[0], "datatype": "FP64"}, *INPUTS[1:]]}).encode(), 400,
         "input 'x': expects FP32 but FP64 was provided"),
        ("POST", "/v2/models/m/infer",
         json.dumps({"inputs": [{**INPUTS[0], "shape": [1, 4]}, *INPUTS[1:]]}).encode(), 400,
         "dimension 1 is 4, expected 2"),
        ("GET", "/v2/models/m/infer", None, 405, "Method Not Allowed: GET /v2/models/m/infer"),
        ("POST", "/v2/models/m/versions/1/ready", None, 405, "Method Not Allowed: POST"),
        ("GET", "/v2/models/m/infer/x", None, 404, "no such endpoint: GET /v2/models/m/infer/x"),
        ("GET", "/v2/nothing", None, 404, "POST /v2/models/NAME[/versions/N]/infer"),
    ]  # fmt: skip
    for method, path, data, status, words in cases:
        response, content = call(treq, method, path, data)
        assert response.code == status, (path, content)
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        assert words in doc_of(content)["error"], (path, content)
    response, content = call(
        treq, "POST", "/v2/models/m/infer", body, {"Inference-Header-Content-Length": ["x"]}
    )
    assert response.code == 400 and "Inference-Header-Content-Length" in doc_of(content)["error"]
    response, content = call(
        treq, "POST", "/v2/models/m/infer", body, {"Content-Type": ["image/png"]}
    )
    assert response.code == 415 and "application/octet-stream" in doc_of(content)["error"]
    response, _ = call(treq, "GET", "/v2/models/m/versions/3/infer")
    assert response.code == 405 and response.headers.getRawHeaders("allow") == ["POST"]
    repository.lookup("m", version=3).state = LOADING
    response, content = call(treq, "POST", "/v2/models/m/infer", body)
    assert response.code == 503 and response.headers.getRawHeaders("retry-after") == ["1"]


def test_every_v2_route_is_counted_under_its_own_label() -> None:
    """Each v2 route marks its requests with its label (what InferenceSite counts them
    under), and a request refused before routing is labelled by its path the same way."""
    api, treq, _ = make_api()
    routes = [
        ("GET", "/v2", "v2_server_metadata"),
        ("GET", "/v2/health/live", "v2_live"),
        ("GET", "/v2/health/ready", "v2_ready"),
        ("GET", "/v2/models/m", "v2_model_metadata"),
        ("GET", "/v2/models/m/versions/2", "v2_model_metadata"),
        ("GET", "/v2/models/m/ready", "v2_model_ready"),
        ("POST", "/v2/models/m/infer", "v2_infer"),
        ("POST", "/v2/models/m/versions/2/infer", "v2_infer"),
        ("GET", "/v2/elsewhere", "v2_other"),
    ]
    for method, path, label in routes:
        assert api.route_label(method.encode(), path.encode()) == label, path
        request = treq.request(method, "http://server" + path,
                               data=json.dumps({"inputs": INPUTS}).encode())  # fmt: skip
        result_of(request)
        marked = api.app.url_map.bind("server").match(path, method=method)[0]
        assert api.app.endpoints[marked].route_label == label


def test_a_wrong_datatype_is_named_with_v2_names_and_tf_servings_wording_stays() -> None:
    """A v2 input of the wrong datatype gets a 400 naming both datatypes as v2 names them
    (INT32, FP32); the same tensors through the data plane as the TF Serving doors (gRPC)
    send them still get TensorFlow's DT_ names, as TF Serving writes them."""
    api, treq, _ = make_api()
    wrong = [{**INPUTS[0], "datatype": "INT32", "data": [1, 2, 3, 4]}, *INPUTS[1:]]
    response, content = call(
        treq, "POST", "/v2/models/m/infer", json.dumps({"inputs": wrong}).encode()
    )
    assert response.code == 400
    assert doc_of(content)["error"] == "input 'x': expects FP32 but INT32 was provided"
    inputs = {
        "x": np.zeros((1, 2), np.int32),
        "n": np.zeros(1, np.int64),
        "s": np.array([b"a"], dtype=object),
    }
    with api.plane.lease(ModelTarget("m")) as lease:
        refused = Deferred.fromCoroutine(lease.predict(None, inputs))
    with pytest.raises(InvalidArgument) as raised:  # refused before anything is queued
        result_of(refused)
    assert raised.value.message == "input 'x': expects DT_FLOAT but DT_INT32 was provided"
