"""The access log and request ids of a real ``twistd -n inference --access_log=json``.

Every route and every status a client can meet (200, 400, 404, 405, 408, 413, 414, 415,
431, 503, 504) is answered with an ``X-Request-Id`` and written as exactly one JSON line
with the documented keys, read back from the server's log file; an error body carries the
same id; a gRPC call gets its id back as trailing metadata and a line of its own. The
client library's id travels to the server's log and comes back in its exceptions.
``--log_format=json`` makes the whole log JSON lines.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client import InferenceClient, InvalidRequest
from harness.twistd import TwistdServer, poll
from service.access_log import KEYS, NAMESPACE
from tests import models
from tests.test_http_limits_integration import Answer, connect, parse, read_to_close

pytestmark = pytest.mark.integration

LIMIT = 10_000  # --max_request_bytes, and --max_inflight_request_bytes
PREDICT = json.dumps({"instances": [[1.0, 1.0, 1.0]]}).encode()
INFER = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]}]}
).encode()
LINE = re.compile(r"\[" + re.escape(NAMESPACE) + r"#info\] (\{.*\})$")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    root = tmp_path_factory.mktemp("models")
    models.make_linear(root / "linear")
    started = TwistdServer(
        [
            "--model_name=linear",
            f"--model_base_path={root / 'linear'}",
            f"--max_request_bytes={LIMIT}",
            f"--max_inflight_request_bytes={LIMIT}",
            "--request_header_timeout=1",
            "--enable_batching",
            "--access_log=json",
        ],
        tmp_path_factory.mktemp("logs"),
    ).start()
    try:
        yield started.wait_ready()
    finally:
        started.stop()


def access_lines(server: TwistdServer) -> list[dict[str, Any]]:
    """Every access-log line of the server's log, parsed."""
    found = []
    for line in server.log().splitlines():
        match = LINE.search(line)
        if match:
            found.append(json.loads(match.group(1)))
    return found


def lines_of(server: TwistdServer, request_id: str) -> list[dict[str, Any]]:
    """The access-log lines of one request id, once at least one is written."""
    return poll(
        lambda: [e for e in access_lines(server) if e["request_id"] == request_id],
        lambda found: bool(found),
        timeout=30,
    )


def exchange(server: TwistdServer, raw: bytes) -> Answer:
    with connect(server) as sock:
        sock.sendall(raw)
        return parse(read_to_close(sock))


def http(method: str, path: str, request_id: str, body: bytes = b"", *headers: str) -> bytes:
    head = [
        f"{method} {path} HTTP/1.1",
        "Host: test",
        "Connection: close",
        f"X-Request-Id: {request_id}",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# Each case: method, path, body, extra headers; the status, route label and model expected.
ROUTES = [
    ("GET", "/healthz", b"", (), 200, "healthz", None),
    ("GET", "/readyz", b"", (), 200, "readyz", None),
    ("GET", "/metrics", b"", (), 200, "metrics", None),
    ("GET", "/v1/models/linear", b"", (), 200, "status", "linear"),
    ("GET", "/v1/models/linear/metadata", b"", (), 200, "metadata", "linear"),
    ("POST", "/v1/models/linear:predict", PREDICT, (), 200, "predict", "linear"),
    ("POST", "/v1/models/linear/versions/1:predict", PREDICT, (), 200, "predict", "linear"),
    ("GET", "/v2", b"", (), 200, "v2_server_metadata", None),
    ("GET", "/v2/health/live", b"", (), 200, "v2_live", None),
    ("GET", "/v2/health/ready", b"", (), 200, "v2_ready", None),
    ("GET", "/v2/models/linear", b"", (), 200, "v2_model_metadata", "linear"),
    ("GET", "/v2/models/linear/ready", b"", (), 200, "v2_model_ready", "linear"),
    ("POST", "/v2/models/linear/infer", INFER, (), 200, "v2_infer", "linear"),
    ("POST", "/v1/models/linear:predict", b"{not json", (), 400, "predict", "linear"),
    ("POST", "/v1/models/linear:classify", b'{"examples": [{}]}', (), 400, "classify", "linear"),
    ("GET", "/v1/models", b"", (), 400, "other", None),
    ("POST", "/v1/models/nope:predict", PREDICT, (), 404, "predict", "nope"),
    ("GET", "/v2/models/nope", b"", (), 404, "v2_model_metadata", "nope"),
    ("GET", "/no/such/path", b"", (), 404, "other", None),
    ("DELETE", "/healthz", b"", (), 405, "other", None),
    (
        "POST",
        "/v1/models/linear:predict",
        PREDICT,
        ("Content-Type: image/png",),
        415,
        "predict",
        "linear",
    ),
    (
        "POST",
        "/v1/models/linear:predict",
        PREDICT,
        ("X-Request-Deadline-Ms: 0",),
        504,
        "predict",
        "linear",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "route", "model"),
    ROUTES,
    ids=[f"{r[0]} {r[1]} {r[4]}" for r in ROUTES],
)
def test_every_route_and_status_writes_one_json_line(
    server: TwistdServer,
    method: str,
    path: str,
    body: bytes,
    headers: tuple[str, ...],
    status: int,
    route: str,
    model: str | None,
) -> None:
    """The answer echoes the request's id (an error body too), and the log holds exactly
    one line for it, with every documented key and what the answer was."""
    request_id = f"route-{method}-{path}-{status}".replace("/", ".")
    answer = exchange(server, http(method, path, request_id, body, *headers))
    assert answer.status == status, answer.raw
    assert answer.headers["x-request-id"] == request_id
    if status >= 400:
        assert json.loads(answer.body)["request_id"] == request_id
    (line,) = lines_of(server, request_id)
    assert tuple(line) == KEYS
    assert (line["status"], line["route"], line["model"]) == (status, route, model)
    assert (line["method"], line["path"]) == (method, path)
    assert line["bytes_in"] == len(body) and line["bytes_out"] == len(answer.body)
    assert line["request_id_replaced"] is None and line["peer"].startswith("127.0.0.1:")
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
    if route in ("predict", "v2_infer") and status == 200:
        assert line["version"] == 1 and line["batch_size"] == 1
        assert line["queue_wait_ms"] >= 0
    else:
        assert line["batch_size"] is None and line["queue_wait_ms"] is None
    if status == 504:
        assert line["deadline_ms"] == 0


def test_limits_are_logged_with_their_status_and_id(server: TwistdServer) -> None:
    """413, 431 and 408 from the HTTP channel: the client's id in the answer and one line
    each; 414 (refused before any header): a fresh id, the same in answer and line."""
    too_big = exchange(
        server, http("POST", "/v1/models/linear:predict", "lim-413", b"x" * (LIMIT + 1))
    )
    long_header = exchange(
        server,
        b"GET /healthz HTTP/1.1\r\nX-Request-Id: lim-431\r\nHost: x\r\nX-Big: "
        + b"a" * 17_000
        + b"\r\n\r\n",
    )
    with connect(server) as sock:  # headers never finished: 408 after --request_header_timeout
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Request-Id: lim-408\r\nHost: x\r\n")
        slow = parse(read_to_close(sock))
    too_long = exchange(server, b"GET /" + b"a" * 17_000 + b" HTTP/1.1\r\n\r\n")
    fresh = too_long.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", fresh)
    for answer, request_id, status in [
        (too_big, "lim-413", 413),
        (long_header, "lim-431", 431),
        (slow, "lim-408", 408),
        (too_long, fresh, 414),
    ]:
        assert answer.status == status and answer.headers["x-request-id"] == request_id
        assert json.loads(answer.body)["request_id"] == request_id
        (line,) = lines_of(server, request_id)
        assert tuple(line) == KEYS and line["status"] == status
        assert line["bytes_out"] == len(answer.body)


def test_a_busy_server_logs_its_503_and_the_held_request(server: TwistdServer) -> None:
    """A body that would pass --max_inflight_request_bytes is 503 (logged, with its id);
    the request holding the budget is answered and logged when its body arrives."""
    body = b" " * 9000 + PREDICT
    with connect(server) as holder:
        raw = http("POST", "/v1/models/linear:predict", "busy-holder", body)
        head, _, rest = raw.partition(b"\r\n\r\n")
        holder.sendall(head + b"\r\n\r\n")  # reserves its Content-Length of the budget
        time.sleep(0.5)  # let the server read the head before the next request
        refused = exchange(
            server, http("POST", "/v1/models/linear:predict", "busy-503", PREDICT * 40)
        )
        holder.sendall(rest)
        held = parse(read_to_close(holder))
    assert refused.status == 503 and refused.headers["x-request-id"] == "busy-503"
    (line,) = lines_of(server, "busy-503")
    assert line["status"] == 503 and line["route"] == "predict"
    assert held.status == 200
    (line,) = lines_of(server, "busy-holder")
    assert (line["status"], line["bytes_in"]) == (200, len(body))


@pytest.mark.parametrize(
    ("sent", "why"),
    [("x" * 129, "longer than 128"), ("two words", "not visible ASCII")],
)
def test_an_unusable_id_is_replaced_and_the_line_says_why(
    server: TwistdServer, sent: str, why: str
) -> None:
    """An id too long or with a space is never echoed: a fresh one is, and the line notes why."""
    answer = exchange(server, http("GET", "/v1/models/nope", sent))
    fresh = answer.headers["x-request-id"]
    assert fresh != sent and re.fullmatch(r"[0-9a-f]{32}", fresh)
    assert json.loads(answer.body)["request_id"] == fresh
    (line,) = lines_of(server, fresh)
    assert why in line["request_id_replaced"]


def test_the_client_request_id_round_trips(server: TwistdServer) -> None:
    """The client's id reaches the server's log, and the call's error carries the same id,
    which the server also put in its error body."""
    with InferenceClient(backends=[("127.0.0.1", server.port)], timeout=30) as client:
        assert client.predict("linear", np.ones((1, 3), np.float32)).shape == (1, 2)
        with pytest.raises(InvalidRequest) as raised:
            client.predict("linear", np.ones((1, 4), np.float32))
    request_id = raised.value.request_id
    assert request_id is not None and request_id in str(raised.value)
    (line,) = lines_of(server, request_id)
    assert (line["status"], line["route"], line["request_id_replaced"]) == (400, "predict", None)
    assert line["deadline_ms"] is not None and line["deadline_ms"] > 0


def test_log_format_json_makes_every_log_line_json(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With --log_format=json every line of the log (standard output) is one JSON object
    with time, level, namespace and message; an access line carries its entry."""
    root = tmp_path_factory.mktemp("models")
    models.make_linear(root / "linear")
    started = TwistdServer(
        ["--model_name=linear", f"--model_base_path={root / 'linear'}", "--log_format=json"],
        Path(tmp_path_factory.mktemp("logs")),
    ).start()
    try:
        started.wait_ready()
        status, _, _ = started.request("GET", "/healthz", headers={"X-Request-Id": "json-log-1"})
        assert status == 200
        entries = poll(
            lambda: [json.loads(line) for line in started.log().splitlines()],
            lambda found: any(e.get("access", {}).get("request_id") == "json-log-1" for e in found),
            timeout=30,
        )
    finally:
        started.stop()
    assert entries and all({"time", "level", "namespace", "message"} <= set(e) for e in entries)
    (access,) = [e for e in entries if e.get("access", {}).get("request_id") == "json-log-1"]
    assert access["namespace"] == NAMESPACE and access["access"]["status"] == 200
    assert any("twistd" in e["message"] and "starting up" in e["message"] for e in entries)


def test_nothing_is_logged_with_access_log_off(tmp_path_factory: pytest.TempPathFactory) -> None:
    """--access_log=off writes no access line, and answers still carry X-Request-Id."""
    root = tmp_path_factory.mktemp("models")
    models.make_linear(root / "linear")
    started = TwistdServer(
        ["--model_name=linear", f"--model_base_path={root / 'linear'}", "--access_log=off"],
        Path(tmp_path_factory.mktemp("logs")),
    ).start()
    try:
        started.wait_ready()
        status, headers, _ = started.request("GET", "/healthz", headers={"X-Request-Id": "off-1"})
    finally:
        started.stop()
    assert status == 200 and headers["X-Request-Id"] == "off-1"
    assert "starting up" in started.log() and not access_lines(started)


def test_grpc_calls_carry_their_id_and_are_logged(server: TwistdServer) -> None:
    """A gRPC Predict with x-request-id metadata gets it back as trailing metadata and one
    access line (protocol grpc, its queue wait and batch); a failed call its code; a call
    without an id a fresh one."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    def request(model: str) -> predict_pb2.PredictRequest:
        message = predict_pb2.PredictRequest()
        message.model_spec.name = model
        message.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((2, 3), np.float32)))
        return message

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response, call = stub.Predict.with_call(
            request("linear"), timeout=30, metadata=[("x-request-id", "grpc-1")]
        )
        assert dict(call.trailing_metadata())["x-request-id"] == "grpc-1"
        with pytest.raises(grpc.RpcError) as failed:
            stub.Predict(request("nope"), timeout=30, metadata=[("x-request-id", "grpc-2")])
        _, anonymous = stub.Predict.with_call(request("linear"), timeout=30)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(failed.value.trailing_metadata())["x-request-id"] == "grpc-2"
    (ok,) = lines_of(server, "grpc-1")
    assert tuple(ok) == KEYS and (ok["protocol"], ok["method"]) == ("grpc", "POST")
    assert ok["path"] == "/tensorflow.serving.PredictionService/Predict"
    assert (ok["status"], ok["grpc_status"], ok["route"]) == (200, "OK", "Predict")
    assert (ok["model"], ok["version"], ok["batch_size"]) == ("linear", 1, 2)
    assert ok["bytes_out"] == response.ByteSize() and ok["queue_wait_ms"] >= 0
    # The client sends its timeout as a grpc-timeout header, rounded up to a whole unit of
    # the header's encoding (100 ms for a timeout between 10 and 100 s), so the server may
    # see up to 100 ms more than the 30 s the client gave.
    assert 0 < ok["deadline_ms"] <= 30_100
    (not_found,) = lines_of(server, "grpc-2")
    assert (not_found["status"], not_found["grpc_status"]) == (404, "NOT_FOUND")
    assert not_found["model"] == "nope" and not_found["bytes_out"] == 0
    fresh = dict(anonymous.trailing_metadata())["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", fresh) and len(lines_of(server, fresh)) == 1


def test_grpc_calls_ended_by_their_deadline_or_the_client_are_logged_as_such(
    tmp_path: Path,
) -> None:
    """A call whose deadline passes while it waits for a batch is logged DEADLINE_EXCEEDED
    504; one the client cancels there, CANCELLED 499; an HTTP predict whose client closes
    its connection there, 499 too."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from tests.test_grpc_integration import queued_rows

    models.make_batch_echo(tmp_path / "echo")
    batching = tmp_path / "batching.txt"
    # A batch runs with two rows, or after 30 s: a lone call waits.
    batching.write_text(
        "max_batch_size { value: 2 }\nbatch_timeout_micros { value: 30000000 }\n"
        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 100 }\n"
    )
    server = TwistdServer(
        [
            "--model_name=echo",
            f"--model_base_path={tmp_path / 'echo'}",
            "--enable_batching",
            f"--batching_parameters_file={batching}",
            "--access_log=json",
        ],
        tmp_path,
    ).start()
    message = predict_pb2.PredictRequest()
    message.model_spec.name = "echo"
    message.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((1, 3), np.float32)))
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            with pytest.raises(grpc.RpcError) as late:
                stub.Predict(message, timeout=0.5, metadata=[("x-request-id", "late-1")])
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            left = stub.Predict.future(message, 60.0, metadata=[("x-request-id", "left-1")])
            server.wait_for(lambda: queued_rows(server, "echo") == 1)  # it waits for a batch
            left.cancel()
            # Each line is written once its handler has ended.
            poll(lambda: lines_of(server, "late-1") + lines_of(server, "left-1"),
                 lambda found: len(found) == 2, 30)  # fmt: skip
        (timed_out,) = lines_of(server, "late-1")
        assert (timed_out["status"], timed_out["grpc_status"]) == (504, "DEADLINE_EXCEEDED")
        (cancelled,) = lines_of(server, "left-1")
        assert (cancelled["status"], cancelled["grpc_status"]) == (499, "CANCELLED")
        body = json.dumps({"instances": [[1.0, 1.0, 1.0]]}).encode()
        with connect(server) as sock:
            sock.sendall(
                b"POST /v1/models/echo:predict HTTP/1.1\r\nHost: x\r\nX-Request-Id: http-left-1"
                b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            server.wait_for(lambda: queued_rows(server, "echo") == 1)
        (closed,) = lines_of(server, "http-left-1")
        assert (closed["status"], closed["grpc_status"], closed["route"]) == (499, None, "predict")
        assert (closed["model"], closed["version"], closed["bytes_out"]) == ("echo", 1, 0)
    finally:
        server.stop()
