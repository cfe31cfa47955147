"""``service.hot_routes``: the predict and infer routes dispatched without Klein's router take
exactly the requests Klein would give those handlers, with the same arguments; everything else
still goes to Klein. (The routes' answers, errors and cancellation are what tests/test_http.py,
tests/test_v2.py and the integration tests check, through this dispatch.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest
from werkzeug.exceptions import HTTPException

from service.http import InferenceAPI
from service.http_paths import MalformedPath
from service.metrics import Metrics
from service.repository import ModelConfig, ModelRepository


@pytest.fixture(scope="module")
def api() -> InferenceAPI:
    repository = ModelRepository([ModelConfig("m", Path("/nonexistent"))], reactor=Clock())
    return InferenceAPI(repository, metrics=Metrics())


def hot(api: InferenceAPI) -> Any:
    return api.resource()._inner  # type: ignore[attr-defined]  # inside UTF8URLs


def label_of(handler: Any) -> str:
    """The route label ``counted`` gave a handler (bound, or a partial of the v2 function)."""
    return str(getattr(handler, "func", handler).route_label)


def request(method: bytes, path: bytes) -> DummyRequest:
    r = DummyRequest([])
    r.method, r.path, r.uri = method, path, path
    return r


def klein_route(api: InferenceAPI, method: bytes, path: bytes) -> tuple[str, dict[str, Any]]:
    """The route label and arguments Klein's URL map gives a path with no escapes: Klein
    routes on the path's segments decoded as UTF-8 (a refused version: MalformedPath)."""
    adapter = api.app.url_map.bind("server")
    try:
        endpoint, args = adapter.match(path.decode("utf-8"), method=method.decode())
    except MalformedPath:
        return "malformed", {}
    except HTTPException:
        return "none", {}
    return api.app.endpoints[endpoint].route_label, dict(args)


@pytest.mark.parametrize(
    ("path", "label", "args"),
    [
        (b"/v1/models/m:predict", "predict", {"target": ("m", None, None)}),
        (b"/v1/models/m/versions/7:predict", "predict", {"target": ("m", 7, None)}),
        (b"/v1/models/m/labels/stable:predict", "predict", {"target": ("m", None, "stable")}),
        ("/v1/models/modèle:predict".encode(), "predict", {"target": ("modèle", None, None)}),
        (b"/v2/models/m/infer", "v2_infer", {"name": "m"}),
        (b"/v2/models/m/versions/3/infer", "v2_infer", {"name": "m", "version": "3"}),
        (b"/v2/models/a:b/versions/x/infer", "v2_infer", {"name": "a:b", "version": "x"}),
    ],
)
def test_the_hot_routes_take_what_klein_would_with_the_same_arguments(
    api: InferenceAPI, path: bytes, label: str, args: dict[str, Any]
) -> None:
    handler, arguments = hot(api).route(request(b"POST", path))
    assert label_of(handler) == label == klein_route(api, b"POST", path)[0]
    target = arguments.get("target")
    if target is not None:
        arguments["target"] = (target.name, target.version, target.label)
    assert arguments == args


@pytest.mark.parametrize(
    ("method", "path"),
    [
        (b"GET", b"/v1/models/m:predict"),  # another method: Klein's 405
        (b"PUT", b"/v2/models/m/infer"),
        (b"POST", b"/v1/models/m:classify"),  # another verb
        (b"POST", b"/v1/models/m%3Ax:predict"),  # an escape: Klein decodes and routes it
        (b"POST", b"/v1/models/m/versions/99999999999999999999:predict"),  # past int64: 400
        (b"POST", b"/v1/models/m/versions/x:predict"),
        (b"POST", b"/v1/models/m:predict/"),
        (b"POST", b"/v1/models//m:predict"),
        (b"POST", b"/v2/models/m/infer/"),
        (b"POST", b"/v2/models/m/versions/infer"),
        (b"POST", b"/v2/models//infer"),
        (b"POST", b"/v2/models/m/versions/1/2/infer"),
        (b"POST", b"/v1/models/\xff:predict"),  # not UTF-8 (UTF8URLs answers it first)
    ],
)
def test_everything_else_goes_to_klein(api: InferenceAPI, method: bytes, path: bytes) -> None:
    assert hot(api).route(request(method, path)) is None


SEGMENT = st.sampled_from(["m", "a:b", "versions", "labels", "infer", "7", "x", "", "é"])
VERB = st.sampled_from([":predict", "/infer", ":classify", "", "/"])


@given(st.sampled_from(["/v1/models/", "/v2/models/"]), st.lists(SEGMENT, max_size=4), VERB)
def test_any_path_it_takes_klein_routes_to_the_same_handler(
    prefix: str, segments: list[str], verb: str
) -> None:
    """For any path built from the routes' pieces, a request the hot routes take is one
    Klein's URL map sends to the same route, with the same arguments."""
    repository = ModelRepository([ModelConfig("m", Path("/nonexistent"))], reactor=Clock())
    api = InferenceAPI(repository, metrics=Metrics())
    path = (prefix + "/".join(segments) + verb).encode()
    routed = hot(api).route(request(b"POST", path))
    if routed is None:
        return
    handler, arguments = routed
    label, args = klein_route(api, b"POST", path)
    assert label_of(handler) == label
    assert arguments == args


# -- what render does with a handler's outcome --------------------------------------------------


class Handlers:
    """HotRoutes around a Klein-less inner resource, with handlers a test controls."""

    def __init__(self, api: InferenceAPI) -> None:
        from twisted.internet.defer import Deferred

        from service.hot_routes import HotRoutes
        from service.http_paths import ModelTargetConverter

        self.pending: Deferred = Deferred()
        self.cancelled = False
        self.errors: list[str] = []

        def cancel(_: Any) -> None:
            self.cancelled = True

        self.pending = Deferred(cancel)

        def serving_error(request: Any, failure: Any) -> bytes:
            self.errors.append(f"serving: {failure.value}")
            if "handler breaks" in str(failure.value):
                raise RuntimeError("the handler broke")
            request.setResponseCode(400)
            return b'{"error": "bad"}'

        def unexpected_error(request: Any, failure: Any) -> bytes:
            self.errors.append(f"unexpected: {failure.value}")
            request.setResponseCode(500)
            return b'{"error": "internal"}'

        self.resource = HotRoutes(
            Resource(),
            predict=lambda request, target: self.pending,
            infer=lambda request, name, version=None: self.pending,
            serving_error=serving_error,
            unexpected_error=unexpected_error,
            converter=ModelTargetConverter(api.app.url_map),
        )

    def render(self) -> DummyRequest:
        r = request(b"POST", b"/v1/models/m:predict")
        assert self.resource.render(r) == server.NOT_DONE_YET
        return r


def test_an_answer_is_written_and_the_request_finished(api: InferenceAPI) -> None:
    handlers = Handlers(api)
    r = handlers.render()
    assert r.finished == 0
    handlers.pending.callback(b'{"ok": 1}')
    assert b"".join(r.written) == b'{"ok": 1}' and r.finished == 1


def test_a_serving_error_is_answered_by_its_handler(api: InferenceAPI) -> None:
    from service.errors import InvalidArgument

    handlers = Handlers(api)
    r = handlers.render()
    handlers.pending.errback(InvalidArgument("no such input"))
    assert handlers.errors == ["serving: no such input"]
    assert r.responseCode == 400 and b"".join(r.written) == b'{"error": "bad"}' and r.finished


def test_anything_else_and_a_failing_handler_get_the_unexpected_error_answer(
    api: InferenceAPI,
) -> None:
    from service.errors import InvalidArgument

    handlers = Handlers(api)
    r = handlers.render()
    handlers.pending.errback(KeyError("oops"))
    assert handlers.errors == ["unexpected: 'oops'"] and r.responseCode == 500 and r.finished

    handlers = Handlers(api)
    r = handlers.render()
    handlers.pending.errback(InvalidArgument("the handler breaks"))
    assert handlers.errors == ["serving: the handler breaks", "unexpected: the handler broke"]
    assert r.responseCode == 500 and r.finished


def test_a_client_that_leaves_cancels_the_handler_and_nothing_is_written(
    api: InferenceAPI,
) -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    handlers = Handlers(api)
    r = handlers.render()
    r.processingFailed(Failure(ConnectionDone()))  # the connection went
    assert handlers.cancelled and r.written == [] and r.finished == 0 and handlers.errors == []
