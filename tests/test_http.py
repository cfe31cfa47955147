"""The Klein routes through StubTreq: no sockets, no threads, no TensorFlow.

The repository holds a hand-built AVAILABLE version whose "model" is numpy and whose
batching queue runs batches at once (``maybeDeferred``) or holds them (a list), so
every route, status code and error body can be checked synchronously.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
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
    inputs={"x": TensorInfo("x", "DT_FLOAT", (None, 2))},
    outputs={"y": TensorInfo("y", "DT_FLOAT", (None, 2))},
)


class FakeServable:
    """The part of Servable the routes read: signatures and metadata."""

    signatures = {"serving_default": SIGNATURE}
    signature_defs = {"serving_default": {"method_name": "tensorflow/serving/predict"}}
    labels = None

    def signature(self, name: str | None) -> Signature:
        if name not in (None, "serving_default"):
            raise InvalidArgument(f"serving signature name: {name!r} not found")
        return SIGNATURE


def double(inputs):
    return {"y": inputs["x"] * 2}


SMALL_BATCHES = BatchingParameters(max_batch_size=4)


def make_api(executor=maybeDeferred, params=SMALL_BATCHES, labels=None):
    metrics = Metrics()
    repository = ModelRepository(
        [ModelConfig("m", Path("/nonexistent"), labels=labels or {})],
        reactor=Clock(),
        metrics=metrics,
    )
    version = LoadedVersion("m", 3, state=AVAILABLE, servable=FakeServable())  # type: ignore[arg-type]
    version.queues["serving_default"] = BatchingQueue(
        double,
        params,
        clock=Clock(),
        executor=executor,
        observer=metrics.batch_observer("m", 3, "serving_default"),
    )
    repository.add_version(version)
    api = InferenceAPI(repository, metrics=metrics)
    return api, StubTreq(api.resource()), repository


def call(treq: StubTreq, method: str, path: str, body: bytes | None = None, headers=None):
    d = treq.request(method, "http://server" + path, data=body, headers=headers or {})
    response = result_of(d)
    content = result_of(response.content())
    return response, json.loads(content) if content.startswith((b"{", b"[")) else content


def test_predict_answers_row_format() -> None:
    """POST :predict with instances answers predictions computed by the servable's queue."""
    _, treq, _ = make_api()
    response, doc = call(treq, "POST", "/v1/models/m:predict", b'{"instances": [[1, 2], [3, 4]]}')
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert doc == {"predictions": [[2.0, 4.0], [6.0, 8.0]]}


def test_predict_with_version_in_the_url() -> None:
    """/versions/3:predict reaches version 3; columnar in, columnar out."""
    _, treq, _ = make_api()
    response, doc = call(treq, "POST", "/v1/models/m/versions/3:predict", b'{"inputs": [[1, 1]]}')
    assert (response.code, doc) == (200, {"outputs": [[2.0, 2.0]]})


def test_status_and_metadata_routes() -> None:
    """GET answers version status and metadata in TF Serving's shapes."""
    _, treq, _ = make_api()
    response, doc = call(treq, "GET", "/v1/models/m")
    assert doc == {
        "model_version_status": [
            {
                "version": "3",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    response, doc = call(treq, "GET", "/v1/models/m/versions/3/metadata")
    assert doc["model_spec"] == {"name": "m", "signature_name": "", "version": "3"}
    assert "serving_default" in doc["metadata"]["signature_def"]["signature_def"]


def test_unknown_model_version_and_label() -> None:
    """Unknown model/version → 404; a version label (none configured) → 400; all as {"error": …}."""
    _, treq, _ = make_api()
    response, doc = call(treq, "POST", "/v1/models/other:predict", b'{"instances": [[1, 2]]}')
    assert response.code == 404 and "other" in doc["error"]
    response, doc = call(treq, "GET", "/v1/models/m/versions/9")
    assert response.code == 404 and "9" in doc["error"]
    response, doc = call(
        treq, "POST", "/v1/models/m/labels/stable:predict", b'{"instances": [[1, 2]]}'
    )
    assert response.code == 400 and "stable" in doc["error"]


def test_version_labels_route_predict_metadata_and_status() -> None:
    """/labels/{label} works wherever /versions/{v} does; an unknown label is a 400 listing the
    labels there are, and one pointing at a version that is not loaded a 400 saying so."""
    _, treq, _ = make_api(labels={"stable": 3, "old": 1})
    response, doc = call(
        treq, "POST", "/v1/models/m/labels/stable:predict", b'{"instances": [[1, 2]]}'
    )
    assert response.code == 200 and doc == {"predictions": [[2.0, 4.0]]}
    response, doc = call(treq, "GET", "/v1/models/m/labels/stable/metadata")
    assert response.code == 200 and doc["model_spec"]["version"] == "3"
    response, doc = call(treq, "GET", "/v1/models/m/labels/stable")
    assert response.code == 200 and doc["model_version_status"][0]["version"] == "3"
    response, doc = call(treq, "GET", "/v1/models/m/labels/beta/metadata")
    assert response.code == 400
    assert doc["error"].startswith("Unrecognized servable version label: beta")
    assert "old, stable" in doc["error"]
    response, doc = call(
        treq, "POST", "/v1/models/m/labels/old:predict", b'{"instances": [[1, 2]]}'
    )
    assert response.code == 400 and "points at version 1, which is not loaded" in doc["error"]


def test_malformed_paths_are_400() -> None:
    """Paths that are not TF Serving's forms are a 400 "Malformed request"."""
    _, treq, _ = make_api()
    for path in (
        "/v1/models/m:explode",
        "/v1/models/m/versions/x:predict",
        "/v1/models/m/extra/bits",
    ):
        response, doc = call(treq, "POST", path, b"{}")
        assert response.code == 400 and "Malformed request" in doc["error"], path


def test_not_yet_loaded_is_503_with_retry_after() -> None:
    """A model still LOADING answers 503 with Retry-After, and /readyz says 503."""
    _, treq, repository = make_api()
    repository.lookup("m", version=3).state = LOADING
    response, doc = call(treq, "POST", "/v1/models/m:predict", b'{"instances": [[1, 2]]}')
    assert response.code == 503 and response.headers.getRawHeaders("retry-after") == ["1"]
    assert "LOADING" in doc["error"]
    response, _ = call(treq, "GET", "/readyz")
    assert response.code == 503


def test_full_queue_is_503_with_retry_after() -> None:
    """When the queue bound is reached, a further request is refused at once with 503 + Retry-After."""
    held: list = []

    def hold(f, *args):
        d: Deferred = Deferred()
        held.append(d)
        return d

    _, treq, _ = make_api(
        executor=hold, params=BatchingParameters(max_batch_size=1, max_enqueued_batches=1)
    )
    first = treq.request(
        "POST", "http://server/v1/models/m:predict", data=b'{"instances": [[1, 2]]}'
    )
    second = treq.request(
        "POST", "http://server/v1/models/m:predict", data=b'{"instances": [[1, 2]]}'
    )
    response, doc = call(treq, "POST", "/v1/models/m:predict", b'{"instances": [[1, 2]]}')
    assert response.code == 503 and response.headers.getRawHeaders("retry-after") == ["1"]
    assert "overloaded" in doc["error"]
    answered: list = []
    first.addBoth(answered.append)
    second.addBoth(answered.append)
    assert len(held) == 1 and answered == []  # one running, one queued: both still waiting


def test_bad_json_is_400_and_the_next_request_works() -> None:
    """Malformed JSON answers 400 with the parser's message; the route keeps working."""
    _, treq, _ = make_api()
    response, doc = call(treq, "POST", "/v1/models/m:predict", b'{"instances": [[1, 2]')
    assert response.code == 400 and doc["error"]
    response, _ = call(treq, "POST", "/v1/models/m:predict", b'{"instances": [[1, 2]]}')
    assert response.code == 200


def test_wrong_content_type_is_415() -> None:
    """A multipart or image body on the JSON route is a 415 that names the content type."""
    _, treq, _ = make_api()
    body = b'--x\r\nContent-Disposition: form-data; name="data"; filename="a.png"\r\n\r\nPNG\r\n--x--\r\n'
    response, doc = call(
        treq,
        "POST",
        "/v1/models/m:predict",
        body,
        {"content-type": ["multipart/form-data; boundary=x"]},
    )
    assert response.code == 415 and "multipart/form-data" in doc["error"]


def test_curl_default_content_type_is_accepted() -> None:
    """curl -d sends application/x-www-form-urlencoded; TF Serving accepts it, and so do we."""
    _, treq, _ = make_api()
    response, _ = call(
        treq,
        "POST",
        "/v1/models/m:predict",
        b'{"instances": [[1, 2]]}',
        {"content-type": ["application/x-www-form-urlencoded"]},
    )
    assert response.code == 200


def test_metrics_and_health() -> None:
    """/healthz is 200, /readyz 200 when loaded, /metrics speaks Prometheus text."""
    _, treq, _ = make_api()
    call(treq, "POST", "/v1/models/m:predict", b'{"instances": [[1, 2]]}')
    assert call(treq, "GET", "/healthz")[0].code == 200
    assert call(treq, "GET", "/readyz")[0].code == 200
    response, text = call(treq, "GET", "/metrics")
    assert (
        response.code == 200
        and b'kleinserve_batch_size_count{model="m",signature="serving_default",version="3"} 1.0'
        in text
    )


@pytest.mark.parametrize(
    ("method", "path", "endpoint", "target"),
    [
        ("POST", "m:predict", "predict", ModelTarget("m")),
        ("POST", "m/versions/12:predict", "predict", ModelTarget("m", version=12)),
        ("POST", "m/labels/stable:predict", "predict", ModelTarget("m", label="stable")),
        ("POST", "m/labels/a:classify", "classify", ModelTarget("m", label="a")),
        ("POST", "m/versions/3:regress", "regress", ModelTarget("m", version=3)),
        ("POST", "m:classify_image", "classify_image", ModelTarget("m")),
        ("GET", "m/versions/2/metadata", "metadata", ModelTarget("m", version=2)),
        ("GET", "m/labels/metadata", "status", ModelTarget("m", label="metadata")),
        ("GET", "m", "status", ModelTarget("m")),
    ],
)
def test_model_urls_route_by_verb(method, path, endpoint, target) -> None:
    """TF Serving's URL forms reach the route of their verb with the model target they name."""
    api, _, _ = make_api()
    adapter = api.app.url_map.bind("server")
    assert adapter.match("/v1/models/" + path, method=method) == (endpoint, {"target": target})


@given(st.text(max_size=40))
def test_any_model_url_answers_json(path: str) -> None:
    """Any path under /v1/models/ answers JSON: 200, or a 4xx with an error, never a 5xx."""
    _, treq, _ = make_api()
    response, doc = call(treq, "GET", "/v1/models/" + quote(path, safe="/:"))
    assert response.code < 500 and isinstance(doc, dict)
    assert response.code == 200 or doc["error"]


def test_outputs_are_float32_not_float64() -> None:
    """The queue hands back float32 arrays, and the route writes them as float32 text."""
    _, treq, _ = make_api()
    response, doc = call(treq, "POST", "/v1/models/m:predict", b'{"instances": [[0.1, 0.7]]}')
    assert doc == {"predictions": [[float(str(np.float32(0.2))), float(str(np.float32(1.4)))]]}


def test_deadline_header_drops_a_request_that_waited_too_long() -> None:
    """X-Request-Deadline-Ms: a request still queued when its deadline passes gets 504, unrun."""
    held: list = []

    def hold(f, *args):
        d: Deferred = Deferred()
        held.append((d, f, args))
        return d

    clock = Clock()
    api, treq, repository = make_api(executor=hold, params=BatchingParameters(max_batch_size=1))
    repository.clock = clock
    repository.lookup("m", version=3).queues["serving_default"]._clock = clock
    first = treq.request(
        "POST", "http://server/v1/models/m:predict", data=b'{"instances": [[1, 2]]}'
    )
    late = treq.request(
        "POST",
        "http://server/v1/models/m:predict",
        data=b'{"instances": [[3, 4]]}',
        headers={"X-Request-Deadline-Ms": ["50"]},
    )
    clock.advance(0.1)
    d, f, args = held.pop(0)
    d.callback(f(*args))  # the first batch finishes; the late request is now past its deadline
    treq.flush()
    response = result_of(late)
    assert response.code == 504 and "deadline" in json.loads(result_of(response.content()))["error"]
    assert result_of(first).code == 200 and held == []


def test_bad_deadline_header_is_400() -> None:
    """A deadline header that is not a number is a 400 naming the header."""
    _, treq, _ = make_api()
    response, doc = call(
        treq,
        "POST",
        "/v1/models/m:predict",
        b'{"instances": [[1, 2]]}',
        {"X-Request-Deadline-Ms": ["soon"]},
    )
    assert response.code == 400 and "X-Request-Deadline-Ms" in doc["error"]
