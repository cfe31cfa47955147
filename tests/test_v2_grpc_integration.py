"""The Open Inference Protocol's gRPC API (``inference.GRPCInferenceService``) against a real
``twistd`` server, with the real ``tritonclient.grpc`` client.

The same server and models as ``tests/test_v2_integration.py`` (HTTP): ``dtypes`` (every
dtype echoed), ``multi`` (two inputs and outputs) and ``strings``.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from harness.twistd import TwistdServer
from tests import models

grpcclient = pytest.importorskip("tritonclient.grpc")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException
service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
service_pb2_grpc = pytest.importorskip("tritonclient.grpc.service_pb2_grpc")

pytestmark = pytest.mark.integration
V2_OF = models.V2_DATATYPES
sample = models.edge_sample


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    models.make_all_dtypes(root / "dtypes")
    models.make_multi_io(root / "multi")
    models.make_strings(root / "strings")
    models.make_slow(root / "slow", seconds=0.5)
    models.make_batch_echo(root / "echo")
    # echo's batch runs when it holds 2 requests' rows (or after 30 s): two calls made
    # together share one batch whatever the timing.
    (root / "echo" / "batching_parameters.txt").write_text(
        "max_batch_size { value: 2 }\nbatch_timeout_micros { value: 30000000 }\n"
        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 1000 }\n"
    )
    config = root / "models.config"
    config.write_text(
        "model_config_list {\n"
        + "".join(
            f"  config {{ name: '{name}' base_path: '{root / name}' model_platform: 'tensorflow' }}\n"
            for name in ("dtypes", "multi", "strings", "slow", "echo")
        )
        + "}\n"
    )
    started = TwistdServer(
        [f"--model_config_file={config}", "--enable_batching"], tmp_path_factory.mktemp("logs")
    ).start()
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


@pytest.fixture
def client(server):
    client = grpcclient.InferenceServerClient(url=server.grpc_target)
    try:
        yield client
    finally:
        client.close()


def inputs_of(arrays: dict[str, np.ndarray]) -> list:
    inputs = []
    for name, array in arrays.items():
        dtype = "string" if array.dtype == object else array.dtype.name
        infer_input = grpcclient.InferInput(name, list(array.shape), V2_OF[dtype])
        inputs.append(infer_input.set_data_from_numpy(array))
    return inputs


def test_health_and_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("dtypes") and client.is_model_ready("multi", "1")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "kleinserve" and "binary_tensor_data" in metadata["extensions"]
    multi = client.get_model_metadata("multi", "1", as_json=True)
    assert multi["name"] == "multi" and multi["versions"] == ["1"]
    assert multi["platform"] == "tensorflow_savedmodel"
    assert sorted(multi["inputs"], key=lambda t: t["name"]) == [
        {"name": "a", "datatype": "FP32", "shape": ["-1", "2"]},
        {"name": "b", "datatype": "INT64", "shape": ["-1"]},
    ]
    dtypes = client.get_model_metadata("dtypes", as_json=True)
    assert {t["datatype"] for t in dtypes["inputs"]} == set(V2_OF.values())


def test_a_model_not_served_is_not_ready_and_a_bad_version_invalid(client) -> None:
    """Not ready, without an error, as Triton answers (its HTTP route says "Model version not
    ready" for both)."""
    assert not client.is_model_ready("nothing")
    assert not client.is_model_ready("multi", "9")
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("multi", "x1")
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "decimal number" in raised.value.message()


def test_every_datatype_round_trips_as_raw_contents(client) -> None:
    """An input of every datatype, echoed: the same values and dtypes come back."""
    arrays = {f"in_{d}": sample(d) for d in models.ALL_DTYPES}
    result = client.infer("dtypes", inputs_of(arrays), request_id="7")
    response = result.get_response()
    assert response.id == "7" and response.model_version == "1"
    assert len(response.raw_output_contents) == len(models.ALL_DTYPES)
    for d in models.ALL_DTYPES:
        got, want = result.as_numpy(f"out_{d}"), sample(d)
        assert result.get_output(f"out_{d}").datatype == V2_OF[d]
        assert got.shape == (2, 2) and got.tolist() == want.tolist(), d
        if d != "string":
            assert got.dtype == want.dtype, d


def test_requested_outputs_and_several_inputs(client) -> None:
    a = np.array([[1, 2], [0, 0]], np.float32)
    b = np.array([3, -1], np.int64)
    result = client.infer(
        "multi",
        inputs_of({"a": a, "b": b}),
        outputs=[grpcclient.InferRequestedOutput("count")],
        model_version="1",
    )
    assert [o.name for o in result.get_response().outputs] == ["count"]
    assert result.as_numpy("count").tolist() == [6, -2]
    assert result.as_numpy("sum") is None
    everything = client.infer("multi", inputs_of({"a": a, "b": b}))
    assert everything.as_numpy("sum").tolist() == [[4.0, 5.0], [-1.0, -1.0]]


def typed_request(**contents) -> service_pb2.ModelInferRequest:
    """A ModelInfer request for ``multi`` with typed contents (what tritonclient never sends)."""
    request = service_pb2.ModelInferRequest(model_name="multi")
    a = request.inputs.add(name="a", datatype="FP32", shape=[1, 2])
    a.contents.fp32_contents.extend(contents.get("a", [1.5, 2.5]))
    b = request.inputs.add(name="b", datatype="INT64", shape=[1])
    b.contents.int64_contents.extend(contents.get("b", [4]))
    return request


def test_typed_contents_are_read_too(server) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(typed_request(), timeout=30)
        names = [o.name for o in response.outputs]
        sums = np.frombuffer(response.raw_output_contents[names.index("sum")], "<f4")
        assert sums.tolist() == [5.5, 6.5]
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(typed_request(a=[1.0]), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "fp32_contents has 1 elements, but shape [1, 2] holds 2" in raised.value.details()
        mixed = typed_request()
        mixed.raw_input_contents.extend([b"\0" * 8, b"\0" * 8])
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(mixed, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "send every input one way" in raised.value.details()


def test_tritons_own_rpcs_are_unimplemented_and_say_what_is_served(server, client) -> None:
    """Triton's extensions (statistics, repository, log settings, streaming ...) answer
    UNIMPLEMENTED with the RPCs served instead, and the server keeps answering."""
    for call in (client.get_inference_statistics, client.get_model_repository_index,
                 client.get_log_settings):  # fmt: skip
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() == "StatusCode.UNIMPLEMENTED", raised.value
        assert "kleinserve does not serve" in raised.value.message()
        assert "ModelInfer" in raised.value.message()
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as stream_error:
            list(stub.ModelStreamInfer(iter([typed_request()]), timeout=30))
        assert stream_error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "ModelStreamInfer is one of Triton's own RPCs" in stream_error.value.details()
    assert client.is_server_live()


def test_bytes_tensors(client) -> None:
    text = np.array([b"abc", b"\x00\xff", b""], dtype=object)
    result = client.infer("strings", inputs_of({"text": text}))
    assert result.as_numpy("length").tolist() == [3, 2, 0]
    assert result.as_numpy("upper_bytes").tolist() == [b"ABC", b"\x00\xff", b""]


def test_errors_carry_the_code_and_message(client) -> None:
    a = np.zeros((1, 2), np.float32)
    b = np.zeros(1, np.int64)
    cases = [
        (lambda: client.infer("nothing", inputs_of({"a": a})), "NOT_FOUND", "nothing"),
        (lambda: client.infer("multi", inputs_of({"a": a, "b": b}), model_version="9"),
         "NOT_FOUND", "9"),
        (lambda: client.infer("multi", inputs_of({"a": a.astype(np.float64), "b": b})),
         "INVALID_ARGUMENT", "expects FP32 but FP64 was provided"),
        (lambda: client.infer("multi", inputs_of({"a": a})), "INVALID_ARGUMENT",
         "missing input(s) 'b'"),
        (lambda: client.infer("multi", inputs_of({"a": a, "b": b}),
                              outputs=[grpcclient.InferRequestedOutput("nope")]),
         "INVALID_ARGUMENT", "unknown output(s) 'nope'"),
        (lambda: client.get_model_metadata("nothing"), "NOT_FOUND", "nothing"),
    ]  # fmt: skip
    for call, code, words in cases:
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() == f"StatusCode.{code}", raised.value
        assert words in raised.value.message(), raised.value


def test_a_deadline_that_passes_in_the_queue_is_deadline_exceeded(client) -> None:
    """``slow`` takes 0.5 s per batch: a call with a 0.1 s timeout fails DEADLINE_EXCEEDED,
    and the server answers the next call."""
    x = np.zeros((1, 3), np.float32)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("slow", inputs_of({"x": x}), client_timeout=0.1)
    assert "DEADLINE_EXCEEDED" in raised.value.status() or "Deadline" in str(raised.value)
    assert client.infer("slow", inputs_of({"x": x})).as_numpy("y") is not None


def test_a_grpc_call_and_a_rest_call_share_one_batch(server, client) -> None:
    """A batch of two rows runs when two requests wait: one by v2 gRPC, one by TF Serving
    REST, together."""
    x = [[1.0, 2.0, 3.0]]
    with ThreadPoolExecutor(2) as pool:
        by_grpc = pool.submit(client.infer, "echo", inputs_of({"x": np.array(x, np.float32)}))
        by_rest = pool.submit(server.post_json, "/v1/models/echo:predict", {"instances": x})
        result = by_grpc.result(timeout=60)
        rest_answer = by_rest.result(timeout=60)
    assert result.as_numpy("rows").tolist() == [2]
    assert result.as_numpy("y").tolist() == [[2.0, 4.0, 6.0]]
    assert rest_answer[0] == 200 and rest_answer[1]["predictions"][0]["rows"] == 2


def test_a_request_whose_client_leaves_while_queued_is_dropped_at_every_front_door(
    server, client
) -> None:
    """One row to ``echo`` waits for a second one; its client leaves (a v2 gRPC call
    cancelled, a TF Serving REST and a v2 REST connection closed): the row leaves the queue,
    and the next pair still shares a batch."""
    from tests.test_grpc_integration import queued_rows
    from tests.test_rude_clients_integration import predict_request

    x = np.ones((1, 3), np.float32)
    request = service_pb2.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    tensor.contents.fp32_contents.extend([1.0, 1.0, 1.0])
    with grpc.insecure_channel(server.grpc_target) as channel:
        waiting = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(
            request, 60.0
        )
        server.wait_for(lambda: queued_rows(server, "echo") == 1)
        waiting.cancel()
        # Within 10 s, well before the batch's 30 s timeout would run the row: only the
        # cancel can have taken it out of the queue.
        server.wait_for(lambda: queued_rows(server, "echo") == 0, timeout=10)
    v2_doc = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]}]}
    for path, doc in (
        ("/v1/models/echo:predict", {"instances": x.tolist()}),
        ("/v2/models/echo/infer", v2_doc),
    ):
        with socket.create_connection(("127.0.0.1", server.port)) as rude:
            rude.sendall(predict_request(path, json.dumps(doc).encode()))
            server.wait_for(lambda: queued_rows(server, "echo") == 1)
        # As above: 10 s, a third of the batch timeout; the closed connection took it out.
        server.wait_for(lambda: queued_rows(server, "echo") == 0, timeout=10)
    test_a_grpc_call_and_a_rest_call_share_one_batch(server, client)
