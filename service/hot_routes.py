"""The inference routes, dispatched without Klein's router.

Nearly every request a server answers is ``POST /v1/models/TARGET:predict`` or ``POST
/v2/models/NAME[/versions/V]/infer``. Klein's per-request work around a handler (werkzeug's
URL map bound and matched, the request adapted to ``IKleinRequest``, interface checks on the
result, four Deferreds) cost as much as all of Twisted's HTTP handling of the request: an
empty route answered a 7 KB body in 60 µs of CPU as a plain Twisted resource and in 125 µs
through Klein (wrk c=64, one process, this machine). ``HotRoutes`` takes those two routes
itself and does what Klein would with them:

* the path (no query; only one with no ``%`` escape, so the text is the text Klein routes
  on) is matched against the routes' own grammar (``ModelTargetConverter``'s pattern and
  werkzeug's default ``[^/]+``), and the target goes through the same converter;
* the same handler is called with the same arguments, a coroutine run as a Deferred;
* a client that leaves cancels it (Klein's ``notifyFinish`` errback);
* its bytes are written and the request finished, unless the client is gone;
* a failure is answered by the application's own handlers: a ``ServingError`` as such,
  anything else (or a failure of that handler) as the unexpected-error handler answers it
  (logged, a JSON 500); a failure after the client left is logged unless it is the
  cancellation.

Everything else — other methods and routes, a path with ``%`` escapes, a version the
converter refuses — goes to Klein, which answers it as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from service.errors import ServingError
from service.http_paths import MalformedPath, ModelTargetConverter

log = Logger()

_PREDICT = re.compile(rf"/v1/models/(?P<target>{ModelTargetConverter.regex}):predict")
_INFER = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


class HotRoutes(Resource):
    """The predict and infer routes of ``api`` (``service.http.InferenceAPI``) dispatched
    here; every other request rendered by ``inner`` (the Klein application's resource)."""

    isLeaf = True

    def __init__(
        self,
        inner: IResource,
        *,
        predict: Callable[..., Any],
        infer: Callable[..., Any],
        serving_error: Callable[[IRequest, Failure], Any],
        unexpected_error: Callable[[IRequest, Failure], Any],
        converter: ModelTargetConverter,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._predict = predict
        self._infer = infer
        self._serving_error = serving_error
        self._unexpected_error = unexpected_error
        self._converter = converter

    def route(self, request: IRequest) -> tuple[Callable[..., Any], dict[str, Any]] | None:
        """The handler and its arguments for a request this resource takes, or None."""
        if request.method != b"POST":
            return None
        raw: bytes = request.path
        if b"%" in raw:
            return None
        try:
            path = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        match = _PREDICT.fullmatch(path)
        if match is not None:
            try:
                return self._predict, {"target": self._converter.to_python(match["target"])}
            except MalformedPath:
                return None  # Klein's route answers it, with its 400
        match = _INFER.fullmatch(path)
        if match is not None:
            arguments = {"name": match["name"]}
            if match["version"] is not None:
                arguments["version"] = match["version"]
            return self._infer, arguments
        return None

    def render(self, request: IRequest) -> Any:
        routed = self.route(request)
        if routed is None:
            return self._inner.render(request)
        handler, arguments = routed
        gone = [False]

        def finished(_: object) -> None:
            gone[0] = True

        request.notifyFinish().addBoth(finished)  # type: ignore[attr-defined]
        answering: Deferred = maybeDeferred(handler, request, **arguments)
        request.notifyFinish().addErrback(lambda _: answering.cancel())  # type: ignore[attr-defined]

        def failed(failure: Failure) -> Any:
            if gone[0]:
                if not failure.check(CancelledError):
                    log.failure("unhandled error answering a request", failure)
                return None
            if not failure.check(ServingError):
                return maybeDeferred(self._unexpected_error, request, failure)
            answer = maybeDeferred(self._serving_error, request, failure)
            # as Klein's chain: a handler that fails passes its failure to the last one
            return answer.addErrback(lambda f: self._unexpected_error(request, f))

        def write(body: bytes | None) -> None:
            if gone[0]:
                return  # the client left: nothing to write to
            if isinstance(body, bytes):
                request.write(body)
            request.finish()

        def broken(failure: Failure) -> None:
            log.failure("unhandled error writing a response", failure)
            if not gone[0] and not getattr(request, "finished", False):
                request.finish()  # never leave the client waiting

        answering.addErrback(failed)
        answering.addCallback(write)
        answering.addErrback(broken)
        return server.NOT_DONE_YET
