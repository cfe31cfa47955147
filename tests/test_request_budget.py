"""The request-body budget, the body decoder and the memory return, driven synchronously.

The bookkeeping (``service.budget``) is plain logic; the request side is checked through the
server's own ``InferenceSite`` and a real ``HTTPChannel`` on an in-memory transport, so a
client can send half a body and close, or close while its body is being decoded, without
sockets or threads. The "model" doubles its input on a batching queue that runs at once.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure

from service.batching import BatchingParameters, BatchingQueue
from service.budget import RequestBudget
from service.decoding import BodyDecoder, MemoryReturn
from service.http import InferenceAPI, InferenceSite
from service.metrics import Metrics
from service.options import DEFAULT_MAX_REQUEST_BYTES, Options
from service.repository import AVAILABLE, LoadedVersion, ModelConfig, ModelRepository
from service.signature import Signature, TensorInfo
from tests.deferreds import result_of

# -- the bookkeeping --------------------------------------------------------------------------


def test_reservations_add_up_and_release_gives_them_back() -> None:
    """Holds reserve up to the limit between them; releasing one gives exactly its bytes back."""
    budget = RequestBudget(100)
    a, b = budget.hold(), budget.hold()
    assert a.reserve(60) and b.reserve(40)
    assert budget.held == 100
    a.release()
    assert budget.held == 40
    a.release()  # a second release gives nothing back twice
    assert budget.held == 40


def test_a_hold_grows_by_the_difference() -> None:
    """Reserving a larger total (a chunked body arriving) adds only the difference; a smaller one adds nothing."""
    budget = RequestBudget(100)
    hold = budget.hold()
    assert hold.reserve(10) and hold.reserve(30) and hold.reserve(20)
    assert (hold.bytes, budget.held) == (30, 30)


def test_a_reservation_past_the_limit_is_refused_and_lets_go() -> None:
    """Past the limit: refused, what the hold had is given back, and it refuses from then on."""
    budget = RequestBudget(100)
    other, hold = budget.hold(), budget.hold()
    assert other.reserve(70) and hold.reserve(20)
    assert not hold.reserve(31)
    assert hold.refused and hold.bytes == 0 and budget.held == 70
    assert not hold.reserve(1)
    other.release()
    assert budget.held == 0


def test_finished_releases_unless_decoding() -> None:
    """The request ending releases its hold; while decoding, the release waits for the decode to end."""
    budget = RequestBudget(100)
    hold = budget.hold()
    hold.reserve(50)
    decode: Deferred = Deferred()
    result = hold.decoding(decode)
    hold.finished()  # the client left mid-decode
    assert budget.held == 50
    decode.callback("arrays")
    assert budget.held == 0
    assert result_of(result) == "arrays"
    hold.finished()
    assert budget.held == 0


def test_decoding_releases_when_the_decode_fails() -> None:
    """A decode that fails still gives the bytes back, and its failure reaches the caller."""
    budget = RequestBudget(100)
    hold = budget.hold()
    hold.reserve(50)
    decode: Deferred = Deferred()
    result = hold.decoding(decode)
    decode.errback(ValueError("bad body"))
    assert budget.held == 0
    with pytest.raises(ValueError):
        result_of(result)


def test_a_cancelled_wait_keeps_the_bytes_until_the_decode_ends() -> None:
    """Cancelling what the route awaits leaves the decode running: its bytes stay held until it ends."""
    budget = RequestBudget(100)
    hold = budget.hold()
    hold.reserve(50)
    decode: Deferred = Deferred()
    result = hold.decoding(decode)
    result.cancel()
    with pytest.raises(CancelledError):
        result_of(result)
    assert budget.held == 50 and not decode.called
    decode.callback("arrays")  # the thread finishes later; nothing is left unhandled
    assert budget.held == 0


def test_a_decode_that_views_the_body_holds_it_until_the_request_ends() -> None:
    """until_finished (tensors that are views of the body): the bytes stay counted after the
    decode, until the request ends; ended first, they go when the decode does; a failed
    decode made nothing that holds the body, so its bytes go at once."""
    budget = RequestBudget(100)
    hold = budget.hold()
    hold.reserve(50)
    decode: Deferred = Deferred()
    result = hold.decoding(decode, until_finished=True)
    decode.callback("views")
    assert result_of(result) == "views" and budget.held == 50
    hold.finished()
    assert budget.held == 0

    early = budget.hold()
    early.reserve(30)
    decode = Deferred()
    early.decoding(decode, until_finished=True)
    early.finished()  # the client left mid-decode
    assert budget.held == 30
    decode.callback("views")
    assert budget.held == 0

    failed = budget.hold()
    failed.reserve(20)
    decode = Deferred()
    result = failed.decoding(decode, until_finished=True)
    decode.errback(ValueError("bad body"))
    assert budget.held == 0
    with pytest.raises(ValueError):
        result_of(result)


def test_a_budget_must_be_positive() -> None:
    """A zero budget is refused when it is made."""
    with pytest.raises(ValueError, match="positive"):
        RequestBudget(0)


# -- the memory return ------------------------------------------------------------------------


def test_memory_is_returned_at_most_once_per_interval() -> None:
    """The first large request triggers a release at once; more within the interval, one release after it."""
    clock, releases = Clock(), []
    memory = MemoryReturn(
        clock=clock, run=maybeDeferred, release=lambda: releases.append(clock.seconds()), interval=2
    )
    memory.large_request_done()
    clock.advance(0)
    assert releases == [0]
    clock.advance(0.5)
    memory.large_request_done()
    memory.large_request_done()
    clock.advance(1)
    assert releases == [0]
    clock.advance(0.5)
    assert releases == [0, 2.0]
    clock.advance(10)
    assert releases == [0, 2.0]


def test_a_failed_release_is_logged_and_the_next_still_runs() -> None:
    """A release that raises does not stop later ones."""
    clock, calls = Clock(), []

    def release() -> None:
        calls.append(1)
        raise OSError("no trim here")

    memory = MemoryReturn(clock=clock, run=maybeDeferred, release=release, interval=1)
    memory.large_request_done()
    clock.advance(0)
    memory.large_request_done()
    clock.advance(1)
    assert calls == [1, 1]


def test_stop_cancels_a_pending_release() -> None:
    """Stopping the decoder cancels a release not yet started."""
    clock, calls = Clock(), []
    memory = MemoryReturn(clock=clock, run=maybeDeferred, release=lambda: calls.append(1))
    memory.large_request_done()
    memory.stop()
    clock.advance(10)
    assert calls == []


# -- the body decoder -------------------------------------------------------------------------


def test_small_bodies_decode_in_place_and_large_ones_on_the_pool() -> None:
    """Below ``off_reactor_bytes`` the decode runs where it is called; from it on, on the executor."""
    handed_off: list[bytes] = []

    def executor(f: Any, *args: Any) -> Deferred:
        handed_off.append(args[0])
        return maybeDeferred(f, *args)

    decoder = BodyDecoder(reactor=Clock(), off_reactor_bytes=10, executor=executor)
    assert result_of(Deferred.fromCoroutine(decoder.decode(b"123456789", len))) == 9
    assert handed_off == []
    assert result_of(Deferred.fromCoroutine(decoder.decode(b"1234567890", len))) == 10
    assert handed_off == [b"1234567890"]


# -- requests through the server's Site -------------------------------------------------------

SIGNATURE = Signature(
    "serving_default",
    inputs={"x": TensorInfo("x", "DT_FLOAT", (None, 2))},
    outputs={"y": TensorInfo("y", "DT_FLOAT", (None, 2))},
)


class FakeServable:
    signatures = {"serving_default": SIGNATURE}
    signature_defs = {"serving_default": {"method_name": "tensorflow/serving/predict"}}
    labels = None

    def signature(self, name: str | None) -> Signature:
        return SIGNATURE


class Server:
    """An InferenceSite with a budget, a decoder whose pool is a list of pending decodes, and
    a channel factory; every body of ``off_reactor_bytes`` or more waits in ``decodes``."""

    def __init__(
        self, budget: int, off_reactor_bytes: int = 10**9, executor: Any = maybeDeferred
    ) -> None:
        repository = ModelRepository([ModelConfig("m", Path("/nonexistent"))], reactor=Clock())
        version = LoadedVersion("m", 1, state=AVAILABLE, servable=FakeServable())  # type: ignore[arg-type]
        version.queues["serving_default"] = BatchingQueue(
            lambda inputs: {"y": inputs["x"] * 2},
            BatchingParameters(max_batch_size=64),
            clock=Clock(),
            executor=executor,
        )
        repository.add_version(version)
        self.decodes: list[tuple[Deferred, Any, bytes]] = []
        self.released: list[int] = []
        self.clock = Clock()
        self.decoder = BodyDecoder(
            reactor=self.clock,
            off_reactor_bytes=off_reactor_bytes,
            executor=self._pending_decode,
            release_memory=lambda: self.released.append(1),
        )
        api = InferenceAPI(repository, metrics=Metrics(), decoder=self.decoder)
        self.budget = RequestBudget(budget)
        self.site = InferenceSite(api, max_body_bytes=10**6, budget=self.budget)

    def _pending_decode(self, f: Any, *args: Any) -> Deferred:
        d: Deferred = Deferred()
        if args:
            self.decodes.append((d, f, args[0]))
        else:  # the memory return
            d.callback(f())
        return d

    def finish_decodes(self) -> None:
        decodes, self.decodes = self.decodes, []
        for d, f, body in decodes:
            d.callback(f(body))

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport


def predict_head(length: int | None) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return (
        b"POST /v1/models/m:predict HTTP/1.1\r\nHost: server\r\n"
        b"Content-Type: application/json\r\n" + framing + b"\r\n\r\n"
    )


def body_of(rows: int) -> bytes:
    return json.dumps({"instances": [[1.0, 2.0]] * rows}).encode()


def response(transport: StringTransport) -> tuple[int, dict[str, str], Any]:
    """Status, headers (lower-case names) and JSON body of the one response written."""
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in header_lines)}
    if headers.get("transfer-encoding") == "chunked":
        chunks = []
        while True:
            size, _, body = body.partition(b"\r\n")
            if int(size, 16) == 0:
                break
            chunks.append(body[: int(size, 16)])
            body = body[int(size, 16) + 2 :]
        body = b"".join(chunks)
    return int(status_line.split()[1]), headers, json.loads(body)


def test_a_body_within_the_budget_is_answered_and_released() -> None:
    """A predict whose Content-Length fits is answered 200, and the budget is back to 0."""
    server = Server(budget=10_000)
    body = body_of(3)
    channel, transport = server.connect()
    channel.dataReceived(predict_head(len(body)) + body)
    code, _, doc = response(transport)
    assert (code, doc) == (200, {"predictions": [[2.0, 4.0]] * 3})
    assert server.budget.held == 0


def v2_request(body: bytes, header_length: int | None) -> bytes:
    binary = (
        b"" if header_length is None else b"Inference-Header-Content-Length: %d\r\n" % header_length
    )
    kind = b"application/json" if header_length is None else b"application/octet-stream"
    return (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: server\r\nContent-Type: " + kind + b"\r\n"
        + binary + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip


@pytest.mark.parametrize("binary", [True, False])
def test_a_v2_body_counts_while_its_tensors_view_it(binary: bool) -> None:
    """v2 binary tensors are read in place, so their body lives until the answer: its bytes
    stay in the budget while the request waits for its batch, and go when it is answered. A
    JSON body is done with once decoded: nothing counts while it waits."""
    batches: list[tuple[Deferred, Any, tuple[Any, ...]]] = []

    def later(f: Any, *args: Any) -> Deferred:
        d: Deferred = Deferred()
        batches.append((d, f, args))
        return d

    server = Server(budget=10_000, executor=later)
    x = [[1.0, 2.0], [3.0, 4.0]]
    tensor = {"name": "x", "shape": [2, 2], "datatype": "FP32"}
    if binary:
        header = json.dumps({"inputs": [dict(tensor, parameters={"binary_data_size": 16})]})
        body = header.encode() + struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
        request = v2_request(body, len(header))
    else:
        body = json.dumps({"inputs": [dict(tensor, data=x)]}).encode()
        request = v2_request(body, None)
    channel, transport = server.connect()
    channel.dataReceived(request)
    assert len(batches) == 1 and transport.value() == b""
    assert server.budget.held == (len(body) if binary else 0)
    d, f, args = batches.pop()
    d.callback(f(*args))
    code, _, doc = response(transport)
    assert code == 200 and doc["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]
    assert server.budget.held == 0


def test_a_declared_length_past_the_budget_is_answered_503_with_retry_after() -> None:
    """While one body holds most of the budget, another whose Content-Length does not fit gets 503 + Retry-After."""
    server = Server(budget=500, off_reactor_bytes=100)
    first, second = body_of(20), body_of(20)
    assert len(first) < 500 < len(first) + len(second)
    channel1, transport1 = server.connect()
    channel1.dataReceived(predict_head(len(first)) + first)  # decoding: holds its bytes
    assert server.budget.held == len(first)
    channel2, transport2 = server.connect()
    channel2.dataReceived(predict_head(len(second)) + second)
    code, headers, doc = response(transport2)
    assert code == 503 and headers["retry-after"] == "1"
    assert "busy with large requests" in doc["error"]
    assert "--max_inflight_request_bytes (500 bytes)" in doc["error"]
    server.finish_decodes()
    assert response(transport1)[0] == 200
    assert server.budget.held == 0


def test_a_chunked_body_is_refused_once_what_arrived_passes_the_budget() -> None:
    """Without a Content-Length, the bytes received so far count; past the budget the request gets 503."""
    server = Server(budget=100)
    body = body_of(20)
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 40]), body[i : i + 40]) for i in range(0, len(body), 40)
    )
    channel, transport = server.connect()
    channel.dataReceived(predict_head(None) + chunks + b"0\r\n\r\n")
    code, headers, doc = response(transport)
    assert code == 503 and headers["retry-after"] == "1"
    assert server.budget.held == 0


def test_a_client_that_closes_mid_body_gives_its_share_back() -> None:
    """Half a body then a closed connection: the budget returns to 0, and a later body is accepted."""
    server = Server(budget=1000)
    body = body_of(40)
    channel, _ = server.connect()
    channel.dataReceived(predict_head(len(body)) + body[: len(body) // 2])
    assert server.budget.held == len(body)
    channel.connectionLost(Failure(ConnectionDone()))
    assert server.budget.held == 0
    channel2, transport2 = server.connect()
    channel2.dataReceived(predict_head(len(body)) + body)
    assert response(transport2)[0] == 200


def test_a_client_that_closes_mid_decode_holds_its_share_until_the_decode_ends() -> None:
    """Closed while its body decodes on the pool: the bytes stay counted until the decode ends, then 0; no inference runs."""
    server = Server(budget=1000, off_reactor_bytes=100)
    body = body_of(20)
    channel, transport = server.connect()
    channel.dataReceived(predict_head(len(body)) + body)
    assert len(server.decodes) == 1
    channel.connectionLost(Failure(ConnectionDone()))
    assert server.budget.held == len(body)
    server.finish_decodes()
    assert server.budget.held == 0
    assert transport.value() == b""  # nothing answered to a client that left


def test_memory_is_returned_after_a_large_request() -> None:
    """A request with a large body triggers the memory return once it is answered; a small one does not."""
    server = Server(budget=10_000, off_reactor_bytes=100)
    small, large = body_of(1), body_of(20)
    channel, _ = server.connect()
    channel.dataReceived(predict_head(len(small)) + small)
    server.clock.advance(0)
    assert server.released == []
    channel, transport = server.connect()
    channel.dataReceived(predict_head(len(large)) + large)
    server.finish_decodes()
    assert response(transport)[0] == 200
    server.clock.advance(0)
    assert server.released == [1]


# -- the flag ---------------------------------------------------------------------------------


def parse(*args: str) -> Any:
    options = Options()
    options.parseOptions(list(args))
    return options.config


def test_the_budget_defaults_to_four_of_the_largest_bodies(tmp_path: Path) -> None:
    """Without the flag the budget is 4 x --max_request_bytes (256 MiB by default); the flag sets it."""
    assert parse(f"--model_base_path={tmp_path}").max_inflight_request_bytes == (
        4 * DEFAULT_MAX_REQUEST_BYTES
    )
    config = parse(f"--model_base_path={tmp_path}", "--max_request_bytes=1000")
    assert config.max_inflight_request_bytes == 4000
    config = parse(f"--model_base_path={tmp_path}", "--max_inflight_request_bytes=123456789")
    assert config.max_inflight_request_bytes == 123456789


def test_a_budget_below_one_body_is_a_usage_error(tmp_path: Path) -> None:
    """A budget smaller than --max_request_bytes stops start-up saying why."""
    with pytest.raises(usage.UsageError, match="must be at least --max_request_bytes"):
        parse(
            f"--model_base_path={tmp_path}",
            "--max_request_bytes=1000",
            "--max_inflight_request_bytes=999",
        )
