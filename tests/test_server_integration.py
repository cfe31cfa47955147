"""Real ``twistd -n inference`` processes serving SavedModels the tests make themselves."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from harness.twistd import TwistdServer
from tests import models

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One server per test model, started together (each loads TensorFlow, ~5 s)."""
    root = tmp_path_factory.mktemp("models")
    logs = tmp_path_factory.mktemp("logs")
    models.make_linear(root / "linear")
    models.make_multi_io(root / "multi")
    models.make_strings(root / "strings")
    models.make_fixed_batch(root / "fixed")
    started = {
        "linear": TwistdServer(
            [
                "--model_name=linear",
                f"--model_base_path={root / 'linear'}",
                "--max_request_bytes=100000",
            ],
            logs,
        ),
        "multi": TwistdServer(
            ["--model_name=multi", f"--model_base_path={root / 'multi'}", "--enable_batching"], logs
        ),
        "strings": TwistdServer(
            ["--model_name=strings", f"--model_base_path={root / 'strings'}"], logs
        ),
        "fixed": TwistdServer(
            ["--model_name=fixed", f"--model_base_path={root / 'fixed'}", "--enable_batching"], logs
        ),
    }
    for server in started.values():
        server.start()
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def test_status_reports_the_available_version(servers) -> None:
    """GET /v1/models/{name} answers TF Serving's model_version_status for version 1."""
    assert servers["linear"].get("/v1/models/linear") == (
        200,
        {
            "model_version_status": [
                {
                    "version": "1",
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        },
    )
    assert servers["linear"].get("/v1/models/linear/versions/1")[0] == 200


def test_metadata_describes_the_signature(servers) -> None:
    """GET …/metadata answers model_spec and the SignatureDef with dtypes and shapes, as TF Serving."""
    status, doc = servers["linear"].get("/v1/models/linear/metadata")
    assert status == 200
    assert doc["model_spec"] == {"name": "linear", "signature_name": "", "version": "1"}
    sig = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    x = sig["inputs"]["x"]
    assert x["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in x["tensor_shape"]["dim"]] == ["-1", "3"]
    assert sig["outputs"]["y"]["dtype"] == "DT_FLOAT"
    assert sig["method_name"] == "tensorflow/serving/predict"


def test_predict_row_format(servers) -> None:
    """Row format in, predictions out: y = x @ W + b for each instance."""
    status, doc = servers["linear"].post_json(
        "/v1/models/linear:predict", {"instances": [[1, 1, 1], [0, 0, 0]]}
    )
    assert (status, doc) == (200, {"predictions": [[9.5, 11.5], [0.5, -0.5]]})


def test_predict_columnar_format_and_version_url(servers) -> None:
    """Columnar format in, outputs out, also through /versions/1."""
    status, doc = servers["linear"].post_json(
        "/v1/models/linear/versions/1:predict", {"inputs": [[1, 0, 0]]}
    )
    assert (status, doc) == (200, {"outputs": [[1.5, 1.5]]})


def test_float32_outputs_are_written_shortest(servers) -> None:
    """A float32 output is written as the shortest text that round-trips the float32."""
    status, _, body = servers["linear"].request(
        "POST",
        "/v1/models/linear:predict",
        b'{"instances": [[0.1, 0, 0]]}',
        {"content-type": "application/json"},
    )
    assert status == 200
    a = np.float32(0.1) * np.float32(1) + np.float32(0.5)
    b = np.float32(0.1) * np.float32(2) - np.float32(0.5)
    assert body.decode() == f'{{"predictions":[[{a!s},{b!s}]]}}'  # str() of a float32 is shortest


def test_multiple_inputs_and_outputs(servers) -> None:
    """Several named inputs in row and columnar form; several outputs come back named."""
    multi = servers["multi"]
    status, doc = multi.post_json(
        "/v1/models/multi:predict", {"instances": [{"a": [1, 2], "b": 3}, {"a": [0, 0], "b": -1}]}
    )
    assert (status, doc) == (
        200,
        {"predictions": [{"count": 6, "sum": [4.0, 5.0]}, {"count": -2, "sum": [-1.0, -1.0]}]},
    )
    status, doc = multi.post_json("/v1/models/multi:predict", {"inputs": {"a": [[1, 2]], "b": [3]}})
    assert (status, doc) == (200, {"outputs": {"count": [6], "sum": [[4.0, 5.0]]}})


def test_signature_name_selects_another_signature(servers) -> None:
    """signature_name picks the "double" signature; an unknown one is a 400 naming it."""
    multi = servers["multi"]
    status, doc = multi.post_json(
        "/v1/models/multi:predict", {"signature_name": "double", "instances": [[1, 2]]}
    )
    assert (status, doc) == (200, {"predictions": [[2.0, 4.0]]})
    status, doc = multi.post_json(
        "/v1/models/multi:predict", {"signature_name": "nope", "instances": [[1, 2]]}
    )
    assert status == 400 and "nope" in doc["error"]


def test_string_inputs_plain_and_b64(servers) -> None:
    """String inputs take plain strings and {"b64": …}; a *_bytes output comes back as b64."""
    strings = servers["strings"]
    raw = base64.b64encode(b"\x00hi").decode()
    status, doc = strings.post_json(
        "/v1/models/strings:predict", {"instances": ["abc", {"b64": raw}]}
    )
    assert status == 200
    assert [p["length"] for p in doc["predictions"]] == [3, 3]
    assert [base64.b64decode(p["upper_bytes"]["b64"]) for p in doc["predictions"]] == [
        b"ABC",
        b"\x00HI",
    ]


def test_fixed_batch_signature_runs_unbatched(servers) -> None:
    """A signature with a fixed batch dimension of 1 is served, request by request."""
    status, doc = servers["fixed"].post_json(
        "/v1/models/fixed:predict", {"inputs": {"x": [[1, 2, 3]]}}
    )
    assert (status, doc) == (200, {"outputs": [6.0]})


BAD_REQUESTS = [
    ("malformed JSON", b'{"instances": [[1, 2, 3]', 400),
    ("both formats", b'{"instances": [[1,2,3]], "inputs": [[1,2,3]]}', 400),
    ("neither format", b'{"signature_name": "serving_default"}', 400),
    ("ragged", b'{"instances": [[1, 2, 3], [1, 2]]}', 400),
    ("wrong rank", b'{"instances": [1, 2, 3]}', 400),
    ("wrong inner shape", b'{"instances": [[1, 2]]}', 400),
    ("string for float", b'{"instances": [["a", "b", "c"]]}', 400),
    ("unknown input name", b'{"inputs": {"z": [[1, 2, 3]]}}', 400),
    ("not an object", b"[1, 2, 3]", 400),
]


@pytest.mark.parametrize(("what", "body", "status"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(servers, what, body, status) -> None:
    """Each kind of bad input gets its 4xx with an {"error": …} body; the next good request works."""
    linear = servers["linear"]
    code, headers, answer = linear.request(
        "POST", "/v1/models/linear:predict", body, {"content-type": "application/json"}
    )
    assert code == status
    error = json.loads(answer)["error"]
    assert isinstance(error, str) and len(error) > 10
    assert linear.post_json("/v1/models/linear:predict", {"instances": [[0, 0, 0]]})[0] == 200


def test_int_input_given_a_fraction_is_rejected(servers) -> None:
    """1.5 for an int64 input is a 400 that names the input."""
    status, doc = servers["multi"].post_json(
        "/v1/models/multi:predict", {"instances": [{"a": [1, 2], "b": 1.5}]}
    )
    assert status == 400 and "b" in doc["error"]


def test_unknown_model_and_version_are_404(servers) -> None:
    """An unknown model or version is a 404 with an error body."""
    linear = servers["linear"]
    status, doc = linear.post_json("/v1/models/nosuch:predict", {"instances": [[0, 0, 0]]})
    assert status == 404 and "nosuch" in doc["error"]
    status, doc = linear.post_json(
        "/v1/models/linear/versions/7:predict", {"instances": [[0, 0, 0]]}
    )
    assert status == 404 and "7" in doc["error"]
    assert linear.get("/v1/models/linear/versions/7")[0] == 404


def test_body_over_the_limit_is_413(servers) -> None:
    """A body over --max_request_bytes is refused with 413, and the server keeps serving."""
    linear = servers["linear"]
    body = json.dumps({"instances": [[0.123456, 0.123456, 0.123456]] * 6000}).encode()
    assert len(body) > 100000
    code, _, answer = linear.request(
        "POST", "/v1/models/linear:predict", body, {"content-type": "application/json"}
    )
    assert code == 413 and "100000" in json.loads(answer)["error"]
    assert linear.post_json("/v1/models/linear:predict", {"instances": [[0, 0, 0]]})[0] == 200


def test_non_json_content_type_is_415(servers) -> None:
    """A body declared as something other than JSON is refused with 415 naming the type."""
    code, _, answer = servers["linear"].request(
        "POST", "/v1/models/linear:predict", b"\x89PNG....", {"content-type": "image/png"}
    )
    assert code == 415 and "image/png" in json.loads(answer)["error"]


def test_health_and_metrics(servers) -> None:
    """/healthz and /readyz answer 200 once loaded; /metrics counts answered predict requests."""
    multi = servers["multi"]
    assert multi.get("/healthz")[0] == 200
    assert multi.get("/readyz")[0] == 200
    multi.post_json("/v1/models/multi:predict", {"instances": [{"a": [1, 2], "b": 3}]})
    status, text = multi.get("/metrics")
    assert status == 200
    assert 'kleinserve_requests_total{code="200",route="predict"}' in text
    assert "kleinserve_batch_size_bucket" in text


def test_digits_predictions_equal_the_model_in_process(tmp_path: Path) -> None:
    """The served digits model answers exactly what calling the SavedModel in-process answers."""
    import tensorflow as tf

    exporter = models.load_exporter()
    exporter.export(tmp_path / "digits", None)
    rng = np.random.default_rng(0)
    batch = rng.random((5, 28, 28, 1), dtype=np.float32)
    expected = (
        tf.saved_model.load(str(tmp_path / "digits" / "1"))
        .signatures["serving_default"](image=tf.constant(batch))["probabilities"]
        .numpy()
    )
    server = TwistdServer(
        ["--model_name=digits", f"--model_base_path={tmp_path / 'digits'}"], tmp_path
    ).start()
    try:
        server.wait_ready()
        body = json.dumps({"instances": batch.tolist()})
        status, doc = server.post_json("/v1/models/digits:predict", json.loads(body))
    finally:
        server.stop()
    assert status == 200
    served = np.array(doc["predictions"], dtype=np.float32)
    np.testing.assert_array_equal(served, expected)
