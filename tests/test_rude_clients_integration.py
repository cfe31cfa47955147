"""Rude clients, paused processes and stuck models against a real ``twistd`` server (the
tests on the digits model twice: one process, and ``--http_processes=2``).

Each test ends with the same check: a predict is answered (a hang fails it through the
socket timeout, not a timed assertion), the in-flight gauge is back to 0, and the server
log holds no traceback the test did not expect (``TwistdServer.stop``).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.ports import free_port
from harness.twistd import REPO, TwistdServer, poll
from tests import models
from tests.consul_agent import consul_agent  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

DIGITS = REPO / "models" / "digits"
# One 28x28x1 image, about the size of a real digits request (7 KB of JSON).
SEVEN = json.dumps(
    {"instances": [[[[round((i * 28 + j) % 17 / 16, 3)] for j in range(28)] for i in range(28)]]}
).encode()
BATCHING = "max_batch_size { value: 8 }\nbatch_timeout_micros { value: 2000 }\n"
STARTUP = 180.0


def predict_request(path: str, body: bytes, host: str = "127.0.0.1") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def in_flight(server: TwistdServer) -> float:
    """Requests in flight other than the /metrics request asking. Front processes report
    theirs once a second, so there the asking request is counted only if it was in flight at
    the last report: with them, none in flight reads 0 or -1."""
    status, text = server.get("/metrics")
    assert status == 200
    for line in str(text).splitlines():
        if line.startswith("kleinserve_in_flight_requests "):
            return float(line.split()[1]) - 1
    raise AssertionError("no kleinserve_in_flight_requests in /metrics")


def assert_still_serving(server: TwistdServer, path: str, body: bytes) -> None:
    """A predict is answered 200 and nothing is left in flight."""
    status, _, _ = server.request("POST", path, body, {"content-type": "application/json"})
    assert status == 200
    assert poll(lambda: in_flight(server), lambda n: n <= 0, timeout=30) <= 0


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-front-processes"])
def digits(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[TwistdServer]:
    """The demo digits CNN with batching on (scripts/export-demo-model makes it), served by one
    process, and by a main process behind two front processes (``--http_processes=2``)."""
    if not (DIGITS / "1").exists():
        pytest.fail("models/digits is missing: run scripts/export-demo-model (scripts/test does)")
    tmp = tmp_path_factory.mktemp("digits")
    (tmp / "batching.txt").write_text(BATCHING)
    server = TwistdServer(
        [
            "--model_name=digits",
            f"--model_base_path={DIGITS}",
            "--enable_batching",
            f"--batching_parameters_file={tmp / 'batching.txt'}",
            f"--http_processes={request.param}",
        ],
        tmp,
    ).start()
    try:
        yield server.wait_ready(STARTUP)
    finally:
        server.stop()


def reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0): what a killed client or a proxy does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_connections_reset_mid_request_never_wedge_the_model(digits: TwistdServer) -> None:
    """64 clients send a predict and reset the connection while it is queued or running, three
    rounds: every later predict is answered, nothing stays in flight, no error is logged."""
    request = predict_request("/v1/models/digits:predict", SEVEN)
    for round_ in range(3):
        socks = [socket.create_connection(("127.0.0.1", digits.port)) for _ in range(64)]
        for sock in socks:
            sock.sendall(request)
        time.sleep(0.002 * round_)  # reset at different points of the batches' lives
        for sock in socks:
            reset(sock)
        assert_still_serving(digits, "/v1/models/digits:predict", SEVEN)


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """The body after ``head``: by Content-Length, or chunk by chunk."""
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":")[1]))
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = b""
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    await reader.readexactly(2)
    return body


async def _load_run(port: int, request: bytes, connections: int, stop_after: int) -> int:
    """A load generator like wrk: keep-alive connections sending back to back; once
    ``stop_after`` answers came, every connection is aborted with its request in flight.
    Returns the answers counted."""
    answered = 0
    enough = asyncio.Event()

    async def connection() -> None:
        nonlocal answered
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not enough.is_set():
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                await read_body(reader, head)
                answered += 1
                if answered >= stop_after:
                    enough.set()
            writer.write(request)  # one more, left in flight
            await asyncio.sleep(0.005)
        finally:
            writer.transport.abort()

    await asyncio.wait_for(asyncio.gather(*(connection() for _ in range(connections))), 120)
    return answered


def test_load_generator_ending_runs_with_requests_in_flight(digits: TwistdServer) -> None:
    """Runs of 64 keep-alive connections, each ended by aborting every connection with a request
    in flight (what wrk does): every run is answered, and the server serves after the last."""
    request = predict_request("/v1/models/digits:predict", SEVEN)
    answered = [asyncio.run(_load_run(digits.port, request, 64, 300)) for _ in range(3)]
    assert all(n >= 300 for n in answered), answered
    assert_still_serving(digits, "/v1/models/digits:predict", SEVEN)


def test_sigstop_then_sigcont_under_load_keeps_serving(digits: TwistdServer) -> None:
    """Clients with a 1 s timeout keep calling while the server is paused 3 s (SIGSTOP): they
    time out and leave; after SIGCONT the server answers again and nothing is left in flight."""
    assert digits.process is not None
    stop = threading.Event()
    outcomes: list[str] = []

    def client() -> None:
        while not stop.is_set():
            req = urllib.request.Request(
                digits.url + "/v1/models/digits:predict",
                data=SEVEN,
                headers={"content-type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=1) as response:
                    outcomes.append(str(response.status))
            except (TimeoutError, urllib.error.URLError, OSError) as e:
                outcomes.append(type(e).__name__)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        digits.process.send_signal(signal.SIGSTOP)
        time.sleep(3)
        digits.process.send_signal(signal.SIGCONT)
        time.sleep(2)
    finally:
        digits.process.send_signal(signal.SIGCONT)
        stop.set()
        for thread in threads:
            thread.join(30)
    assert "200" in outcomes and any(o != "200" for o in outcomes)  # both happened
    assert_still_serving(digits, "/v1/models/digits:predict", SEVEN)


def test_clients_timing_out_while_unbatched_requests_run(tmp_path: Path) -> None:
    """Batching off, a model that takes 0.3 s: clients that give up after 0.05 s while their
    request runs leave nothing stuck; the next predict is answered."""
    models.make_slow(tmp_path / "slow", seconds=0.3)
    server = TwistdServer(
        ["--model_name=slow", f"--model_base_path={tmp_path / 'slow'}"], tmp_path
    ).start()
    try:
        server.wait_ready(STARTUP)
        body = json.dumps({"instances": [[1.0, 2.0, 3.0]]}).encode()
        timeouts = 0
        for _ in range(6):
            req = urllib.request.Request(
                server.url + "/v1/models/slow:predict", data=body, method="POST"
            )
            try:
                urllib.request.urlopen(req, timeout=0.05).read()
            except (TimeoutError, urllib.error.URLError):
                timeouts += 1
        assert timeouts > 0
        assert_still_serving(server, "/v1/models/slow:predict", body)
    finally:
        server.stop()


def _hanging_server(tmp_path: Path, *extra: str) -> TwistdServer:
    models.make_hanging(tmp_path / "hang")
    return TwistdServer(
        ["--model_name=hang", f"--model_base_path={tmp_path / 'hang'}", *extra],
        tmp_path,
    ).start()


def _post_in_background(server: TwistdServer, x: float, results: list) -> threading.Thread:
    body = json.dumps({"instances": [[x, 2.0, 3.0]]}).encode()

    def send() -> None:
        try:
            results.append(
                server.request(
                    "POST", "/v1/models/hang:predict", body, {"content-type": "application/json"}
                )
            )
        except OSError as e:  # the connection dropped
            results.append(e)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_stuck_model_turns_liveness_and_readiness_red(
    tmp_path: Path,
    consul_agent,  # noqa: F811
) -> None:
    """A batch that never returns: past --inference_stall_seconds /healthz and /readyz answer
    503 saying why, and the Consul TTL (liveness) check turns critical."""
    server = _hanging_server(
        tmp_path,
        "--inference_stall_seconds=2",
        f"--consul={consul_agent.http_addr}",
        "--advertise=127.0.0.1",
        "--consul_check_interval=1",
        "--consul_ttl=3",
        "--drain_delay=0",
        "--drain_timeout=3",
    )
    try:
        server.wait_ready(STARTUP)
        assert server.get("/healthz")[0] == 200
        _post_in_background(server, -1.0, [])
        status, body = poll(lambda: server.get("/healthz"), lambda r: r[0] == 503, timeout=60)
        assert status == 503 and "inference thread is stuck" in body["error"]
        status, body = server.get("/readyz")
        assert status == 503 and body["status"] == "stalled"
        liveness = f"service:inference-127.0.0.1-{server.port}:liveness"

        def check() -> str | None:
            _, _, checks = consul_agent.get("/v1/agent/checks")
            return checks.get(liveness, {}).get("Status")

        assert poll(check, lambda s: s == "critical", timeout=60) == "critical"
    finally:
        server.stop()


def test_sigterm_with_a_stuck_batch_exits_within_its_bound(tmp_path: Path) -> None:
    """SIGTERM while one batch never returns and requests wait behind it: the queued requests
    are answered 503 with Retry-After, the log says how many were cut, and the process exits
    (the watchdog ends it: the stuck thread cannot be stopped)."""
    server = _hanging_server(tmp_path, "--drain_delay=0", "--drain_timeout=3")
    try:
        server.wait_ready(STARTUP)
        stuck: list = []
        _post_in_background(server, -1.0, stuck)
        poll(lambda: in_flight(server), lambda n: n == 1, timeout=30)
        queued: list = []
        threads = [_post_in_background(server, 1.0, queued) for _ in range(3)]
        poll(lambda: in_flight(server), lambda n: n == 4, timeout=30)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(60)  # a hang fails here, not on a duration
        for thread in threads:
            thread.join(30)
        assert code == 70  # EXIT_STUCK: the stop finished, an inference thread could not
        statuses = [r[0] for r in queued]
        assert statuses == [503, 503, 503], queued
        assert all(r[1].get("Retry-After") == "1" for r in queued)
        log = server.log()
        assert "3 still queued were answered 503" in log
        assert "the stop did not finish" in log
    finally:
        server.stop()


def test_sigterm_under_load_answers_every_request_and_closes_each_connection(
    digits_for_stop: TwistdServer,
) -> None:
    """SIGTERM under steady load on 16 keep-alive connections: the server keeps answering
    through --drain_delay, every request sent is answered (200), the last answer on each
    connection carries ``Connection: close``, and the process ends in order.

    Connections are opened before the stop: a client that opens new connections to a port
    as it closes can meet a reset from the kernel's listen backlog, which no server avoids;
    Consul deregistration and --drain_delay are what keep new clients away."""
    server = digits_for_stop
    assert server.process is not None
    outcomes: list[object] = []
    closed_by_server: list[bool] = []

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            while True:
                connection.request(
                    "POST",
                    "/v1/models/digits:predict",
                    SEVEN,
                    {"content-type": "application/json"},
                )
                response = connection.getresponse()
                response.read()
                outcomes.append(response.status)
                if response.getheader("connection", "").lower() == "close":
                    closed_by_server.append(True)
                    return
        except OSError as e:
            outcomes.append(repr(e))
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(60)
    for thread in threads:
        thread.join(30)
    assert code == -signal.SIGTERM  # an orderly stop: twistd ends with the signal it was sent
    assert set(outcomes) == {200}, set(map(str, outcomes))
    assert len(closed_by_server) == 16
    assert "unanswered" not in server.log()


@pytest.fixture
def digits_for_stop(tmp_path: Path) -> Iterator[TwistdServer]:
    server = TwistdServer(
        [
            "--model_name=digits",
            f"--model_base_path={DIGITS}",
            "--enable_batching",
            "--drain_delay=0.5",
            "--drain_timeout=5",
        ],
        tmp_path,
    ).start()
    try:
        yield server.wait_ready(STARTUP)
    finally:
        server.stop()


def test_a_port_in_use_ends_start_up_with_a_non_zero_status(tmp_path: Path) -> None:
    """Start-up on a port another process holds: the reason is logged and the process exits
    non-zero instead of staying alive listening on nothing."""
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        models.make_linear(tmp_path / "linear")
        server = TwistdServer(
            ["--model_name=linear", f"--model_base_path={tmp_path / 'linear'}"],
            tmp_path,
            port=port,
        ).start()
        assert server.process is not None
        code = server.process.wait(120)
    assert code == 75
    assert "cannot listen" in server.log() and "Address already in use" in server.log()
    server.stop()
