"""HTTP limits and bad paths against a real ``twistd -n inference``, over raw sockets.

Each limit is answered with its status and a JSON ``{"error": …}`` and the connection is
closed; after each, and while a slow client is being timed out, a normal predict on another
connection still answers 200.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest

from harness.twistd import TwistdServer, poll
from tests import models

pytestmark = pytest.mark.integration

LIMIT = 10_000  # --max_request_bytes
READ_TIMEOUT = 5  # --request_read_timeout, seconds
MAX_CONNECTIONS = 6
PREDICT = json.dumps({"instances": [[1.0, 1.0, 1.0], [0.5, 0.0, -1.0]]}).encode()
# y = x @ [[1, 2], [3, 4], [5, 6]] + [0.5, -0.5]
PREDICTED = {"predictions": [[9.5, 11.5], [-4.0, -5.5]]}


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes

    def error(self) -> str:
        assert self.headers["content-type"] == "application/json", self.raw
        return json.loads(self.body)["error"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    root = tmp_path_factory.mktemp("models")
    models.make_linear(root / "linear")
    started = TwistdServer(
        [
            "--model_name=linear",
            f"--model_base_path={root / 'linear'}",
            f"--max_request_bytes={LIMIT}",
            "--request_header_timeout=1",
            f"--request_read_timeout={READ_TIMEOUT}",
            f"--max_connections={MAX_CONNECTIONS}",
        ],
        tmp_path_factory.mktemp("logs"),
    ).start()
    try:
        yield started.wait_ready()
    finally:
        started.stop()


def connect(server: TwistdServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def read_to_close(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_answer(sock: socket.socket) -> bytes:
    """One whole response from a connection kept open (chunked or with Content-Length)."""
    received = b""
    while True:
        head, found, body = received.partition(b"\r\n\r\n")
        if found:
            lengths = [
                int(line.split(b":", 1)[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            ]
            if body.endswith(b"\r\n0\r\n\r\n") or (lengths and len(body) >= lengths[0]):
                return received
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk


def parse(raw: bytes) -> Answer:
    """The last response in ``raw`` (after any 100 Continue), its body de-chunked."""
    head, _, rest = raw.rpartition(b"HTTP/1.1 ")[2].partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
    body = rest
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2 :]
    return Answer(int(status_line.split(" ")[0]), headers, body, raw)


def exchange(server: TwistdServer, data: bytes) -> Answer:
    """Send ``data`` on a new connection and read the answer until the server closes."""
    with connect(server) as sock:
        sock.sendall(data)
        return parse(read_to_close(sock))


def post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: test", b"Connection: close", *headers]
    if not any(h.lower().startswith(b"transfer-encoding") for h in headers):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def get(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


def assert_refused(answer: Answer, status: int) -> str:
    """The answer is ``status`` with a JSON error, Connection: close and no Server header."""
    assert answer.status == status, answer.raw
    assert answer.headers["connection"] == "close"
    assert "server" not in answer.headers
    return answer.error()


def assert_still_serving(server: TwistdServer) -> None:
    """A normal predict, on a connection of its own, answers 200."""
    status, doc = server.post_json("/v1/models/linear:predict", json.loads(PREDICT))
    assert (status, doc) == (200, PREDICTED)


def trickle(
    server: TwistdServer, start: bytes, byte: bytes, meanwhile: Callable[[], None]
) -> bytes:
    """Send ``start``, then ``byte`` about every 0.2 s (calling ``meanwhile`` between them)
    until the server's answer has come; what it answered."""
    with connect(server) as sock:
        sock.sendall(start)
        sock.settimeout(0.2)
        received = bytearray()

        def send_one() -> bytes:
            try:
                sock.sendall(byte)
                received.extend(sock.recv(65536))
            except TimeoutError:
                meanwhile()
            return bytes(received)

        return poll(send_one, lambda got: b"}" in got, timeout=60)


def test_a_predict_is_answered_without_a_server_header(server: TwistdServer) -> None:
    """A predict over a raw socket answers 200 with its predictions and no Server header."""
    answer = exchange(server, post(b"/v1/models/linear:predict", PREDICT))
    assert (answer.status, json.loads(answer.body)) == (200, PREDICTED)
    assert "server" not in answer.headers


def test_a_long_request_line_is_414(server: TwistdServer) -> None:
    """A request line over 16 KiB is answered 414 naming the limit."""
    error = assert_refused(exchange(server, get(b"/" + b"a" * 20_000)), 414)
    assert "request line" in error and "16384" in error
    assert_still_serving(server)


def test_a_long_header_line_is_431(server: TwistdServer) -> None:
    """A header line over 16 KiB is answered 431 naming the limit."""
    data = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    error = assert_refused(exchange(server, data), 431)
    assert "header line" in error and "16384" in error
    assert_still_serving(server)


def test_too_many_headers_is_431(server: TwistdServer) -> None:
    """101 headers are answered 431 naming the limit of 100."""
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    error = assert_refused(exchange(server, b"GET /healthz HTTP/1.1\r\n" + many + b"\r\n"), 431)
    assert "100 headers" in error
    assert_still_serving(server)


def test_content_length_over_the_limit_is_413_with_no_100_continue(server: TwistdServer) -> None:
    """Content-Length over --max_request_bytes with Expect: 100-continue is answered 413 at
    once, without 100 Continue, though no byte of the body was sent."""
    head = post(b"/v1/models/linear:predict", b"", b"Expect: 100-continue")
    head = head.replace(b"Content-Length: 0", b"Content-Length: %d" % (LIMIT + 1))
    answer = exchange(server, head)
    assert b"100 Continue" not in answer.raw
    error = assert_refused(answer, 413)
    assert str(LIMIT + 1) in error and str(LIMIT) in error
    assert_still_serving(server)


def test_a_body_over_the_limit_sent_without_waiting_still_gets_its_413(
    server: TwistdServer,
) -> None:
    """A client sending its whole too-large body at once reads the 413, not a reset."""
    body = b" " * (LIMIT * 20)
    error = assert_refused(exchange(server, post(b"/v1/models/linear:predict", body)), 413)
    assert str(LIMIT) in error
    assert_still_serving(server)


def test_a_chunked_body_past_the_limit_is_413_before_it_ends(server: TwistdServer) -> None:
    """A chunked body is answered 413 once past the limit, though its last chunk never came."""
    chunks = b"".join(b"1000\r\n" + b" " * 4096 + b"\r\n" for _ in range(3))  # 12 KiB, no end
    answer = exchange(
        server, post(b"/v1/models/linear:predict", chunks, b"Transfer-Encoding: chunked")
    )
    assert str(LIMIT) in assert_refused(answer, 413)
    assert_still_serving(server)


def test_headers_trickled_past_the_timeout_are_408(server: TwistdServer) -> None:
    """Headers sent a byte at a time are answered 408 after --request_header_timeout (1 s)."""
    raw = trickle(server, b"GET /healthz HTTP/1.1\r\nX-Slow: ", b"a", lambda: None)
    error = assert_refused(parse(raw), 408)
    assert "--request_header_timeout" in error
    assert_still_serving(server)


def test_a_gzip_body_is_answered_as_the_plain_one(server: TwistdServer) -> None:
    """A gzip predict body is inflated and answered exactly as the uncompressed body."""
    data = post(b"/v1/models/linear:predict", gzip.compress(PREDICT), b"Content-Encoding: gzip")
    answer = exchange(server, data)
    assert (answer.status, json.loads(answer.body)) == (200, PREDICTED)


def test_a_gzip_bomb_is_413(server: TwistdServer) -> None:
    """A gzip body under the limit that inflates past it is answered 413."""
    bomb = gzip.compress(b" " * 1_000_000)
    assert len(bomb) < LIMIT
    data = post(b"/v1/models/linear:predict", bomb, b"Content-Encoding: gzip")
    assert "inflated" in assert_refused(exchange(server, data), 413)
    assert_still_serving(server)


def test_content_encoding_br_is_415(server: TwistdServer) -> None:
    """Content-Encoding: br is answered 415 naming br and the accepted gzip and identity."""
    data = post(b"/v1/models/linear:predict", b"xx", b"Content-Encoding: br")
    error = assert_refused(exchange(server, data), 415)
    assert "'br'" in error and "gzip" in error and "identity" in error
    assert_still_serving(server)


BAD_PATHS = [
    (b"/v1/models/linear/versions/%C2%B2", 400, "64 bits"),
    (b"/v1/models/linear/versions/%D9%A1", 400, "64 bits"),
    (b"/v1/models/linear/versions/" + b"9" * 4301, 400, "64 bits"),
    (b"/v1/models/linear/versions/9223372036854775808", 400, "64 bits"),
    (b"/v1/models/%FF", 400, "not UTF-8"),
    (b"/v1/models/linear/labels/%FF", 400, "not UTF-8"),
    (b"/v1/models/\xff", 400, "request line"),
    (b"/v1/models/nosuch%00", 404, "nosuch"),
    (b"/v1/models/linear/versions/9223372036854775807", 404, "9223372036854775807"),
]


@pytest.mark.parametrize(("path", "status", "says"), BAD_PATHS)
def test_bad_paths_answer_json(server: TwistdServer, path: bytes, status: int, says: str) -> None:
    """Bad versions, non-UTF-8 paths (escaped or raw bytes) and impossible names are JSON
    400s and 404s on GET and POST, never 500s."""
    for data in (get(path), post(path + b":predict", PREDICT)):
        answer = exchange(server, data)
        assert answer.status == status, answer.raw
        assert says in answer.error()
    assert_still_serving(server)


def test_a_body_trickled_past_the_read_timeout_is_408_while_others_are_served(
    server: TwistdServer,
) -> None:
    """A body sent a byte at a time is answered 408 once --request_read_timeout has passed,
    naming how much of it had come; meanwhile other clients' predicts are answered."""
    head = post(b"/v1/models/linear:predict", b"").replace(b"Length: 0", b"Length: 900")
    raw = trickle(server, head, b" ", lambda: assert_still_serving(server))
    error = assert_refused(parse(raw), 408)
    assert "--request_read_timeout" in error and "of 900 bytes" in error
    assert_still_serving(server)


def test_a_body_sent_steadily_within_the_read_timeout_is_answered(server: TwistdServer) -> None:
    """A body near the size limit sent in ten pieces over about a second (well within the
    5 s read timeout) is answered 200."""
    body = PREDICT + b" " * (LIMIT - len(PREDICT))
    data = post(b"/v1/models/linear:predict", body)
    with connect(server) as sock:
        for start in range(0, len(data), len(data) // 10 + 1):
            sock.sendall(data[start : start + len(data) // 10 + 1])
            time.sleep(0.1)
        answer = parse(read_to_close(sock))
    assert (answer.status, json.loads(answer.body)) == (200, PREDICTED)


def test_a_connection_past_the_limit_is_503_while_held_ones_are_served(
    server: TwistdServer,
) -> None:
    """With --max_connections connections open (each answered once, so the server holds
    them), the next connection is answered 503 with Retry-After and Connection: close, and
    each held connection still gets its answer; closing one lets a new one in."""
    keep_alive = post(b"/v1/models/linear:predict", PREDICT).replace(b"Connection: close", b"X: y")
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:
            sock.sendall(keep_alive)
            assert parse(read_answer(sock)).status == 200
        with connect(server) as extra:
            answer = parse(read_to_close(extra))
        error = assert_refused(answer, 503)
        assert answer.headers["retry-after"] == "1"
        assert f"limit of {MAX_CONNECTIONS} connections" in error and "--max_connections" in error
        for sock in held:
            sock.sendall(keep_alive)
            answer = parse(read_answer(sock))
            assert (answer.status, json.loads(answer.body)) == (200, PREDICTED)
    finally:
        for sock in held:
            sock.close()
    status, text = poll(lambda: server.get("/metrics"), lambda got: got[0] == 200, timeout=30)
    assert 'kleinserve_refused_connections_total{how="503"} 1.0' in str(text)
