"""The request-body budget and off-reactor decoding against a real ``twistd`` of models/digits.

One server, 20 MB bodies at most and 30 MB of them at once: two 16 MB bodies do not fit
together. A raw socket sends a request's headers and part of its body, so a body is
deterministically "being received" while another request arrives.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from harness.twistd import REPO, TwistdServer, poll

pytestmark = pytest.mark.integration

DIGITS = REPO / "models" / "digits"
MAX_BODY = 20_000_000
BUDGET = 30_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    if not (DIGITS / "1" / "saved_model.pb").exists():
        pytest.skip("no demo model in models/digits: run scripts/export-demo-model")
    started = TwistdServer(
        [
            "--model_name=digits",
            f"--model_base_path={DIGITS}",
            f"--max_request_bytes={MAX_BODY}",
            f"--max_inflight_request_bytes={BUDGET}",
        ],
        tmp_path_factory.mktemp("logs"),
    ).start()
    try:
        yield started.wait_ready()
    finally:
        started.stop()


def digits_body(megabytes: float, channels: int = 1) -> bytes:
    """A row-format body of 28x28x``channels`` images, about ``megabytes`` MB (4 distinct images)."""
    rng = np.random.default_rng(0)
    images = [
        json.dumps(np.round(rng.random((28, 28, channels)), 3).tolist()).encode() for _ in range(4)
    ]
    count = int(megabytes * 1e6 / (len(images[0]) + 1))
    return b'{"instances": [' + b",".join(images[i % 4] for i in range(count)) + b"]}"


def open_predict(server: TwistdServer, body: bytes, send: int) -> socket.socket:
    """A connection that has sent a predict's headers and the first ``send`` bytes of its body."""
    conn = socket.create_connection(("127.0.0.1", server.port))
    conn.sendall(
        b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    conn.sendall(body[:send])
    return conn


def read_status(conn: socket.socket) -> int:
    """The status code of the response on ``conn`` (read to the end; the server closes)."""
    conn.settimeout(120)
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.close()
    return int(data.split(b" ", 2)[1])


def gauge(server: TwistdServer, name: str) -> float:
    _, text = server.get("/metrics")
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, text
    return float(match[1])


def body_bytes_held(server: TwistdServer) -> float:
    return gauge(server, "kleinserve_request_body_bytes")


def in_flight(server: TwistdServer) -> float:
    """Requests received whole and not yet answered, counting the /metrics request asking."""
    return gauge(server, "kleinserve_in_flight_requests")


def test_a_second_large_body_while_one_is_received_gets_503_with_retry_after(
    server: TwistdServer,
) -> None:
    """While one 16 MB body is being received, another gets 503 + Retry-After; the first is then answered 200."""
    body = digits_body(16)
    first = open_predict(server, body, send=len(body) // 2)
    assert poll(lambda: body_bytes_held(server), lambda held: held >= len(body), 30) >= len(body)
    status, headers, answer = server.request(
        "POST", "/v1/models/digits:predict", body, {"content-type": "application/json"}
    )
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert "busy with large requests" in json.loads(answer)["error"]
    first.sendall(body[len(body) // 2 :])
    assert read_status(first) == 200
    assert poll(lambda: body_bytes_held(server), lambda held: held == 0, 30) == 0


def test_a_client_that_leaves_mid_body_gives_its_bytes_back(server: TwistdServer) -> None:
    """Half a 16 MB body, then a closed connection: the budget returns to 0 and a later 16 MB body is answered 200."""
    body = digits_body(16)
    conn = open_predict(server, body, send=len(body) // 2)
    assert poll(lambda: body_bytes_held(server), lambda held: held > 0, 30) > 0
    conn.close()
    assert poll(lambda: body_bytes_held(server), lambda held: held == 0, 30) == 0
    status, _, answer = server.request(
        "POST", "/v1/models/digits:predict", body, {"content-type": "application/json"}
    )
    assert status == 200, answer
    assert len(json.loads(answer)["predictions"][0]) == 10


def test_a_client_that_leaves_mid_decode_gives_its_bytes_back(server: TwistdServer) -> None:
    """A whole 19 MB body, then a closed connection while it is processed: the budget returns to 0."""
    body = digits_body(19, channels=2)
    conn = open_predict(server, body, send=len(body))
    # In flight only while it decodes (a few tenths of a second): read without a pause.
    assert poll(lambda: in_flight(server), lambda count: count >= 2, 30, interval=0) >= 2
    conn.close()
    assert poll(lambda: body_bytes_held(server), lambda held: held == 0, 60) == 0
    assert server.get("/healthz")[0] == 200


def test_the_server_answers_while_a_large_body_decodes(server: TwistdServer) -> None:
    """Requests are answered while a 19 MB body decodes; it is then answered 400 (wrong shape).

    The body's images have 2 channels where the model takes 1, so no inference runs: from
    the moment the whole body is in (it counts as in flight) to its answer, the server only
    decodes it. /metrics answering with it in flight shows the reactor was free meanwhile;
    decoded on the reactor thread, it would answer only after the 400, never seeing it.
    """
    body = digits_body(19, channels=2)
    assert len(body) < MAX_BODY
    conn = open_predict(server, body, send=len(body))
    # In flight only while it decodes (a few tenths of a second): read without a pause.
    assert poll(lambda: in_flight(server), lambda count: count >= 2, 30, interval=0) >= 2
    assert server.get("/healthz") == (200, {"status": "alive"})
    assert read_status(conn) == 400


def test_the_budget_gauge_is_exported(server: TwistdServer) -> None:
    """The budget's gauge is exported and idle at 0 between requests."""
    assert body_bytes_held(server) == 0
