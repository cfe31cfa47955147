"""``--http_processes=2`` in a real ``twistd -n inference``: two front processes without
TensorFlow answer HTTP on one port, the main process runs the digits model for both."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from harness.twistd import TwistdServer, poll

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits"
# Two rows make a batch; a lone row waits 2 s for a partner, so a batch of 2 means two
# requests met in the main process's queue.
BATCHING = "max_batch_size { value: 2 }\nbatch_timeout_micros { value: 2000000 }\n"
KILLED = [r"front process \d ended"]  # a killed front process is logged, and expected


def _digits_or_skip() -> None:
    if not (DIGITS / "1" / "saved_model.pb").exists():
        pytest.skip("no demo model in models/digits: run scripts/export-demo-model")


def _start(tmp: Path, *extra: str, expected: list[str] | None = None) -> TwistdServer:
    batching = tmp / "batching.txt"
    batching.write_text(BATCHING)
    return TwistdServer(
        [
            "--model_name=digits",
            f"--model_base_path={DIGITS}",
            "--http_processes=2",
            "--enable_batching",
            f"--batching_parameters_file={batching}",
            *extra,
        ],
        tmp,
        expected_errors=expected,
    ).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[TwistdServer]:
    _digits_or_skip()
    started = _start(tmp_path_factory.mktemp("fronts"), expected=KILLED)
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def _images(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 28, 28, 1), dtype=np.float32)


def _fronts(server: TwistdServer) -> list[int]:
    """The pids of the server's front processes."""
    assert server.process is not None
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(server.process.pid)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "service.front" in line]


@contextlib.contextmanager
def _under_load(server: TwistdServer) -> Iterator[None]:
    """Four clients sending predicts in a loop (failures to connect ignored) meanwhile."""
    stop = threading.Event()
    image = _images(1)[0].tolist()

    def load() -> None:
        while not stop.is_set():
            try:
                server.post_json("/v1/models/digits:predict", {"instances": [image]})
            except OSError:
                time.sleep(0.05)  # a connection of a process killed or stopping

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # load under way
        yield
    finally:
        stop.set()
        for t in threads:
            t.join()


def _statuses(server: TwistdServer, images: np.ndarray) -> list[int]:
    """The statuses of one predict per image, sent at once."""
    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        answers = pool.map(
            lambda x: server.post_json("/v1/models/digits:predict", {"instances": [x.tolist()]}),
            images,
        )
        return [status for status, _ in answers]


def _predict_request(image: np.ndarray, request_id: str = "") -> bytes:
    """A predict of one image, as bytes for a raw socket (filed under ``request_id``)."""
    body = json.dumps({"instances": [image.tolist()]}).encode()
    head = (
        f"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        f"\r\nContent-Length: {len(body)}\r\nX-Request-Id: {request_id or 'none'}\r\n\r\n"
    ).encode()
    return head + body


def _statuses_logged(server: TwistdServer, prefix: str) -> dict[str, int]:
    """The access-log status of each predict whose request id starts with ``prefix``."""
    pattern = r'"POST /v1/models/digits:predict" (\d{3}) .* id=(' + re.escape(prefix) + r"\S*)"
    return {request_id: int(status) for status, request_id in re.findall(pattern, server.log())}


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _metric(text: str, prefix: str) -> float:
    match = re.search(re.escape(prefix) + r"[^\n]* ([0-9.e+]+)\n", text)
    return float(match.group(1)) if match else 0.0


def _metrics(server: TwistdServer) -> str:
    status, text = server.get("/metrics")
    assert status == 200
    return str(text)


def _predict(conn: http.client.HTTPConnection, image: np.ndarray) -> tuple[int, dict]:
    body = json.dumps({"instances": [image.tolist()]}).encode()
    conn.request("POST", "/v1/models/digits:predict", body, {"content-type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_answers_equal_the_in_process_model_for_tf_serving_json_and_v2(server) -> None:
    """:predict (rows and columns) and v2 infer through front processes answer what the
    SavedModel answers in-process."""
    import tensorflow as tf

    images = _images(6)
    serve = tf.saved_model.load(str(DIGITS / "1")).signatures["serving_default"]
    want = next(iter(serve(tf.constant(images)).values())).numpy()
    with ThreadPoolExecutor(max_workers=6) as pool:  # pairs meet in batches of 2
        rows = list(
            pool.map(
                lambda x: server.post_json(
                    "/v1/models/digits:predict", {"instances": [x.tolist()]}
                ),
                images,
            )
        )
        columns = list(
            pool.map(
                lambda x: server.post_json(
                    "/v1/models/digits:predict", {"inputs": {"image": [x.tolist()]}}
                ),
                images,
            )
        )
        v2 = list(
            pool.map(
                lambda x: server.post_json(
                    "/v2/models/digits/infer",
                    {
                        "inputs": [
                            {
                                "name": "image",
                                "datatype": "FP32",
                                "shape": [1, 28, 28, 1],
                                "data": x.reshape(-1).tolist(),
                            }
                        ]
                    },
                ),
                images,
            )
        )
    for i in range(len(images)):
        assert rows[i][0] == 200, rows[i]
        assert columns[i][0] == 200, columns[i]
        assert v2[i][0] == 200, v2[i]
        np.testing.assert_allclose(rows[i][1]["predictions"][0], want[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(columns[i][1]["outputs"][0], want[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v2[i][1]["outputs"][0]["data"], want[i], rtol=1e-5, atol=1e-6)


def test_status_metadata_and_errors_answer_as_one_process_does(server) -> None:
    """Forwarded and remote routes answer TF Serving's documents and JSON errors."""
    status, doc = server.get("/v1/models/digits")
    assert status == 200 and doc["model_version_status"][0]["state"] == "AVAILABLE"
    status, doc = server.get("/v1/models/digits/metadata")
    assert status == 200 and "serving_default" in json.dumps(doc)
    status, doc = server.post_json("/v1/models/nope:predict", {"instances": [[1.0]]})
    assert status == 404 and "nope" in doc["error"]
    status, doc = server.post_json("/v1/models/digits:predict", {"instances": [[1.0]]})
    assert status == 400 and "error" in doc
    status, doc = server.post_json(
        "/v1/models/digits:predict", {"signature_name": "other", "instances": [[1.0]]}
    )
    assert status == 400 and "other" in doc["error"]


def test_requests_from_both_front_processes_share_a_batch(server) -> None:
    """One request through each front process, at once: they run as one batch of 2."""
    connections = _one_connection_per_front_process(server)
    image = _images(1)[0]
    before = _metrics(server)
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda c: _predict(c, image), connections.values()))
    after = _metrics(server)
    for conn in connections.values():
        conn.close()
    assert [status for status, _ in answers] == [200, 200]
    for process in connections:
        key = f'kleinserve_front_predicts_total{{process="{process}"}}'
        assert _metric(after, key) - _metric(before, key) == 1
    count = "kleinserve_batch_size_count"
    single = 'kleinserve_batch_size_bucket{le="1.0"'
    assert _metric(after, count) - _metric(before, count) == 1, "not one batch"
    assert _metric(after, single) == _metric(before, single), "a request ran alone"


def _process_of(server: TwistdServer, conn: http.client.HTTPConnection, image: np.ndarray) -> str:
    """Which front process serves ``conn``: the one whose count of predicts moves."""
    before = _metrics(server)
    status, _ = _predict(conn, image)
    assert status == 200
    after = _metrics(server)
    (moved,) = [
        p
        for p in ("0", "1")
        if _metric(after, f'kleinserve_front_predicts_total{{process="{p}"}}')
        > _metric(before, f'kleinserve_front_predicts_total{{process="{p}"}}')
    ]
    return moved


def test_front_processes_do_not_load_tensorflow(server) -> None:
    """The front processes map no TensorFlow library; the main process does."""
    fronts = _fronts(server)
    assert len(fronts) == 2
    for pid in fronts:
        assert "tensorflow" not in Path(f"/proc/{pid}/maps").read_text()
    assert server.process is not None
    assert "tensorflow" in Path(f"/proc/{server.process.pid}/maps").read_text()


def _predicts(text: str, code: str | None = None) -> float:
    """The predict requests the front processes have ended (answered, or their client left:
    499), of every code or of ``code``; each front process reports its own every second."""
    pattern = r"kleinserve_requests_total\{([^}]*)\} ([0-9.e+]+)\n"
    return sum(
        float(value)
        for labels, value in re.findall(pattern, text)
        if 'route="predict"' in labels and (code is None or f'code="{code}"' in labels)
    )


def test_clients_leaving_mid_request_never_wedge_the_server(server) -> None:
    """Many clients that send a predict and leave before its answer: each is access-logged
    (499, or 200 when its row had run before its leaving was read) and counted, a request
    after them is answered, and nothing stays queued or in flight."""
    image = _images(1)[0]
    before = _metrics(server)
    for i in range(40):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(_predict_request(image, f"rude-{i}"))  # a lone row, then abandoned
    assert _statuses(server, _images(2)) == [200, 200]
    # The burst is over once all 40 are logged: a front process sends a request's cancel to
    # the main process before its access-log entry, and its counts after both.
    logged = poll(lambda: _statuses_logged(server, "rude-"), lambda found: len(found) == 40, 30)
    assert len(logged) == 40 and set(logged.values()) <= {200, 499} and 499 in logged.values()
    left = sum(status == 499 for status in logged.values())
    server.wait_for(lambda: _predicts(_metrics(server), "499") >= _predicts(before, "499") + left)
    assert _metric(_metrics(server), "kleinserve_queued_rows") == 0
    server.wait_for(
        lambda: _metric(_metrics(server), "kleinserve_in_flight_requests") <= 1, timeout=30
    )


def test_a_request_whose_client_leaves_while_queued_never_runs(server) -> None:
    """A lone row waits in the main process's queue for a partner; its client leaves: the
    front process's cancel notice takes it out, so it never runs as a batch of 1 (which it
    would, 2 s on, had the cancel not come), it is logged as 499, and the next pair runs as
    one batch of 2."""
    count = "kleinserve_batch_size_count"
    single = 'kleinserve_batch_size_bucket{le="1.0"'
    server.wait_for(lambda: _metric(_metrics(server), "kleinserve_queued_rows") == 0)
    before = _metrics(server)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_predict_request(_images(1)[0], "lone-left"))
        server.wait_for(lambda: _metric(_metrics(server), "kleinserve_queued_rows") == 1)
    logged = poll(lambda: _statuses_logged(server, "lone-left"), bool, 30)
    assert logged == {"lone-left": 499}
    assert _metric(_metrics(server), "kleinserve_queued_rows") == 0
    assert _statuses(server, _images(2)) == [200, 200]
    after = _metrics(server)
    assert _metric(after, single) == _metric(before, single), "the row of the left client ran"
    assert _metric(after, count) - _metric(before, count) == 1, "not one batch for the pair"


def test_connections_open_at_the_front_processes_show_on_metrics(server) -> None:
    """kleinserve_open_connections counts the clients' connections held by every front
    process (each reports its own every second; /metrics sums them)."""
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(6)]
    try:
        server.wait_for(
            lambda: _metric(_metrics(server), "kleinserve_open_connections") >= 6, timeout=30
        )
    finally:
        for sock in idle:
            sock.close()
    server.wait_for(
        lambda: _metric(_metrics(server), "kleinserve_open_connections") <= 1, timeout=30
    )


def test_a_killed_front_process_is_replaced_and_the_server_keeps_answering(server) -> None:
    """SIGKILL to a front process under load: a new one takes its place, and every request
    after that is answered."""
    before = _fronts(server)
    with _under_load(server):
        os.kill(before[0], signal.SIGKILL)
        server.wait_for(lambda: len(set(_fronts(server)) - set(before)) == 1, timeout=30)
    assert before[1] in _fronts(server)
    assert _statuses(server, _images(8)) == [200] * 8


def test_sigterm_under_load_exits_in_its_bound_and_leaves_no_shared_memory(tmp_path) -> None:
    """SIGTERM while requests run: the server exits in order before --drain_delay + --drain_timeout
    (plus start-up slack), the front processes with it, and /dev/shm holds none of its rings."""
    _digits_or_skip()
    server = _start(tmp_path, "--drain_delay=0", "--drain_timeout=5")
    server.wait_ready()
    assert server.process is not None
    pid = server.process.pid
    fronts = _fronts(server)
    rings = [name for name in os.listdir("/dev/shm") if name.startswith(f"kleinserve-{pid}-")]
    assert len(rings) == 2
    with _under_load(server):
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=5 + 10)  # the bound, and slack for a busy machine
    server.stop()
    assert code == -signal.SIGTERM
    assert [p for p in fronts if _alive(p)] == []
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"kleinserve-{pid}-")] == []


def test_forwarded_routes_metrics_and_access_log_cover_the_front_processes(server) -> None:
    """An image upload is forwarded to the main process and answered; /metrics counts the
    front processes' requests; the access log has their lines with model, version, batch."""
    seven = (REPO / "samples" / "seven.png").read_bytes()
    status, _, body = server.request(
        "POST", "/v1/models/digits:classify_image", seven, {"content-type": "image/png"}
    )
    assert status == 200, body
    assert json.loads(body)["predictions"][0]["label"] == "7"
    predicted = 'kleinserve_requests_total{code="200",route="predict"'
    classified = 'kleinserve_requests_total{code="200",route="classify_image"'
    before = _metric(_metrics(server), predicted)
    assert _statuses(server, _images(4)) == [200] * 4

    def counted() -> bool:
        # Each front process reports its counts once a second, each on its own clock: wait
        # for both counts, which may come from different front processes.
        metrics = _metrics(server)
        return _metric(metrics, predicted) >= before + 4 and _metric(metrics, classified) >= 1

    server.wait_for(counted, timeout=30)
    assert re.search(
        r'"POST /v1/models/digits:predict" 200 predict model=digits version=1 .* batch=[12] ',
        server.log(),
    )
    assert '"POST /v1/models/digits:classify_image" 200 classify_image' in server.log()


def test_a_killed_main_process_leaves_no_front_process_and_no_shared_memory(tmp_path) -> None:
    """SIGKILL to the main process: its front processes exit (their channel closed) and its
    rings are unlinked (by the resource tracker that registered them)."""
    _digits_or_skip()
    server = _start(tmp_path)
    server.wait_ready()
    assert server.process is not None
    pid = server.process.pid
    fronts = _fronts(server)
    assert len(fronts) == 2
    server.process.kill()
    server.process.wait()
    server.wait_for(lambda: not any(_alive(p) for p in fronts), timeout=30)
    server.wait_for(
        lambda: not any(n.startswith(f"kleinserve-{pid}-") for n in os.listdir("/dev/shm")),
        timeout=30,
    )
    server.stop()


def test_hooks_run_in_the_main_process_behind_front_processes(tmp_path) -> None:
    """A version with hooks: :invoke and :predict are forwarded whole and answered by its
    hooks in the main process (examples/hooks/digit_labels reads a picture of a seven)."""
    _digits_or_skip()
    from tests.test_hooks_integration import digits_version, example

    base = tmp_path / "labels"
    digits_version(base, 1, example("digit_labels"))
    server = TwistdServer(
        ["--model_name=labels", f"--model_base_path={base}", "--http_processes=2"]
        + ["--enable_model_hooks"],
        tmp_path,
    ).start()
    try:
        server.wait_ready()
        seven = (REPO / "samples" / "seven.png").read_bytes()
        answers = [
            server.request(
                "POST", f"/v1/models/labels:{verb}", seven, {"content-type": "image/png"}
            )
            for verb in ("invoke", "predict")
        ]
    finally:
        server.stop()
    for status, _, body in answers:
        assert status == 200, body
        assert json.loads(body)["digit"] == "seven"


def test_v2_binary_tensors_cross_both_ways(server) -> None:
    """A v2 infer with its input and output as binary data (Triton's extension) answers what
    the same request as JSON answers."""
    image = _images(1, seed=11)
    raw = image.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": [1, 28, 28, 1],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    with ThreadPoolExecutor(max_workers=2) as pool:  # a pair: no lone wait for a batch
        binary, as_json = pool.map(
            lambda request: request(),
            [
                lambda: server.request(
                    "POST",
                    "/v2/models/digits/infer",
                    header + raw,
                    {
                        "content-type": "application/octet-stream",
                        "inference-header-content-length": str(len(header)),
                    },
                ),
                lambda: server.request(
                    "POST",
                    "/v2/models/digits/infer",
                    json.dumps(
                        {
                            "inputs": [
                                {
                                    "name": "image",
                                    "datatype": "FP32",
                                    "shape": [1, 28, 28, 1],
                                    "data": image.reshape(-1).tolist(),
                                }
                            ]
                        }
                    ).encode(),
                    {"content-type": "application/json"},
                ),
            ],
        )
    status, headers, body = binary
    assert status == 200, body
    length = int({k.lower(): v for k, v in headers.items()}["inference-header-content-length"])
    doc = json.loads(body[:length])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 40
    scores = np.frombuffer(body[length:], dtype="<f4")
    status, _, body = as_json
    assert status == 200, body
    want = next(o for o in json.loads(body)["outputs"] if o["name"] == "probabilities")
    np.testing.assert_allclose(scores, want["data"], rtol=1e-5, atol=1e-6)


def test_tokens_limits_and_request_metrics_hold_in_the_front_processes(tmp_path) -> None:
    """With --auth_token_file, every front process refuses a call without the token (401),
    answers one with it, re-reads the file on the main process's SIGHUP; and the request
    metrics count the front processes' inference requests under their model and version."""
    _digits_or_skip()
    tokens = tmp_path / "tokens"
    tokens.write_text("first-token\n")
    tokens.chmod(0o600)
    server = _start(tmp_path, f"--auth_token_file={tokens}")
    try:
        server.wait_ready()
        body = json.dumps({"instances": _images(1).tolist()}).encode()
        path = "/v1/models/digits:predict"

        answered = []

        def statuses(token: str | None) -> list[int]:
            headers = {"content-type": "application/json"}
            if token:
                headers["authorization"] = f"Bearer {token}"
            got = [server.request("POST", path, body, headers)[0] for _ in range(8)]
            answered.extend(got)
            return got

        assert statuses(None) == [401] * 8  # new connections: both front processes answer
        assert statuses("first-token") == [200] * 8
        tokens.write_text("second-token\n")
        os.kill(server.process.pid, signal.SIGHUP)
        server.wait_for(lambda: statuses("second-token") == [200] * 8, timeout=30)
        assert statuses("first-token") == [401] * 8
        counted = (
            'kleinserve_model_requests_total{api="tfserving_rest",code="200",method="predict",'
            'model="digits",version="1"}'
        )
        ok = answered.count(200)
        server.wait_for(lambda: _metric(_metrics(server), counted) == ok, timeout=30)
        assert _metric(_metrics(server), counted) == ok
    finally:
        server.stop()


def test_a_known_target_costs_one_predict_frame_and_no_lease(server) -> None:
    """Once each front process has leased digits, its requests send no lease: N requests are
    N predicts, and the frames beyond them are batched notices (before, each request took
    five: lease, predict, release, log entry, metrics), a counts report a second aside."""
    connections = _one_connection_per_front_process(server)  # each has leased digits once
    image = _images(1)[0]
    rounds = 10
    started = time.monotonic()  # before the scrapes too: their own frames are in the window
    before = _metrics(server)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(rounds):  # one request through each at once: a batch of 2, no wait
            answers = list(pool.map(lambda c: _predict(c, image), connections.values()))
            assert [status for status, _ in answers] == [200, 200]
    after = _metrics(server)
    reports = time.monotonic() - started + 3  # counts reports, one a second (a bound, not a test)
    for conn in connections.values():
        conn.close()
    for process in connections:

        def moved(name: str, process: str = process) -> float:
            key = f'kleinserve_front_{name}_total{{process="{process}"}}'
            return _metric(after, key) - _metric(before, key)

        assert moved("predicts") == rounds
        assert moved("leases") == 0
        assert moved("frames") <= 2 * rounds + reports


def _one_connection_per_front_process(
    server: TwistdServer,
) -> dict[str, http.client.HTTPConnection]:
    """A kept-alive connection to each front process, keyed by its number (each made one
    predict, a lone row: it ran after the batch timeout)."""
    connections: dict[str, http.client.HTTPConnection] = {}
    image = _images(1)[0]
    for _ in range(20):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        process = _process_of(server, conn, image)
        if process in connections:
            conn.close()
        else:
            connections[process] = conn
        if len(connections) == 2:
            break
    assert len(connections) == 2, "the kernel never gave a connection to each front process"
    return connections


def test_a_hot_swap_and_a_label_move_under_load_fail_no_request(tmp_path) -> None:
    """Version 2 copied in while requests flow through both front processes, then the label
    "stable" moved from 1 to 2: no request fails, every answer is exactly one version's, and
    requests sent after each change is seen are answered by version 2."""
    from tests import models
    from tests.test_lifecycle_integration import (
        V1,
        V2,
        Load,
        model_entry,
        predict,
        sighup,
        states,
        write_config,
    )

    base, staging = tmp_path / "m", tmp_path / "staging"
    models.make_linear(base, version=1, scale=1)
    models.make_linear(staging, version=2, scale=2)
    config = tmp_path / "models.conf"
    both = (1, 2)
    write_config(config, model_entry("m", base, versions=both, labels={"stable": 1}))
    server = TwistdServer(
        [
            f"--model_config_file={config}",
            "--file_system_poll_wait_seconds=0.5",
            "--http_processes=2",
            "--enable_batching",
        ],
        tmp_path,
    ).start()
    try:
        server.wait_ready()
        with (
            Load(partial(predict, server, "m"), threads=4) as latest,
            Load(partial(predict, server, "m/labels/stable"), threads=4) as stable,
        ):
            poll(latest.count, lambda n: n >= 50, timeout=60)
            shutil.copytree(staging / "2", base / "2")
            swapped = poll(
                lambda: states(server, "m"), lambda s: s == {1: "AVAILABLE", 2: "AVAILABLE"}, 60
            )
            seen_swap = time.monotonic()
            poll(lambda: latest.count(lambda a: a.sent > seen_swap), lambda n: n >= 50, 60)
            changed = time.monotonic()
            write_config(config, model_entry("m", base, versions=both, labels={"stable": 2}))
            sighup(server)
            moved = poll(
                lambda: server.get("/v1/models/m/labels/stable")[1],
                lambda doc: doc["model_version_status"][0]["version"] == "2",
                60,
            )
            seen_move = time.monotonic()
            poll(lambda: stable.count(lambda a: a.sent > seen_move), lambda n: n >= 50, 60)
    finally:
        server.stop()
    assert swapped == {1: "AVAILABLE", 2: "AVAILABLE"}
    assert moved["model_version_status"][0]["version"] == "2"
    assert latest.failures() == [] and stable.failures() == []
    for load in (latest, stable):
        assert {str(a.body["predictions"]) for a in load.answers} == {str(V1), str(V2)}
    assert all(a.body["predictions"] == V2 for a in latest.answers if a.sent > seen_swap)
    assert all(a.body["predictions"] == V1 for a in stable.answers if a.received < changed)
    assert all(a.body["predictions"] == V2 for a in stable.answers if a.sent > seen_move)
