"""HTTP/1.1 limits answered with a JSON error, never a silent close: the server's channel.

Twisted's ``HTTPChannel`` enforces its limits by closing the connection with no answer
(a request line or header line too long, too many headers) or with a bare ``400`` and no
body; it answers ``Expect: 100-continue`` itself before anything can look at the size of the
body; and it keeps a connection open as long as the client sends a byte now and then, however
long its request headers take (slowloris). ``LimitedHTTPChannel`` answers each of these with
the status the RFCs name and a ``{"error": "…"}`` body saying which limit and its size:

================================  ======  ==================================================
limit                             status  when
================================  ======  ==================================================
no good bearer token (with        401     at the end of the headers, without reading the body
``--auth_token_file``)                    and without ``100 Continue`` (``service.auth``)
request line over MAX_LENGTH      414     as soon as the line passes the limit
a header line over MAX_LENGTH     431     as soon as the line passes the limit
more than ``maxHeaders`` headers  431     at the header past the limit
request line + headers over       431     as soon as they pass the limit
``totalHeadersSize``
headers not complete in           408     ``request_header_timeout`` seconds after the first
``request_header_timeout``                byte of the request
headers and body not complete in  408     ``request_read_timeout`` seconds after the first byte
``request_read_timeout``                  of the request (a body trickled in, slowloris style)
more than ``max_connections``     503     as the connection opens, before anything is read
connections open                          (with ``Retry-After``; see ``service.http_site``)
Content-Length over the body      413     at the end of the headers, without reading the body
limit                                     and without ``100 Continue``
a chunked or gzip body growing    413     as soon as it passes the limit (gzip: its inflated
past the body limit                       size)
a Content-Encoding other than     415     at the end of the headers
gzip or identity
anything else malformed           400     (what Twisted refuses: a bad request line, header,
                                          Content-Length or chunk)
================================  ======  ==================================================

Every refusal carries the request's id (``X-Request-Id`` and ``"request_id"``: the client's
id if its header had arrived and is usable, else a fresh one) and is counted and
access-logged by the Site like an answered request.

Every refusal ends the connection: the answer carries ``Connection: close``, then the
channel closes its sending side (over TLS, which has no half-close, it leaves the closing to
the client) and reads and discards what the client still sends for at most
``linger_seconds`` before closing. Closing at once while the client is still sending
its body would make the kernel reset the connection, and a reset can destroy the answer
before the client reads it.

Idle keep-alive connections keep Twisted's own idle timeout (``timeOut``, 60 s, restarted
by every byte received); the header and read timeouts run only while a request is arriving,
and each measures from the request's first byte, so a client sending a byte now and then
cannot stretch them. The defaults (``service.options``): ``MAX_LENGTH`` 16 KiB,
``maxHeaders`` 100, ``totalHeadersSize`` 64 KiB, ``--request_header_timeout`` 30 s,
``--request_read_timeout`` 60 s, ``--max_request_bytes`` 64 MiB, ``--max_connections`` 1024.
"""

from __future__ import annotations

import io
import zlib
from typing import Any, Protocol, cast

from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers

from service import codec
from service.access_log import RequestRecord
from service.errors import (
    HeaderFieldsTooLarge,
    InvalidArgument,
    PayloadTooLarge,
    RequestTimeout,
    ServingError,
    UnsupportedMediaType,
    URITooLong,
)
from wire.http import error_body

JSON = b"application/json"
# RFC 9110's reason phrases (Twisted's table lacks 431).
REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}
# zlib's window bits for the gzip container (header and CRC), not a raw or zlib stream.
GZIP_WBITS = 16 + zlib.MAX_WBITS
GZIP_CODINGS = {"gzip", "x-gzip"}  # RFC 9110 8.4.1.3: x-gzip is gzip


def content_coding(headers: Headers) -> str | None:
    """The body's Content-Encoding as "identity" or "gzip"; None for anything else.

    Several codings (``gzip, br``) are refused as a whole: only one layer of gzip is inflated.
    """
    codings = [
        coding.strip().lower()
        for value in headers.getRawHeaders(b"content-encoding", [])
        for coding in value.decode("latin-1").split(",")
    ]
    codings = [c for c in codings if c not in ("", "identity")]
    if not codings:
        return "identity"
    if len(codings) == 1 and codings[0] in GZIP_CODINGS:
        return "gzip"
    return None


def head_error(headers: Headers, length: int | None, max_body_bytes: int) -> ServingError | None:
    """What is wrong with a request, known from its head alone (before its body is read)."""
    if length is not None and length > max_body_bytes:
        return PayloadTooLarge(
            f"the request body (Content-Length: {length} bytes) is larger than the limit of "
            f"{max_body_bytes} bytes (--max_request_bytes)"
        )
    if content_coding(headers) is None:
        named = b", ".join(headers.getRawHeaders(b"content-encoding", [])).decode("latin-1")
        return UnsupportedMediaType(
            f"Content-Encoding {named!r} is not accepted; send the body as gzip or identity "
            "(uncompressed)"
        )
    return None


class BodyBuffer:
    """A request body kept in memory up to ``limit`` bytes, gzip inflated as it arrives.

    Both the bytes received and, for gzip, the inflated bytes are bounded by ``limit``: zlib
    is never asked for more output than the limit leaves, so a gzip bomb costs at most
    ``limit`` bytes of memory before it is refused. ``write`` and ``finish`` raise the
    ``ServingError`` the client should get.
    """

    def __init__(self, limit: int, *, gzip: bool = False) -> None:
        self.limit = limit
        self.content = io.BytesIO()
        self.size = 0  # bytes in ``content``
        self.received = 0  # bytes received (compressed, for gzip)
        self._inflater = zlib.decompressobj(GZIP_WBITS) if gzip else None

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.limit:
            raise self._too_large("")
        if self._inflater is None:
            self._keep(data)
        else:
            self._inflate(data)

    def finish(self) -> io.BytesIO:
        """The whole body, read from its start; a gzip stream cut short is a 400."""
        if self._inflater is not None and self.received and not self._inflater.eof:
            raise InvalidArgument("the gzip request body ends before its gzip stream does")
        self.content.seek(0)
        return self.content

    def _inflate(self, data: bytes) -> None:
        assert self._inflater is not None
        while data:
            if self._inflater.eof:  # another gzip member follows (as `cat a.gz b.gz`)
                self._inflater = zlib.decompressobj(GZIP_WBITS)
            try:
                out = self._inflater.decompress(data, self.limit - self.size + 1)
            except zlib.error as e:
                raise InvalidArgument(f"the request body is not valid gzip: {e}") from None
            self._keep(out)
            # Input left over: zlib stopped at the output bound (then _keep has raised), or
            # the member ended and another one begins.
            rest = self._inflater.unconsumed_tail or self._inflater.unused_data
            if not out and len(rest) >= len(data):  # no progress: never spin on the reactor
                raise InvalidArgument("the request body is not valid gzip")
            data = rest

    def _keep(self, data: bytes) -> None:
        if self.size + len(data) > self.limit:
            raise self._too_large(" inflated (Content-Encoding: gzip)" if self._inflater else "")
        self.size += len(data)
        self.content.write(data)

    def _too_large(self, how: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body{how} is larger than the limit of {self.limit} bytes "
            "(--max_request_bytes)"
        )


class LimitsSite(Protocol):
    """What the channel reads from its Site (``service.http_site.InferenceSite``)."""

    max_body_bytes: int
    request_header_timeout: float
    request_read_timeout: float
    reactor: Any  # IReactorTime

    def refused(
        self,
        record: RequestRecord,
        *,
        method: bytes,
        path: bytes,
        status: int,
        peer: object,
        bytes_in: int,
        bytes_out: int,
    ) -> None: ...

    def authorize(self, method: bytes, path: bytes, headers: Headers) -> None:
        """Raise the ``ServingError`` (401) of a request that may not be served."""


def refusal_response(error: ServingError, request_id: str) -> bytes:
    """A whole HTTP/1.1 response for a refused request: JSON error, ``Connection: close``,
    its ``X-Request-Id`` (and the error's own headers: ``Retry-After`` when it says when to try
    again, ``WWW-Authenticate`` for a 401).

    ``request_id`` is a usable id (``wire.http.request_id_problem``): no CR or LF can reach
    the head."""
    body = codec.encode_json(error_body(error.message, request_id))
    head = [
        b"HTTP/1.1 %d %s" % (error.status, REASONS.get(error.status, b"Error")),
        b"Content-Type: " + JSON,
        b"Content-Length: %d" % len(body),
        b"Connection: close",
        b"X-Request-Id: " + request_id.encode("ascii"),
    ]
    head.extend(name + b": " + value for name, value in error.response_headers())
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class LimitedHTTPChannel(http.HTTPChannel):
    """Twisted's HTTP/1.1 channel, answering every limit it enforces (table above).

    The limits are class attributes: ``MAX_LENGTH`` (one line), ``maxHeaders``,
    ``totalHeadersSize``; the body limit and the timeouts come from the Site. A Site over its
    connection limit sets ``refusal``: the connection is refused with it as it opens.
    """

    MAX_LENGTH = 16 * 1024  # bytes in the request line, and in any one header line
    maxHeaders = 100
    totalHeadersSize = 64 * 1024  # request line and headers together, with their CRLFs
    linger_seconds = 5.0

    site: LimitsSite
    refusal: ServingError | None = None  # answered as the connection opens (the Site sets it)

    def __init__(self) -> None:
        super().__init__()
        self._head_lines = 0  # non-empty lines of the head so far (the request line first)
        self._head_bytes = 0
        self._header_count = 0
        self._head_timer: IDelayedCall | None = None
        self._read_timer: IDelayedCall | None = None
        self._linger_timer: IDelayedCall | None = None
        self._refused = False
        self._request_line = (b"", b"")  # the request line's method and path, for metrics
        self._head_started = 0.0  # clock seconds when the current request's head began
        self._current: Any = None  # the request whose head or body is arriving, if made yet

    # -- receiving ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.refusal is not None:
            self.refuse(self.refusal)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and dropped
        if self.line_mode and not self._handlingRequest and self._head_timer is None:
            self._request_line = (b"", b"")  # a new request's head begins
            self._current = None
            self._head_started = self.site.reactor.seconds()
            self._head_timer = self.callLater(
                self.site.request_header_timeout, self._head_timed_out
            )
            self._cancel_read_timer()
            self._read_timer = self.callLater(self.site.request_read_timeout, self._read_timed_out)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        self._head_bytes += len(line) + len(self.delimiter)
        if self._head_bytes > self.totalHeadersSize:
            self.refuse(
                HeaderFieldsTooLarge(
                    "the request line and headers together are larger than the limit of "
                    f"{self.totalHeadersSize} bytes"
                )
            )
            return
        if line and self._head_lines == 0:
            parts = line.split(b" ")
            if len(parts) == 3:
                self._request_line = (parts[0], parts[1].split(b"?")[0])
        if line:
            self._head_lines += 1
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._head_lines == 0:
            self.refuse(
                URITooLong(f"the request line is longer than the limit of {self.MAX_LENGTH} bytes")
            )
        else:
            self.refuse(
                HeaderFieldsTooLarge(
                    f"a request header line is longer than the limit of {self.MAX_LENGTH} bytes"
                )
            )

    def headerReceived(self, line: bytes) -> bool:
        self._header_count += 1
        if self._header_count > self.maxHeaders:
            self.refuse(
                HeaderFieldsTooLarge(
                    f"the request has more than the limit of {self.maxHeaders} headers"
                )
            )
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        """The head is complete: stop its timer, and refuse a request without a good token
        (``service.auth``) or a body that cannot be accepted, before Twisted would answer
        ``Expect: 100-continue`` and before any of the body is read."""
        self._cancel_head_timer()
        self._head_lines = self._head_bytes = self._header_count = 0
        request = self.requests[-1]
        method, path = self._request_line
        try:
            self.site.authorize(method, path, request.requestHeaders)
        except ServingError as refused:
            self.refuse(refused)
            return
        error = head_error(request.requestHeaders, self.length, self.site.max_body_bytes)
        if error is not None:
            self.refuse(error)
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self._refused:  # the body was refused part way; the rest is only being drained
            return
        self._cancel_read_timer()  # the whole request is in
        super().allContentReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's refusal of malformed HTTP (a bare 400, no body), as our JSON 400."""
        if not self.line_mode:
            what = "the chunked request body is malformed"
        elif self._head_lines <= 1:
            what = "the request line is not METHOD TARGET HTTP/1.x in printable ASCII"
        else:
            what = "a header, Content-Length or Transfer-Encoding is malformed"
        self.refuse(InvalidArgument(f"malformed HTTP request: {what}"))

    def request_began(self, request: Any) -> None:
        """Twisted made the request object of the head now arriving (``BoundedRequest``
        tells): a refusal from now on answers under its id."""
        self._current = request

    # -- refusing -------------------------------------------------------------------------------

    def refuse(self, error: ServingError) -> None:
        """Answer ``error`` and end the connection (after draining, see the module docstring).

        Called by the channel's own checks and by the request while its body arrives.
        """
        transport = self.transport
        if self._refused or transport is None:
            return
        self._refused = True
        self._cancel_head_timer()
        self._cancel_read_timer()
        self.setTimeout(None)
        self.clearLineBuffer()  # LineReceiver parses nothing more of what it has buffered
        request = self._current
        record = getattr(request, "record", None)
        if record is None:  # refused before a request object existed (e.g. 414)
            record = RequestRecord.begin(None, self._head_started)
        response = refusal_response(error, record.request_id)
        transport.write(response)
        method, path = self._request_line
        self.site.refused(
            record,
            method=method,
            path=path,
            status=error.status,
            peer=transport.getPeer(),
            bytes_in=getattr(request, "received", 0),
            bytes_out=len(response.partition(b"\r\n\r\n")[2]),
        )
        self._networkProducer.unregisterProducer()
        # Looked up on the class: Twisted's TLS transport passes unknown attributes through
        # to the TCP connection under it, and half-closing that under TLS cut the encrypted
        # answer still buffered above it (the client saw the connection close without it).
        half_close = getattr(type(transport), "loseWriteConnection", None)
        if half_close is not None:
            half_close(transport)
        # TLS has no half-close, and closing at once (or sending TLS's close_notify, after
        # which the client's body still arriving is an error that resets the connection)
        # can destroy the answer before the client reads it: the answer's Connection: close
        # has the client close, and the same linger bounds how long it may take.
        self._linger_timer = self.callLater(self.linger_seconds, self._stop_lingering)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        timeout = self.site.request_header_timeout
        self.refuse(
            RequestTimeout(
                f"the request headers were not complete within {timeout:g} s "
                "(--request_header_timeout)"
            )
        )

    def _read_timed_out(self) -> None:
        self._read_timer = None
        timeout = self.site.request_read_timeout
        what = "its headers were still arriving"
        if not self.line_mode:  # the head is in: the body is what is late
            received = getattr(self._current, "received", 0)
            expected = f" of {self.length}" if self.length else ""  # chunked: not known
            what = f"its body was still arriving ({received}{expected} bytes had come)"
        self.refuse(
            RequestTimeout(
                f"the request was not received whole within {timeout:g} s "
                f"(--request_read_timeout); {what}"
            )
        )

    def _stop_lingering(self) -> None:
        self._linger_timer = None
        cast(ITCPTransport, self.transport).abortConnection()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_head_timer()
        self._cancel_read_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connectionLost(reason)
