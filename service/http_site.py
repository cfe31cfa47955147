"""The HTTP server under the routes: its Site, and the request that holds a bounded body.

``InferenceSite`` serves ``InferenceAPI``'s resource (``service.http``) over
``LimitedHTTPChannel`` (``service.http_limits``, which answers the HTTP limits before a route
runs); ``BoundedRequest`` holds each body in memory up to the limit, against the site's
``RequestBudget`` (``service.budget``). The site counts every answered or refused request,
writes its access-log line (``service.access_log``), and tracks its connections so a stop
can drain them (``service.lifecycle``). Every request is filed under a request id, echoed
as ``X-Request-Id`` on its answer.

Connections are bounded (``--max_connections``). Twisted's own bound
(``policies.LimitTotalConnectionsFactory``) closes a connection past it without a word; here
it is answered ``503`` with ``Retry-After`` and ``Connection: close`` as it opens, counted and
access-logged like any refusal, while the connections already open keep being served. An
answered refusal lingers while the client may still be sending (``LimitedHTTPChannel``), so
at most ``max_lingering_refusals`` are answered at once; past that a new connection is closed
at once with no answer, which bounds the descriptors a flood of connections can hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.web import server
from twisted.web.http_headers import Headers

from service.access_log import AccessLog, RequestRecord, entry, peer_of
from service.auth import HTTPAuth
from service.budget import BodyHold, RequestBudget
from service.errors import Cancelled, ServingError, Unavailable
from service.http_limits import BodyBuffer, LimitedHTTPChannel, content_coding
from service.http_request import note_target
from service.lifecycle import InFlight
from service.request_metrics import HTTP_ROUTES

if TYPE_CHECKING:
    from service.http import InferenceAPI

#: The ``route`` label of a request no route took (kleinserve_requests_total).
OTHER_ROUTE = "other"

IDLE_GRACE = 1.0
"""On stop, seconds an idle keep-alive connection is kept for a request already on its way."""


class BoundedRequest(server.Request):
    """A request whose body is held in memory up to a limit, gzip inflated as it arrives.

    Twisted would spool bodies over 100 kB to a temporary file (a disk write per large tensor
    request) and accept any size; this keeps up to ``max_body_bytes`` in memory (after
    inflating, for ``Content-Encoding: gzip``) and, the moment a body passes that, has the
    channel answer 413 and close (``LimitedHTTPChannel.refuse``), never holding the excess.
    A Content-Length over the limit is refused by the channel before any of the body is read.

    The body also takes a share of the site's ``RequestBudget`` (``body_hold``): its
    ``Content-Length`` when the headers arrive, or, chunked, what has arrived so far. A share
    the budget cannot give is answered 503 with Retry-After by the channel at once. The share
    is given back when the request is answered or its client leaves, if decoding did not give
    it back first.
    """

    max_body_bytes = 64 * 1024 * 1024
    _body: BodyBuffer | None = None
    _refused = False
    body_hold: BodyHold | None = None
    received = 0  # body bytes received, as sent (gzip: compressed)
    _record: RequestRecord | None = None
    _site: InferenceSite | None = None  # set once the whole request is in, and routed

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        site = getattr(channel, "site", None)
        self._started = site.reactor.seconds() if site is not None else 0.0
        began = getattr(channel, "request_began", None)
        if began is not None:  # LimitedHTTPChannel: a refusal from now on is this request's
            began(self)

    @property
    def record(self) -> RequestRecord:
        """The request's access-log record and id, made the first time it is asked for (by
        then the id is read from the headers that have arrived)."""
        if self._record is None:
            sent = self.requestHeaders.getRawHeaders(b"x-request-id")
            deadline = self.requestHeaders.getRawHeaders(b"x-request-deadline-ms", [None])[0]
            self._record = RequestRecord.begin(sent, self._started, deadline)
        return self._record

    def process(self) -> None:
        site = self._site = cast(Any, self.channel).site
        site.in_flight.started()
        self.notifyFinish().addBoth(site.in_flight.finished)
        if site.stopping:  # arrived on a kept-alive connection while the port closes
            _close_after(self)
        super().process()

    def connectionLost(self, reason: Any) -> None:
        """The connection closed: a request the routes took and had not finished answering
        is still counted and access-logged, so no request a client sent whole goes unseen:
        as ``499`` if none of its answer was written (the client closed first; nginx's code,
        and what a cancelled gRPC call is logged as), else with the status it was being
        answered with and the bytes that went out (as nginx does)."""
        super().connectionLost(reason)
        site = self._site
        if site is not None and not self.finished:
            if not self.startedWriting:
                self.code = Cancelled.status
            site.log(self)

    def gotLength(self, length: int | None) -> None:
        gzip = content_coding(self.requestHeaders) == "gzip"
        self._body = BodyBuffer(self.max_body_bytes, gzip=gzip)
        self.content = self._body.content  # type: ignore[assignment]  # Twisted declares it None until here
        site: InferenceSite = cast(Any, self.channel).site
        hold = self.body_hold = site.budget.hold()
        self.notifyFinish().addBoth(hold.finished)
        self.notifyFinish().addBoth(lambda _: site.body_finished(self.received))
        if length and not hold.reserve(length):
            self._refuse(_busy(hold))

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused or self._body is None:
            return
        self.received += len(data)
        hold = self.body_hold
        if hold is not None and not hold.reserve(self.received):  # a chunked body past it
            self._refuse(_busy(hold))
            return
        try:
            self._body.write(data)
        except ServingError as error:
            self._refuse(error)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """The body is complete: a gzip stream cut short is refused, not routed."""
        if self._body is not None:
            try:
                self.content = self._body.finish()  # type: ignore[assignment]
            except ServingError as error:
                self._refuse(error)
                return
        super().requestReceived(command, path, version)

    def _refuse(self, error: ServingError) -> None:
        self._refused = True
        cast(LimitedHTTPChannel, self.channel).refuse(error)

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            # No Server header at all (Twisted sends "TwistedWeb/<version>"): naming the
            # software and its version only helps scanners, and TF Serving's REST API, whose
            # clients this server stands in for, sends none either.
            self.responseHeaders.removeHeader(b"server")
            self.responseHeaders.setRawHeaders(b"x-request-id", [self.record.request_id.encode()])
        super().write(data)


class InferenceSite(server.Site):
    """Our own Site: no tracebacks to clients, HTTP limits answered (``LimitedHTTPChannel``),
    bounded bodies, request metrics, an access-log line per answer (``access_log``; None:
    none), bearer tokens checked before a body is read (``auth``; None: every request is
    served).

    HTTP/1.1 only, as before: Twisted's HTTP/2 needs the ``h2`` package, which is not installed.
    """

    displayTracebacks = False
    noisy = False  # no "Starting factory" lines
    protocol = LimitedHTTPChannel  # type: ignore[assignment]
    max_lingering_refusals = 64  # refusals past max_connections being answered at once

    def __init__(
        self,
        api: InferenceAPI,
        *,
        max_body_bytes: int,
        request_header_timeout: float = 30.0,
        request_read_timeout: float = 60.0,
        max_connections: int = 1024,
        in_flight: InFlight | None = None,
        budget: RequestBudget | None = None,
        access_log: AccessLog | None = None,
        auth: HTTPAuth | None = None,
        reactor: Any = None,
        count_requests: bool = True,
    ) -> None:
        """``count_requests=False``: the site of the main process's socket for front
        processes (``--http_processes``), whose requests (and their models' request metrics)
        the front processes count."""
        # parsePOSTFormSubmission=False: Twisted would otherwise parse every POST's content type
        # with the email package (~10% of a small predict's reactor time), run parse_qs over
        # curl -d bodies, and buffer multipart uploads whole; routes parse what they accept.
        super().__init__(
            api.resource(),
            requestFactory=type("Request", (BoundedRequest,), {"max_body_bytes": max_body_bytes}),
            parsePOSTFormSubmission=False,
            reactor=reactor,  # None: the global reactor (Twisted's default)
        )
        self.max_body_bytes = max_body_bytes
        self.request_header_timeout = request_header_timeout
        self.request_read_timeout = request_read_timeout
        self.max_connections = max_connections
        self.access_log = access_log or AccessLog("off")
        self.auth = auth
        self.metrics = api.metrics
        self._requests = api.metrics.requests
        self._model_requests = api.metrics.model_requests
        self._route_of = api.route_of
        self._count = count_requests
        self.in_flight = in_flight or InFlight()
        self.budget = budget or RequestBudget(4 * max_body_bytes)
        api.metrics.request_body_bytes.set_function(lambda: self.budget.held)
        self._decoder = api.decoder
        api.metrics.in_flight.set_function(lambda: self.in_flight.count)
        self.stopping = False
        self._connections: set[Any] = set()
        self._refusing: set[Any] = set()  # connections past max_connections, being refused
        self._all_closed: list[Deferred] = []
        api.metrics.open_connections.set_function(lambda: self.open_connections)

    @property
    def open_connections(self) -> int:
        """Connections being served (those being refused are not)."""
        return len(self._connections) - len(self._refusing)

    def buildProtocol(self, addr: Any) -> Any:
        over_limit = self.open_connections >= self.max_connections
        if over_limit and len(self._refusing) >= self.max_lingering_refusals:
            self.metrics.refused_connections.labels("closed").inc()
            return None  # Twisted closes the connection
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self._connections.add(protocol)
            if over_limit:
                self._refusing.add(protocol)
                self.metrics.refused_connections.labels("503").inc()
                protocol.refusal = Unavailable(
                    f"the server has its limit of {self.max_connections} connections open "
                    "(--max_connections); retry later or on another server",
                    retry_after=1,
                )
            lost = protocol.connectionLost

            def connection_lost(reason: Any, protocol: Any = protocol) -> None:
                self._connections.discard(protocol)
                self._refusing.discard(protocol)
                lost(reason)
                if not self._connections:
                    waiters, self._all_closed = self._all_closed, []
                    for d in waiters:
                        d.callback(None)

            protocol.connectionLost = connection_lost
        return protocol

    def all_closed(self) -> Deferred:
        """Fires once no connection is open (at once if none is)."""
        d: Deferred = Deferred()
        if self._connections:
            self._all_closed.append(d)
        else:
            d.callback(None)
        return d

    def stop_keeping_alive(self, idle_grace: float = IDLE_GRACE) -> None:
        """The port is closing: answers from now on carry ``Connection: close`` and their
        connections close after them; a connection with no request under way closes once it
        has been idle ``idle_grace`` seconds (not at once: a request it was sent may still be
        unread, and closing with unread data would reset it)."""
        self.stopping = True
        for protocol in list(self._connections):
            # Site wraps each HTTPChannel in a proxy that could switch to HTTP/2.
            channel = getattr(protocol, "_channel", protocol)
            requests = getattr(channel, "requests", [])
            for request in requests:
                _close_after(request)
            if not requests:  # not persistent = False: Twisted would drop a request arriving
                channel.setTimeout(idle_grace)

    def authorize(self, method: bytes, path: bytes, headers: Headers) -> None:
        """Raise ``Unauthenticated`` for a request that needs a token and has no good one
        (``service.auth``); the channel asks once the headers are in."""
        if self.auth is not None:
            self.auth.check(method, path, headers.getRawHeaders(b"authorization", []))

    def body_finished(self, received: int) -> None:
        """A request ended (answered, or its client left) after receiving ``received`` bytes;
        after a large one, memory is given back (at most every few seconds)."""
        if received >= self._decoder.off_reactor_bytes:
            self._decoder.large_request_done()

    def log(self, request: Any) -> None:
        """Count each answered request under the label of the route that took it
        (``"other"`` when none did) and, an inference request, under its model
        (``service.request_metrics``, from its access-log record); and write its access-log
        line (Twisted's own access-log line is not written)."""
        label = getattr(request, "route_label", OTHER_ROUTE)
        if self._count:
            self._requests.labels(label, str(request.code)).inc()
        record = getattr(request, "record", None)  # None: not a BoundedRequest
        if record is None:
            return
        finished = self.reactor.seconds()
        api = HTTP_ROUTES.get(label)
        if api is not None and self._count:  # else the front process counts it
            self._model_requests.observe(
                api, record.model, record.version, request.code, finished - record.started
            )
        if self.access_log.enabled:
            self.access_log.write(
                entry(
                    record,
                    finished=finished,
                    peer=peer_of(request.getClientAddress()),
                    method=request.method,
                    path=request.path,
                    route=label,
                    status=request.code,
                    bytes_in=request.received,
                    bytes_out=request.sentLength,
                )
            )

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
    ) -> None:
        """Count a request the channel refused (a limit) like an answered one, and write its
        access-log line.

        No route ran, so its label is a best effort: the route the request line's method and
        path match in the application's own route table, ``"other"`` when none does (or
        the line never arrived whole); the model and version its URL names are noted too.
        """
        label, args = self._route_of(method, path)
        if self._count:
            self._requests.labels(label, str(status)).inc()
        if record.model is None:
            note_target(record, args)
        finished = self.reactor.seconds()
        api = HTTP_ROUTES.get(label)
        if api is not None and self._count:
            self._model_requests.observe(
                api, record.model, record.version, status, finished - record.started
            )
        if self.access_log.enabled:
            self.access_log.write(
                entry(
                    record,
                    finished=finished,
                    peer=peer_of(peer),
                    method=method,
                    path=path,
                    route=label,
                    status=status,
                    bytes_in=bytes_in,
                    bytes_out=bytes_out,
                )
            )


#: File descriptors the process needs besides its HTTP connections: model files, gRPC,
#: Consul, logs, refusals lingering (``InferenceSite.max_lingering_refusals``).
OTHER_DESCRIPTORS = 256


def open_files_problem(max_connections: int, open_files_limit: int) -> str | None:
    """Why the process's open-file limit would refuse connections before --max_connections
    does (the kernel's refusal is a silent close, not a 503), or None."""
    needed = max_connections + OTHER_DESCRIPTORS
    if open_files_limit < 0 or open_files_limit >= needed:  # < 0: RLIM_INFINITY
        return None
    return (
        f"the open-file limit ({open_files_limit}) leaves no room for --max_connections="
        f"{max_connections} and the server's other {OTHER_DESCRIPTORS} descriptors: raise it to "
        f"{needed} or more (ulimit -n, systemd's LimitNOFILE) or lower --max_connections, or "
        "connections past it are refused by the kernel without an answer"
    )


def _busy(hold: BodyHold) -> Unavailable:
    return Unavailable(
        "the server is busy with large requests: their bodies being received or decoded "
        f"would pass --max_inflight_request_bytes ({hold.limit} bytes); retry later",
        retry_after=1,
    )


def _close_after(request: Any) -> None:
    """Answer this request with ``Connection: close`` and close the connection after it."""
    if not request.startedWriting:
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
    request.channel.persistent = False
