"""The HTTP API: TensorFlow Serving's REST API on Klein, plus health and metrics.

Routes, one per verb (TF Serving's REST API, plus uploads and operations); TARGET is
``NAME[/versions/N | /labels/L]`` (``service.http_paths.ModelTargetConverter``):
  POST /v1/models/TARGET:predict
  POST /v1/models/TARGET:classify         tf.Examples (service.examples)
  POST /v1/models/TARGET:regress          tf.Examples (service.examples)
  POST /v1/models/TARGET:classify_image   an image upload (service.images)
  POST /v1/models/TARGET:invoke           any body, for the version's own Python hooks
                                          (service.model_hooks; :predict goes through them too)
  POST /          the same, for the default model (--default_model, or the only one served)
  GET  /v1/models/TARGET                  version status
  GET  /v1/models/TARGET/metadata         signatures
  (any other /v1/models/… path is a 400 "Malformed request", as TF Serving answers it)
  GET  /healthz   200 while the server serves; 503 when a batch has run past
                  --inference_stall_seconds or a queue stopped moving (service.health)
  GET  /readyz    200 when every model (of the start-up config, or added later and since
                  served) has an AVAILABLE version, 503 before that, while draining on
                  stop and while /healthz fails,
                  429 while a batching queue is fuller than --overload_fraction
  GET  /metrics   Prometheus text format (also on --monitoring_config_file's path, as TF Serving)
  /v2/…           the Open Inference Protocol (KServe v2): routes added by ``service.v2``

The model routes are an adapter over the data plane (``service.dataplane``): parse the
request (JSON through ``service.codec`` and ``service.examples``, uploads through
``service.images.parse_upload``), call the data plane, encode its answer. A request holds
the version it was routed to (``DataPlane.lease``) until it is answered, its JSON body
decoded inside that lease, so a hot swap never unloads a version under a request. Every
request is counted under its route's label (``counted``), and its access-log record
(``service.access_log``) notes the model and version that answer it (``serving``); errors
name the request's id.

The HTTP limits (line and header sizes, the header timeout, body size and encoding) are
answered by the channel, ``service.http_limits.LimitedHTTPChannel``, before a route runs;
the Site and its requests are ``service.http_site``.

Everything here runs on the reactor thread and stays cheap: parse, validate,
queue, encode. TensorFlow runs behind the batching queues; images are decoded
on ``ImageDecoder``'s own threads, large JSON bodies on ``BodyDecoder``'s. Bodies being
received or decoded count against one ``RequestBudget`` (``service.budget``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import unquote

from klein import Klein
from klein.interfaces import IKleinRequest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from service import codec, examples, v2
from service.batching import Queued
from service.decoding import BodyDecoder
from service.errors import FailedPrecondition, InvalidArgument, ServingError
from service.health import Health
from service.hot_routes import HotRoutes
from service.http_paths import MalformedPath, ModelTargetConverter, echo, malformed
from service.http_request import (
    ANY_CONTENT_TYPE,
    JSON,
    JSON_CONTENT_TYPES,
    cancellation_of,
    counted,
    deadline_of,
    decode_body,
    forwarded,
    hook_request_of,
    read_body,
    request_id_of,
    send_encoded,
    serving,
)
from service.http_site import OTHER_ROUTE, InferenceSite
from service.images import ImageDecoder, parse_upload
from service.metrics import Metrics
from service.model_hooks import HOOKS_FILE
from service.plane_types import Decoded, Encoded, ModelTarget
from wire.http import error_body
from wire.paths import PREFIX

if TYPE_CHECKING:
    from service.dataplane import DataPlane, VersionLease
    from service.repository import ModelRepository

__all__ = ["JSON_CONTENT_TYPES", "InferenceAPI", "InferenceSite", "UTF8URLs", "read_body"]

log = Logger()

T = TypeVar("T")

# Content types of an image upload: a form, or the image itself ("image/*" matches any image type).
UPLOAD_CONTENT_TYPES = {b"multipart/form-data", b"image/*", b"application/octet-stream"}
UPLOAD_HINT = (
    "send the image as multipart/form-data (curl -F data=@picture.jpg) or as the body with "
    "its image content type (curl -H 'Content-Type: image/jpeg' --data-binary @picture.jpg)"
)


class InferenceAPI:
    """The Klein application; its state lives on the instance, not in module globals."""

    app = Klein()
    # Werkzeug would answer "/v1/models//m" with a redirect to "/v1/models/m"; TF Serving's
    # REST API never redirects, and a client following one would resend its body elsewhere.
    app.url_map.merge_slashes = False
    app.url_map.converters["target"] = ModelTargetConverter

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
        plane: Any = None,
        prometheus_path: str | None = None,
        forward: Callable[[IRequest], Any] | None = None,
    ) -> None:
        """``plane``: the data plane (``service.dataplane.DataPlane``; in a front process
        ``service.front_remote.RemotePlane``). ``forward``: in a front process, what answers
        the routes the main process answers (``service.http_request.forwarded``); None in
        the process that holds the models."""
        if plane is None:
            from service.dataplane import DataPlane

            plane = DataPlane(repository, images=images, default_model=default_model)
        self.repository = repository
        self.plane: DataPlane = plane
        self.forward = forward
        self.health = health or Health(repository, stall_seconds=60.0)
        self.metrics = metrics
        self.overload_fraction = overload_fraction
        # TF Serving's monitoring config path (service.monitoring_config), served as /metrics.
        self.prometheus_path = prometheus_path
        # Without a pool of its own (tests), every body is decoded where it is read.
        self.decoder = decoder or BodyDecoder(reactor=repository.clock, executor=maybeDeferred)

    def resource(self) -> IResource:
        hot = HotRoutes(
            self.app.resource(),
            predict=self.predict,
            infer=functools.partial(v2.v2_infer, self),
            serving_error=self._serving_error,
            unexpected_error=self._unexpected_error,
            converter=ModelTargetConverter(self.app.url_map),
        )
        resource: IResource = UTF8URLs(hot)
        if self.prometheus_path is not None:
            resource = MetricsAlias(resource, self.prometheus_path.encode(), self.metrics_page)
        return resource

    def route_label(self, method: bytes, path: bytes) -> str:
        """The label of the route a request line would take (for one refused before routing)."""
        return self.route_of(method, path)[0]

    def route_of(self, method: bytes, path: bytes) -> tuple[str, Mapping[str, Any]]:
        """The label of the route a request line would take, and its URL arguments (the
        model a refused request named: ``service.http_request.note_target``)."""
        adapter = self.app.url_map.bind("server")
        try:
            endpoint, args = adapter.match(
                unquote(path.decode("latin-1"), errors="replace"),
                method=method.decode("latin-1"),
            )
        except (HTTPException, MalformedPath):
            return OTHER_ROUTE, {}
        label: str = getattr(self.app.endpoints[endpoint], "route_label", OTHER_ROUTE)
        return label, args

    def _deadline(self, request: IRequest) -> float | None:
        """The client's deadline (``X-Request-Deadline-Ms``) as clock time."""
        return deadline_of(request, self.plane.clock)

    # -- errors ---------------------------------------------------------------------------------

    @app.handle_errors(ServingError)
    def _serving_error(self, request: IRequest, failure: Any) -> bytes:
        error: ServingError = failure.value
        return _error_response(request, error)

    @app.handle_errors(MalformedPath)
    def _malformed_path(self, request: IRequest, failure: Any) -> bytes:
        """A model URL the converter refused (a version past int64): a 400 saying why."""
        path_info: str = IKleinRequest(request).mapper.path_info  # decoded, as routed
        method = request.method.decode(errors="replace")
        return _error_response(request, malformed(method, path_info.removeprefix(PREFIX)))

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
        return codec.encode_json(
            error_body(f"{error.name}: {method} {path}", request_id_of(request))
        )

    @app.handle_errors(Exception)
    def _unexpected_error(self, request: IRequest, failure: Any) -> bytes:
        log.failure(
            "unexpected error answering {uri} (request id {request_id})",
            failure,
            uri=request.uri,
            request_id=request_id_of(request),
        )
        return _error_response(request, ServingError("internal error; see the server log"))

    # -- TF Serving REST API --------------------------------------------------------------------

    @app.route("/v1/models/<target:target>:predict", methods=["POST"])
    @counted("predict")
    async def predict(self, request: server.Request, target: ModelTarget) -> bytes:
        async with self.plane.lease(target) as model:  # a swap unloads it only after the answer
            queued = serving(request, model.name, model.version)
            if model.hooks is not None:
                if self.forward is not None:  # a front process: hooks run in the main one
                    return cast(bytes, await self.forward(request))
                return await self._through_hooks(request, model, "predict", queued)
            decoded = await self._decode_json(
                request, lambda body: codec.decode_body(body, model.signature)
            )
            outputs = await model.predict(
                decoded.signature_name,
                decoded.inputs,
                deadline=self._deadline(request),
                cancellation=cancellation_of(request),
                queued=queued,
            )
        request.setHeader(b"content-type", JSON)
        return codec.encode_predict(outputs, decoded.row_format)

    @app.route("/v1/models/<target:target>:invoke", methods=["POST"])
    @counted("invoke")
    @forwarded
    async def invoke(self, request: server.Request, target: ModelTarget) -> bytes:
        """A body of any content type for the version's ``preprocess`` or ``handle`` hook."""
        async with self.plane.lease(target) as model:  # a swap unloads it only after the answer
            if model.hooks is None or not model.hooks.takes_raw_bodies:
                raise FailedPrecondition(
                    f"model {model.name!r} version {model.version} has no preprocess or handle "
                    f"hook to take this body ({HOOKS_FILE}, served with --enable_model_hooks); "
                    "send JSON tensors to :predict"
                )
            return await self._through_hooks(
                request, model, "invoke", serving(request, model.name, model.version)
            )

    async def _through_hooks(
        self, request: server.Request, model: VersionLease, verb: str, queued: Queued | None
    ) -> bytes:
        """Answer through the version's hooks (``service.model_hooks``): the body goes to them
        as it came when they decode it (preprocess, handle), else it is decoded as JSON."""
        assert model.hooks is not None
        raw = model.hooks.takes_raw_bodies
        body = read_body(request, ANY_CONTENT_TYPE if raw else JSON_CONTENT_TYPES)
        hook_request = hook_request_of(request, model, verb, body)
        del body

        async def decode(hook_request: Any) -> Decoded:
            decoded = await self.decoder.decode(
                hook_request.body, lambda b: codec.decode_body(b, model.signature)
            )
            return decoded.signature_name, decoded.inputs, decoded.row_format

        answer = await model.through_hooks(
            hook_request,
            decode=decode,
            encode=lambda outputs, row_format: Encoded(
                codec.encode_predict(outputs, row_format is not False), JSON
            ),
            encode_answer=encode_answer,
            deadline=self._deadline(request),
            cancellation=cancellation_of(request),
            queued=queued,
        )
        return send_encoded(request, answer)

    @app.route("/v1/models/<target:target>:classify", methods=["POST"])
    @counted("classify")
    @forwarded
    async def classify(self, request: server.Request, target: ModelTarget) -> bytes:
        """TF Serving's Classify: the examples run as k rows of the DT_STRING input."""
        return await self._examples(request, target, examples.CLASSIFY)

    @app.route("/v1/models/<target:target>:regress", methods=["POST"])
    @counted("regress")
    @forwarded
    async def regress(self, request: server.Request, target: ModelTarget) -> bytes:
        """TF Serving's Regress: the examples run as k rows of the DT_STRING input."""
        return await self._examples(request, target, examples.REGRESS)

    async def _examples(self, request: server.Request, target: ModelTarget, verb: str) -> bytes:
        async with self.plane.lease(target) as model:  # a swap unloads it only after the answer
            queued = serving(request, model.name, model.version)
            decoded = await self._decode_json(
                request, lambda body: examples.decode_examples(body, verb)
            )
            run = model.classify if verb == examples.CLASSIFY else model.regress
            outputs = await run(
                decoded.signature_name,
                decoded.serialized,
                deadline=self._deadline(request),
                cancellation=cancellation_of(request),
                queued=queued,
            )
        request.setHeader(b"content-type", JSON)
        return examples.encode_results(outputs, verb, len(decoded.serialized))

    async def _decode_json(self, request: server.Request, decode: Callable[[bytes], T]) -> T:
        """Read the JSON body and decode it (``service.http_request.decode_body``)."""
        return await decode_body(request, self.decoder, decode)

    @app.route("/v1/models/<target:target>", methods=["GET"])
    @counted("status")
    @forwarded
    def status(self, request: IRequest, target: ModelTarget) -> bytes:
        status = self.plane.status(target)
        request.setHeader(b"content-type", JSON)
        return codec.encode_json({"model_version_status": status})

    @app.route("/v1/models/<target:target>/metadata", methods=["GET"])
    @counted("metadata")
    @forwarded
    def metadata(self, request: IRequest, target: ModelTarget) -> bytes:
        metadata = self.plane.metadata(target)
        serving(request, metadata.name, metadata.version)
        request.setHeader(b"content-type", JSON)
        return codec.encode_json(
            {
                "model_spec": {
                    "name": metadata.name,
                    "signature_name": "",
                    "version": str(metadata.version),
                },
                "metadata": {"signature_def": {"signature_def": metadata.signature_defs}},
            }
        )

    @app.route("/v1/models", methods=["GET", "POST"])
    @app.route("/v1/models/", methods=["GET", "POST"])
    @counted(OTHER_ROUTE)
    def no_model_url(self, request: IRequest) -> bytes:
        """``/v1/models`` without a model: a 400, as TF Serving answers it."""
        method, path = (
            request.method.decode(errors="replace"),
            request.path.decode(errors="replace"),
        )
        if method == "GET":
            raise InvalidArgument(f"Missing model name in request: GET {path}")
        raise InvalidArgument(f"Malformed request: {method} {path}")

    @app.route("/v1/<path:rest>", methods=["GET", "POST"])
    @counted(OTHER_ROUTE)
    def other_v1_url(self, request: IRequest, rest: str) -> bytes:
        """Any other ``/v1/`` URL: TF Serving's REST handler takes every one and answers 400."""
        method, path = (
            request.method.decode(errors="replace"),
            request.path.decode(errors="replace"),
        )
        raise InvalidArgument(f"Malformed request: {method} {echo(path)}")

    @app.route("/v1/models/<path:path>", methods=["GET", "POST"])
    @counted(OTHER_ROUTE)
    def other_model_url(self, request: IRequest, path: str) -> bytes:
        """Any other model URL: a 400 saying what is wrong with it, as TF Serving words it."""
        raise malformed(request.method.decode(errors="replace"), path)

    # -- image uploads (service.images) --------------------------------------------------------

    @app.route("/", methods=["POST"])
    @counted("classify_image")
    @forwarded
    async def upload(self, request: server.Request) -> bytes:
        """An image upload for the default model: ``curl -F data=@picture.jpg http://host:8501/``."""
        return await self._classify_image(request, ModelTarget(self.plane.default_model()))

    @app.route("/v1/models/<target:target>:classify_image", methods=["POST"])
    @counted("classify_image")
    @forwarded
    async def classify_image(self, request: server.Request, target: ModelTarget) -> bytes:
        return await self._classify_image(request, target)

    async def _classify_image(self, request: server.Request, target: ModelTarget) -> bytes:
        self.plane.require_images()  # 503 before the lookup
        async with self.plane.lease(
            target
        ) as model:  # decoding awaits: the version must outlive it
            queued = serving(request, model.name, model.version)
            body = read_body(request, UPLOAD_CONTENT_TYPES, hint=UPLOAD_HINT)
            args: dict[bytes, list[bytes]] = request.args or {}
            query_top_k = args.get(b"top_k")
            upload = parse_upload(
                body,
                (request.getHeader(b"content-type") or b"").decode("latin-1"),
                query_top_k[-1].decode("utf-8", errors="replace") if query_top_k else None,
            )
            results = await model.classify_images(
                upload.images,
                upload.top_k,
                deadline=self._deadline(request),
                cancellation=cancellation_of(request),
                queued=queued,
            )
        answer: dict[str, Any] = {"model": results.name, "version": str(results.version)}
        if len(results.predictions) == 1:
            answer["predictions"] = results.predictions[0]
        else:
            answer["results"] = [{"predictions": p} for p in results.predictions]
        request.setHeader(b"content-type", JSON)
        return codec.encode_json(answer)

    # -- operations -----------------------------------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    @counted("healthz")
    @forwarded
    def healthz(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", JSON)
        problem = self.health.problem()
        if problem is not None:
            request.setResponseCode(503)
            return codec.encode_json({"status": "stalled", "error": problem})
        return codec.encode_json({"status": "alive"})

    @app.route("/readyz", methods=["GET"])
    @counted("readyz")
    @forwarded
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
    @counted("metrics")
    @forwarded
    def metrics_page(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.metrics.registry)


v2.mount(InferenceAPI.app)  # the Open Inference Protocol's routes (service.v2)


def encode_answer(answer: Any) -> Encoded:
    """A hook's answer as a body: ``bytes`` as they are, anything else as JSON (numpy too)."""
    if isinstance(answer, bytes | bytearray | memoryview):
        return Encoded(bytes(answer), b"application/octet-stream")
    return Encoded(codec.encode_json(answer), JSON)


def _error_response(request: IRequest, error: ServingError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", JSON)
    for name, value in error.response_headers():
        request.setHeader(name, value)
    return codec.encode_json(error_body(error.message, request_id_of(request)))


class MetricsAlias(Resource):
    """``GET path`` answers as ``/metrics`` (TF Serving's ``prometheus_config.path``); every
    other request goes to ``inner``."""

    isLeaf = True

    def __init__(self, inner: IResource, path: bytes, render: Callable[[IRequest], Any]) -> None:
        super().__init__()
        self._inner, self._path, self._render = inner, path.rstrip(b"/") or b"/", render

    def render(self, request: IRequest) -> bytes | int:
        if request.method in (b"GET", b"HEAD") and request.path.rstrip(b"/") == self._path:
            page = self._render(request)
            if not isinstance(page, Deferred):
                return page
            # A front process forwards the page to the main process (``forwarded``).
            page.addErrback(lambda _: codec.encode_json(error_body("metrics unavailable", None)))
            page.addCallback(lambda body: (request.write(body), request.finish()))
            return server.NOT_DONE_YET
        return cast(int | bytes, self._inner.render(request))


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
                    error_body(
                        f"the URL {part} {echo(shown)!r} is not UTF-8 once its %XX "
                        "escapes are decoded; percent-encode the UTF-8 bytes of the text",
                        request_id_of(request),
                    )
                )
        return cast(int | bytes, self._inner.render(request))
