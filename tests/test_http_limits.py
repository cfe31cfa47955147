"""HTTP limits and URL parsing without sockets: the channel on a StringTransport and a Clock.

``LimitedHTTPChannel`` is driven byte by byte as a connection would drive it, through the
real ``InferenceSite`` (routes on the numpy test model of ``tests.test_http``); the only
stand-in is the transport, which records what is written and how the connection is closed.
"""

from __future__ import annotations

import gzip
import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.routing import MapAdapter

from service.access_log import AccessLog
from service.auth import HTTPAuth
from service.dataplane import ModelTarget
from service.errors import InvalidArgument, PayloadTooLarge, UnsupportedMediaType
from service.http import InferenceAPI, InferenceSite
from service.http_limits import BodyBuffer, LimitedHTTPChannel, content_coding, head_error
from service.http_paths import (
    INT64_MAX,
    MalformedPath,
    ModelTargetConverter,
    malformed,
    parse_version,
)
from service.http_site import OTHER_DESCRIPTORS, open_files_problem
from tests.conftest import CapturedLogs
from tests.test_http import call, make_api

PREDICT = b'{"instances": [[1, 2], [3, 4]]}'
PREDICTED = {"predictions": [[2.0, 4.0], [6.0, 8.0]]}


# -- the model target converter and the malformed-path 400s -----------------------------------


@given(st.text())
def test_any_model_path_is_a_target_or_a_malformed_request(path: str) -> None:
    """Any text after /v1/models/ either matches a route's target or is an InvalidArgument
    "Malformed request" (never another error), with the path echoed shortened."""
    _, adapter = model_routes()
    try:
        endpoint, values = adapter.match("/v1/models/" + path, method="POST")
    except (HTTPException, MalformedPath):
        return  # Not Found (e.g. an empty name): the routing error handler's JSON 404
    if endpoint == "no_model_url":  # the empty path: "/v1/models/" itself
        assert path == ""
    elif endpoint == "other_v1_url":  # an empty name ("/v1/models//…"): the catch-all's 400
        assert path.startswith("/")
    elif endpoint == "other_model_url":
        error = malformed("POST", values["path"])
        assert isinstance(error, InvalidArgument) and error.message.startswith("Malformed")
        assert len(error.message) < 700
    else:
        assert isinstance(values["target"], ModelTarget) and "/" not in values["target"].name


def model_routes() -> tuple[InferenceAPI, MapAdapter]:
    api, _, _ = make_api()
    return api, api.app.url_map.bind("server")


@given(
    st.integers(min_value=0, max_value=INT64_MAX),
    st.sampled_from([("POST", ":predict", "predict"), ("GET", "", "status")]),
)
def test_versions_round_trip(version: int, route: tuple[str, str, str]) -> None:
    """Every int64 version written in decimal routes back to itself, with its verb."""
    method, verb, endpoint = route
    _, adapter = model_routes()
    assert adapter.match(f"/v1/models/m/versions/{version}{verb}", method=method) == (
        endpoint,
        {"target": ModelTarget("m", version=version)},
    )


@pytest.mark.parametrize(
    "version",
    [
        "\u00b2",  # superscript two: str.isdigit() accepts it, int() does not
        "\u0661",  # Arabic-Indic one: int() reads it as 1
        "\uff11",  # fullwidth one
        "9" * 4301,  # past Python's int digit limit
        str(INT64_MAX + 1),
        "-1",
        "+1",
        "1_000",
        "0x1",
        " 1",
    ],
)
def test_a_version_must_be_ascii_digits_within_int64(version: str) -> None:
    """A version that is not ASCII digits fitting int64 is never a target, and its 400 says so."""
    assert parse_version(version) is None
    with pytest.raises(InvalidArgument, match="decimal number .* fits in 64 bits"):
        raise malformed("GET", f"m/versions/{version}:predict")


def test_leading_zeros_and_the_largest_version() -> None:
    """Leading zeros are read as TF Serving's int64 parse reads them; INT64_MAX is a version."""
    converter = ModelTargetConverter(model_routes()[1].map)
    assert converter.to_python("m/versions/007") == ModelTarget("m", version=7)
    assert converter.to_python(f"m/versions/{'0' * 30}{INT64_MAX}").version == INT64_MAX
    assert converter.to_python("m/labels/stable") == ModelTarget("m", label="stable")


BAD_PATHS = [
    ("/v1/models/m/versions/%C2%B2", 400, "64 bits"),
    ("/v1/models/m/versions/%D9%A1", 400, "64 bits"),
    ("/v1/models/m/versions/" + "9" * 4301, 400, "64 bits"),
    ("/v1/models/m/versions/9223372036854775808", 400, "64 bits"),
    ("/v1/models/%FF", 400, "not UTF-8"),
    ("/v1/models/m/labels/%FF", 400, "not UTF-8"),
]


@pytest.mark.parametrize(
    ("method", "path", "status", "says"),
    [("GET", path, status, says) for path, status, says in BAD_PATHS]
    + [("POST", path + ":predict", status, says) for path, status, says in BAD_PATHS]
    + [
        ("GET", "/v1/models/nosuch%00", 404, "nosuch"),
        ("POST", "/v1/models/nosuch%00:predict", 404, "nosuch"),
        ("GET", "/v1/models/m/versions/9223372036854775807", 404, "9223372036854775807"),
        ("POST", "/v1/models/m/versions/9223372036854775807:predict", 404, "9223372036854775807"),
        ("GET", "/v1/models//m", 400, "Malformed request"),  # no redirect to /v1/models/m
        ("POST", "/v1//models/m:predict", 404, "Not Found"),
    ],
)
def test_bad_paths_answer_json(method: str, path: str, status: int, says: str) -> None:
    """Bad versions and non-UTF-8 paths are JSON 400s, unknown names JSON 404s, on GET and POST."""
    _, treq, _ = make_api()
    response, doc = call(treq, method, path, PREDICT if method == "POST" else None)
    assert response.code == status
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert says in doc["error"]


@given(st.sampled_from(["GET", "POST"]), st.binary(max_size=40), st.booleans())
def test_every_model_path_answers_json_never_5xx(method: str, raw: bytes, as_version: bool) -> None:
    """Any bytes, percent-encoded, under /v1/models/ (or as a version) answer a JSON 4xx or 200."""
    _, treq, _ = make_api()
    path = "/v1/models/" + ("m/versions/" if as_version else "") + quote(raw, safe="/:")
    response, doc = call(treq, method, path, PREDICT if method == "POST" else None)
    assert response.code < 500
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert isinstance(doc, dict)


# -- bodies: size, gzip --------------------------------------------------------------------------


def test_identity_body_is_kept_up_to_the_limit() -> None:
    """An uncompressed body is kept whole up to the limit, and one byte more is a 413."""
    body = BodyBuffer(10)
    body.write(b"12345")
    body.write(b"67890")
    assert body.finish().read() == b"1234567890"
    with pytest.raises(PayloadTooLarge, match="limit of 10 bytes"):
        body.write(b"x")


@given(st.binary(max_size=3000), st.lists(st.integers(min_value=1, max_value=200), max_size=30))
def test_gzip_is_inflated_however_it_is_split(data: bytes, cuts: list[int]) -> None:
    """A gzip body fed in any pieces inflates to exactly what was compressed."""
    compressed = gzip.compress(data)
    body = BodyBuffer(max(len(data), len(compressed)), gzip=True)
    start = 0
    for cut in cuts:
        body.write(compressed[start : start + cut])
        start += cut
    body.write(compressed[start:])
    assert body.finish().read() == data


def test_gzip_members_follow_each_other() -> None:
    """Concatenated gzip members (as `cat a.gz b.gz`) inflate to both contents in order."""
    body = BodyBuffer(100, gzip=True)
    body.write(gzip.compress(b"first ") + gzip.compress(b"second"))
    assert body.finish().read() == b"first second"


def test_a_gzip_bomb_is_refused_without_holding_more_than_the_limit() -> None:
    """100 MB of zeros in 100 kB of gzip: 413 once the inflated size passes the limit, and the
    buffer never holds more than the limit."""
    bomb = gzip.compress(bytes(100_000_000), compresslevel=9)
    body = BodyBuffer(1_000_000, gzip=True)
    with pytest.raises(PayloadTooLarge, match=r"inflated .* limit of 1000000 bytes"):
        for start in range(0, len(bomb), 4096):
            body.write(bomb[start : start + 4096])
    assert body.size <= 1_000_000
    assert len(body.content.getvalue()) <= 1_000_000


def test_compressed_bytes_are_bounded_too() -> None:
    """Compressed input past the limit is a 413 even if it inflates to little (empty members)."""
    empty = gzip.compress(b"")
    body = BodyBuffer(len(empty) * 3, gzip=True)
    with pytest.raises(PayloadTooLarge):
        for _ in range(4):
            body.write(empty)


def test_corrupt_and_truncated_gzip_are_400() -> None:
    """Bytes that are not gzip, and a gzip stream cut short, are InvalidArgument (400)."""
    with pytest.raises(InvalidArgument, match="not valid gzip"):
        BodyBuffer(100, gzip=True).write(b"this is not gzip")
    body = BodyBuffer(1000, gzip=True)
    body.write(gzip.compress(b"x" * 500)[:-12])
    with pytest.raises(InvalidArgument, match="ends before its gzip stream"):
        body.finish()


@pytest.mark.parametrize(
    ("values", "coding"),
    [
        ([], "identity"),
        ([b"identity"], "identity"),
        ([b"gzip"], "gzip"),
        ([b" GZip "], "gzip"),
        ([b"x-gzip"], "gzip"),
        ([b"identity, gzip"], "gzip"),
        ([b"br"], None),
        ([b"deflate"], None),
        ([b"gzip, gzip"], None),
        ([b"gzip", b"br"], None),
    ],
)
def test_content_coding(values: list[bytes], coding: str | None) -> None:
    """gzip (or x-gzip) and identity are accepted, alone; anything else is not."""
    headers = Headers({b"content-encoding": values} if values else {})
    assert content_coding(headers) == coding


def test_head_errors() -> None:
    """Content-Length over the limit is a 413 naming both sizes; br a 415 naming br and the
    accepted encodings; a body within the limit and gzip pass."""
    too_large = head_error(Headers(), 2000, 1000)
    assert isinstance(too_large, PayloadTooLarge)
    assert "2000" in too_large.message and "1000" in too_large.message
    br = head_error(Headers({b"content-encoding": [b"br"]}), 10, 1000)
    assert isinstance(br, UnsupportedMediaType)
    assert "'br'" in br.message and "gzip" in br.message and "identity" in br.message
    assert head_error(Headers({b"content-encoding": [b"gzip"]}), 1000, 1000) is None
    assert head_error(Headers(), None, 1000) is None  # chunked: checked as it arrives


# -- the channel ----------------------------------------------------------------------------------


class TCPTransport(StringTransport):
    """A StringTransport that, like a TCP socket, can close its sending side alone."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def make_site(
    *,
    max_body_bytes: int = 1000,
    timeout: float = 30.0,
    read_timeout: float = 60.0,
    max_connections: int = 1024,
    access_log: AccessLog | None = None,
    auth: HTTPAuth | None = None,
) -> InferenceSite:
    """An InferenceSite on the numpy test model, its timers on a ``Clock`` (``site.reactor``)."""
    api, _, _ = make_api()
    return InferenceSite(
        api,
        max_body_bytes=max_body_bytes,
        request_header_timeout=timeout,
        request_read_timeout=read_timeout,
        max_connections=max_connections,
        access_log=access_log,
        auth=auth,
        reactor=Clock(),
    )


class Connection:
    """One client connection to an InferenceSite (a new one, or ``site``'s): bytes in, the
    answer's parts out."""

    def __init__(self, *, site: InferenceSite | None = None, **limits: Any) -> None:
        self.site = site if site is not None else make_site(**limits)
        self.clock: Clock = self.site.reactor
        self.metrics = self.site.metrics
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        assert isinstance(self.channel, LimitedHTTPChannel)
        self.transport = TCPTransport()
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def answer(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """Status, headers (lower-cased names) and body of the first response written."""
        head, _, rest = self.transport.value().partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in header_lines)
        headers = {name.lower(): value for name, value in headers.items()}
        if headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size, _, rest = rest.partition(b"\r\n")
                if int(size, 16) == 0:
                    break
                body, rest = body + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
        else:
            body = rest[: int(headers[b"content-length"])]
        return int(status_line.split(b" ")[1]), headers, body

    def trickle(self, byte: bytes, *, seconds: int) -> tuple[int, str]:
        """Send ``byte`` each second for ``seconds - 1`` seconds, checking nothing is
        answered, then let one more second pass: the refusal that must come then."""
        for _ in range(seconds - 1):
            self.clock.advance(1)
            self.send(byte)
        assert self.transport.value() == b""
        self.clock.advance(1)
        return self.refused()

    def refused(self) -> tuple[int, str]:
        """The refusal's status and error message, checking it is JSON and ends the connection."""
        status, headers, body = self.answer()
        assert headers[b"content-type"] == b"application/json"
        assert headers[b"connection"] == b"close"
        assert self.transport.write_closed
        return status, json.loads(body)["error"]


def request(path: bytes = b"/v1/models/m:predict", body: bytes = PREDICT, *headers: bytes) -> bytes:
    head = [b"POST " + path + b" HTTP/1.1", b"Host: example", *headers]
    if not any(h.lower().startswith(b"transfer-encoding") for h in headers):
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def test_a_request_is_answered_without_a_server_header() -> None:
    """A predict over the channel answers 200 with its predictions and no Server header."""
    connection = Connection()
    connection.send(request())
    status, headers, body = connection.answer()
    assert (status, json.loads(body)) == (200, PREDICTED)
    assert b"server" not in headers
    assert not connection.transport.disconnecting


def test_a_gzip_body_is_inflated_and_answered() -> None:
    """A gzip predict body (Content-Encoding: gzip) is answered as the plain one."""
    connection = Connection()
    connection.send(
        request(b"/v1/models/m:predict", gzip.compress(PREDICT), b"Content-Encoding: gzip")
    )
    status, _, body = connection.answer()
    assert (status, json.loads(body)) == (200, PREDICTED)


def test_a_long_request_line_is_414() -> None:
    """A request line past 16 KiB is answered 414 naming the limit, before its end arrives."""
    connection = Connection()
    connection.send(b"GET /" + b"a" * LimitedHTTPChannel.MAX_LENGTH)
    status, error = connection.refused()
    assert status == 414 and "request line" in error and "16384" in error


def test_a_long_header_line_is_431() -> None:
    """A header line past 16 KiB is answered 431 naming the limit."""
    connection = Connection()
    connection.send(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n")
    status, error = connection.refused()
    assert status == 431 and "header line" in error and "16384" in error


def test_too_many_headers_is_431() -> None:
    """More than 100 headers is answered 431 naming the limit."""
    connection = Connection()
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    connection.send(b"GET /healthz HTTP/1.1\r\n" + many + b"\r\n")
    status, error = connection.refused()
    assert status == 431 and "more than the limit of 100 headers" in error


def test_headers_too_large_together_are_431() -> None:
    """Headers within the per-line limit but past 64 KiB together are answered 431."""
    connection = Connection()
    connection.send(
        b"GET /healthz HTTP/1.1\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 8000) for i in range(9))
    )
    status, error = connection.refused()
    assert status == 431 and "together" in error and "65536" in error


def test_content_length_over_the_limit_is_413_without_100_continue() -> None:
    """Content-Length past --max_request_bytes with Expect: 100-continue: 413 at the end of
    the headers, and no 100 Continue."""
    connection = Connection(max_body_bytes=1000)
    connection.send(
        b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    assert b"100 Continue" not in connection.transport.value()
    status, error = connection.refused()
    assert status == 413 and "1001" in error and "1000" in error


def test_a_body_within_the_limit_still_gets_100_continue() -> None:
    """Expect: 100-continue with an acceptable Content-Length is still answered 100 Continue."""
    connection = Connection(max_body_bytes=1000)
    connection.send(
        b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    assert connection.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_a_chunked_body_past_the_limit_is_413_at_once() -> None:
    """A chunked body is answered 413 as soon as it passes the limit, before it ends."""
    connection = Connection(max_body_bytes=1000)
    connection.send(request(b"/v1/models/m:predict", b"", b"Transfer-Encoding: chunked"))
    connection.send(b"3e8\r\n" + b" " * 1000 + b"\r\n")
    assert connection.transport.value() == b""
    connection.send(b"1\r\n \r\n")
    status, error = connection.refused()
    assert status == 413 and "1000" in error


def test_a_gzip_bomb_is_413_over_the_channel() -> None:
    """A small gzip body inflating past the limit is answered 413 naming the inflated size."""
    connection = Connection(max_body_bytes=10_000)
    bomb = gzip.compress(b" " * 1_000_000)
    assert len(bomb) < 10_000
    connection.send(request(b"/v1/models/m:predict", bomb, b"Content-Encoding: gzip"))
    status, error = connection.refused()
    assert status == 413 and "inflated" in error


def test_other_encodings_are_415() -> None:
    """Content-Encoding: br is answered 415 naming br and gzip and identity."""
    connection = Connection()
    connection.send(request(b"/v1/models/m:predict", b"xx", b"Content-Encoding: br"))
    status, error = connection.refused()
    assert status == 415 and "'br'" in error and "gzip" in error and "identity" in error


def test_truncated_gzip_is_400() -> None:
    """A gzip body that ends before its gzip stream is answered 400, not routed."""
    connection = Connection()
    cut = gzip.compress(PREDICT)[:-10]
    connection.send(request(b"/v1/models/m:predict", cut, b"Content-Encoding: gzip"))
    status, error = connection.refused()
    assert status == 400 and "gzip" in error


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"GET /v1/models/\xff:predict HTTP/1.1\r\n\r\n", "request line"),
        (b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", "Content-Length"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunked"),
    ],
)
def test_malformed_http_is_a_json_400(data: bytes, says: str) -> None:
    """What Twisted refuses as malformed (raw 0xFF in the path, a bad Content-Length or chunk)
    is a JSON 400 saying where, not a bare 400."""
    connection = Connection()
    connection.send(data)
    status, error = connection.refused()
    assert status == 400 and says in error


def test_headers_trickled_past_the_timeout_are_408() -> None:
    """Headers sent a byte a second are answered 408 once --request_header_timeout passes."""
    connection = Connection(timeout=30.0)
    connection.send(b"GET /healthz HTTP/1.1\r\n")
    status, error = connection.trickle(b"X", seconds=30)
    assert status == 408 and "30 s" in error and "--request_header_timeout" in error


def test_idle_keep_alive_connections_keep_the_idle_timeout() -> None:
    """An answered keep-alive connection gets no 408 while idle; Twisted's idle timeout (60 s)
    closes it silently."""
    connection = Connection(timeout=30.0)
    connection.send(request())
    answered = connection.transport.value()
    connection.clock.advance(59)
    assert connection.transport.value() == answered and not connection.transport.disconnecting
    connection.clock.advance(1)
    assert connection.transport.value() == answered and connection.transport.disconnecting


def test_a_refused_connection_drains_then_closes() -> None:
    """After a refusal what the client still sends is dropped, and the connection is aborted
    after linger_seconds; a client closing first cancels every timer."""
    connection = Connection(max_body_bytes=10)
    connection.send(request())
    written = connection.transport.value()
    connection.send(request())  # dropped: no second answer
    assert connection.transport.value() == written
    connection.clock.advance(LimitedHTTPChannel.linger_seconds)
    assert connection.transport.disconnected

    other = Connection(max_body_bytes=10)
    other.send(request())
    other.channel.connectionLost(Failure(ConnectionDone()))
    assert other.clock.getDelayedCalls() == []


def test_a_refusal_under_a_wrapping_transport_never_half_closes_the_socket_beneath() -> None:
    """Under a transport that wraps the socket and passes unknown attributes through to it
    (Twisted's TLS is a ProtocolWrapper), a refusal does not half-close that socket, which
    would cut the wrapper's answer: the answer is written, the client is left to close, and
    the connection is aborted after linger_seconds."""
    site = make_site(max_body_bytes=10)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
    socket = TCPTransport()
    wrapper = ProtocolWrapper(WrappingFactory(site), channel)
    wrapper.makeConnection(socket)
    assert wrapper.loseWriteConnection == socket.loseWriteConnection  # passed through
    channel.dataReceived(request())
    assert socket.value().startswith(b"HTTP/1.1 413 ")
    assert not socket.write_closed and not socket.disconnecting
    site.reactor.advance(LimitedHTTPChannel.linger_seconds)
    assert socket.disconnecting


def test_refusals_before_the_request_line_count_as_other() -> None:
    """A refusal before a whole request line arrived (a header timeout) counts as "other"."""
    connection = Connection(timeout=5.0)
    connection.send(b"POST /v1/models/m:pre")
    connection.clock.advance(5.0)
    sample = connection.metrics.registry.get_sample_value(
        "kleinserve_requests_total", {"route": "other", "code": "408"}
    )
    assert connection.refused()[0] == 408 and sample == 1.0


@pytest.mark.parametrize(
    ("line", "route"),
    [
        (b"POST /v1/models/m:predict", "predict"),
        (b"GET /v1/models/m/versions/3", "status"),
        (b"GET /v1/models/m/labels/x/metadata", "metadata"),
        (b"POST /v1/models/m:explode", "other"),
        (b"GET /v1/models/m/versions/99999999999999999999", "other"),
        (b"PUT /v1/models/m:predict", "other"),
        (b"GET /healthz", "healthz"),
    ],
)
def test_answered_requests_are_counted_under_the_route_that_took_them(
    line: bytes, route: str
) -> None:
    """Each answered request counts under its matched route's label; "other" when no route
    took it (a malformed model URL, another method)."""
    connection = Connection()
    body = PREDICT if line.startswith(b"POST") else b""
    connection.send(line + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    status, _, _ = connection.answer()
    sample = connection.metrics.registry.get_sample_value(
        "kleinserve_requests_total", {"route": route, "code": str(status)}
    )
    assert sample == 1.0


def test_refusals_are_counted_in_the_metrics() -> None:
    """A refused predict counts as a predict request with the refusal's status."""
    connection = Connection(max_body_bytes=10)
    connection.send(request())
    sample = connection.metrics.registry.get_sample_value(
        "kleinserve_requests_total", {"route": "predict", "code": "413"}
    )
    assert sample == 1.0


def test_a_request_whose_client_leaves_before_its_answer_is_logged_and_counted_499(
    logs: CapturedLogs,
) -> None:
    """A predict sent whole whose connection closes while its batch runs: one access-log line
    and one count as 499 (nginx's "client closed request", as a cancelled gRPC call), under
    its route, model and version, and nothing written. A request answered before its
    connection closes, or one whose client left mid-body (no route ran), is not a 499; one
    whose answer was being written keeps that answer's status, with the bytes that went out."""
    api, _, _ = make_api(executor=lambda f, *args: Deferred())  # the model never answers
    site = InferenceSite(api, max_body_bytes=1000, access_log=AccessLog("json"), reactor=Clock())
    left = Connection(site=site)
    left.send(request())
    assert left.transport.value() == b""  # the batch runs
    left.channel.connectionLost(Failure(ConnectionDone()))
    mid_body = Connection(site=site)
    mid_body.send(request()[:-3])
    mid_body.channel.connectionLost(Failure(ConnectionDone()))
    mid_answer = Connection(site=site)
    mid_answer.send(request())
    (cut,) = mid_answer.channel.requests
    cut.write(b'{"predictions": [')  # an answer under way (the route writes it whole, finished)
    mid_answer.channel.connectionLost(Failure(ConnectionDone()))
    answered = Connection(access_log=AccessLog("json"))  # a model that answers at once
    answered.send(request())
    assert answered.answer()[0] == 200
    answered.channel.connectionLost(Failure(ConnectionDone()))

    lines = [
        json.loads(e["access_line"])
        for e in list(logs)
        if e.get("log_namespace") == "kleinserve.access"
    ]
    assert [(x["status"], x["route"], x["model"], x["version"]) for x in lines] == [
        (499, "predict", "m", 3),
        (200, "predict", "m", 3),  # its answer cut short: the status it went out with
        (200, "predict", "m", 3),
    ]
    assert lines[0]["bytes_out"] == 0 and lines[1]["bytes_out"] > 0
    assert left.transport.value() == b""
    registry = site.metrics.registry
    requests = {"route": "predict", "code": "499"}
    assert registry.get_sample_value("kleinserve_requests_total", requests) == 1.0
    model = {"api": "tfserving_rest", "method": "predict", "model": "m", "version": "3"}
    assert (
        registry.get_sample_value("kleinserve_model_requests_total", model | {"code": "499"}) == 1
    )
    assert registry.get_sample_value("kleinserve_in_flight_requests") == 0


# -- the whole request's read timeout -------------------------------------------------------------


def test_a_body_trickled_past_the_read_timeout_is_408() -> None:
    """Headers in time, then a body sent a byte a second: 408 once --request_read_timeout
    has passed since the request's first byte, saying how much of the body had come."""
    connection = Connection(timeout=30.0, read_timeout=60.0)
    connection.send(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n")
    connection.clock.advance(20)
    connection.send(b"Content-Length: 100\r\n\r\n")
    status, error = connection.trickle(b" ", seconds=40)
    assert status == 408 and "60 s" in error and "--request_read_timeout" in error
    assert "39 of 100 bytes" in error


def test_a_large_body_at_a_steady_rate_within_the_read_timeout_is_answered() -> None:
    """A 50 kB body sent in ten pieces five seconds apart (45 s in all, under the 60 s read
    timeout, each gap under the header timeout) is answered 200."""
    connection = Connection(max_body_bytes=100_000, read_timeout=60.0)
    body = PREDICT + b" " * (50_000 - len(PREDICT))  # JSON allows trailing whitespace
    connection.send(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n")
    connection.send(b"Content-Length: %d\r\n\r\n" % len(body))
    for start in range(0, len(body), 5_000):
        connection.clock.advance(5)
        connection.send(body[start : start + 5_000])
    status, _, answer = connection.answer()
    assert (status, json.loads(answer)) == (200, PREDICTED)


def test_the_read_timeout_starts_again_with_each_request() -> None:
    """On a kept-alive connection each request gets the whole read timeout from its own first
    byte: a second request sent 50 s after the first, taking 50 s itself, is answered."""
    connection = Connection(timeout=30.0, read_timeout=60.0)
    connection.send(request())
    first = connection.transport.value()
    connection.clock.advance(50)
    second = request()
    connection.send(second[:-20])  # the head and part of the body
    connection.clock.advance(25)
    connection.send(second[-20:-10])
    connection.clock.advance(25)
    connection.send(second[-10:])
    assert connection.transport.value().count(b"HTTP/1.1 200 OK") == 2
    assert connection.transport.value().startswith(first)


# -- the connection limit --------------------------------------------------------------------------


def test_a_connection_past_the_limit_is_503_while_the_open_ones_are_served(
    logs: CapturedLogs,
) -> None:
    """With --max_connections=2 a third connection is answered 503 with Retry-After and
    Connection: close as it opens, counted and access-logged; the two open ones are still
    served, and once one closes a new connection is served again."""
    site = make_site(max_connections=2, access_log=AccessLog("json"))
    first, second = Connection(site=site), Connection(site=site)
    third = Connection(site=site)
    status, error = third.refused()
    _, headers, _ = third.answer()
    assert status == 503 and headers[b"retry-after"] == b"1"
    assert "limit of 2 connections" in error and "--max_connections" in error
    for held in (first, second):
        held.send(request())
        assert held.answer()[0] == 200
    registry = site.metrics.registry
    assert registry.get_sample_value("kleinserve_refused_connections_total", {"how": "503"}) == 1
    assert registry.get_sample_value("kleinserve_open_connections") == 2
    assert (
        registry.get_sample_value("kleinserve_requests_total", {"route": "other", "code": "503"})
        == 1
    )
    (line,) = [
        json.loads(e["access_line"])
        for e in list(logs)
        if e.get("log_namespace") == "kleinserve.access" and '"status":503' in e["access_line"]
    ]
    assert line["request_id"] == headers[b"x-request-id"].decode()

    third.channel.connectionLost(Failure(ConnectionDone()))
    first.channel.connectionLost(Failure(ConnectionDone()))
    fourth = Connection(site=site)
    fourth.send(request())
    assert fourth.answer()[0] == 200


def test_refusals_past_the_linger_bound_are_closed_at_once() -> None:
    """While max_lingering_refusals refusals are still lingering, a further connection past
    the limit gets no protocol (Twisted closes it) and is counted as closed."""
    site = make_site(max_connections=1)
    site.max_lingering_refusals = 1
    Connection(site=site)
    Connection(site=site).refused()
    assert site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4322)) is None
    registry = site.metrics.registry
    assert registry.get_sample_value("kleinserve_refused_connections_total", {"how": "503"}) == 1
    assert registry.get_sample_value("kleinserve_refused_connections_total", {"how": "closed"}) == 1


def test_an_open_file_limit_below_the_connection_limit_is_named() -> None:
    """An open-file limit without room for --max_connections and the other descriptors is
    a problem naming both and what to change; one with room, or none, is not."""
    problem = open_files_problem(1024, 1024)
    assert problem is not None and "1024" in problem and "LimitNOFILE" in problem
    assert open_files_problem(1024, 1024 + OTHER_DESCRIPTORS) is None
    assert open_files_problem(1024, -1) is None  # RLIM_INFINITY
