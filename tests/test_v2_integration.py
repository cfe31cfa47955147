"""The Open Inference Protocol against a real ``twistd`` server, with the real ``tritonclient``.

One server (TF Serving's config file) serves ``dtypes`` (``make_all_dtypes``: an input of every
dtype, echoed), ``multi`` (``make_multi_io``, with batching) and ``strings``
(``make_strings``); tritonclient's HTTP client talks to it as to Triton.
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from harness.twistd import TwistdServer
from tests import models

httpclient = pytest.importorskip("tritonclient.http")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

pytestmark = pytest.mark.integration
V2_OF = models.V2_DATATYPES
sample = models.edge_sample


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    models.make_all_dtypes(root / "dtypes")
    models.make_multi_io(root / "multi")
    models.make_strings(root / "strings")
    config = root / "models.config"
    config.write_text(
        "model_config_list {\n"
        + "".join(
            f"  config {{ name: '{name}' base_path: '{root / name}' model_platform: 'tensorflow' }}\n"
            for name in ("dtypes", "multi", "strings")
        )
        + "}\n"
    )
    started = TwistdServer(
        [f"--model_config_file={config}", "--enable_batching"],
        tmp_path_factory.mktemp("logs"),
    ).start()
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


@pytest.fixture
def client(server):
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        yield client
    finally:
        client.close()


def inputs_of(arrays: dict[str, np.ndarray], binary: bool) -> list:
    inputs = []
    for name, array in arrays.items():
        dtype = "string" if array.dtype == object else array.dtype.name
        infer_input = httpclient.InferInput(name, list(array.shape), V2_OF[dtype])
        inputs.append(infer_input.set_data_from_numpy(array, binary_data=binary))
    return inputs


def test_health_and_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("dtypes") and client.is_model_ready("multi", "1")
    assert not client.is_model_ready("nothing")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "kleinserve" and "binary_tensor_data" in metadata["extensions"]
    multi = client.get_model_metadata("multi", "1")
    assert multi["name"] == "multi" and multi["versions"] == ["1"]
    assert multi["platform"] == "tensorflow_savedmodel"
    assert sorted(multi["inputs"], key=lambda t: t["name"]) == [
        {"name": "a", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "b", "datatype": "INT64", "shape": [-1]},
    ]
    outputs = {t["name"]: t for t in multi["outputs"]}
    assert outputs["count"] == {"name": "count", "datatype": "INT64", "shape": [-1]}
    dtypes = client.get_model_metadata("dtypes")
    assert {t["datatype"] for t in dtypes["inputs"]} == set(V2_OF.values())


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(client, binary: bool) -> None:
    """An input of every datatype, echoed: the same values come back, binary or JSON."""
    arrays = {f"in_{d}": sample(d) for d in models.ALL_DTYPES}
    if not binary:  # JSON carries BYTES as text, and the client writes it as str
        arrays["in_string"] = np.array([["a", ""], ["é", "zz"]], dtype=object)
    outputs = [httpclient.InferRequestedOutput(f"out_{d}", binary_data=binary)
               for d in models.ALL_DTYPES]  # fmt: skip
    result = client.infer("dtypes", inputs_of(arrays, binary), outputs=outputs, request_id="7")
    assert result.get_response()["id"] == "7"
    assert result.get_response()["model_version"] == "1"
    for d in models.ALL_DTYPES:
        got = result.as_numpy(f"out_{d}")
        want = sample(d)
        assert result.get_output(f"out_{d}")["datatype"] == V2_OF[d]
        if d == "string":
            got = np.array([v.encode() if isinstance(v, str) else v for v in got.ravel()],
                           dtype=object).reshape(got.shape)  # fmt: skip
        else:
            assert got.dtype == want.dtype, d
        assert got.shape == (2, 2) and got.tolist() == want.tolist(), d


def test_requested_outputs_and_several_inputs(client) -> None:
    """Two inputs of two dtypes; only the output asked for comes back, as JSON when asked."""
    a = np.array([[1, 2], [0, 0]], np.float32)
    b = np.array([3, -1], np.int64)
    result = client.infer(
        "multi",
        inputs_of({"a": a, "b": b}, binary=True),
        outputs=[httpclient.InferRequestedOutput("count", binary_data=False)],
        model_version="1",
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["count"]
    assert result.get_output("count")["data"] == [6, -2]
    assert result.as_numpy("sum") is None
    everything = client.infer("multi", inputs_of({"a": a, "b": b}, binary=False))
    assert everything.as_numpy("sum").tolist() == [[4.0, 5.0], [-1.0, -1.0]]
    assert everything.as_numpy("count").tolist() == [6, -2]


def test_bytes_tensors(client) -> None:
    text = np.array([b"abc", b"\x00\xff", b""], dtype=object)
    result = client.infer("strings", inputs_of({"text": text}, binary=True))
    assert result.as_numpy("length").tolist() == [3, 2, 0]
    assert result.as_numpy("upper_bytes").tolist() == [b"ABC", b"\x00\xff", b""]


def test_errors_raise_with_status_and_message(client) -> None:
    a = np.zeros((1, 2), np.float32)
    b = np.zeros(1, np.int64)
    cases = [
        (lambda: client.infer("nothing", inputs_of({"a": a}, True)), "404", "nothing"),
        (lambda: client.infer("multi", inputs_of({"a": a, "b": b}, True), model_version="9"),
         "404", "9"),
        (lambda: client.infer("multi", inputs_of({"a": a.astype(np.float64), "b": b}, True)),
         "400", "expects FP32 but FP64 was provided"),
        (lambda: client.infer("multi", inputs_of({"a": a}, True)), "400", "missing input(s) 'b'"),
        (lambda: client.infer("multi", inputs_of({"a": a, "b": b}, True),
                              outputs=[httpclient.InferRequestedOutput("nope")]),
         "400", "unknown output(s) 'nope'"),
        (lambda: client.get_model_metadata("nothing"), "404", "nothing"),
    ]  # fmt: skip
    for call, status, words in cases:
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() == status, raised.value
        assert words in raised.value.message(), raised.value


def raw_request(
    body: bytes, header_length: int | None = None, path: str = "/v2/models/multi/infer"
) -> bytes:
    extra = f"Inference-Header-Content-Length: {header_length}\r\n" if header_length else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def binary_multi_body() -> tuple[bytes, int]:
    a = np.array([[1, 2]], np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "a",
                    "shape": [1, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 8},
                },
                {"name": "b", "shape": [1], "datatype": "INT64", "data": [3]},
            ]
        }  # fmt: skip
    ).encode()
    return header + a.tobytes(), len(header)


def read_responses(sock: socket.socket, count: int, timeout: float = 30.0) -> bytes:
    """Read until ``count`` HTTP responses (with Content-Length bodies) have arrived."""
    sock.settimeout(timeout)
    data = b""
    while data.count(b"HTTP/1.1 ") < count or not _complete(data, count):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _complete(data: bytes, count: int) -> bool:
    rest = data
    for _ in range(count):
        head, sep, body = rest.partition(b"\r\n\r\n")
        if not sep:
            return False
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n")
             if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
        if len(body) < length:
            return False
        rest = body[length:]
    return True


def test_rude_clients_leave_the_server_serving(server, client) -> None:
    """A binary request whose connection closes mid-body, then a pipelined pair on one
    connection: both answered in order, and the server keeps serving without a traceback."""
    body, header_length = binary_multi_body()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        request = raw_request(body, header_length)
        sock.sendall(request[: len(request) - 5])  # the last bytes of the tensor never come
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        bad = raw_request(b'{"inputs": [{"name": "a"}]}')
        sock.sendall(raw_request(body, header_length) + bad)
        answers = read_responses(sock, 2)
    first, second = answers.split(b"HTTP/1.1 ")[1:3]
    assert first.startswith(b"200") and b"Inference-Header-Content-Length" not in first
    assert b'"count","datatype":"INT64","shape":[1],"data":[6]' in first
    assert second.startswith(b"400") and b"datatype" in second
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the cut request is gone; the server answers on
        if client.is_server_live():
            break
    result = client.infer("multi", inputs_of({"a": np.ones((1, 2), np.float32),
                                              "b": np.ones(1, np.int64)}, True))  # fmt: skip
    assert result.as_numpy("count").tolist() == [2]
    status, text = server.get("/metrics")
    assert status == 200 and 'route="v2_infer"' in text and 'route="v2_live"' in text
    server.check_log()


def test_a_v2_request_and_a_tf_serving_request_are_both_answered(server) -> None:
    """The same model answers both front doors on the same port."""
    status, doc = server.post_json(
        "/v1/models/multi:predict", {"inputs": {"a": [[1, 2]], "b": [3]}}
    )
    assert (status, doc) == (200, {"outputs": {"count": [6], "sum": [[4.0, 5.0]]}})
    status, doc = server.post_json("/v2/models/multi/infer", {"inputs": [
        {"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
        {"name": "b", "shape": [1], "datatype": "INT64", "data": [3]}]})  # fmt: skip
    assert status == 200
    assert {o["name"]: o["data"] for o in doc["outputs"]} == {"count": [6], "sum": [4.0, 5.0]}
