"""Bearer tokens on a real ``twistd -n inference --auth_token_file``: every route family over
HTTP, TF Serving's gRPC stubs, the client library and its command line, the health checks
and /metrics, a SIGHUP re-read, and no token in the server's log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from client import InferenceClient, Unauthenticated
from harness.twistd import REPO, TWISTD, TwistdServer, poll
from tests import models
from tests.test_access_log_integration import lines_of

pytestmark = pytest.mark.integration

FIRST, SECOND, WRONG = "first-Token.1", "second-Token.2", "guessed-Token.3"
PREDICT = json.dumps({"instances": [[1.0, 1.0, 1.0]]}).encode()
PREDICTED = {"predictions": [[9.5, 11.5]]}
INFER = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]}]}
).encode()
EXAMPLES = json.dumps({"examples": [{"x": [1.0, 1.0]}]}).encode()
PROMETHEUS = "/monitoring/prometheus/metrics"
BARE = 'Bearer realm="kleinserve"'
INVALID = 'Bearer realm="kleinserve", error="invalid_token"'

# Every protected route family: (method, path, body).
PROTECTED = [
    ("POST", "/v1/models/linear:predict", PREDICT),
    ("POST", "/v1/models/linear/versions/1:predict", PREDICT),
    ("GET", "/v1/models/linear", None),
    ("GET", "/v1/models/linear/metadata", None),
    ("POST", "/v1/models/linear:classify", EXAMPLES),
    ("POST", "/v1/models/linear:regress", EXAMPLES),
    ("POST", "/v1/models/linear:invoke", b"any,body"),
    ("POST", "/v1/models/linear:classify_image", b"\x89PNG not really"),
    ("POST", "/", b"\x89PNG not really"),
    ("GET", "/v2", None),
    ("GET", "/v2/models/linear", None),
    ("GET", "/v2/models/linear/ready", None),
    ("POST", "/v2/models/linear/infer", INFER),
    ("GET", "/v1/models/nosuch", None),  # unknown models too: nothing is said without a token
]
OPEN = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"]


def write_tokens(path: Path, *tokens: str) -> Path:
    path.write_text("# tokens of the test fleet\n\n" + "".join(f"{t}\n" for t in tokens))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    """linear, two tokens, /metrics open (the default), TF Serving's monitoring path too."""
    root = tmp_path_factory.mktemp("models")
    models.make_linear(root / "linear")
    tokens = write_tokens(root / "tokens", FIRST, SECOND)
    monitoring = root / "monitoring.config"
    monitoring.write_text(f'prometheus_config {{ enable: true path: "{PROMETHEUS}" }}\n')
    started = TwistdServer(
        [
            "--model_name=linear",
            f"--model_base_path={root / 'linear'}",
            f"--auth_token_file={tokens}",
            f"--monitoring_config_file={monitoring}",
            "--access_log=json",
        ],
        tmp_path_factory.mktemp("logs"),
    ).start()
    try:
        yield started.wait_ready()
    finally:
        started.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(
    server: TwistdServer, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, dict[str, str], Any]:
    status, answer_headers, raw = server.request(method, path, body, headers)
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = raw
    return status, {k.lower(): v for k, v in answer_headers.items()}, doc


# -- HTTP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_every_route_family_refuses_a_missing_or_wrong_token(
    server: TwistdServer, method: str, path: str, body: bytes | None
) -> None:
    """Without a token: 401, the bare Bearer challenge, an error saying a token is needed;
    with a wrong one: 401, error="invalid_token", an error saying it is not valid (never
    repeating it); both with the request id in header, body and the access log."""
    status, headers, doc = call(server, method, path, body, {"X-Request-Id": "no-token"})
    assert (status, headers["www-authenticate"]) == (401, BARE)
    assert "needs a bearer token" in doc["error"] and doc["request_id"] == "no-token"
    assert headers["x-request-id"] == "no-token"
    status, headers, doc = call(
        server, method, path, body, {**bearer(WRONG), "X-Request-Id": "wrong-token"}
    )
    assert (status, headers["www-authenticate"]) == (401, INVALID)
    assert "not valid" in doc["error"] and WRONG not in doc["error"]
    assert doc["request_id"] == "wrong-token"
    entries = lines_of(server, "wrong-token")
    assert entries[-1]["status"] == 401 and entries[-1]["path"] == path


@pytest.mark.parametrize("token", [FIRST, SECOND])
def test_either_token_of_the_file_is_served(server: TwistdServer, token: str) -> None:
    """Each token of the file reaches the models: REST predict, status, metadata, v2 infer
    and metadata, the v2 server metadata answer as without auth."""
    assert call(server, "POST", "/v1/models/linear:predict", PREDICT, bearer(token))[::2] == (
        200,
        PREDICTED,
    )
    status, _, doc = call(server, "GET", "/v1/models/linear", None, bearer(token))
    assert status == 200 and doc["model_version_status"][0]["state"] == "AVAILABLE"
    status, _, doc = call(server, "GET", "/v1/models/linear/metadata", None, bearer(token))
    assert status == 200 and "serving_default" in json.dumps(doc)
    status, _, doc = call(server, "POST", "/v2/models/linear/infer", INFER, bearer(token))
    assert status == 200 and doc["outputs"][0]["data"] == [9.5, 11.5]
    status, _, doc = call(server, "GET", "/v2/models/linear", None, bearer(token))
    assert status == 200 and doc["name"] == "linear"
    assert call(server, "GET", "/v2", None, bearer(token))[0] == 200


def test_past_the_token_a_route_answers_as_it_would(server: TwistdServer) -> None:
    """With a good token, a request the route refuses gets the route's own answer (an upload
    that is no image: 415; an unknown model: 404), not a 401."""
    status, _, doc = call(server, "POST", "/", b"not an image", bearer(FIRST))
    assert status not in (401, 200) and "error" in doc
    assert call(server, "GET", "/v1/models/nosuch", None, bearer(FIRST))[0] == 404


def test_health_and_metrics_are_open(server: TwistdServer) -> None:
    """The health endpoints, /metrics and the monitoring config's path answer without a token."""
    for path in OPEN:
        assert call(server, "GET", path, None, {})[0] == 200, path
    for path in ("/metrics", PROMETHEUS):
        status, _, text = call(server, "GET", path, None, {})
        assert status == 200 and b"kleinserve_requests_total" in text


def test_a_refusal_costs_no_body(server: TwistdServer) -> None:
    """A predict without a token announcing 50 MB with Expect: 100-continue is answered 401
    at once, before any of its body is sent (and never with 100 Continue)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/models/linear:predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"100 Continue" not in answer and b"WWW-Authenticate: " + BARE.encode() in answer


def test_tritonclient_sends_the_token_as_a_header(server: TwistdServer) -> None:
    """Triton's own HTTP client passes the token in ``headers=``; without it, the server's
    401 reaches the caller as an InferenceServerException saying a token is needed."""
    httpclient = pytest.importorskip("tritonclient.http")
    errors = pytest.importorskip("tritonclient.utils")
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        x = httpclient.InferInput("x", [1, 3], "FP32")
        x.set_data_from_numpy(np.ones((1, 3), np.float32))
        answer = client.infer("linear", [x], headers=bearer(SECOND))
        np.testing.assert_allclose(answer.as_numpy("y"), [[9.5, 11.5]])
        with pytest.raises(errors.InferenceServerException, match="needs a bearer token"):
            client.infer("linear", [x])
    finally:
        client.close()


# -- gRPC -----------------------------------------------------------------------------------------


def predict_request() -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "linear"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((1, 3), np.float32)))
    return request


def test_grpc_needs_the_token_in_its_metadata(server: TwistdServer) -> None:
    """TF Serving's stubs: Predict and GetModelStatus without authorization metadata or
    with a wrong token are UNAUTHENTICATED (with the request id as trailing metadata and an
    access-log line); with either token they answer; the health service needs none."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
        for metadata, says in (
            ([("x-request-id", "grpc-none")], "needs a bearer token"),
            ([("x-request-id", "grpc-wrong"), ("authorization", f"Bearer {WRONG}")], "not valid"),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                predict(predict_request(), timeout=30, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert says in refused.value.details() and WRONG not in refused.value.details()
            trailing = dict(refused.value.trailing_metadata())
            assert trailing["x-request-id"] == metadata[0][1]
        for token in (FIRST, SECOND):
            response = predict(
                predict_request(), timeout=30, metadata=[("authorization", f"Bearer {token}")]
            )
            np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]), [[9.5, 11.5]])
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "linear"
        with pytest.raises(grpc.RpcError) as refused:
            status(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = status(request, timeout=30, metadata=[("authorization", f"Bearer {FIRST}")])
        assert answer.model_version_status[0].version == 1
        check = health_pb2_grpc.HealthStub(channel).Check
        serving = health_pb2.HealthCheckResponse.SERVING
        # Health follows readiness within its refresh interval (half a second).
        health = poll(
            lambda: check(health_pb2.HealthCheckRequest(), timeout=30).status, serving.__eq__, 30
        )
        assert health == serving
    (line,) = lines_of(server, "grpc-wrong")
    assert (line["status"], line["grpc_status"], line["route"]) == (
        401,
        "UNAUTHENTICATED",
        "Predict",
    )
    assert line["protocol"] == "grpc" and line["bytes_in"] == predict_request().ByteSize()


# -- the client library and its command line ------------------------------------------------------


@pytest.mark.parametrize("protocol", ["rest", "v2", "grpc"])
def test_the_client_sends_its_token(server: TwistdServer, protocol: str) -> None:
    """InferenceClient(token=…) predicts over REST, v2 and gRPC, and reads metadata and
    status; a wrong token or none is Unauthenticated after one attempt, naming what to do."""
    port = server.grpc_port if protocol == "grpc" else server.port
    with InferenceClient(
        backends=[("127.0.0.1", port)], protocol=protocol, token=SECOND, timeout=30
    ) as client:
        np.testing.assert_allclose(client.predict("linear", np.ones((1, 3))), [[9.5, 11.5]])
        if protocol != "grpc":
            assert client.status("linear")["model_version_status"][0]["version"] == "1"
            assert "signature_def" in client.metadata("linear")["metadata"]
    for token in (WRONG, None):
        with InferenceClient(
            backends=[("127.0.0.1", port)], protocol=protocol, token=token, timeout=30
        ) as client:
            with pytest.raises(Unauthenticated) as raised:
                client.predict("linear", np.ones((1, 3)))
        assert raised.value.status == 401 and "--auth_token_file" in str(raised.value)
        assert WRONG not in str(raised.value)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "KLEINSERVE_TOKEN"}
    command = [sys.executable, "-m", "client.cli", *args]
    return subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **(env or {})},
    )


def test_the_cli_takes_a_token_file_or_the_environment(
    server: TwistdServer, tmp_path: Path
) -> None:
    """inference-client predicts with --token-file, with $KLEINSERVE_TOKEN, and with both
    (the file wins); a wrong token exits 1 saying Unauthenticated; none is a 401 too."""
    backend = ["--backend", f"127.0.0.1:{server.port}"]
    predict = [*backend, "predict", "linear", "--json", PREDICT.decode()]
    good = write_tokens(tmp_path / "good", FIRST)
    wrong = write_tokens(tmp_path / "wrong", WRONG)
    for args, env in (
        (["--token-file", str(good)], None),
        ([], {"KLEINSERVE_TOKEN": SECOND}),
        (["--token-file", str(good)], {"KLEINSERVE_TOKEN": WRONG}),
    ):
        answer = cli(*args, *predict, env=env)
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout) == PREDICTED
    status = cli("--token-file", str(good), *backend, "status", "linear")
    assert status.returncode == 0 and "AVAILABLE" in status.stdout
    for args, env in ((["--token-file", str(wrong)], None), ([], None)):
        refused = cli(*args, *predict, env=env)
        assert refused.returncode == 1 and "Unauthenticated" in refused.stderr
        assert "401" in refused.stderr and WRONG not in refused.stderr


# -- nothing is logged ----------------------------------------------------------------------------


def test_no_token_is_ever_logged(server: TwistdServer) -> None:
    """After calls with good and wrong tokens over HTTP and gRPC (here and in the tests
    above), the server's log, access log included, holds none of the tokens."""
    for token in (FIRST, WRONG):
        call(server, "POST", "/v1/models/linear:predict", PREDICT, bearer(token))
        call(server, "GET", "/v1/models/linear/metadata", None, bearer(token))
    with grpc.insecure_channel(server.grpc_target) as channel:
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
        predict(predict_request(), timeout=30, metadata=[("authorization", f"Bearer {SECOND}")])
        with pytest.raises(grpc.RpcError):
            predict(predict_request(), timeout=30, metadata=[("authorization", f"Bearer {WRONG}")])
    status, _, _ = call(server, "GET", "/healthz", None, {"X-Request-Id": "last-call"})
    lines_of(server, "last-call")  # the log has caught up with every call before it
    log = server.log()
    assert '"status":401' in log and '"status":200' in log
    for token in (FIRST, SECOND, WRONG):
        assert token not in log


# -- --auth_metrics and SIGHUP --------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TwistdServer, Path]]:
    """A server with --auth_metrics, its token file holding "kept" and "removed" tokens."""
    root = tmp_path_factory.mktemp("models")
    models.make_linear(root / "linear")
    tokens = write_tokens(root / "tokens", "kept-token", "removed-token")
    started = TwistdServer(
        [
            "--model_name=linear",
            f"--model_base_path={root / 'linear'}",
            f"--auth_token_file={tokens}",
            "--auth_metrics",
            "--port=0",
        ],
        tmp_path_factory.mktemp("logs"),
    ).start()
    try:
        yield started.wait_ready(), tokens
    finally:
        started.stop()


def served_with(server: TwistdServer, token: str) -> int:
    return call(server, "POST", "/v1/models/linear:predict", PREDICT, bearer(token))[0]


def test_auth_metrics_protects_metrics_and_the_cli_sends_its_token_there(
    guarded: tuple[TwistdServer, Path], tmp_path: Path
) -> None:
    """With --auth_metrics, /metrics needs a token and health does not; inference-client
    backends reads /metrics with its token (without one, its row shows the 401)."""
    server, _ = guarded
    status, headers, _ = call(server, "GET", "/metrics", None, {})
    assert (status, headers["www-authenticate"]) == (401, BARE)
    assert call(server, "GET", "/metrics", None, bearer("kept-token"))[0] == 200
    assert all(call(server, "GET", path, None, {})[0] == 200 for path in OPEN)
    token = write_tokens(tmp_path / "token", "kept-token")
    listing = ["--backend", f"127.0.0.1:{server.port}", "backends", "--json"]
    (row,) = json.loads(cli("--token-file", str(token), *listing).stdout)
    assert "error" not in row and row["requests_served"] > 0
    (row,) = json.loads(cli(*listing).stdout)
    assert row["error"] == "/metrics answered 401"


def test_a_sighup_rereads_the_token_file(guarded: tuple[TwistdServer, Path]) -> None:
    """After the file is edited (a token added, one removed) and SIGHUP is sent, the added
    token is served and the removed one refused; a file emptied and SIGHUP keeps the
    tokens, logging why, and the server keeps running."""
    server, tokens = guarded
    assert served_with(server, "added-token") == 401
    write_tokens(tokens, "kept-token", "added-token")
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    assert poll(lambda: served_with(server, "added-token"), lambda s: s == 200, 30) == 200
    assert served_with(server, "removed-token") == 401
    assert served_with(server, "kept-token") == 200

    tokens.write_text("# emptied by mistake\n")
    server.process.send_signal(signal.SIGHUP)
    logged = poll(server.log, lambda log: "holds no token" in log, 30)
    assert "2 token(s) read before stay valid" in logged
    assert served_with(server, "added-token") == 200
    assert server.process.poll() is None


def test_an_unusable_token_file_stops_start_up(tmp_path: Path) -> None:
    """twistd with an empty token file exits at once with a message saying so."""
    empty = tmp_path / "tokens"
    empty.write_text("")
    done = subprocess.run(
        [
            str(TWISTD),
            "-n",
            "--pidfile=",
            "inference",
            f"--model_base_path={tmp_path}",
            f"--auth_token_file={empty}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "--auth_token_file: the token file" in done.stdout + done.stderr
    assert "holds no token" in done.stdout + done.stderr
