"""Per-version Python hooks (service.model_hooks) in a real ``twistd -n inference``.

The demo digits model is copied into several models here, each version with a hooks file:
the shipped examples (examples/hooks/), and hooks written for the test (every way a hook can
fail, a slow one, one that tags its answers with its version for the hot swap). Requests go
through urllib, the real curl and raw sockets (clients that leave mid-request); metrics are
read with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from harness.twistd import REPO, TwistdServer

pytestmark = pytest.mark.integration

DIGITS = REPO / "models" / "digits" / "1"
SAMPLES = REPO / "samples"
EXAMPLES = REPO / "examples" / "hooks"
HOOKS = Path("assets.extra", "kleinserve_hooks.py")

FAULTY_HOOKS = """
import time
import numpy as np
from service.errors import InvalidArgument


def setup(ctx):
    ctx.state["slept"] = ctx.metrics.counter("faulty_sleeps", "Preprocess calls that slept")


def preprocess(request, ctx):
    mode = request.query.get("fail", ("",))[0]
    if mode == "raise":
        raise RuntimeError("preprocess blew up")
    if mode == "invalid":
        raise InvalidArgument("the picture is too dark")
    if mode == "not_dict":
        return [1, 2, 3]
    if mode == "wrong_input":
        return {"nope": [1.0]}
    if mode == "wrong_shape":
        return {"image": np.zeros((1, 5), np.float32)}
    if mode == "not_numbers":
        return {"image": [["a", "b"]]}
    if mode == "sleep":
        ctx.state["slept"].inc()
        time.sleep(float(request.query["seconds"][0]))
    return ctx.decode_json(request)


def postprocess(outputs, request, ctx):
    mode = request.query.get("fail", ("",))[0]
    if mode == "post_raise":
        raise KeyError("postprocess lost its key")
    if mode == "not_json":
        return {"answer": object()}
    if mode == "bytes":
        return b"\\x00raw"
    return {"predictions": outputs["probabilities"], "version": ctx.version}
"""

TAGGED_HOOKS = """
TAG = "{tag}"


def preprocess(request, ctx):
    # Remember this request in this version's state: postprocess of another version cannot.
    ctx.state[id(request)] = TAG
    return ctx.decode_json(request)


def postprocess(outputs, request, ctx):
    return {{"pre": ctx.state.pop(id(request), "another version's"), "post": TAG,
             "version": ctx.version}}
"""


TENSOR_HOOKS = """
import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def preprocess(request, ctx):
    if request.inputs is None:  # TF Serving's REST API: JSON
        return ctx.decode_json(request)
    return {"image": request.inputs["image"]}  # v2 and gRPC: tensors


def postprocess(outputs, request, ctx):
    if request.headers.get("x-fail") == "1":
        return "not tensors"
    best = np.argmax(outputs["probabilities"], axis=1)
    return {
        "digit": best.astype(np.int64),
        "word": [WORDS[i] for i in best],
        "verb": [request.verb] * len(best),
    }
"""


def digits_version(base: Path, number: int, hooks: str | None) -> Path:
    """A copy of the digits model as version ``number`` of ``base``, with ``hooks`` as its
    hooks file (the text, or None for none). Copied into a staging folder and renamed into
    place, as a deploy does, so the server never sees half a version."""
    staging = base.parent / f".staging-{base.name}-{number}"
    shutil.copytree(DIGITS, staging)
    if hooks is not None:
        (staging / HOOKS).parent.mkdir(parents=True, exist_ok=True)
        (staging / HOOKS).write_text(hooks)
    base.mkdir(parents=True, exist_ok=True)
    staging.rename(base / str(number))
    return base / str(number)


def example(name: str) -> str:
    return (EXAMPLES / name / "kleinserve_hooks.py").read_text()


def config_file(path: Path, models: dict[str, Path]) -> Path:
    entries = "".join(
        f'  config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" }}\n'
        for name, base in models.items()
    )
    path.write_text(f"model_config_list {{\n{entries}}}\n")
    return path


def digit_instances(*names: str) -> list[Any]:
    """The sample PNGs as the model's input rows: [28, 28, 1] floats in [0, 1]."""
    rows = []
    for name in names:
        pixels = np.asarray(Image.open(SAMPLES / f"{name}.png"), dtype=np.float32) / 255
        rows.append(pixels[:, :, None].tolist())
    return rows


def metrics(server: TwistdServer) -> dict[str, Any]:
    status, _, body = server.request("GET", "/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


EXPECTED_ERRORS = [
    r"hook preprocess of model 'faulty' version 1 raised",
    r"hook postprocess of model 'faulty' version 1 raised",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    root = tmp_path_factory.mktemp("hooks")
    bases = {
        name: root / name
        for name in ("labels", "twice", "counted", "faulty", "swap", "plain", "tensors")
    }
    digits_version(bases["labels"], 1, example("digit_labels"))
    digits_version(bases["twice"], 1, example("two_passes"))
    digits_version(bases["counted"], 1, example("custom_metrics"))
    digits_version(bases["faulty"], 1, FAULTY_HOOKS)
    digits_version(bases["swap"], 1, TAGGED_HOOKS.format(tag="A"))
    digits_version(bases["plain"], 1, None)
    digits_version(bases["tensors"], 1, TENSOR_HOOKS)
    batching = root / "batching.txt"
    # A long batch timeout, so that concurrent requests surely meet in one batch.
    batching.write_text(
        "max_batch_size { value: 64 }\nbatch_timeout_micros { value: 20000 }\n"
        "max_enqueued_batches { value: 64 }\nnum_batch_threads { value: 1 }\n"
    )
    monitoring = root / "monitoring.config"
    monitoring.write_text(
        'prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }'
    )
    server = TwistdServer(
        [
            f"--model_config_file={config_file(root / 'models.config', bases)}",
            f"--monitoring_config_file={monitoring}",
            "--enable_model_hooks",
            "--hook_threads=2",
            "--enable_batching",
            f"--batching_parameters_file={batching}",
            "--file_system_poll_wait_seconds=0.2",
        ],
        root,
        expected_errors=EXPECTED_ERRORS,
    ).start()
    server.bases = bases  # type: ignore[attr-defined]
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# -- the shipped examples ---------------------------------------------------------------------


def test_a_picture_in_business_labels_out(server: TwistdServer) -> None:
    """examples/hooks/digit_labels: the picture as the body, decoded in the hook."""
    status, headers, body = server.request(
        "POST",
        "/v1/models/labels:invoke",
        (SAMPLES / "seven.png").read_bytes(),
        {"content-type": "image/png"},
    )
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    assert answer["digit"] == "seven"
    assert answer["route_to"] in ("automatic", "manual_review")
    assert 0 < answer["confidence"] <= 1


def test_a_picture_as_a_form_field_from_the_real_curl(server: TwistdServer) -> None:
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "-F",
            f"data=@{SAMPLES / 'three.png'}",
            f"{server.url}/v1/models/labels/versions/1:invoke",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert json.loads(done.stdout)["digit"] == "three"


def test_predict_goes_through_the_hooks_too(server: TwistdServer) -> None:
    status, _, body = server.request(
        "POST",
        "/v1/models/labels:predict",
        (SAMPLES / "four.png").read_bytes(),
        {"content-type": "image/png"},
    )
    assert status == 200
    assert json.loads(body)["digit"] == "four"


def test_a_body_the_hook_refuses_is_a_400_naming_the_hook(server: TwistdServer) -> None:
    status, _, body = server.request(
        "POST", "/v1/models/labels:invoke", b"not a picture", {"content-type": "image/png"}
    )
    assert status == 400
    error = json.loads(body)["error"]
    assert error.startswith(
        "hook preprocess of model 'labels' version 1: the body is not a picture"
    )


def test_handle_calls_the_model_twice_and_the_calls_share_batches(server: TwistdServer) -> None:
    """examples/hooks/two_passes: 16 requests at once, two predicts each, batched together."""
    instances = digit_instances("five")

    def call(_: int) -> tuple[int, Any]:
        return server.post_json("/v1/models/twice:predict", {"instances": instances})

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(call, range(16)))
    for status, answer in answers:
        assert status == 200, answer
        assert answer["passes"] == 2
        assert answer["classes"] == [5]
        assert len(answer["predictions"][0]) == 10
    sizes = metrics(server)["kleinserve_batch_size"]
    rows = {
        s.name: s.value
        for s in sizes.samples
        if s.labels.get("model") == "twice" and s.name.endswith(("_sum", "_count"))
    }
    assert rows["kleinserve_batch_size_sum"] == 32  # every predict ran, one row each
    assert rows["kleinserve_batch_size_count"] < 32  # and some ran in the same batch


def test_custom_metrics_appear_on_metrics_with_model_and_version(server: TwistdServer) -> None:
    status, answer = server.post_json(
        "/v1/models/counted:predict", {"instances": digit_instances("two", "two", "nine")}
    )
    assert status == 200, answer
    assert len(answer["predictions"]) == 3
    predicted = metrics(server)["digits_predicted"]
    counts = {
        s.labels["digit"]: s.value
        for s in predicted.samples
        if s.name == "digits_predicted_total"
        and s.labels["model"] == "counted"
        and s.labels["version"] == "1"
    }
    assert counts.get("2", 0) >= 2
    assert counts.get("9", 0) >= 1
    assert "digits_confidence" in metrics(server)


def test_tf_servings_monitoring_path_serves_the_same_metrics(server: TwistdServer) -> None:
    """--monitoring_config_file's prometheus_config.path, as a TF Serving scrape config has it."""
    status, headers, body = server.request("GET", "/monitoring/prometheus/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"kleinserve_requests", "kleinserve_batch_size"} <= names


def test_a_model_without_hooks_answers_as_before_and_refuses_invoke(server: TwistdServer) -> None:
    status, answer = server.post_json(
        "/v1/models/plain:predict", {"instances": digit_instances("one")}
    )
    assert status == 200
    assert len(answer["predictions"][0]) == 10
    status, _, body = server.request(
        "POST", "/v1/models/plain:invoke", b"1,2,3", {"content-type": "text/csv"}
    )
    assert status == 400
    assert "has no preprocess or handle hook" in json.loads(body)["error"]


# -- the other protocols: tensors in, tensors out ------------------------------------------


def test_open_inference_protocol_infer_goes_through_the_hooks(server: TwistdServer) -> None:
    """The real tritonclient: binary tensors in, the hook's tensors out."""
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    images = np.asarray(digit_instances("seven", "two"), dtype=np.float32)
    image = httpclient.InferInput("image", list(images.shape), "FP32")
    image.set_data_from_numpy(images)
    result = client.infer("tensors", [image])
    assert result.as_numpy("digit").tolist() == [7, 2]
    assert result.as_numpy("word").tolist() == [b"seven", b"two"]
    assert result.as_numpy("verb").tolist() == [b"infer", b"infer"]
    only = client.infer("tensors", [image], outputs=[httpclient.InferRequestedOutput("word")])
    assert only.get_response()["outputs"][0]["name"] == "word"
    assert only.as_numpy("digit") is None
    utils = pytest.importorskip("tritonclient.utils")
    with pytest.raises(utils.InferenceServerException, match="answers tensors") as error:
        client.infer("tensors", [image], headers={"x-fail": "1"})
    assert error.value.status() == "500"


def test_grpc_predict_goes_through_the_hooks(server: TwistdServer) -> None:
    """TF Serving's own gRPC stubs, as its clients call it."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    images = np.asarray(digit_instances("four"), dtype=np.float32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tensors"
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(images))
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=30)
        assert tf.make_ndarray(response.outputs["digit"]).tolist() == [4]
        assert tf.make_ndarray(response.outputs["verb"]).tolist() == [b"Predict"]
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=30, metadata=(("x-fail", "1"),))
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "hook postprocess of model 'tensors' version 1" in error.value.details()


def test_rest_predict_of_the_same_hooks_answers_json(server: TwistdServer) -> None:
    status, answer = server.post_json(
        "/v1/models/tensors:predict", {"instances": digit_instances("nine")}
    )
    assert status == 200, answer
    assert answer == {"digit": [9], "word": ["nine"], "verb": ["predict"]}


# -- hooks that fail ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fail", "status", "message"),
    [
        ("raise", 500, "hook preprocess of model 'faulty' version 1 raised RuntimeError"),
        ("invalid", 400, "hook preprocess of model 'faulty' version 1: the picture is too dark"),
        ("not_dict", 500, "hook preprocess of model 'faulty' version 1: the inputs are a list"),
        ("wrong_input", 400, "hook preprocess of model 'faulty' version 1: inputs: missing"),
        ("wrong_shape", 400, "hook preprocess of model 'faulty' version 1: input 'image': got"),
        ("not_numbers", 400, "hook preprocess of model 'faulty' version 1: input 'image' does"),
        ("post_raise", 500, "hook postprocess of model 'faulty' version 1 raised KeyError"),
        ("not_json", 500, "hook postprocess of model 'faulty' version 1: could not encode"),
    ],
)
def test_hook_errors_are_json_errors_naming_hook_and_version(
    server: TwistdServer, fail: str, status: int, message: str
) -> None:
    got, answer = server.post_json(
        f"/v1/models/faulty:predict?fail={fail}", {"instances": digit_instances("six")}
    )
    assert got == status, answer
    assert answer["error"].startswith(message), answer
    assert "Traceback" not in answer["error"]
    assert "blew up" not in answer["error"] and "lost its key" not in answer["error"]


def test_a_hook_may_answer_bytes(server: TwistdServer) -> None:
    status, headers, body = server.request(
        "POST",
        "/v1/models/faulty:predict?fail=bytes",
        json.dumps({"instances": digit_instances("six")}).encode(),
        {"content-type": "application/json"},
    )
    assert status == 200
    assert headers["Content-Type"] == "application/octet-stream"
    assert body == b"\x00raw"


def test_a_hook_past_the_deadline_is_a_504_and_the_pool_recovers(server: TwistdServer) -> None:
    body = json.dumps({"instances": digit_instances("eight")}).encode()
    status, _, answer = server.request(
        "POST",
        "/v1/models/faulty:predict?fail=sleep&seconds=3",
        body,
        {"content-type": "application/json", "x-request-deadline-ms": "300"},
    )
    assert status == 504
    assert json.loads(answer)["error"] == (
        "hook preprocess of model 'faulty' version 1 did not return before the deadline"
    )
    # Both hook threads are free again once the slow hook returns: these are all answered.
    with ThreadPoolExecutor(max_workers=4) as pool:
        later = list(
            pool.map(
                lambda _: server.request(
                    "POST", "/v1/models/faulty:predict", body, {"content-type": "application/json"}
                ),
                range(4),
            )
        )
    assert [status for status, _, _ in later] == [200] * 4


def sleeps(server: TwistdServer) -> float:
    """How many of faulty's preprocess calls have slept (run, not skipped)."""
    family = metrics(server).get("faulty_sleeps")
    return sum(s.value for s in family.samples if s.name.endswith("_total")) if family else 0.0


def test_clients_that_leave_mid_request_and_mid_hook_leave_the_server_serving(
    server: TwistdServer,
) -> None:
    """Three clients leave mid-body, then three mid-hook: with 2 hook threads busy 1 s with
    two of the latter, the third's call is still waiting for a thread when its client has
    left, and is skipped unrun (it sleeps only if the cancel never reached the hook pool)."""
    slept = sleeps(server)
    body = json.dumps({"instances": digit_instances("eight")}).encode()
    head = (
        "POST /v1/models/faulty:predict?fail=sleep&seconds=1 HTTP/1.1\r\n"
        f"Host: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    for sent in (head + body[: len(body) // 2], head + body):  # mid-body; then mid-hook
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as rude:
                rude.sendall(sent)
    status, answer = server.post_json(
        "/v1/models/labels:predict", {"instances": digit_instances("zero")}
    )
    # labels' preprocess takes pictures, not JSON: a 400 from the hook, answered at once.
    assert status == 400, answer
    status, answer = server.post_json(
        "/v1/models/faulty:predict", {"instances": digit_instances("zero")}
    )
    assert status == 200, answer
    assert np.argmax(answer["predictions"][0]) == 0
    # That predict's preprocess came after the three in the hook pool's queue: all that
    # were going to run have started.
    assert sleeps(server) - slept < 3, "a hook call whose client had left ran"


# -- hot swap ---------------------------------------------------------------------------------


def test_a_hot_swap_under_load_answers_each_request_wholly_by_one_version(
    server: TwistdServer,
) -> None:
    body = {"instances": digit_instances("one")}
    answers: list[tuple[int, Any]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            answers.append(server.post_json("/v1/models/swap:predict", body))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        server.wait_for(lambda: len(answers) >= 20)
        digits_version(server.bases["swap"], 2, TAGGED_HOOKS.format(tag="B"))  # type: ignore[attr-defined]

        def swapped() -> bool:
            status, doc = server.get("/v1/models/swap")
            states = {v["version"]: v["state"] for v in doc["model_version_status"]}
            return states == {"2": "AVAILABLE", "1": "END"}

        server.wait_for(swapped)
        seen = len(answers)
        server.wait_for(lambda: len(answers) >= seen + 20)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    kinds = set()
    for status, answer in answers:
        assert status == 200, answer
        assert answer["pre"] == answer["post"], answer  # never half one version, half the other
        kinds.add((answer["post"], answer["version"]))
    assert kinds == {("A", 1), ("B", 2)}


def test_hook_metrics_vanish_with_their_version(server: TwistdServer) -> None:
    """custom_metrics' series are labelled version 1; a version 2 without hooks replaces it."""
    server.post_json("/v1/models/counted:predict", {"instances": digit_instances("two")})
    assert "digits_predicted" in metrics(server)
    digits_version(server.bases["counted"], 2, None)  # type: ignore[attr-defined]

    def unloaded() -> bool:
        status, doc = server.get("/v1/models/counted")
        return {v["version"]: v["state"] for v in doc["model_version_status"]} == {
            "2": "AVAILABLE",
            "1": "END",
        }

    server.wait_for(unloaded)
    assert "digits_predicted" not in metrics(server)
    status, answer = server.post_json(
        "/v1/models/counted:predict", {"instances": digit_instances("two")}
    )
    assert status == 200 and "predictions" in answer  # now the server's own answer


# -- loading --------------------------------------------------------------------------------


def test_a_hooks_file_that_fails_fails_its_versions_load(tmp_path: Path) -> None:
    bases = {"broken_setup": tmp_path / "broken_setup", "broken_import": tmp_path / "broken_import"}
    digits_version(bases["broken_setup"], 1, "def setup(ctx):\n    raise OSError('no vocab')\n")
    digits_version(bases["broken_import"], 1, "import not_a_module_anywhere\n")
    server = TwistdServer(
        [
            f"--model_config_file={config_file(tmp_path / 'models.config', bases)}",
            "--enable_model_hooks",
            "--max_num_load_retries=1",
            "--load_retry_interval_micros=100000",
        ],
        tmp_path,
        expected_errors=[r"hooks file .* failed", r"failed to load"],
    ).start()
    try:

        def given_up(name: str) -> dict[str, Any] | None:
            try:
                status, doc = server.get(f"/v1/models/{name}")
            except OSError:  # not listening yet
                return None
            if status != 200:
                return None
            (version,) = doc["model_version_status"]
            return version if version["state"] == "END" else None

        server.wait_for(lambda: all(given_up(name) for name in bases))
        setup = given_up("broken_setup")
        assert setup is not None
        assert "failed to load after 2 attempts" in setup["status"]["error_message"]
        assert "OSError: no vocab" in setup["status"]["error_message"]
        imported = given_up("broken_import")
        assert imported is not None
        assert "ModuleNotFoundError" in imported["status"]["error_message"]
        assert server.get("/readyz")[0] == 503
    finally:
        server.stop()


def test_without_enable_model_hooks_a_hooks_file_is_ignored_with_one_warning(
    tmp_path: Path,
) -> None:
    digits_version(tmp_path / "digits", 1, "raise SystemExit('a hooks file must not run')\n")
    server = TwistdServer(
        ["--model_name=digits", f"--model_base_path={tmp_path / 'digits'}"], tmp_path
    ).start()
    try:
        server.wait_ready()
        status, answer = server.post_json(
            "/v1/models/digits:predict", {"instances": digit_instances("seven")}
        )
        assert status == 200
        assert np.argmax(answer["predictions"][0]) == 7
        warnings = [
            line for line in server.log().splitlines() if "without --enable_model_hooks" in line
        ]
        assert len(warnings) == 1, warnings
    finally:
        server.stop()
