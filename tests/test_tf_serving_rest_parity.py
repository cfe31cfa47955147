"""TF Serving's REST behaviour where kleinserve differed, each case citing the TF Serving
test or source it follows (tensorflow/serving, ``tensorflow_serving/model_servers/
http_rest_api_handler_test.cc`` and ``tensorflow_serving/util/json_tensor_test.cc``)."""

from __future__ import annotations

import pytest

from harness.twistd import TwistdServer
from tests import models

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("models")
    models.make_scalar_string(root / "scalar")
    models.make_linear(root / "linear")
    config = root / "models.config"
    config.write_text(
        "model_config_list {\n"
        f"  config {{ name: 'scalar' base_path: '{root / 'scalar'}' model_platform: 'tensorflow' }}\n"
        f"  config {{ name: 'linear' base_path: '{root / 'linear'}' model_platform: 'tensorflow' }}\n"
        "}\n"
    )
    started = TwistdServer([f"--model_config_file={config}"], tmp_path_factory.mktemp("logs"))
    started.start()
    try:
        yield started.wait_ready()
    finally:
        started.stop()


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": {"b64": "aGVsbG8="}},
        {"inputs": {"text": {"b64": "aGVsbG8="}}},
        {"inputs": "hello"},
    ],
)
def test_a_scalar_string_in_columnar_format_is_answered(server: TwistdServer, body) -> None:
    """json_tensor_test.cc FillTensorMapFromColumnarFormat with a scalar: a bare value (or a
    {"b64"} object) is a rank-0 tensor; the scalar string output comes back as a string."""
    code, doc = server.post_json("/v1/models/scalar:predict", body)
    assert (code, doc) == (200, {"outputs": {"echo": "hello", "length": 5}})


@pytest.mark.parametrize(
    ("path", "words"), [("/v1/models", "Missing model name"), ("/v1/foo", "Malformed request")]
)
def test_a_v1_url_no_route_takes_is_a_400(server: TwistdServer, path: str, words: str) -> None:
    """http_rest_api_handler_test.cc UnsupportedApiCalls: TF Serving's handler takes every
    /v1/ URL; one it cannot parse is 400 (not 404), GET /v1/models "Missing model name"."""
    code, doc = server.get(path)
    assert code == 400 and words in doc["error"]


def test_a_version_past_int64_is_a_malformed_request(server: TwistdServer) -> None:
    """http_rest_api_handler_test.cc: a version that does not parse as int64 is 400."""
    code, doc = server.get("/v1/models/linear/versions/99999999999999999999")
    assert code == 400 and "Malformed request" in doc["error"]


def test_metadata_writes_fields_at_their_defaults_as_tf_serving(server: TwistdServer) -> None:
    """http_rest_api_handler_test.cc GetModelMetadata: TF Serving's JSON printer writes every
    field, so a tensor_shape has "dim" (each with "name") and "unknown_rank", and a
    SignatureDef has "defaults"."""
    code, doc = server.get("/v1/models/linear/metadata")
    assert code == 200
    signature = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    shape = signature["inputs"]["x"]["tensor_shape"]
    assert shape == {
        "dim": [{"size": "-1", "name": ""}, {"size": "3", "name": ""}],
        "unknown_rank": False,
    }
    assert signature["defaults"] == {}
    scalar = server.get("/v1/models/scalar/metadata")[1]["metadata"]["signature_def"]
    assert scalar["signature_def"]["serving_default"]["inputs"]["text"]["tensor_shape"] == {
        "dim": [],
        "unknown_rank": False,
    }


def test_a_float_past_float32s_range_is_refused_as_tf_serving_refuses_it(
    server: TwistdServer,
) -> None:
    """json_tensor.cc IsLosslessDecimal<float>: a finite number outside float32's range is
    refused (400), not turned into infinity."""
    code, doc = server.post_json("/v1/models/linear:predict", {"instances": [[1e39, 0, 0]]})
    assert code == 400 and "too large for DT_FLOAT" in doc["error"], doc
