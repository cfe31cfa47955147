"""The HTTP API: TensorFlow Serving's REST API on Klein, plus health and metrics.

Routes (TF Serving's REST API, plus uploads and operations):
  POST /v1/models/{name}[/versions/{v} | /labels/{l}]:predict
  POST /v1/models/{name}[/versions/{v} | /labels/{l}]:classify   tf.Examples (service.examples)
  POST /v1/models/{name}[/versions/{v} | /labels/{l}]:regress    tf.Examples (service.examples)
  POST /v1/models/{name}[/versions/{v} | /labels/{l}]:classify_image   an image upload
  POST /          the same, for the default model (--default_model, or the only one served)
  GET  /v1/models/{name}[/versions/{v} | /labels/{l}]            version status
  GET  /v1/models/{name}[/versions/{v} | /labels/{l}]/metadata   signatures
  GET  /healthz   200 while the server serves; 503 when a batch has run past
                  --inference_stall_seconds or a queue stopped moving (service.health)
  GET  /readyz    200 when every model (of the start-up config, or added later and since
                  served) has an AVAILABLE version, 503 before that, while draining on
                  stop and while /healthz fails,
                  429 while a batching queue is fuller than --overload_fraction

A request holds the version it was routed to (``LoadedVersion.lease``) until it is
answered, so a hot swap never unloads a version under a request.
  GET  /metrics   Prometheus text format

The HTTP limits (line and header sizes, the header timeout, body size and encoding) are
answered by the channel, ``service.http_limits.LimitedHTTPChannel``, before a route runs.

Everything here runs on the reactor thread and stays cheap: parse, validate,
queue, encode. TensorFlow runs behind ``LoadedVersion.predict``; images are decoded
on ``ImageDecoder``'s own threads, large JSON bodies on ``BodyDecoder``'s. Bodies being
received or decoded count against one ``RequestBudget`` (``service.budget``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, TypeVar, cast

import attrs
import numpy as np
from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from service import codec, examples
from service.budget import BodyHold, RequestBudget
from service.decoding import BodyDecoder
from service.errors import (
    InvalidArgument,
    NotFound,
    ServingError,
    Unavailable,
    UnsupportedMediaType,
)
from service.health import Health
from service.http_limits import BodyBuffer, LimitedHTTPChannel, content_coding
from service.images import (
    Abandonment,
    ImageDecoder,
    ImagePlan,
    class_scores,
    parse_upload,
    top_predictions,
)
from service.lifecycle import InFlight
from service.metrics import Metrics
from service.repository import LoadedVersion, ModelRepository
from wire.paths import INT64_MAX
from wire.paths import TARGET as _TARGET

log = Logger()

T = TypeVar("T")

JSON = b"application/json"
# Content types a JSON body may come with: curl -d sends form-urlencoded, TF Serving ignores the type.
JSON_CONTENT_TYPES = {
    b"",
    b"application/json",
    b"text/json",
    b"text/plain",
    b"application/x-www-form-urlencoded",
}
# Content types of an image upload: a form, or the image itself ("image/*" matches any image type).
UPLOAD_CONTENT_TYPES = {b"multipart/form-data", b"image/*", b"application/octet-stream"}
UPLOAD_HINT = (
    "send the image as multipart/form-data (curl -F data=@picture.jpg) or as the body with "
    "its image content type (curl -H 'Content-Type: image/jpeg' --data-binary @picture.jpg)"
)

# Echoed text is cut to this many characters: an error message stays short whatever was sent.
ECHO_CHARS = 200


@attrs.frozen
class Target:
    """What a /v1/models/… path names."""

    name: str
    version: int | None
    label: str | None
    verb: str  # "", ":predict", ":classify_image", ":classify", ":regress", "/metadata", …


def parse_target(method: str, path: str) -> Target:
    """What a ``/v1/models/<path>`` URL names; anything else is an InvalidArgument (400)."""
    match = _TARGET.fullmatch(path)
    if match is None:
        raise InvalidArgument(f"Malformed request: {method} /v1/models/{_echo(path)}")
    version = match["version"]
    return Target(
        match["name"],
        None if version is None else parse_version(version, method, path),
        match["label"],
        match["verb"] or "",
    )


def parse_version(text: str, method: str, path: str) -> int:
    """A version number as TF Serving takes it: ASCII decimal digits, within int64.

    ``str.isdigit`` and ``int`` accept far more (superscripts, other scripts' digits) and
    ``int`` fails past 4,300 digits, so the digits are checked here, and counted before
    ``int`` sees them.
    """
    significant = text.lstrip("0") or "0"
    if not (text.isascii() and text.isdigit() and len(significant) <= len(str(INT64_MAX))) or (
        int(significant) > INT64_MAX
    ):
        raise InvalidArgument(
            f"Malformed request: {method} /v1/models/{_echo(path)}: the version must be a "
            f"decimal number (digits 0-9) that fits in 64 bits, not {_echo(text)!r}"
        )
    return int(significant)


def _echo(text: str) -> str:
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "…"


class InferenceAPI:
    """The Klein application; its state lives on the instance, not in module globals."""

    app = Klein()
    # Werkzeug would answer "/v1/models//m" with a redirect to "/v1/models/m"; TF Serving's
    # REST API never redirects, and a client following one would resend its body elsewhere.
    app.url_map.merge_slashes = False

    def __init__(
        self,
        repository: ModelRepository,
        *,
        metrics: Metrics,
        overload_fraction: float = 0.8,
        images: ImageDecoder | None = None,
        default_model: str | None = None,
        health: Health | None = None,
        decoder: BodyDecoder | None = None,
    ) -> None:
        self.repository = repository
        self.health = health or Health(repository, stall_seconds=60.0)
        self.metrics = metrics
        self.overload_fraction = overload_fraction
        self.images = images
        self.default_model = default_model
        # Without a pool of its own (tests), every body is decoded where it is read.
        self.decoder = decoder or BodyDecoder(reactor=repository.clock, executor=maybeDeferred)

    def resource(self) -> IResource:
        return UTF8URLs(self.app.resource())

    def _deadline(self, request: IRequest) -> float | None:
        """The client's deadline, from ``X-Request-Deadline-Ms`` (milliseconds left), as clock time."""
        header = request.getHeader(b"x-request-deadline-ms")
        if header is None:
            return None
        try:
            remaining = float(header)
        except ValueError:
            raise InvalidArgument(
                f"X-Request-Deadline-Ms must be a number of milliseconds, not {header!r}"
            ) from None
        return self.repository.clock.seconds() + remaining / 1000

    # -- errors ---------------------------------------------------------------------------------

    @app.handle_errors(ServingError)
    def _serving_error(self, request: IRequest, failure: Any) -> bytes:
        error: ServingError = failure.value
        return _error_response(request, error)

    @app.handle_errors(HTTPException)
    def _routing_error(self, request: IRequest, failure: Any) -> bytes:
        """Klein's own refusals (no such path 404, another method 405) as JSON, not as 500s."""
        error: HTTPException = failure.value
        request.setResponseCode(error.code or 500)
        request.setHeader(b"content-type", JSON)
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            request.setHeader(b"allow", ", ".join(error.valid_methods).encode())
        method, path = (
            request.method.decode(errors="replace"),
            request.path.decode(errors="replace"),
        )
        return codec.encode_json({"error": f"{error.name}: {method} {path}"})

    @app.handle_errors(Exception)
    def _unexpected_error(self, request: IRequest, failure: Any) -> bytes:
        log.failure("unexpected error answering {uri}", failure, uri=request.uri)
        return _error_response(request, ServingError("internal error; see the server log"))

    # -- TF Serving REST API --------------------------------------------------------------------

    @app.route("/v1/models/<path:path>", methods=["POST"])
    async def post_model(self, request: server.Request, path: str) -> bytes:
        target = parse_target("POST", path)
        if target.verb == ":classify_image":
            return await self._classify_image(request, target)
        if target.verb in (":classify", ":regress"):
            return await self._classify_or_regress(request, target, target.verb[1:])
        if target.verb != ":predict":
            raise InvalidArgument(
                f"Malformed request: POST /v1/models/{path}; this server supports :predict, "
                ":classify, :regress and :classify_image"
            )
        version = self._lookup(target)
        with version.lease():  # a swap unloads this version only after the answer
            decoded = await self._decode_json(
                request, lambda body: codec.decode_body(body, version.signature)
            )
            signature = version.signature(decoded.signature_name)
            outputs = await self._predict(request, version, signature.name, decoded.inputs)
        request.setHeader(b"content-type", JSON)
        return codec.encode_predict(outputs, decoded.row_format)

    async def _decode_json(self, request: server.Request, decode: Callable[[bytes], T]) -> T:
        """Read the JSON body and decode it (a large one on the decoder's threads).

        The body's bytes count against the request budget until the decode ends, and nothing
        keeps them after: the caller holds only what ``decode`` made.
        """
        body = read_body(request, JSON_CONTENT_TYPES)
        decoding = Deferred.fromCoroutine(self.decoder.decode(body, decode))
        del body  # the decode holds it; a route cancelled meanwhile need not
        hold: BodyHold | None = getattr(request, "body_hold", None)
        if hold is not None:  # None: a request type without a budget (tests' plain Site)
            decoding = hold.decoding(decoding)
        decoded: T = await decoding
        return decoded

    async def _predict(
        self,
        request: server.Request,
        version: LoadedVersion,
        signature_name: str,
        inputs: dict[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """Queue one request's inputs; a client that goes away drops them from the queue."""
        queued = version.predict(signature_name, inputs, self._deadline(request))
        request.notifyFinish().addErrback(lambda _: queued.cancel())
        return await queued

    async def _classify_or_regress(
        self, request: server.Request, target: Target, verb: str
    ) -> bytes:
        """TF Serving's Classify and Regress: the examples run as k rows of the DT_STRING input."""
        version = self._lookup(target)
        with version.lease():  # a swap unloads this version only after the answer
            decoded = await self._decode_json(
                request, lambda body: examples.decode_examples(body, verb)
            )
            signature = examples.signature_for(
                version.require().signatures, decoded.signature_name, verb
            )
            outputs = await self._predict(
                request, version, signature.name, {examples.INPUTS: decoded.serialized}
            )
        request.setHeader(b"content-type", JSON)
        return examples.encode_results(outputs, verb, len(decoded.serialized))

    @app.route("/v1/models/<path:path>", methods=["GET"])
    def get_model(self, request: IRequest, path: str) -> bytes:
        target = parse_target("GET", path)
        request.setHeader(b"content-type", JSON)
        if target.verb == "":
            status = self.repository.status(target.name, target.version, target.label)
            return codec.encode_json({"model_version_status": status})
        if target.verb == "/metadata":
            version = self._lookup(target)
            return codec.encode_json(
                {
                    "model_spec": {
                        "name": target.name,
                        "signature_name": "",
                        "version": str(version.version),
                    },
                    "metadata": {
                        "signature_def": {"signature_def": version.require().signature_defs}
                    },
                }
            )
        raise InvalidArgument(f"Malformed request: GET /v1/models/{path}")

    # -- image uploads (service.images) --------------------------------------------------------

    @app.route("/", methods=["POST"])
    async def post_upload(self, request: server.Request) -> bytes:
        """An image upload for the default model: ``curl -F data=@picture.jpg http://host:8501/``."""
        return await self._classify_image(
            request, Target(self._default_model(), None, None, ":classify_image")
        )

    def _default_model(self) -> str:
        if self.default_model is not None:
            return self.default_model
        if len(self.repository.configs) == 1:
            (name,) = self.repository.configs
            return name
        raise NotFound(
            "this server serves several models and has no --default_model: "
            "POST to /v1/models/NAME:classify_image"
        )

    async def _classify_image(self, request: server.Request, target: Target) -> bytes:
        if self.images is None:
            raise Unavailable("image uploads are not enabled on this server")
        version = self._lookup(target)
        with version.lease():  # decoding awaits: the version must outlive it
            return await self._classify_leased(request, target, version, self.images)

    async def _classify_leased(
        self, request: server.Request, target: Target, version: LoadedVersion, images: ImageDecoder
    ) -> bytes:
        body = read_body(request, UPLOAD_CONTENT_TYPES, hint=UPLOAD_HINT)
        args: dict[bytes, list[bytes]] = request.args or {}
        query_top_k = args.get(b"top_k")
        upload = parse_upload(
            body,
            (request.getHeader(b"content-type") or b"").decode("latin-1"),
            query_top_k[-1].decode("utf-8", errors="replace") if query_top_k else None,
        )
        servable = version.require()
        plan = await images.plan(servable, target.name)
        abandonment = Abandonment()
        request.notifyFinish().addErrback(abandonment.set)  # client gone: skip its decodes
        arrays = await images.decode(plan, upload.images, abandonment)
        scores = await _run_images(version, plan, arrays, request, self._deadline(request))
        predictions = [top_predictions(row, plan.labels, upload.top_k) for row in scores]
        answer: dict[str, Any] = {"model": target.name, "version": str(version.version)}
        if len(predictions) == 1:
            answer["predictions"] = predictions[0]
        else:
            answer["results"] = [{"predictions": p} for p in predictions]
        request.setHeader(b"content-type", JSON)
        return codec.encode_json(answer)

    def _lookup(self, target: Target) -> LoadedVersion:
        """The AVAILABLE version a request names (404 unknown, 400 unknown label, 503 not
        available); take its ``lease()`` before the first await."""
        return self.repository.lookup(target.name, target.version, target.label)

    # -- operations -----------------------------------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", JSON)
        problem = self.health.problem()
        if problem is not None:
            request.setResponseCode(503)
            return codec.encode_json({"status": "stalled", "error": problem})
        return codec.encode_json({"status": "alive"})

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", JSON)
        models = {
            name: [v.status() for v in versions.values()]
            for name, versions in self.repository.versions.items()
        }
        if self.health.draining:
            request.setResponseCode(503)
            return codec.encode_json({"status": "draining", "models": models})
        problem = self.health.problem()
        if problem is not None:
            request.setResponseCode(503)
            return codec.encode_json({"status": "stalled", "error": problem, "models": models})
        if not self.repository.ready:
            request.setResponseCode(503)
            return codec.encode_json({"status": "loading", "models": models})
        load = max((queue.load for queue in self.repository.queues()), default=0.0)
        if load > self.overload_fraction:
            # Consul marks a 429 check "warning": ?passing leaves this instance out until it recovers.
            request.setResponseCode(429)
            return codec.encode_json(
                {"status": "overloaded", "queue_fill": round(load, 3), "models": models}
            )
        return codec.encode_json({"status": "ready", "models": models})

    @app.route("/metrics", methods=["GET"])
    def metrics_page(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.metrics.registry)


async def _run_images(
    version: LoadedVersion,
    plan: ImagePlan,
    arrays: list[np.ndarray],
    request: server.Request,
    deadline: float | None = None,
) -> list[np.ndarray]:
    """Run decoded images through the version's batching queue; one score vector per image.

    k images of one shape for a batchable input are one request of k rows; otherwise each
    image is a request of its own (they still share batches when the queue can merge them).
    """
    if plan.batched and len({a.shape for a in arrays}) == 1:
        groups = [list(range(len(arrays)))]
        submits = [{plan.input: np.stack(arrays)}]
    else:
        groups = [[i] for i in range(len(arrays))]
        submits = [{plan.input: a} for a in arrays]
    queued: list[Deferred] = []
    try:
        for inputs in submits:
            queued.append(version.predict(plan.signature, inputs, deadline))
    except ServingError:  # e.g. the queue is full: drop what was already queued
        for d in queued:
            d.addErrback(lambda _: None)  # the CancelledError below is expected
            d.cancel()
        raise

    def cancel_all(_: object) -> None:  # the client went away
        for d in queued:
            d.cancel()

    request.notifyFinish().addErrback(cancel_all)
    results = await DeferredList(queued, consumeErrors=True)
    scores: list[np.ndarray] = [np.empty(0)] * len(arrays)
    for group, (ok, value) in zip(groups, results, strict=True):
        if not ok:
            assert isinstance(value, Failure)
            value.raiseException()
        for i, row in zip(group, class_scores(value[plan.output], len(group)), strict=True):
            scores[i] = row
    return scores


def _error_response(request: IRequest, error: ServingError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", JSON)
    if error.retry_after is not None:
        request.setHeader(b"retry-after", str(error.retry_after).encode())
    return codec.encode_json({"error": error.message})


def read_body(
    request: IRequest, content_types: set[bytes], *, hint: str = "send JSON (application/json)"
) -> bytes:
    """The request body, after checking its type (its size is checked as it arrives, by
    ``BoundedRequest``).

    ``content_types`` may hold a wildcard subtype, ``image/*``, accepting every ``image/…``.
    """
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    wildcard = content_type.partition(b"/")[0] + b"/*"
    if content_type not in content_types and (
        b"/" not in content_type or wildcard not in content_types
    ):
        raise UnsupportedMediaType(
            f"content type {content_type.decode(errors='replace')!r} is not accepted here; {hint}"
        )
    # The bytes without a copy (BytesIO shares its buffer); the request keeps none of them.
    content = cast(io.BytesIO, request.content)
    request.content = io.BytesIO()
    return content.getvalue()


IDLE_GRACE = 1.0
"""On stop, seconds an idle keep-alive connection is kept for a request already on its way."""


class UTF8URLs(Resource):
    """Answers a URL that is not UTF-8 once percent-decoded with a JSON 400, before Klein.

    Klein would answer it with a text/plain 400 (and log a traceback): Klein's router needs
    text, and the API promises a JSON body for every error.
    """

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: IRequest) -> bytes | int:
        segments = [*(request.prepath or []), *(request.postpath or [])]
        for part, value in (("path", b"/".join(segments)), ("host", request.getRequestHostname())):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                shown = (request.path if part == "path" else value).decode("ascii", "replace")
                request.setResponseCode(400)
                request.setHeader(b"content-type", JSON)
                return codec.encode_json(
                    {
                        "error": f"the URL {part} {_echo(shown)!r} is not UTF-8 once its %XX "
                        "escapes are decoded; percent-encode the UTF-8 bytes of the text"
                    }
                )
        return cast(int | bytes, self._inner.render(request))


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
    _received = 0

    def process(self) -> None:
        site = cast(Any, self.channel).site
        site.in_flight.started()
        self.notifyFinish().addBoth(site.in_flight.finished)
        if site.stopping:  # arrived on a kept-alive connection while the port closes
            _close_after(self)
        super().process()

    def gotLength(self, length: int | None) -> None:
        gzip = content_coding(self.requestHeaders) == "gzip"
        self._body = BodyBuffer(self.max_body_bytes, gzip=gzip)
        self.content = self._body.content  # type: ignore[assignment]  # Twisted declares it None until here
        site: InferenceSite = cast(Any, self.channel).site
        hold = self.body_hold = site.budget.hold()
        self.notifyFinish().addBoth(hold.finished)
        self.notifyFinish().addBoth(lambda _: site.body_finished(self._received))
        if length and not hold.reserve(length):
            self._refuse(_busy(hold))

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused or self._body is None:
            return
        self._received += len(data)
        hold = self.body_hold
        if hold is not None and not hold.reserve(self._received):  # a chunked body past it
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
        super().write(data)


class InferenceSite(server.Site):
    """Our own Site: no tracebacks to clients, HTTP limits answered (``LimitedHTTPChannel``),
    bounded bodies, request metrics.

    HTTP/1.1 only, as before: Twisted's HTTP/2 needs the ``h2`` package, which is not installed.
    """

    displayTracebacks = False
    noisy = False  # no "Starting factory" lines
    protocol = LimitedHTTPChannel  # type: ignore[assignment]

    def __init__(
        self,
        api: InferenceAPI,
        *,
        max_body_bytes: int,
        request_header_timeout: float = 30.0,
        in_flight: InFlight | None = None,
        budget: RequestBudget | None = None,
        reactor: Any = None,
    ) -> None:
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
        self._requests = api.metrics.requests
        self.in_flight = in_flight or InFlight()
        self.budget = budget or RequestBudget(4 * max_body_bytes)
        api.metrics.request_body_bytes.set_function(lambda: self.budget.held)
        self._decoder = api.decoder
        api.metrics.in_flight.set_function(lambda: self.in_flight.count)
        self.stopping = False
        self._connections: set[Any] = set()
        self._all_closed: list[Deferred] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self._connections.add(protocol)
            lost = protocol.connectionLost

            def connection_lost(reason: Any, protocol: Any = protocol) -> None:
                self._connections.discard(protocol)
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

    def body_finished(self, received: int) -> None:
        """A request ended (answered, or its client left) after receiving ``received`` bytes;
        after a large one, memory is given back (at most every few seconds)."""
        if received >= self._decoder.off_reactor_bytes:
            self._decoder.large_request_done()

    def log(self, request: Any) -> None:
        """Count each answered request (instead of an access-log line per request)."""
        self._requests.labels(route_kind(request.path), str(request.code)).inc()

    def count_refusal(self, path: bytes, status: int) -> None:
        """Count a request the channel refused (a limit) like an answered one."""
        self._requests.labels(route_kind(path), str(status)).inc()


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


def route_kind(path: bytes) -> str:
    if path == b"/":
        return "classify_image"
    if path.startswith(b"/v1/models/"):
        if path.endswith(b":predict"):
            return "predict"
        if path.endswith(b":classify_image"):
            return "classify_image"
        if path.endswith(b":classify"):
            return "classify"
        if path.endswith(b":regress"):
            return "regress"
        if path.endswith(b"/metadata"):
            return "metadata"
        return "status" if b":" not in path else "other"
    return (
        path.strip(b"/").decode(errors="replace")
        if path in (b"/healthz", b"/readyz", b"/metrics")
        else "other"
    )
