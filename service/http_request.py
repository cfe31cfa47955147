"""What every HTTP front door does with a request, whatever its protocol.

Shared by TF Serving's REST routes (``service.http``) and the Open Inference Protocol's
(``service.v2``), which are routes of the same Klein application on the same Site:

- ``counted``: the ``route`` label a request is counted under (kleinserve_requests_total);
- ``record_of``, ``request_id_of``, ``note_target``, ``serving``: the request's access-log record
  (``service.access_log``) and id, and what a route notes in it: the model and version that
  answer, and the record the batching queue fills (queue wait, batch size);
- ``cancellation_of``: a ``Cancellation`` set when the client goes away before its answer;
- ``deadline_of``: the client's ``X-Request-Deadline-Ms``, as clock time;
- ``read_body``: the body, after checking its content type;
- ``decode_body``: read and decode a body, a large one on the body decoder's thread, its
  bytes held against the request budget until the decode ends;
- ``hook_request_of``: the request as a version's hooks see it; ``send_encoded``: an answer
  made by ``DataPlane``'s ``through_hooks``.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
from twisted.internet.defer import Deferred
from twisted.web import server
from twisted.web.iweb import IRequest

from service.access_log import RequestRecord
from service.batching import Queued
from service.budget import BodyHold
from service.decoding import BodyDecoder
from service.errors import InvalidArgument, UnsupportedMediaType
from service.model_hooks import HookRequest
from service.plane_types import Cancellation, Encoded, ModelTarget

if TYPE_CHECKING:
    from service.dataplane import VersionLease

T = TypeVar("T")
Handler = TypeVar("Handler", bound=Callable[..., Any])

JSON = b"application/json"
# Content types a JSON body may come with: curl -d sends form-urlencoded, TF Serving ignores the type.
JSON_CONTENT_TYPES = {
    b"",
    b"application/json",
    b"text/json",
    b"text/plain",
    b"application/x-www-form-urlencoded",
}


def counted(label: str) -> Callable[[Handler], Handler]:
    """Count the route's requests under ``label`` (the ``route`` label of
    kleinserve_requests_total): the route marks its request, and ``InferenceSite.log``
    reads the mark. The label is also kept on the handler, for ``InferenceAPI.route_label``."""

    def mark(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def route(self: Any, request: IRequest, *args: Any, **kwargs: Any) -> Any:
            request.route_label = label  # type: ignore[attr-defined]
            record = record_of(request)
            if record is not None:  # the model the URL names, for a request that fails early
                note_target(record, kwargs)
            return handler(self, request, *args, **kwargs)

        route.route_label = label  # type: ignore[attr-defined]
        return cast(Handler, route)

    return mark


def note_target(record: RequestRecord, route_args: Mapping[str, Any]) -> None:
    """Note the model (and version) a route's URL arguments name in the request's record:
    a ``target`` (TF Serving's URLs) or a ``name`` (the v2 URLs; their version is parsed
    by the route)."""
    target, name = route_args.get("target"), route_args.get("name")
    if isinstance(target, ModelTarget):
        record.model, record.version = target.name, target.version
    elif isinstance(name, str):
        record.model = name


def forwarded(handler: Handler) -> Handler:
    """In a front process (``--http_processes``), the route is answered by the main process:
    the request goes there whole (``InferenceAPI.forward``, ``service.front_remote``)."""

    @functools.wraps(handler)
    def route(self: Any, request: IRequest, *args: Any, **kwargs: Any) -> Any:
        if self.forward is not None:
            return self.forward(request)
        return handler(self, request, *args, **kwargs)

    return cast(Handler, route)


def record_of(request: IRequest) -> RequestRecord | None:
    """The request's access-log record (None for a request type without one: tests' plain
    Site; ``service.http_site.BoundedRequest`` always has one)."""
    record = getattr(request, "record", None)
    return record if isinstance(record, RequestRecord) else None


def request_id_of(request: IRequest) -> str | None:
    """The id the request is filed under (echoed as X-Request-Id), if it has one."""
    record = record_of(request)
    return None if record is None else record.request_id


def serving(request: IRequest, model: str, version: int | None) -> Queued | None:
    """Note the model and version that answer the request, for its access-log line; the
    record the batching queue fills with its queue wait and batch size (None: no record)."""
    record = record_of(request)
    if record is None:
        return None
    record.model, record.version = model, version
    return record.queued


def note_deadline_ms(request: IRequest, milliseconds: float) -> None:
    """The client gave the server ``milliseconds`` (the sooner of several limits is kept)."""
    record = record_of(request)
    if record is None or not math.isfinite(milliseconds):  # NaN is no JSON number
        return
    if record.deadline_ms is None or milliseconds < record.deadline_ms:
        record.deadline_ms = milliseconds


def cancellation_of(request: server.Request) -> Cancellation:
    """A ``Cancellation`` set when the client goes away before its answer."""
    cancellation = Cancellation()
    request.notifyFinish().addErrback(cancellation.cancel)
    return cancellation


def deadline_of(request: IRequest, clock: Any) -> float | None:
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
    return float(clock.seconds()) + remaining / 1000


# ``read_body`` with this takes a body of any content type (a hook decodes it).
ANY_CONTENT_TYPE: set[bytes] = {b"*/*"}


def read_body(
    request: IRequest, content_types: set[bytes], *, hint: str = "send JSON (application/json)"
) -> bytes:
    """The request body, after checking its type (its size is checked as it arrives, by
    ``BoundedRequest``).

    ``content_types`` may hold a wildcard subtype, ``image/*``, accepting every ``image/…``.
    """
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    wildcard = content_type.partition(b"/")[0] + b"/*"
    accepted = (
        content_types is ANY_CONTENT_TYPE
        or content_type in content_types
        or (b"/" in content_type and wildcard in content_types)
    )
    if not accepted:
        raise UnsupportedMediaType(
            f"content type {content_type.decode(errors='replace')!r} is not accepted here; {hint}"
        )
    # The bytes without a copy (BytesIO shares its buffer); the request keeps none of them.
    content = cast(io.BytesIO, request.content)
    request.content = io.BytesIO()
    return content.getvalue()


async def decode_body(
    request: server.Request,
    decoder: BodyDecoder,
    decode: Callable[[bytes], T],
    content_types: set[bytes] = JSON_CONTENT_TYPES,
    hint: str = "send JSON (application/json)",
    views_body: bool = False,
) -> T:
    """Read the body and decode it (a large one on the decoder's threads).

    The body's bytes count against the request budget until the decode ends, and nothing
    keeps them after: the caller holds only what ``decode`` made. A decode whose tensors
    are views of the body (``views_body``: binary tensors read in place) keeps the body as
    long as they live, so its bytes count until the request ends.
    """
    body = read_body(request, content_types, hint=hint)
    decoding = Deferred.fromCoroutine(decoder.decode(body, decode))
    del body  # the decode holds it; a route cancelled meanwhile need not
    hold: BodyHold | None = getattr(request, "body_hold", None)
    if hold is not None:  # None: a request type without a budget (tests' plain Site)
        decoding = hold.decoding(decoding, until_finished=views_body)
    decoded: T = await decoding
    return decoded


def hook_request_of(
    request: server.Request,
    model: VersionLease,
    verb: str,
    body: bytes,
    inputs: Mapping[str, np.ndarray] | None = None,
) -> HookRequest:
    """What a version's hooks see of an HTTP request (``service.model_hooks.HookRequest``)."""
    content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
    args: dict[bytes, list[bytes]] = request.args or {}
    return HookRequest(
        model=model.name,
        version=model.version,
        verb=verb,
        body=body,
        content_type=content_type.split(";")[0].strip().lower(),
        content_type_header=content_type,
        headers={
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        },
        query={
            key.decode("utf-8", "replace"): tuple(v.decode("utf-8", "replace") for v in values)
            for key, values in args.items()
        },
        inputs=inputs,
    )


def send_encoded(request: IRequest, answer: Encoded) -> bytes:
    """Set the status line's headers of an encoded answer; its body, to return from a route."""
    request.setHeader(b"content-type", answer.content_type)
    for name, value in answer.headers:
        request.setHeader(name, value)
    return answer.body
