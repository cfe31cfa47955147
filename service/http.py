"""The HTTP API: TensorFlow Serving's REST API on Klein, plus health and metrics.

Routes (TF Serving's, see ARCHITECTURE.md):
  POST /v1/models/{name}[/versions/{v}]:predict
  GET  /v1/models/{name}[/versions/{v}]            version status
  GET  /v1/models/{name}[/versions/{v}]/metadata   signatures
  GET  /healthz   200 while the process runs
  GET  /readyz    200 when every configured model has an AVAILABLE version, 503 before that,
                  429 while a batching queue is fuller than --overload_fraction
  GET  /metrics   Prometheus text format

Everything here runs on the reactor thread and stays cheap: parse, validate,
queue, encode. TensorFlow runs behind ``LoadedVersion.predict``.
"""

from __future__ import annotations

import io
import re
from typing import Any

import attrs
from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.logger import Logger
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from service import codec
from service.errors import InvalidArgument, PayloadTooLarge, ServingError, UnsupportedMediaType
from service.lifecycle import InFlight
from service.metrics import Metrics
from service.repository import LoadedVersion, ModelRepository

log = Logger()

JSON = b"application/json"
# Content types a JSON body may come with: curl -d sends form-urlencoded, TF Serving ignores the type.
JSON_CONTENT_TYPES = {
    b"",
    b"application/json",
    b"text/json",
    b"text/plain",
    b"application/x-www-form-urlencoded",
}

_TARGET = re.compile(
    r"^(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<verb>:[a-z_]+|/metadata)?$"
)


@attrs.frozen
class Target:
    """What a /v1/models/… path names."""

    name: str
    version: int | None
    label: str | None
    verb: str  # "", ":predict", ":classify", ":regress", "/metadata", …


def parse_target(method: str, path: str) -> Target:
    match = _TARGET.match(path)
    if match is None:
        raise InvalidArgument(f"Malformed request: {method} /v1/models/{path}")
    version = match["version"]
    if version is not None and not version.isdigit():
        raise InvalidArgument(
            f"Malformed request: {method} /v1/models/{path} (version must be a number)"
        )
    return Target(
        match["name"], int(version) if version else None, match["label"], match["verb"] or ""
    )


class InferenceAPI:
    """The Klein application; state lives on the instance (STYLE 3)."""

    app = Klein()

    def __init__(
        self, repository: ModelRepository, *, metrics: Metrics, overload_fraction: float = 0.8
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.overload_fraction = overload_fraction

    def resource(self) -> IResource:
        return self.app.resource()

    # -- errors ---------------------------------------------------------------------------------

    @app.handle_errors(ServingError)
    def _serving_error(self, request: IRequest, failure: Any) -> bytes:
        error: ServingError = failure.value
        return _error_response(request, error)

    @app.handle_errors(Exception)
    def _unexpected_error(self, request: IRequest, failure: Any) -> bytes:
        log.failure("unexpected error answering {uri}", failure, uri=request.uri)
        return _error_response(request, ServingError("internal error; see the server log"))

    # -- TF Serving REST API --------------------------------------------------------------------

    @app.route("/v1/models/<path:path>", methods=["POST"])
    async def post_model(self, request: IRequest, path: str) -> bytes:
        target = parse_target("POST", path)
        if target.verb != ":predict":
            raise InvalidArgument(
                f"Malformed request: POST /v1/models/{path}; this server supports :predict"
            )
        version = self._lookup(target)
        body = read_body(request, JSON_CONTENT_TYPES)
        decoded = codec.decode_body(body, version.signature)
        signature = version.signature(decoded.signature_name)
        queued = version.predict(signature.name, decoded.inputs)
        request.notifyFinish().addErrback(lambda _: queued.cancel())  # client gone: drop it
        outputs = await queued
        request.setHeader(b"content-type", JSON)
        return codec.encode_predict(outputs, decoded.row_format)

    @app.route("/v1/models/<path:path>", methods=["GET"])
    def get_model(self, request: IRequest, path: str) -> bytes:
        target = parse_target("GET", path)
        request.setHeader(b"content-type", JSON)
        if target.verb == "":
            if target.label is not None:
                target = attrs.evolve(target, version=self._lookup(target).version, label=None)
            return codec.encode_json(
                {"model_version_status": self.repository.status(target.name, target.version)}
            )
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

    def _lookup(self, target: Target) -> LoadedVersion:
        """The AVAILABLE version a request names (404 unknown, 503 not available)."""
        if target.label is not None:
            raise InvalidArgument(
                f"Unrecognized servable version label: {target.label} (no version labels are configured)"
            )
        version = self.repository.lookup(target.name, target.version)
        version.require()
        return version

    # -- operations -----------------------------------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", JSON)
        return codec.encode_json({"status": "alive"})

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", JSON)
        models = {
            name: [v.status() for v in versions.values()]
            for name, versions in self.repository.versions.items()
        }
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


def _error_response(request: IRequest, error: ServingError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", JSON)
    if error.retry_after is not None:
        request.setHeader(b"retry-after", str(error.retry_after).encode())
    return codec.encode_json({"error": error.message})


def read_body(request: IRequest, content_types: set[bytes]) -> bytes:
    """The request body, after checking its size and type (STYLE 11)."""
    if getattr(request, "body_too_large", False):
        limit = getattr(request, "max_body_bytes", 0)
        raise PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes")
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type not in content_types:
        raise UnsupportedMediaType(
            f"content type {content_type.decode(errors='replace')!r} is not accepted here; "
            "send JSON (application/json)"
        )
    return request.content.read()


class BoundedRequest(server.Request):
    """A request whose body is held in memory up to a limit and discarded beyond it.

    Twisted would spool bodies over 100 kB to a temporary file (a disk write per
    large tensor request) and accept any size; this keeps up to
    ``max_body_bytes`` in memory and, past that, only flags the request so the
    route answers 413 without ever holding the excess.
    """

    max_body_bytes = 64 * 1024 * 1024
    body_too_large = False
    _received = 0

    def process(self) -> None:
        in_flight = self.channel.site.in_flight
        in_flight.started()
        self.notifyFinish().addBoth(in_flight.finished)
        super().process()

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()
        if length is not None and length > self.max_body_bytes:
            self.body_too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        self.content.write(data)


class InferenceSite(server.Site):
    """Our own Site (STYLE 8): no tracebacks to clients, bounded bodies, request metrics."""

    displayTracebacks = False
    noisy = False  # no "Starting factory" lines

    def __init__(
        self, api: InferenceAPI, *, max_body_bytes: int, in_flight: InFlight | None = None
    ) -> None:
        # parsePOSTFormSubmission=False: Twisted would otherwise parse every POST's content type
        # with the email package (~10% of a small predict's reactor time), run parse_qs over
        # curl -d bodies, and buffer multipart uploads whole; routes parse what they accept.
        super().__init__(
            api.resource(),
            requestFactory=type("Request", (BoundedRequest,), {"max_body_bytes": max_body_bytes}),
            parsePOSTFormSubmission=False,
        )
        self._requests = api.metrics.requests
        self.in_flight = in_flight or InFlight()

    def log(self, request: Any) -> None:
        """Count each answered request (instead of an access-log line per request)."""
        self._requests.labels(route_kind(request.path), str(request.code)).inc()


def route_kind(path: bytes) -> str:
    if path.startswith(b"/v1/models/"):
        if path.endswith(b":predict"):
            return "predict"
        if path.endswith(b"/metadata"):
            return "metadata"
        return "status" if b":" not in path else "other"
    return (
        path.strip(b"/").decode(errors="replace")
        if path in (b"/healthz", b"/readyz", b"/metrics")
        else "other"
    )
