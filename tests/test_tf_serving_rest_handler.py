"""TF Serving's REST handler tests, ported case by case (tensorflow/serving,
``tensorflow_serving/model_servers/http_rest_api_handler_test.cc``,
``HttpRestApiHandlerTest.<name>``), against kleinserve's routes in memory (the model "m" of
tests/test_http.py doubles its float inputs). Statuses are TF Serving's; messages are
checked for the words TF Serving's tests check where kleinserve uses them too."""

from __future__ import annotations

import pytest

from tests.test_http import call, make_api

INSTANCES = b'{"instances": [[1, 2]]}'


@pytest.mark.parametrize(
    ("method", "path", "words"),
    [  # UnsupportedApiCalls
        ("GET", "/v1/foo", "Malformed request"),
        ("POST", "/v1/foo", "Malformed request"),
        ("GET", "/v1/models", "Missing model name"),
        ("POST", "/v1/models", "Malformed request"),
        ("GET", "/v1/models/foo:predict", "Malformed request"),
        ("GET", "/v1/models/foo/version/50:predict", "Malformed request"),
        ("POST", "/v1/models/foo/version/50:regress", "Malformed request"),
        ("POST", "/v1/models/foo/versions/HELLO:regress", "Malformed request"),
        ("POST", f"/v1/models/foo/versions/{2**64 - 1}:regress", "fits in 64 bits"),
    ],
)
def test_unsupported_api_calls_are_400(method: str, path: str, words: str) -> None:
    _, treq, _ = make_api()
    response, doc = call(treq, method, path, INSTANCES if method == "POST" else None)
    assert response.code == 400 and words in doc["error"], doc


@pytest.mark.parametrize(
    "path",  # PredictModelNameVersionErrors
    [
        "/v1/models/foo:predict",
        "/v1/models/foo/versions/50:predict",
        "/v1/models/m/versions/99:predict",
    ],
)
def test_an_unknown_model_or_version_is_404(path: str) -> None:
    _, treq, _ = make_api()
    response, doc = call(treq, "POST", path, INSTANCES)
    assert response.code == 404 and "Servable not found" in doc["error"], doc


@pytest.mark.parametrize(
    ("body", "words"),
    [  # PredictRequestErrors
        (b"", "empty"),
        (b"instances = [1, 2]", "malformed JSON"),
        (b'{"instances": ["a", "b"]}', "expected a number"),
    ],
)
def test_predict_request_errors_are_400(body: bytes, words: str) -> None:
    _, treq, _ = make_api()
    response, doc = call(treq, "POST", "/v1/models/m:predict", body)
    assert response.code == 400 and words in doc["error"], doc


def test_predict_answers_json_with_its_content_type() -> None:
    """Predict: the latest version, a named version, columnar in and out."""
    _, treq, _ = make_api()
    response, doc = call(treq, "POST", "/v1/models/m:predict", b'{"instances": [[1.0, 2.0]]}')
    assert (response.code, doc) == (200, {"predictions": [[2.0, 4.0]]})
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    body = b'{"signature_name": "serving_default", "inputs": [[3.0, 4.0]]}'
    response, doc = call(treq, "POST", "/v1/models/m/versions/3:predict", body)
    assert (response.code, doc) == (200, {"outputs": [[6.0, 8.0]]})


def test_get_status_of_all_versions_and_of_one() -> None:
    """GetStatus."""
    _, treq, _ = make_api()
    status = {
        "model_version_status": [
            {
                "version": "3",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert call(treq, "GET", "/v1/models/m")[1] == status
    assert call(treq, "GET", "/v1/models/m/versions/3")[1] == status
