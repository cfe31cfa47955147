"""The client's Open Inference Protocol (client.v2_api) without a network: the binary encoding
against the server's own codec, which protocol each server gets, errors, and the client
against the server's v2 routes through StubTreq."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from twisted.internet import task

from client import cli, cli_tensors, v2_api
from client.async_client import AsyncInferenceClient
from client.errors import InvalidRequest, ServerError
from client.signature import SignatureSpec, TensorSpec
from client.transport import HTTPRequest, HTTPResponse, TreqTransport
from discovery.backends import Backend
from service import v2_codec
from tests import test_v2
from tests.deferreds import result_of
from tests.test_client_unit import FakeSource, FakeSources, FakeTransport, json_response, settle
from wire.consul_tags import API_TAG, V2_API_TAG
from wire.http import DEADLINE_HEADER
from wire.v2_tensors import HEADER_LENGTH, NUMPY_DTYPES

X = TensorSpec("x", np.dtype(np.float32), (None, 3))
Y = TensorSpec("y", np.dtype(np.float32), (None, 2))
SIGNATURE = SignatureSpec("serving_default", inputs={"x": X}, outputs={"y": Y})
V2_SERVER = Backend("inference-v2", "10.0.0.1", 8501, tags=(API_TAG, V2_API_TAG))
REST_SERVER = Backend("inference-rest", "10.0.0.2", 8501, tags=(API_TAG,))


# --- the encoding, against the server's codec ----------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn) -> np.ndarray:
    """An array of any v2 datatype (BYTES: any bytes), of any small shape, any values."""
    datatype = draw(st.sampled_from(list(NUMPY_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
    if datatype == "BYTES":
        array = np.empty(shape, dtype=object)
        for index in np.ndindex(*shape):
            array[index] = draw(st.binary(max_size=12))
        return array
    return draw(hnp.arrays(NUMPY_DTYPES[datatype], shape))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and every element's bytes (so NaN payloads and -0.0 count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "O":
        return a.tolist() == b.tolist()
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def untyped(arrays: dict[str, np.ndarray]) -> SignatureSpec:
    """A signature that names the inputs and outputs but declares no dtype (no casting)."""
    specs = {name: TensorSpec(name, None, None) for name in arrays}
    return SignatureSpec("serving_default", inputs=specs, outputs=specs)


@given(st.dictionaries(st.sampled_from("abcd"), tensors(), min_size=1, max_size=4))
def test_any_array_round_trips_exactly_through_client_and_server(
    arrays: dict[str, np.ndarray],
) -> None:
    """Any arrays of the v2 datatypes go from the client's encoder through the server's
    decoder, and back from the server's binary encoder through the client's decoder,
    with the same dtype, shape and bytes."""
    request = v2_api.infer_request("m", 2, arrays, untyped(arrays))
    assert request.path == "/v2/models/m/versions/2/infer"
    decoded = v2_codec.decode_infer(
        request.body or b"", int(request.headers[HEADER_LENGTH.lower()])
    )
    assert list(decoded.inputs) == list(arrays)
    assert all(same(decoded.inputs[name], array) for name, array in arrays.items())
    body, length = v2_codec.encode_infer(
        "m", 2, None, [(name, array, True) for name, array in decoded.inputs.items()]
    )
    headers = {} if length is None else {HEADER_LENGTH: str(length)}
    answer = v2_api.decode_infer(HTTPResponse(200, headers, body), untyped(arrays))
    if isinstance(answer, np.ndarray):  # a signature of one output: its bare array
        answer = {name: answer for name in arrays}
    assert list(answer) == list(arrays)
    assert all(same(answer[name], array) for name, array in arrays.items())
    assert all(a.flags.writeable for a in answer.values())


@given(tensors().filter(lambda a: a.dtype.kind != "O" or all(
    isinstance(v, bytes) and v.decode("utf-8", "replace").encode() == v for v in a.ravel()
)))  # fmt: skip
def test_json_outputs_are_read_too(array: np.ndarray) -> None:
    """An answer with JSON ``data`` (a server that ignores the request for binary outputs)
    reads back as the same values and dtype (BYTES: UTF-8 text, all JSON carries)."""
    body, length = v2_codec.encode_infer("m", 1, None, [("t", array, False)])
    assert length is None
    answer = v2_api.decode_infer(HTTPResponse(200, {}, body), None)
    assert isinstance(answer, dict)
    got = answer["t"]
    assert got.dtype == array.dtype and got.shape == array.shape
    if array.dtype.kind == "f":
        np.testing.assert_array_equal(got, array)  # NaN equals NaN here; -0.0 == 0.0
    else:
        assert got.tolist() == array.tolist()


def test_inputs_are_cast_to_the_signatures_dtype_within_their_kind() -> None:
    """float64 and int lists become the signature's FP32; text becomes BYTES; a float for
    an integer input is left as it is (the server then names both datatypes)."""
    assert v2_api.tensor_of([[1, 2, 3]], X).dtype == np.float32
    assert v2_api.tensor_of(np.ones(3), X).dtype == np.float32
    text = v2_api.tensor_of(["é", b"\x00"], None)
    assert text.dtype == object and text.tolist() == ["é", b"\x00"]
    ints = TensorSpec("n", np.dtype(np.int32), None)
    assert v2_api.tensor_of([1.5], ints).dtype == np.float64
    with pytest.raises(TypeError, match="holds a int"):
        v2_api.tensor_of([1, 2], TensorSpec("s", np.dtype(object), None))
    with pytest.raises(TypeError, match="complex128"):
        v2_api.tensor_of(np.ones(2, np.complex128), None)


def test_a_request_asks_for_binary_outputs_and_sizes_each_input() -> None:
    """The JSON header names each input's datatype, shape and byte count, and asks for binary
    outputs; the header's length is in Inference-Header-Content-Length."""
    request = v2_api.infer_request("m", None, np.ones((2, 3)), SIGNATURE)
    length = int(request.headers[HEADER_LENGTH.lower()])
    header = orjson.loads((request.body or b"")[:length])
    assert header == {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [2, 3],
                "parameters": {"binary_data_size": 24},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    assert request.headers["content-type"] == "application/octet-stream"
    assert len(request.body or b"") == length + 24
    with pytest.raises(TypeError, match="dict of named arrays"):
        v2_api.infer_request("m", None, np.ones(2), None)


def test_metadata_becomes_the_default_signature() -> None:
    """GET /v2/models/NAME's inputs and outputs are read as the default signature, -1 as a
    free dimension."""
    doc = {
        "name": "m",
        "versions": ["1"],
        "platform": "tensorflow_savedmodel",
        "inputs": [{"name": "x", "datatype": "FP16", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "BYTES", "shape": [-1]}],
    }
    metadata = v2_api.decode_metadata(orjson.dumps(doc), 1)
    spec = metadata.signature(None)
    assert spec is not None and (metadata.name, metadata.version) == ("m", 1)
    assert spec.inputs["x"] == TensorSpec("x", np.dtype(np.float16), (None, 3))
    assert spec.outputs["y"].dtype == np.dtype(object)
    with pytest.raises(ValueError, match="not a v2 model metadata"):
        v2_api.decode_metadata(b'{"inputs": []}', None)


SHORT = (
    b'{"outputs": [{"name": "y", "datatype": "FP32", "shape": [2], '
    b'"parameters": {"binary_data_size": 8}}]}'
)


@pytest.mark.parametrize(
    ("headers", "body", "words"),
    [
        ({}, b'{"model_name": "m"}', "no 'outputs'"),
        ({HEADER_LENGTH: "99"}, b"{}", "does not fit"),
        ({}, b'{"outputs": [{"name": "y", "datatype": "FP8", "shape": [1], "data": [1]}]}',
         "unknown datatype"),
        ({HEADER_LENGTH: str(len(SHORT))}, SHORT + b"\x00" * 4, "passes the end"),
        ({}, b'{"outputs": [{"name": "y", "datatype": "FP32", "shape": [3], "data": [1]}]}',
         "1 elements for shape"),
    ],
)  # fmt: skip
def test_an_answer_that_does_not_add_up_is_a_value_error(
    headers: dict[str, str], body: bytes, words: str
) -> None:
    """Answers the client cannot read raise ValueError saying why (the client turns it into
    a ServerError naming the model)."""
    with pytest.raises(ValueError, match=words):
        v2_api.decode_infer(HTTPResponse(200, headers, body), None)


# --- which protocol each server gets -------------------------------------------------------------


def v2_answer(y: np.ndarray) -> HTTPResponse:
    body, length = v2_codec.encode_infer("m", 1, None, [("y", y, True)])
    assert length is not None
    return HTTPResponse(200, {HEADER_LENGTH: str(length)}, body)


REST_METADATA = {
    "model_spec": {"name": "m", "version": "1"},
    "metadata": {
        "signature_def": {
            "signature_def": {
                "serving_default": {
                    "inputs": {
                        "x": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1"}]}}
                    },
                    "outputs": {"y": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": []}}},
                }
            }
        }
    },
}
V2_METADATA = {
    "name": "m",
    "versions": ["1"],
    "platform": "tensorflow_savedmodel",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
}


def answers(where: tuple[str, int], request: HTTPRequest) -> Any:
    """A server that speaks both: v2 and REST answers of y = [[1.5, 2.5]]."""
    y = np.array([[1.5, 2.5]], np.float32)
    if request.path == "/v2/models/m/infer":
        return v2_answer(y)
    if request.path == "/v2/models/m":
        return json_response(200, V2_METADATA)
    if request.path == "/v1/models/m/metadata":
        return json_response(200, REST_METADATA)
    if request.path == "/v1/models/m:predict":
        return json_response(200, {"outputs": y.tolist()})
    return json_response(404, {"error": f"no {request.path}"})


def fleet_client(
    protocol: str, backends: tuple[Backend, ...], answer: Any = answers
) -> tuple[AsyncInferenceClient, FakeTransport]:
    transport = FakeTransport(answer)
    client = AsyncInferenceClient(
        reactor=CLOCK,
        sources=FakeSources(FakeSource(backends)),
        transport=transport,
        protocol=protocol,
        rng=random.Random(7),
    )
    return client, transport


CLOCK = task.Clock()


def predict(client: AsyncInferenceClient, **options: Any) -> Any:
    """The answer to one call, moving the clock through the backoff of any retries."""
    answer = client.predict("m", np.ones((1, 3)), **options)
    for _ in range(50):
        if answer.called:
            break
        CLOCK.advance(0.1)
    return result_of(answer)


def predict_paths(transport: FakeTransport) -> dict[int | str, set[str]]:
    paths: dict[int | str, set[str]] = {}
    for (host, _), request in transport.sent:
        if request.method == "POST":
            paths.setdefault(host, set()).add(request.path)
    return paths


def test_auto_sends_v2_to_servers_tagged_api_v2_and_rest_json_to_the_others() -> None:
    """protocol="auto" (the default): each call goes as v2 binary to a server tagged api:v2
    and as TF Serving JSON to one without; both answers read as the same float32 array; the
    signature comes from REST metadata, which every kleinserve server answers."""
    client, transport = fleet_client("auto", (V2_SERVER, REST_SERVER))
    assert AsyncInferenceClient(backends=[("h", 1)], reactor=task.Clock()).protocol == "auto"
    for _ in range(20):
        y = predict(client)
        assert y.dtype == np.float32 and y.tolist() == [[1.5, 2.5]]
    assert predict_paths(transport) == {
        "10.0.0.1": {"/v2/models/m/infer"},
        "10.0.0.2": {"/v1/models/m:predict"},
    }
    sent = [r for _, r in transport.sent if r.path.endswith("/infer")]
    assert all(DEADLINE_HEADER.lower() in r.headers for r in sent)  # the attempt's deadline
    assert [r.path for _, r in transport.sent if r.method == "GET"] == ["/v1/models/m/metadata"]


def test_auto_names_a_signature_over_rest_only_and_v2_refuses_to() -> None:
    """A call naming another signature goes as REST JSON to every server in auto (v2 serves
    one signature); protocol="v2" refuses it with a ValueError saying what to use."""
    client, transport = fleet_client("auto", (V2_SERVER,))
    predict(client, signature_name="other")
    assert predict_paths(transport) == {"10.0.0.1": {"/v1/models/m:predict"}}
    v2_client, _ = fleet_client("v2", (V2_SERVER,))
    with pytest.raises(ValueError, match="protocol='rest' or 'auto'"):
        predict(v2_client, signature_name="other")


def test_static_backends_have_no_tags_so_auto_speaks_rest_and_v2_speaks_v2() -> None:
    """Without tags (a static list) auto sends TF Serving JSON; protocol="v2" sends v2 to
    every server and reads the signature from the v2 metadata."""
    untagged = Backend("static", "10.0.0.3", 8501)
    client, transport = fleet_client("auto", (untagged,))
    predict(client)
    assert predict_paths(transport) == {"10.0.0.3": {"/v1/models/m:predict"}}
    client, transport = fleet_client("v2", (untagged, REST_SERVER))
    for _ in range(6):
        assert predict(client).tolist() == [[1.5, 2.5]]
    assert set().union(*predict_paths(transport).values()) == {"/v2/models/m/infer"}
    assert [r.path for _, r in transport.sent if r.method == "GET"] == ["/v2/models/m"]


def test_a_retry_moves_from_a_v2_server_to_a_rest_one_with_its_own_encoding() -> None:
    """A 503 from the v2 server is retried on the REST server, written as REST JSON there."""

    def answer(where: tuple[str, int], request: HTTPRequest) -> Any:
        if request.path == "/v2/models/m/infer":
            return json_response(503, {"error": "the batching queue is full"})
        return answers(where, request)

    client, transport = fleet_client("auto", (V2_SERVER, REST_SERVER), answer)
    for _ in range(5):
        assert predict(client).tolist() == [[1.5, 2.5]]
    assert client.stats.retries >= 1


def test_v2_errors_map_to_the_clients_exceptions_with_the_servers_message() -> None:
    """A v2 400 is an InvalidRequest carrying the server's words; a 500 a ServerError; an
    answer that is not v2 a ServerError saying it cannot be read."""
    refusal = "input 'x': expects FP32 but FP64 was provided"

    def answer(where: tuple[str, int], request: HTTPRequest) -> Any:
        if request.path == "/v2/models/m/infer":
            return json_response(400, {"error": refusal})
        return answers(where, request)

    client, transport = fleet_client("v2", (V2_SERVER,), answer)
    with pytest.raises(InvalidRequest) as refused:
        predict(client)
    assert refused.value.status == 400 and refused.value.server_message == refusal
    assert refusal in str(refused.value)

    def failing(where: tuple[str, int], request: HTTPRequest) -> Any:
        if request.path == "/v2/models/m/infer":
            return json_response(500, {"error": "the model failed"})
        return answers(where, request)

    client, transport = fleet_client("v2", (V2_SERVER,), failing)
    with pytest.raises(ServerError) as failed:
        predict(client)
    assert failed.value.status == 500 and failed.value.server_message == "the model failed"
    assert len([r for _, r in transport.sent if r.method == "POST"]) == 1  # 500: not retried

    def garbled(where: tuple[str, int], request: HTTPRequest) -> Any:
        if request.path == "/v2/models/m/infer":
            return json_response(200, {"predictions": [1]})
        return answers(where, request)

    client, _ = fleet_client("v2", (V2_SERVER,), garbled)
    with pytest.raises(ServerError, match="cannot read the server's answer"):
        predict(client)


def test_unknown_protocol_is_refused() -> None:
    """protocol must be one of auto, rest, v2, grpc."""
    with pytest.raises(ValueError, match="auto, rest, v2, grpc"):
        AsyncInferenceClient(backends=[("h", 1)], reactor=task.Clock(), protocol="soap")


# --- against the server's v2 routes -------------------------------------------------------------


def test_the_client_over_v2_against_the_servers_routes() -> None:
    """protocol="v2" against the real v2 routes (StubTreq over InferenceAPI): the signature
    from GET /v2/models/m, float64 cast to FP32, text as BYTES, every output with its dtype;
    a wrong datatype the server refuses is an InvalidRequest naming v2 datatypes."""
    _, treq, _ = test_v2.make_api()  # a StubTreq over the server's resource
    client = AsyncInferenceClient(
        backends=[("127.0.0.1", 8501)],
        reactor=task.Clock(),
        transport=TreqTransport(treq),
        protocol="v2",
    )
    inputs = {"x": np.array([[1.0, 2.0]]), "n": np.array([5, -6]), "s": ["ab", b"\xff"]}
    outputs = settle(treq, client.predict("m", inputs))
    assert outputs["y"].dtype == np.float32 and outputs["y"].tolist() == [[2.0, 4.0]]
    assert outputs["twice"].dtype == np.int64 and outputs["twice"].tolist() == [10, -12]
    assert outputs["upper"].tolist() == [b"AB", b"\xff"]
    with pytest.raises(InvalidRequest) as refused:
        settle(treq, client.predict("m", {**inputs, "n": np.array([1.5, 2.5])}))
    assert refused.value.status == 400
    assert refused.value.server_message == "input 'n': expects INT64 but FP64 was provided"


# --- the command line's --protocol ---------------------------------------------------------------


def test_cli_protocol_is_predicts_and_other_commands_use_rest() -> None:
    """--protocol (either side of the command, default auto) is the protocol of predict's
    client; the other commands' clients speak REST; an unknown protocol is refused."""
    parser = cli.build_parser()
    body = '{"instances": [[1, 2, 3]]}'
    args = parser.parse_args(["predict", "m", "--json", body, "--backend", "h:1"])
    assert cli.make_client(task.Clock(), args).protocol == "auto"
    for where in (["--protocol", "v2", "predict", "m"], ["predict", "m", "--protocol", "v2"]):
        args = parser.parse_args([*where, "--json", body, "--backend", "h:1"])
        assert cli.make_client(task.Clock(), args).protocol == "v2"
    args = parser.parse_args(["--protocol", "grpc", "status", "m", "--backend", "h:1"])
    assert cli.make_client(task.Clock(), args).protocol == "rest"
    with pytest.raises(SystemExit):
        parser.parse_args(["--protocol", "soap", "status", "m"])


def test_cli_reads_a_predict_body_as_tensors() -> None:
    """Columnar inputs (one or named), rows (values or named), {"b64": …} as bytes and the
    signature_name; a body with both or neither of inputs and instances is refused."""
    one = cli_tensors.tensors_of({"inputs": [[1.5, 2]]})
    assert (one.inputs.tolist(), one.rows, one.signature_name) == ([[1.5, 2.0]], False, None)
    rows = cli_tensors.tensors_of(
        {"signature_name": "s", "instances": [{"a": 1, "t": {"b64": "/w=="}}, {"a": 2, "t": "x"}]}
    )
    assert rows.rows and rows.signature_name == "s"
    assert rows.inputs["a"].tolist() == [1, 2] and rows.inputs["t"].tolist() == [b"\xff", b"x"]
    assert cli_tensors.tensors_of({"instances": [[1], [2]]}).inputs.shape == (2, 1)
    for bad in ({"inputs": 1, "instances": [1]}, {}, {"instances": []}, [1]):
        with pytest.raises(ValueError):
            cli_tensors.tensors_of(bad)
    with pytest.raises(ValueError, match="same inputs"):
        cli_tensors.tensors_of({"instances": [{"a": 1}, {"b": 2}]})


def test_cli_writes_the_answer_as_tf_serving_does() -> None:
    """Rows answer {"predictions": …} (several outputs: an object per row), columns
    {"outputs": …}; float32 as its shortest text, NaN as TF Serving's token, text as text
    and other bytes as {"b64": …}."""
    y = np.array([[0.1, 2.0]], np.float32)
    assert cli_tensors.dumps(cli_tensors.answer_doc(y, True)).split() == [
        b'{', b'"predictions":', b'[', b'[', b'0.1,', b'2.0', b']', b']', b'}'
    ]  # fmt: skip
    several = {"y": y, "s": np.array([b"ab"], dtype=object), "n": np.array([np.nan], np.float16)}
    doc = json.loads(cli_tensors.dumps(cli_tensors.answer_doc(several, True)))
    assert doc["predictions"][0]["y"] == [0.1, 2.0] and doc["predictions"][0]["s"] == "ab"
    assert np.isnan(doc["predictions"][0]["n"])
    columns = json.loads(cli_tensors.dumps(cli_tensors.answer_doc({"s": several["s"]}, False)))
    assert columns == {"outputs": {"s": ["ab"]}}
    raw = cli_tensors.answer_doc(np.array([b"\xff"], dtype=object), False)
    assert json.loads(cli_tensors.dumps(raw)) == {"outputs": [{"b64": "/w=="}]}
