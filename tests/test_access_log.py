"""Request ids and the access log without sockets: the id rules, the line formats, the queue's
report, and the real ``InferenceSite`` on a StringTransport writing its lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from service.access_log import KEYS, NAMESPACE, AccessLog, RequestRecord, entry, request_id_from
from service.access_log import text_line as access_text
from service.batching import BatchingParameters, Queued
from service.http_limits import LimitedHTTPChannel
from service.logs import json_line, json_observer, text_observer
from service.options import Options
from tests.conftest import CapturedLogs
from tests.test_batching import make_queue, rows_for
from tests.test_http_limits import PREDICT, PREDICTED, Connection, request
from wire.http import MAX_REQUEST_ID_LENGTH, request_id_problem

HEX32 = r"[0-9a-f]{32}"


# -- the id rules -----------------------------------------------------------------------------


def test_no_id_sent_gets_a_fresh_one() -> None:
    """Without X-Request-Id the request gets 32 hex digits, and nothing was replaced."""
    request_id, replaced = request_id_from(None)
    assert replaced is None and len(request_id) == 32 and int(request_id, 16) >= 0
    assert request_id_from(None)[0] != request_id


@pytest.mark.parametrize(
    "sent",
    [b"abc-123", b"a" * MAX_REQUEST_ID_LENGTH, b"trace=4bf92f3577b34da6;span=00f067aa0ba902b7"],
)
def test_a_usable_id_is_kept(sent: bytes) -> None:
    """Visible ASCII up to 128 characters is the request's id, unchanged."""
    assert request_id_from([sent]) == (sent.decode(), None)


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        ([b"a" * (MAX_REQUEST_ID_LENGTH + 1)], "longer than 128"),
        ([b"abc\r\nSet-Cookie: x=1"], "not visible ASCII"),
        ([b"has space"], "not visible ASCII"),
        ([b"caf\xc3\xa9"], "not visible ASCII"),
        ([b"\x1b[31mred"], "not visible ASCII"),
        ([b""], "empty"),
        ([b"one", b"two"], "more than once"),
    ],
)
def test_an_unusable_id_is_replaced_and_says_why(sent: list[bytes], reason: str) -> None:
    """Too long, not visible ASCII, empty or sent twice: a fresh id, and the reason."""
    request_id, replaced = request_id_from(sent)
    assert replaced is not None and reason in replaced
    assert len(request_id) == 32 and request_id.encode() not in sent


@given(st.lists(st.binary(max_size=200), max_size=3))
def test_every_id_is_safe_to_echo(sent: list[bytes]) -> None:
    """Whatever a client sends, the id used is visible ASCII of at most 128 characters, and
    it is the client's exactly when nothing was replaced."""
    request_id, replaced = request_id_from(sent)
    assert request_id_problem(request_id) is None
    if sent and replaced is None:
        assert [request_id.encode()] == sent


# -- the formats ------------------------------------------------------------------------------


def sample_entry(**changes: Any) -> dict[str, Any]:
    record = RequestRecord("id-1", None, started=100.0, model="m", version=3, deadline_ms=900.0)
    record.queued.batched(0.0125, 4)
    fields = entry(
        record,
        finished=100.0421,
        peer="127.0.0.1:5000",
        method=b"POST",
        path=b"/v1/models/m:predict",
        route="predict",
        status=200,
        bytes_in=52,
        bytes_out=38,
    )
    return {**fields, **changes}


def test_an_entry_has_every_documented_key_with_its_unit() -> None:
    """The entry's keys are KEYS in order; times in ms, bytes as ints, time in RFC 3339 UTC."""
    fields = sample_entry()
    assert tuple(fields) == KEYS
    assert fields["time"] == "1970-01-01T00:01:40.042Z"
    assert fields["latency_ms"] == pytest.approx(42.1)
    assert (fields["queue_wait_ms"], fields["batch_size"]) == (12.5, 4)
    assert (fields["bytes_in"], fields["bytes_out"], fields["deadline_ms"]) == (52, 38, 900.0)
    assert json.loads(json.dumps(fields)) == fields


def test_the_text_line_is_one_readable_line() -> None:
    """The text form names each field; a path with quotes and spaces stays one quoted word."""
    line = access_text(sample_entry())
    assert line == (
        '127.0.0.1:5000 "POST /v1/models/m:predict" 200 predict model=m version=3 in=52B '
        "out=38B 42.1ms queue=12.5ms batch=4 deadline=900ms id=id-1"
    )
    odd = access_text(sample_entry(path='/a "b"\nc', model="two words", request_id_replaced="x"))
    assert "\n" not in odd and '"POST /a \\"b\\"\\nc"' in odd and 'model="two words"' in odd
    assert odd.endswith("(replaced the client's id: x)")
    grpc = access_text(sample_entry(protocol="grpc", grpc_status="OK", route="Predict"))
    assert '"POST /v1/models/m:predict" 200 grpc=OK Predict model=m' in grpc


@pytest.mark.parametrize(
    ("header", "noted"), [(b"1500", 1500.0), (b"nan", None), (b"inf", None), (b"soon", None)]
)
def test_the_deadline_is_noted_only_when_it_is_a_finite_number(
    header: bytes, noted: float | None
) -> None:
    """X-Request-Deadline-Ms is written as sent; NaN, infinity or text (no JSON number) not."""
    assert RequestRecord.begin(None, 0.0, header).deadline_ms == noted


@given(st.text(), st.text(), st.binary())
def test_a_text_line_never_breaks(model: str, route: str, path: bytes) -> None:
    """Whatever the model, route or path hold, the text form is one line of printable text."""
    line = access_text(sample_entry(model=model, route=route, path=path.decode("latin-1")))
    assert line.isprintable()


def test_a_request_that_queued_nothing_has_no_wait_or_batch() -> None:
    """Without a batch: queue wait and batch size are null in JSON and "-" in text."""
    record = RequestRecord("id-2", None, started=5.0)
    fields = entry(
        record,
        finished=5.0,
        peer="-",
        method=b"GET",
        path=b"/healthz",
        route="healthz",
        status=200,
        bytes_in=0,
        bytes_out=17,
    )
    assert fields["queue_wait_ms"] is None and fields["batch_size"] is None
    assert "queue=- batch=- deadline=-" in access_text(fields)


def test_an_unknown_access_log_format_is_refused() -> None:
    """--access_log takes off, text or json; anything else stops start-up saying so."""
    with pytest.raises(ValueError):
        AccessLog("xml")
    with pytest.raises(UsageError, match="--access_log takes off, text, json"):
        Options().parseOptions(["--model_base_path=/", "--access_log=xml"])


def twistd_options(*args: str) -> Any:
    """twistd's own options, parsed with the inference plugin's as twistd parses them."""
    from twisted.scripts.twistd import ServerOptions

    options = ServerOptions()
    options.parseOptions(list(args))
    return options


def test_log_format_json_sets_twistds_logger(tmp_path: Path) -> None:
    """--log_format=json makes twistd's --logger the JSON observer; text makes it the text
    observer (service.logs: twistd's lines, cheaper)."""
    base = f"--model_base_path={tmp_path}"
    json_log = twistd_options("-n", "inference", base, "--log_format=json")
    assert json_log["logger"] is json_observer
    assert twistd_options("-n", "inference", base)["logger"] is text_observer


@pytest.mark.parametrize(
    ("twistd", "message"),
    [
        (["-n", "--logfile=x.log"], "drop twistd's --logfile"),
        (["-n", "--logger=service.logs.json_observer"], "or twistd's --logger, not both"),
        ([], "run twistd -n"),
    ],
)
def test_log_format_json_refuses_what_would_lose_lines(
    tmp_path: Path, twistd: list[str], message: str
) -> None:
    """JSON lines go to standard output: a log file, another logger or a daemon is refused."""
    with pytest.raises(UsageError, match=message):
        twistd_options(*twistd, "inference", f"--model_base_path={tmp_path}", "--log_format=json")


def test_json_log_lines_carry_level_namespace_message_and_traceback() -> None:
    """Each event is one JSON line: time, level, namespace, message; a failure's traceback;
    an access event's entry as an object."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failure = Failure()
    event = {
        "log_time": 0.5,
        "log_level": LogLevel.critical,
        "log_namespace": "service.x",
        "log_format": "it went {how}",
        "how": "wrong",
        "log_failure": failure,
    }
    line = json_line(event)
    assert line.endswith("\n") and line.count("\n") == 1
    doc = json.loads(line)
    assert doc["time"] == "1970-01-01T00:00:00.500Z" and doc["level"] == "critical"
    assert (doc["namespace"], doc["message"]) == ("service.x", "it went wrong")
    assert "RuntimeError: boom" in doc["traceback"] and "access" not in doc
    access = json.loads(json_line({"log_format": "{x}", "x": 1, "access": {"status": 200}}))
    assert access["access"] == {"status": 200} and access["level"] == "info"


# -- the batching queue's report ----------------------------------------------------------------


def test_the_queue_reports_wait_and_batch_size_to_each_request() -> None:
    """Requests merged into one batch each learn the batch's rows and their own wait."""
    params = BatchingParameters(max_batch_size=8, batch_timeout_micros=10_000)
    queue, clock, executor, _ = make_queue(params)
    first, second, alone = Queued(), Queued(), Queued()
    queue.submit(rows_for(1, 2), 2, queued=first)
    clock.advance(0.004)
    queue.submit(rows_for(2, 3), 3, queued=second)
    assert first.wait_seconds is None  # still waiting for the batch timeout
    clock.advance(0.006)
    assert (first.batch_size, second.batch_size) == (5, 5)
    assert first.wait_seconds == pytest.approx(0.010)
    assert second.wait_seconds == pytest.approx(0.006)
    executor.finish_one()
    queue.submit(rows_for(3, 1), 1)  # no record: nothing to tell, nothing fails
    clock.advance(0.010)
    assert alone.wait_seconds is None and alone.batch_size is None


def test_a_split_request_keeps_its_longest_wait_and_largest_batch() -> None:
    """A request split over two batches reports the later batch's wait and the larger batch."""
    queue, clock, executor, _ = make_queue(BatchingParameters(max_batch_size=4))
    queued = Queued()
    queue.submit(rows_for(1, 6), 6, queued=queued)
    assert (queued.batch_size, queued.wait_seconds) == (4, 0.0)
    clock.advance(0.02)
    executor.finish_one()
    assert (queued.batch_size, queued.wait_seconds) == (4, pytest.approx(0.02))


# -- the site writing lines ---------------------------------------------------------------------


def access_lines(logs: CapturedLogs) -> list[dict[str, Any]]:
    """The JSON access-log lines written so far."""
    return [json.loads(e["access_line"]) for e in list(logs) if e.get("log_namespace") == NAMESPACE]


def test_an_answered_predict_writes_one_json_line(logs: CapturedLogs) -> None:
    """A predict: one JSON line with the model, version, bytes, batch, deadline and the
    echoed id."""
    connection = Connection(access_log=AccessLog("json"))
    connection.send(
        request(
            b"/v1/models/m:predict", PREDICT, b"X-Request-Id: abc-1", b"X-Request-Deadline-Ms: 2500"
        )
    )
    status, headers, body = connection.answer()
    assert (status, json.loads(body)) == (200, PREDICTED)
    assert headers[b"x-request-id"] == b"abc-1"
    (line,) = access_lines(logs)
    assert tuple(line) == KEYS
    assert line["request_id"] == "abc-1" and line["request_id_replaced"] is None
    assert (line["method"], line["path"], line["route"]) == (
        "POST",
        "/v1/models/m:predict",
        "predict",
    )
    assert (line["model"], line["version"], line["status"]) == ("m", 3, 200)
    assert (line["bytes_in"], line["bytes_out"]) == (len(PREDICT), len(body))
    assert line["batch_size"] == 2 and line["queue_wait_ms"] == 0.0
    peer = connection.transport.getPeer()
    assert line["peer"] == f"{peer.host}:{peer.port}" and line["deadline_ms"] == 2500.0


def test_an_error_carries_the_id_in_header_body_and_line(logs: CapturedLogs) -> None:
    """A 404 for an unknown model: the same fresh id in X-Request-Id, the error body and
    the line, which names the model asked for and the client's deadline; a bad client id
    is replaced and noted."""
    connection = Connection(access_log=AccessLog("json"))
    connection.send(
        request(
            b"/v1/models/nope:predict",
            PREDICT,
            b"X-Request-Id: " + b"x" * 129,
            b"X-Request-Deadline-Ms: 2500",
        )
    )
    status, headers, body = connection.answer()
    doc = json.loads(body)
    assert status == 404 and doc["request_id"] == headers[b"x-request-id"].decode()
    (line,) = access_lines(logs)
    assert (
        line["request_id"] == doc["request_id"] and "longer than 128" in line["request_id_replaced"]
    )
    assert (line["status"], line["model"], line["version"]) == (404, "nope", None)
    assert line["batch_size"] is None and line["deadline_ms"] == 2500.0


def test_a_refusal_by_the_channel_is_logged_with_its_id(logs: CapturedLogs) -> None:
    """A 413 refused at the headers: the client's id in the header, body and line."""
    connection = Connection(max_body_bytes=10, access_log=AccessLog("json"))
    connection.send(request(b"/v1/models/m:predict", PREDICT, b"X-Request-Id: big-1"))
    status, headers, body = connection.answer()
    assert status == 413 and headers[b"x-request-id"] == b"big-1"
    assert json.loads(body)["request_id"] == "big-1"
    (line,) = access_lines(logs)
    assert (line["status"], line["request_id"], line["route"]) == (413, "big-1", "predict")
    assert line["bytes_out"] == len(body)


def test_a_request_line_too_long_gets_a_fresh_id(logs: CapturedLogs) -> None:
    """414 comes before any request exists: a fresh id, in the header, body and line."""
    connection = Connection(access_log=AccessLog("json"))
    connection.send(b"GET /" + b"a" * LimitedHTTPChannel.MAX_LENGTH)
    status, headers, body = connection.answer()
    request_id = headers[b"x-request-id"].decode()
    assert status == 414 and len(request_id) == 32
    assert json.loads(body)["request_id"] == request_id
    (line,) = access_lines(logs)
    assert (line["status"], line["request_id"], line["method"]) == (414, request_id, "")


def test_text_lines_and_off(logs: CapturedLogs) -> None:
    """--access_log=text writes one readable line per request; off writes none (the
    X-Request-Id header is still sent)."""
    connection = Connection(access_log=AccessLog("text"))
    connection.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: t-1\r\n\r\n")
    assert connection.answer()[0] == 200
    (event,) = [e for e in list(logs) if e.get("log_namespace") == NAMESPACE]
    assert event["access_line"].startswith('192.168.1.1:54321 "GET /healthz" 200 healthz ')
    assert event["access_line"].endswith(" id=t-1") and event["access"]["status"] == 200
    quiet = Connection(access_log=AccessLog("off"))
    quiet.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: t-2\r\n\r\n")
    status, headers, _ = quiet.answer()
    assert status == 200 and headers[b"x-request-id"] == b"t-2"
    assert len([e for e in list(logs) if e.get("log_namespace") == NAMESPACE]) == 1


def test_the_access_logger_is_its_own_namespace() -> None:
    """Lines go out under kleinserve.access, so they can be routed or filtered apart."""
    seen: list[dict[str, Any]] = []
    AccessLog("json", Logger(namespace=NAMESPACE, observer=seen.append)).write({"a": 1})
    assert seen[0]["log_namespace"] == NAMESPACE and seen[0]["access_line"] == '{"a":1}'
