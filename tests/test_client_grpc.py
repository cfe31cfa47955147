"""The client's gRPC protocol (client.grpc_api) without a server: bodies, answers, ports."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from twisted.internet import task

from client.async_client import AsyncInferenceClient
from client.grpc_api import HTTP_STATUS, _on_grpc_ports, decode_predict, predict_body
from client.signature import SignatureSpec, TensorSpec
from discovery.backends import Backend
from tests.deferreds import result_of

SIGNATURE = SignatureSpec(
    "serving_default",
    inputs={"x": TensorSpec("x", np.dtype(np.float32), (None, 3))},
    outputs={"y": TensorSpec("y", np.dtype(np.float32), (None, 2))},
)


def test_one_array_becomes_the_only_input_in_the_signatures_dtype() -> None:
    request = predict_pb2.PredictRequest.FromString(
        predict_body("m", 3, "serving_default", [[1.0, 2.0, 3.0]], SIGNATURE)
    )
    assert (request.model_spec.name, request.model_spec.version.value) == ("m", 3)
    assert request.model_spec.signature_name == "serving_default"
    x = tf.make_ndarray(request.inputs["x"])
    assert x.dtype == np.float32 and x.tolist() == [[1.0, 2.0, 3.0]]


def test_named_inputs_keep_their_kind_and_text_becomes_bytes() -> None:
    request = predict_pb2.PredictRequest.FromString(
        predict_body("m", None, None, {"a": np.arange(3), "s": ["é", "b"]}, None)
    )
    assert not request.model_spec.HasField("version")
    assert tf.make_ndarray(request.inputs["a"]).dtype == np.int64
    assert tf.make_ndarray(request.inputs["s"]).tolist() == ["é".encode(), b"b"]


def test_one_array_for_a_model_of_several_inputs_is_refused() -> None:
    two = SignatureSpec(
        "s", inputs={"a": SIGNATURE.inputs["x"], "b": SIGNATURE.inputs["x"]}, outputs={}
    )
    with pytest.raises(TypeError, match="dict of named arrays"):
        predict_body("m", None, None, [1.0], two)


def test_an_answer_of_one_output_is_its_array_and_of_several_a_dict() -> None:
    response = predict_pb2.PredictResponse()
    response.outputs["y"].CopyFrom(tf.make_tensor_proto(np.ones((1, 2), np.float32)))
    y = decode_predict(response.SerializeToString(), SIGNATURE)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    response.outputs["z"].CopyFrom(tf.make_tensor_proto(np.zeros(1, np.int32)))
    both = decode_predict(response.SerializeToString(), None)
    assert isinstance(both, dict) and set(both) == {"y", "z"}


def test_consul_backends_are_reached_on_their_announced_grpc_port() -> None:
    """A registration without grpc_port (REST only) is not used over gRPC."""
    both = Backend("a", "10.0.0.1", 8501, meta={"grpc_port": "8500"})
    rest_only = Backend("b", "10.0.0.2", 8501)
    assert [(b.address, b.port) for b in _on_grpc_ports((both, rest_only))] == [("10.0.0.1", 8500)]


def test_grpc_codes_map_to_the_statuses_the_dispatcher_reads() -> None:
    """4xx: the caller's mistake, not retried; 5xx: retried elsewhere."""
    assert HTTP_STATUS["INVALID_ARGUMENT"] == 400 and HTTP_STATUS["NOT_FOUND"] == 404
    assert HTTP_STATUS["UNAVAILABLE"] == 503 and HTTP_STATUS["RESOURCE_EXHAUSTED"] == 503
    assert HTTP_STATUS["DEADLINE_EXCEEDED"] == 504


def test_rest_calls_of_a_grpc_client_with_static_grpc_ports_say_what_to_do() -> None:
    """protocol="grpc" with a static list (gRPC ports): status, metadata, predict_json and
    classify_image have no REST port to go to, and say so instead of sending REST to gRPC."""
    client = AsyncInferenceClient(backends=[("h", 8500)], reactor=task.Clock(), protocol="grpc")
    for call in (
        lambda: client.status("m"),
        lambda: client.metadata("m"),
        lambda: client.predict_json("m", {"instances": [1]}),
        lambda: client.classify_image("m", b"png"),
    ):
        with pytest.raises(ValueError, match="protocol='rest'"):
            result_of(call())
