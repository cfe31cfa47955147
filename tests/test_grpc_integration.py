"""TF Serving's gRPC API of a real twistd, called with the ``tensorflow-serving-api`` stubs.

Every call here is what a TF Serving user's code already does (``PredictionServiceStub`` with
``tf.make_tensor_proto`` and ``tf.make_ndarray``); answers are compared with the REST API's
answers from the same server, and with the values the models compute.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from harness.twistd import TwistdServer
from tests import models

pytestmark = pytest.mark.integration


def write_config(path: Path, entries: dict[str, Path], labels: str = "") -> None:
    text = "model_config_list {\n"
    for name, base in entries.items():
        text += f"  config {{ name: '{name}' base_path: '{base}' model_platform: 'tensorflow'"
        if name == "linear":
            text += " model_version_policy { all {} }" + labels
        text += " }\n"
    path.write_text(text + "}\n")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """One server of several models (linear in versions 1 and 2, label "stable" -> 1)."""
    root = tmp_path_factory.mktemp("models")
    logs = tmp_path_factory.mktemp("logs")
    models.make_linear(root / "linear", 1)
    models.make_linear(root / "linear", 2, scale=10.0)
    models.make_multi_io(root / "multi")
    models.make_strings(root / "strings")
    models.make_all_dtypes(root / "dtypes")
    models.make_example_classifier(root / "examples")
    models.make_batch_echo(root / "echo")
    batching = root / "batching.txt"
    # A batch runs when it holds 2 requests' rows (or after 30 s): two calls made together
    # share one batch whatever the timing.
    batching.write_text(
        "max_batch_size { value: 2 }\nbatch_timeout_micros { value: 30000000 }\n"
        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 1000 }\n"
    )
    config = root / "models.config"
    entries = {
        name: root / name for name in ("linear", "multi", "strings", "dtypes", "examples", "echo")
    }
    write_config(config, entries, " version_labels { key: 'stable' value: 1 }")
    (root / "echo" / "batching_parameters.txt").write_text(batching.read_text())
    server = TwistdServer(
        [f"--model_config_file={config}", "--enable_batching"],
        logs,
        expected_errors=[r"the call was cancelled"],
    ).start()
    try:
        server.wait_ready()
        channel = grpc.insecure_channel(server.grpc_target)
        yield server, channel, root
        channel.close()
    finally:
        server.stop()


def predict_stub(channel: grpc.Channel) -> Any:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def predict_request(name: str, inputs: dict[str, Any], **spec: Any) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        elif key == "output_filter":
            request.output_filter.extend(value)
        else:
            setattr(request.model_spec, key, value)
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(
            value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value)
        )
    return request


def grpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_predict_with_tf_make_tensor_proto_as_tf_serving_clients_do(served) -> None:
    """The official client code: make_tensor_proto in, make_ndarray out, REST's values."""
    server, channel, _ = served
    x = np.array([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]], dtype=np.float32)
    response = predict_stub(channel).Predict(predict_request("linear", {"x": x}), 10.0)
    y = tf.make_ndarray(response.outputs["y"])
    expected = x @ np.array(models.W, np.float32) * 10.0 + np.array(models.B, np.float32)
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    rest = server.post_json("/v1/models/linear:predict", {"instances": x.tolist()})
    np.testing.assert_allclose(y, np.array(rest[1]["predictions"], np.float32), rtol=1e-6)
    assert response.model_spec.name == "linear"
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"


@pytest.mark.parametrize("dtype", models.ALL_DTYPES)
def test_every_dtype_round_trips_in_tensor_content_and_in_typed_fields(served, dtype: str) -> None:
    """Each dtype TF Serving takes comes back exactly, sent either way a client may send it."""
    _, channel, _ = served
    rng = np.random.default_rng(7)
    values = {
        "float32": rng.normal(size=(3, 2)).astype(np.float32),
        "float64": rng.normal(size=(3, 2)),
        "float16": rng.normal(size=(3, 2)).astype(np.float16),
        "bool": np.array([[True, False], [False, True], [True, True]]),
        "string": np.array([[b"a", b""], [b"\xff\x00", "é".encode()], [b"x" * 300, b"z"]], object),
    }
    array = values.get(dtype)
    if array is None:
        info = np.iinfo(np.dtype(dtype))
        array = np.array([[info.min, info.max], [0, 1], [info.max - 1, info.min + 1]], dtype)
    inputs = {
        f"in_{d}": np.zeros((3, 2), object if d == "string" else d) for d in models.ALL_DTYPES
    }
    for d in models.ALL_DTYPES:
        if d == "string":
            inputs["in_string"][:] = b""
    typed = tf.make_tensor_proto(array)
    fields = tensor_pb2.TensorProto(dtype=typed.dtype, tensor_shape=typed.tensor_shape)
    if dtype == "float16":
        fields.half_val.extend(array.reshape(-1).view(np.uint16).tolist())
    elif dtype != "string":
        field = {
            "float32": "float_val", "float64": "double_val", "int64": "int64_val",
            "uint32": "uint32_val", "uint64": "uint64_val", "bool": "bool_val",
        }.get(dtype, "int_val")  # fmt: skip
        getattr(fields, field).extend(array.reshape(-1).tolist())
    else:
        fields = typed  # strings always travel in string_val
    for proto in (typed, fields):
        sent = dict(inputs)
        sent[f"in_{dtype}"] = proto
        response = predict_stub(channel).Predict(
            predict_request("dtypes", sent, output_filter=[]), 10.0
        )
        got = tf.make_ndarray(response.outputs[f"out_{dtype}"])
        assert got.dtype == array.dtype and got.shape == array.shape
        assert got.tolist() == array.tolist()


def test_a_single_typed_value_fills_the_tensor_as_tensorflow_does(served) -> None:
    """float_val with one value and shape [2, 3] is a tensor of six copies (Tensor::FromProto)."""
    _, channel, _ = served
    proto = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[
                tensor_shape_pb2.TensorShapeProto.Dim(size=2),
                tensor_shape_pb2.TensorShapeProto.Dim(size=3),
            ]
        ),
        float_val=[1.0],
    )
    response = predict_stub(channel).Predict(
        predict_request("linear", {"x": proto}, version=1), 10.0
    )
    y = tf.make_ndarray(response.outputs["y"])
    expected = np.ones((2, 3), np.float32) @ np.array(models.W, np.float32) + models.B
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_versions_labels_signatures_and_output_filter(served) -> None:
    """model_spec picks the version (number or label) and signature; output_filter trims."""
    _, channel, _ = served
    stub = predict_stub(channel)
    x = np.array([[1.0, 1.0, 1.0]], np.float32)
    one = stub.Predict(predict_request("linear", {"x": x}, version_label="stable"), 10.0)
    assert one.model_spec.version.value == 1
    by_number = stub.Predict(predict_request("linear", {"x": x}, version=1), 10.0)
    assert (
        tf.make_ndarray(by_number.outputs["y"]).tolist()
        == tf.make_ndarray(one.outputs["y"]).tolist()
    )
    a = np.array([[1.0, 2.0]], np.float32)
    b = np.array([3], np.int64)
    both = stub.Predict(predict_request("multi", {"a": a, "b": b}), 10.0)
    assert set(both.outputs) == {"sum", "count"}
    only = stub.Predict(predict_request("multi", {"a": a, "b": b}, output_filter=["count"]), 10.0)
    assert set(only.outputs) == {"count"} and tf.make_ndarray(only.outputs["count"]).tolist() == [6]
    twice = stub.Predict(predict_request("multi", {"a": a}, signature_name="double"), 10.0)
    assert twice.model_spec.signature_name == "double"
    assert tf.make_ndarray(twice.outputs["twice"]).tolist() == [[2.0, 4.0]]
    strings = stub.Predict(predict_request("strings", {"text": np.array([b"ab", b"xyz"])}), 10.0)
    assert tf.make_ndarray(strings.outputs["upper_bytes"]).tolist() == [b"AB", b"XYZ"]
    assert tf.make_ndarray(strings.outputs["length"]).tolist() == [2, 3]


@pytest.mark.parametrize(
    ("name", "inputs", "spec", "code", "words"),
    [
        ("nope", {"x": np.zeros((1, 3), np.float32)}, {}, grpc.StatusCode.NOT_FOUND, "nope"),
        ("linear", {"x": np.zeros((1, 3), np.float32)}, {"version": 9}, grpc.StatusCode.NOT_FOUND, "9"),
        ("linear", {"x": np.zeros((1, 3), np.float32)}, {"version_label": "nolabel"}, grpc.StatusCode.INVALID_ARGUMENT, "nolabel"),
        ("linear", {"x": np.zeros((1, 3), np.int32)}, {}, grpc.StatusCode.INVALID_ARGUMENT, "DT_FLOAT"),
        ("linear", {"x": np.zeros((1, 4), np.float32)}, {}, grpc.StatusCode.INVALID_ARGUMENT, "dimension 1"),
        ("linear", {"z": np.zeros((1, 3), np.float32)}, {}, grpc.StatusCode.INVALID_ARGUMENT, "missing input(s) 'x'"),
        ("linear", {"x": np.zeros((1, 3), np.float32)}, {"signature_name": "nosig"}, grpc.StatusCode.INVALID_ARGUMENT, "nosig"),
        ("linear", {"x": np.zeros((1, 3), np.float32)}, {"output_filter": ["q"]}, grpc.StatusCode.INVALID_ARGUMENT, "output tensor alias not found"),
        ("", {"x": np.zeros((1, 3), np.float32)}, {}, grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
    ],
)  # fmt: skip
def test_errors_have_tf_servings_codes_and_say_what_was_wrong(
    served,
    name: str,
    inputs: dict[str, Any],
    spec: dict[str, Any],
    code: grpc.StatusCode,
    words: str,
) -> None:
    _, channel, _ = served
    request = predict_request(name, inputs, **spec)
    error = grpc_error(lambda: predict_stub(channel).Predict(request, 10.0))
    assert error.code() == code, error.details()
    assert words in error.details()


def test_a_malformed_tensor_proto_is_invalid_argument(served) -> None:
    """tensor_content of the wrong length, and a dtype the server cannot hold."""
    _, channel, _ = served
    short = tf.make_tensor_proto(np.zeros((1, 3), np.float32))
    short.tensor_content = short.tensor_content[:-1]
    error = grpc_error(
        lambda: predict_stub(channel).Predict(predict_request("linear", {"x": short}), 10.0)
    )
    assert (
        error.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "tensor_content has 11 bytes" in error.details()
    )
    complex_ = tf.make_tensor_proto(np.zeros((1, 3), np.complex64))
    error = grpc_error(
        lambda: predict_stub(channel).Predict(predict_request("linear", {"x": complex_}), 10.0)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "DT_COMPLEX64" in error.details()


def test_metadata_and_status_match_the_rest_answers(served) -> None:
    """GetModelMetadata's SignatureDefMap and GetModelStatus are REST's documents as protos."""
    server, channel, _ = served
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "multi"
    response = predict_stub(channel).GetModelMetadata(request, 10.0)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    rest = server.get("/v1/models/multi/metadata")[1]
    as_json = json_format.MessageToDict(
        signatures, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    assert as_json == rest["metadata"]["signature_def"]
    assert response.model_spec.version.value == 1

    bad = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["nope"])
    bad.model_spec.name = "multi"
    error = grpc_error(lambda: predict_stub(channel).GetModelMetadata(bad, 10.0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in error.details()

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "linear"
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, 10.0)
    as_json = json_format.MessageToDict(
        status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    assert (
        as_json["model_version_status"]
        == server.get("/v1/models/linear")[1]["model_version_status"]
    )
    assert [s.version for s in status.model_version_status] == [2, 1]


def example(**features: Any) -> example_pb2.Example:
    made = example_pb2.Example()
    for key, value in features.items():
        if isinstance(value, list):
            made.features.feature[key].float_list.value.extend(value)
        elif isinstance(value, bytes):
            made.features.feature[key].bytes_list.value.append(value)
        else:
            made.features.feature[key].int64_list.value.append(value)
    return made


def test_classify_regress_and_multi_inference_match_rest(served) -> None:
    """Examples (with a context merged in) give REST's classifications and regressions."""
    server, channel, _ = served
    stub = predict_stub(channel)
    rows = [example(x=[1.0, 2.0]), example(x=[0.0, 0.0], kind=b"big")]
    context = example(count=3)
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "examples"
    classify.input.example_list_with_context.examples.extend(rows)
    classify.input.example_list_with_context.context.CopyFrom(context)
    answer = stub.Classify(classify, 10.0)
    rest = server.post_json(
        "/v1/models/examples:classify",
        {
            "examples": [{"x": [1.0, 2.0]}, {"x": [0.0, 0.0], "kind": "big"}],
            "context": {"count": 3},
        },
    )[1]["results"]
    got = [[[c.label, c.score] for c in row.classes] for row in answer.result.classifications]
    assert [[label for label, _ in row] for row in got] == [
        [label for label, _ in row] for row in rest
    ]
    np.testing.assert_allclose(
        [[score for _, score in row] for row in got],
        [[s for _, s in row] for row in rest],
        rtol=1e-6,
    )
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = "examples"
    regress.model_spec.signature_name = "regress"
    regress.input.example_list.examples.extend(rows)
    values = [r.value for r in stub.Regress(regress, 10.0).result.regressions]
    rest_values = server.post_json(
        "/v1/models/examples:regress",
        {
            "signature_name": "regress",
            "examples": [{"x": [1.0, 2.0]}, {"x": [0.0, 0.0], "kind": "big"}],
        },
    )[1]["results"]
    np.testing.assert_allclose(values, rest_values, rtol=1e-6)

    multi = inference_pb2.MultiInferenceRequest()
    for signature, method in (
        ("classify", "tensorflow/serving/classify"),
        ("regress", "tensorflow/serving/regress"),
    ):
        task = multi.tasks.add(method_name=method)
        task.model_spec.name = "examples"
        task.model_spec.signature_name = signature
    multi.input.example_list.examples.extend(rows)
    results = stub.MultiInference(multi, 10.0).results
    assert [r.WhichOneof("result") for r in results] == [
        "classification_result",
        "regression_result",
    ]
    np.testing.assert_allclose([r.value for r in results[1].regression_result.regressions], values)
    empty = classification_pb2.ClassificationRequest()
    empty.model_spec.name = "examples"
    error = grpc_error(lambda: stub.Classify(empty, 10.0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "Input is empty" in error.details()


def test_grpc_and_rest_requests_share_one_batch(served) -> None:
    """A batch of two rows runs when two requests wait: one by gRPC, one by REST, together."""
    server, channel, _ = served
    x = [[1.0, 2.0, 3.0]]
    with ThreadPoolExecutor(2) as pool:
        by_grpc = pool.submit(
            predict_stub(channel).Predict,
            predict_request("echo", {"x": np.array(x, np.float32)}),
            60.0,
        )
        by_rest = pool.submit(server.post_json, "/v1/models/echo:predict", {"instances": x})
        grpc_rows = tf.make_ndarray(by_grpc.result().outputs["rows"]).tolist()
        rest_answer = by_rest.result()
    assert grpc_rows == [2]
    assert rest_answer[0] == 200 and rest_answer[1]["predictions"][0]["rows"] == 2


def test_200_concurrent_calls_by_grpc_and_rest_are_all_answered_in_full_batches(served) -> None:
    """100 gRPC and 100 REST calls at once: every answer right, every batch full (2 rows)."""
    server, channel, _ = served
    stub = predict_stub(channel)

    def by_grpc(i: int) -> tuple[list[float], int]:
        response = stub.Predict(
            predict_request("echo", {"x": np.full((1, 3), i, np.float32)}), 60.0
        )
        return tf.make_ndarray(response.outputs["y"])[0].tolist(), int(
            tf.make_ndarray(response.outputs["rows"])[0]
        )

    def by_rest(i: int) -> tuple[list[float], int]:
        code, doc = server.post_json("/v1/models/echo:predict", {"instances": [[i, i, i]]})[:2]
        assert code == 200, doc
        return doc["predictions"][0]["y"], doc["predictions"][0]["rows"]

    with ThreadPoolExecutor(50) as pool:
        grpc_answers = list(pool.map(by_grpc, range(100)))
        rest_answers = list(pool.map(by_rest, range(100, 200)))
    for i, (y, rows) in enumerate([*grpc_answers, *rest_answers]):
        assert y == [2.0 * i] * 3 and rows == 2


def test_health_says_serving_with_the_grpc_health_stub(served) -> None:
    _, channel, _ = served
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tensorflow.serving.PredictionService"):
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), 10.0)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    error = grpc_error(lambda: stub.Check(health_pb2.HealthCheckRequest(service="nope"), 10.0))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def queued_rows(server: TwistdServer, model: str) -> float:
    """The model's rows waiting for a batch, from /metrics (read with prometheus_client)."""
    text = server.request("GET", "/metrics")[2].decode()
    for family in text_string_to_metric_families(text):
        if family.name == "kleinserve_queued_rows":
            return sum(s.value for s in family.samples if s.labels.get("model") == model)
    return 0.0


def test_a_call_cancelled_or_timed_out_while_queued_leaves_the_server_serving(served) -> None:
    """A call waiting for a batch (the echo model waits for a second row) that the client
    cancels, and one whose deadline passes there, are dropped; the next pair still runs."""
    server, channel, _ = served
    stub = predict_stub(channel)
    one_row = predict_request("echo", {"x": np.ones((1, 3), np.float32)})
    waiting = stub.Predict.future(one_row, 60.0)
    server.wait_for(lambda: queued_rows(server, "echo") == 1)
    waiting.cancel()
    assert waiting.cancelled()
    # Within 10 s, well before the batch's 30 s timeout would run it: the cancel took it out.
    server.wait_for(lambda: queued_rows(server, "echo") == 0, timeout=10)
    error = grpc_error(lambda: stub.Predict(one_row, 0.5))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_for(lambda: queued_rows(server, "echo") == 0, timeout=10)
    test_grpc_and_rest_requests_share_one_batch(served)


#: A load generator, run as its own process: 64 calls in flight, each one row to ``echo``
#: (which runs two rows at a time), for 400 answers; then one call alone, which waits for a
#: second row, when it is killed.
_GRPC_LOAD = """
import asyncio, sys
import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

async def main():
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "echo"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((1, 3), np.float32)))
    left = [400]
    async with grpc.aio.insecure_channel(sys.argv[1]) as channel:
        call = channel.unary_unary(
            "/tensorflow.serving.PredictionService/Predict",
            request_serializer=predict_pb2.PredictRequest.SerializeToString,
        )
        async def worker():
            while left[0] > 0:
                left[0] -= 1
                await call(request, timeout=120)
        await asyncio.gather(*(worker() for _ in range(64)))
        print("alone", flush=True)
        await call(request, timeout=120)

asyncio.run(main())
"""


def test_a_load_generator_killed_with_calls_in_flight_wedges_nothing(served) -> None:
    """A gRPC load generator SIGKILLed with a call in flight (its connection reset, no
    cancel sent) after 400 answers at 64 in flight: the call it left is dropped from the
    queue well before its deadline, and the next calls, gRPC and REST, share a batch."""
    server, _, _ = served
    generator = subprocess.Popen(
        [sys.executable, "-c", _GRPC_LOAD, server.grpc_target],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    try:
        assert generator.stdout is not None
        assert generator.stdout.readline() == b"alone\n"
        server.wait_for(lambda: queued_rows(server, "echo") == 1)
    finally:
        generator.kill()
        generator.wait(30)
    # Its deadline is 120 s away and its batch's timeout 30 s: within 10 s, only the reset
    # connection can have taken it out of the queue.
    server.wait_for(lambda: queued_rows(server, "echo") == 0, timeout=10)
    test_grpc_and_rest_requests_share_one_batch(served)


def test_handle_reload_config_request_applies_a_model_server_config(served) -> None:
    """HandleReloadConfigRequest changes the served models as a config file reload does."""
    server, channel, root = served
    config = model_server_config_pb2.ModelServerConfig()
    for name in ("linear", "multi", "strings", "dtypes", "examples", "echo"):
        entry = config.model_config_list.config.add(name=name, base_path=str(root / name))
        entry.model_platform = "tensorflow"
        if name == "linear":
            entry.model_version_policy.all.SetInParent()
            entry.version_labels["stable"] = 1
    models.make_linear(root / "linear_copy", 1)
    config.model_config_list.config.add(name="linear_copy", base_path=str(root / "linear_copy"))
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    answer = stub.HandleReloadConfigRequest(
        model_management_pb2.ReloadConfigRequest(config=config), 30.0
    )
    assert answer.status.error_code == 0
    assert (
        server.get("/v1/models/linear_copy")[1]["model_version_status"][0]["state"] == "AVAILABLE"
    )
    bad = model_server_config_pb2.ModelServerConfig()
    bad.model_config_list.config.add(name="x", base_path="")
    error = grpc_error(
        lambda: stub.HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=bad), 30.0
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "base_path" in error.details()
    assert server.get("/v1/models/linear_copy")[0] == 200  # a refused config changes nothing


def test_sigterm_under_grpc_load_turns_health_off_then_answers_every_call(tmp_path: Path) -> None:
    """On SIGTERM, gRPC health says NOT_SERVING while calls are still answered (drain delay);
    calls in flight then end answered or UNAVAILABLE, never hung; the exit is orderly."""
    models.make_slow(tmp_path / "slow", seconds=0.05)
    server = TwistdServer(
        [
            "--model_name=slow",
            f"--model_base_path={tmp_path / 'slow'}",
            "--enable_batching",
            "--drain_delay=5",
        ],
        tmp_path,
    ).start()
    try:
        server.wait_ready()
        channel = grpc.insecure_channel(server.grpc_target)
        stub = predict_stub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        request = predict_request("slow", {"x": np.ones((1, 3), np.float32)})
        outcomes: list[str] = []

        def call(_: int) -> None:
            try:
                stub.Predict(request, 60.0)
                outcomes.append("ok")
            except grpc.RpcError as error:
                outcomes.append(error.code().name)

        with ThreadPoolExecutor(16) as pool:
            calls = pool.map(call, range(400))
            server.wait_for(lambda: len(outcomes) >= 16)
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            server.wait_for(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(), 10.0).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                )
            )
            answered = stub.Predict(request, 60.0)  # still served during the drain delay
            assert tf.make_ndarray(answered.outputs["y"]).shape == (1, 3)
            list(calls)
        assert set(outcomes) <= {"ok", "UNAVAILABLE"}, set(outcomes)
        assert outcomes.count("ok") >= 16
        channel.close()
    finally:
        assert server.stop() == -signal.SIGTERM


def test_a_full_queue_is_resource_exhausted_and_a_large_message_is_refused(tmp_path: Path) -> None:
    """A message past --grpc_max_receive_bytes, and a call the full batching queue cannot take,
    are both RESOURCE_EXHAUSTED, as in TF Serving; the server keeps answering."""
    models.make_hanging(tmp_path / "hang")
    batching = tmp_path / "batching.txt"
    batching.write_text(
        "max_batch_size { value: 1 }\nmax_enqueued_batches { value: 1 }\n"
        "num_batch_threads { value: 1 }\nbatch_timeout_micros { value: 0 }\n"
    )
    server = TwistdServer(
        [
            "--model_name=hang",
            f"--model_base_path={tmp_path / 'hang'}",
            "--enable_batching",
            f"--batching_parameters_file={batching}",
            "--grpc_max_receive_bytes=2000",
            "--inference_stall_seconds=1",
            "--drain_delay=0",
            "--drain_timeout=3",
        ],
        tmp_path,
    ).start()
    try:
        server.wait_ready()
        channel = grpc.insecure_channel(server.grpc_target)
        stub = predict_stub(channel)
        large = predict_request("hang", {"x": np.ones((200, 3), np.float32)})
        error = grpc_error(lambda: stub.Predict(large, 10.0))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = stub.Predict(predict_request("hang", {"x": np.ones((1, 3), np.float32)}), 30.0)
        assert tf.make_ndarray(ok.outputs["y"]).tolist() == [[1.0, 1.0, 1.0]]

        stuck = stub.Predict.future(predict_request("hang", {"x": -np.ones((1, 3), np.float32)}))
        server.wait_for(lambda: server.get("/healthz")[0] == 503)  # the batch runs, stuck
        waiting = stub.Predict.future(predict_request("hang", {"x": np.ones((1, 3), np.float32)}))
        server.wait_for(lambda: queued_rows(server, "hang") == 1)  # the queue is full
        error = grpc_error(
            lambda: stub.Predict(predict_request("hang", {"x": np.ones((1, 3), np.float32)}), 10.0)
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in (error.details() or "")
        for call in (stuck, waiting):
            call.cancel()
        channel.close()
    finally:
        server.stop()


def test_calls_past_grpc_max_calls_are_refused_and_the_rest_answered(tmp_path: Path) -> None:
    """With --grpc_max_calls=1, a call made while another is in progress (waiting for a
    batch) is RESOURCE_EXHAUSTED at once; once that one is cancelled,
    calls are answered again, and the server logged nothing unexpected."""
    models.make_linear(tmp_path / "linear")
    models.make_batch_echo(tmp_path / "echo")
    (tmp_path / "echo" / "batching_parameters.txt").write_text(
        "max_batch_size { value: 2 }\nbatch_timeout_micros { value: 30000000 }\n"
        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 10 }\n"
    )
    config = tmp_path / "models.config"
    write_config(config, {name: tmp_path / name for name in ("linear", "echo")})
    server = TwistdServer(
        [f"--model_config_file={config}", "--enable_batching", "--grpc_max_calls=1"], tmp_path
    ).start()
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = predict_stub(channel)
            waiting = stub.Predict.future(
                predict_request("echo", {"x": np.ones((1, 3), np.float32)}), 60.0
            )
            server.wait_for(lambda: queued_rows(server, "echo") == 1)
            linear = predict_request("linear", {"x": np.ones((1, 3), np.float32)})
            error = grpc_error(lambda: stub.Predict(linear, 10.0))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Concurrent RPC limit" in (error.details() or "")  # grpcio's, not the queue's
            waiting.cancel()
            server.wait_for(lambda: queued_rows(server, "echo") == 0, timeout=10)
            answered = None
            for _ in range(50):  # grpcio counts the cancelled call out once its handler ends
                try:
                    answered = stub.Predict(linear, 10.0)
                    break
                except grpc.RpcError as refused:
                    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    time.sleep(0.1)
            assert answered is not None, "a call past the cancelled one was never answered"
            assert tf.make_ndarray(answered.outputs["y"]).shape == (1, 2)
    finally:
        server.stop()


def test_a_hot_swap_under_grpc_load_fails_no_call(tmp_path: Path) -> None:
    """Version 2 appears while gRPC calls run: every call is answered, by 1 until 2 serves."""
    base = tmp_path / "linear"
    models.make_linear(base, 1)
    server = TwistdServer(
        ["--model_name=linear", f"--model_base_path={base}", "--file_system_poll_wait_seconds=1"],
        tmp_path,
    ).start()
    try:
        server.wait_ready()
        channel = grpc.insecure_channel(server.grpc_target)
        stub = predict_stub(channel)
        request = predict_request("linear", {"x": np.ones((1, 3), np.float32)})
        versions: list[int] = []
        failures: list[str] = []
        swapped = threading.Event()

        def call(_: int) -> None:
            while not swapped.is_set():
                try:
                    versions.append(stub.Predict(request, 30.0).model_spec.version.value)
                except grpc.RpcError as e:
                    failures.append(f"{e.code().name}: {e.details()}")

        with ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(call, i) for i in range(8)]
            server.wait_for(lambda: len(versions) >= 50)
            staged = tmp_path / "staged"
            models.make_linear(staged, 2, scale=10.0)
            (staged / "2").rename(base / "2")  # appears whole, as a deploy tool would
            server.wait_for(lambda: 2 in versions[-20:], timeout=120)
            count = len(versions)
            server.wait_for(lambda: len(versions) >= count + 50)
            swapped.set()
            for done in calls:
                done.result()
        assert failures == []
        first_two = versions.index(2)
        assert set(versions[:first_two]) == {1} and versions[-1] == 2
        channel.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("spec", "code"),
    [  # tensorflow_serving/model_servers/get_model_status_impl_test.cc, GetModelStatusImplTest
        ({}, grpc.StatusCode.INVALID_ARGUMENT),  # MissingOrEmptyModelSpecFailure
        ({"name": "nonexistent_model"}, grpc.StatusCode.NOT_FOUND),  # InvalidModelNameFailure
        ({"name": "linear", "version": 99}, grpc.StatusCode.NOT_FOUND),  # ...VersionFailure
    ],
)
def test_get_model_status_failures_port_tf_servings(served, spec: dict[str, Any], code) -> None:
    _, channel, _ = served
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = spec.get("name", "")
    if "version" in spec:
        request.model_spec.version.value = spec["version"]
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    assert grpc_error(lambda: stub.GetModelStatus(request, 10.0)).code() == code


def test_get_model_status_of_all_versions_and_of_one(served) -> None:
    """GetModelStatusImplTest AllVersionsSuccess and SingleVersionSuccess."""
    _, channel, _ = served
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "linear"
    every = stub.GetModelStatus(request, 10.0).model_version_status
    assert {s.version for s in every} == {1, 2}
    assert all(s.status.error_code == 0 and s.status.error_message == "" for s in every)
    request.model_spec.version.value = 1
    (one,) = stub.GetModelStatus(request, 10.0).model_version_status
    assert one.version == 1 and one.status.error_code == 0
