"""The Open Inference Protocol (KServe v2) REST API, with Triton's binary tensor extension.

Routes of ``InferenceAPI``'s Klein application (``mount`` adds them; ``service.http`` calls it),
so they share its port, Site, limits, body budget, error handling and metrics; each is
counted under its own route label. NAME_V is ``NAME`` or ``NAME/versions/N``:

  GET  /v2                         server metadata: name, version, extensions
  GET  /v2/health/live             200 {"live": true}; 503 {"live": false, …} as /healthz
  GET  /v2/health/ready            200 {"ready": true}; 503 {"ready": false, …} as /readyz
                                   (loading, draining, stalled; an overloaded server is ready)
  GET  /v2/models/NAME_V           model metadata: versions, platform, inputs, outputs
  GET  /v2/models/NAME_V/ready     200 {"name", "ready": true}; 503 with "ready": false
  POST /v2/models/NAME_V/infer     inference (bodies: ``service.v2_codec``)

A model's v2 signature is ``serving_default``, or its only signature. Inference goes
through the data plane as ``:predict`` does (``service.http``): the version is leased before
the first await, the body decoded inside the lease (a large one on the body decoder's
thread, its bytes held against the request budget), and ``VersionLease.predict`` checks the
inputs against the signature and queues them with the request's deadline
(``X-Request-Deadline-Ms``, or the request's ``timeout`` parameter, whichever is sooner) and a
``Cancellation`` set when the client goes away. So v2 and TF Serving requests for a model
share batches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import metadata as package_metadata
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from klein import Klein
from twisted.web import server
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed

from service import codec, v2_codec
from service.batching import Queued
from service.errors import Internal, InvalidArgument, NotFound, Unavailable
from service.http_paths import echo, parse_version
from service.http_request import (
    JSON,
    JSON_CONTENT_TYPES,
    cancellation_of,
    counted,
    deadline_of,
    decode_body,
    forwarded,
    hook_request_of,
    note_deadline_ms,
    send_encoded,
    serving,
)
from service.model_hooks import answer_tensors
from service.plane_types import Decoded, Encoded, ModelTarget
from service.signature import TensorInfo, quoted
from wire.dtypes import DEFAULT_SIGNATURE, V2_NAMES

if TYPE_CHECKING:
    from service.dataplane import VersionLease
    from service.http import InferenceAPI

SERVER_NAME = "kleinserve"
EXTENSIONS = ("binary_tensor_data",)
OCTET_STREAM = b"application/octet-stream"
INFER_CONTENT_TYPES = JSON_CONTENT_TYPES | {OCTET_STREAM}
INFER_HINT = "send JSON (application/json), or JSON and tensor bytes (application/octet-stream)"
_HEADER_LENGTH = v2_codec.HEADER_LENGTH.lower().encode()


def server_version() -> str:
    try:
        return package_metadata.version(SERVER_NAME)
    except package_metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "0+unknown"


_SERVER_METADATA = codec.encode_json(
    {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}
)


def mount(app: Klein) -> None:
    """Add the v2 routes to ``app`` (``InferenceAPI.app``; handlers get the InferenceAPI)."""
    model, version = "/v2/models/<name>", "/v2/models/<name>/versions/<version>"
    app.route("/v2", methods=["GET"])(v2_server_metadata)
    app.route("/v2/health/live", methods=["GET"])(v2_live)
    app.route("/v2/health/ready", methods=["GET"])(v2_ready)
    for prefix in (model, version):
        app.route(prefix, methods=["GET"])(v2_model_metadata)
        app.route(prefix + "/ready", methods=["GET"])(v2_model_ready)
        app.route(prefix + "/infer", methods=["POST"])(v2_infer)
    for path in ("/v2/", "/v2/<path:path>"):
        app.route(path, methods=["GET", "POST"])(v2_other)


def _answer(request: IRequest, doc: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    return codec.encode_json(doc)


@counted("v2_server_metadata")
def v2_server_metadata(api: InferenceAPI, request: IRequest) -> bytes:
    request.setHeader(b"content-type", JSON)
    return _SERVER_METADATA


@counted("v2_live")
@forwarded
def v2_live(api: InferenceAPI, request: IRequest) -> bytes:
    """Liveness, as ``/healthz``: false while an inference thread or a queue is stuck."""
    problem = api.health.problem()
    if problem is not None:
        return _answer(request, {"live": False, "error": problem}, 503)
    return _answer(request, {"live": True})


@counted("v2_ready")
@forwarded
def v2_ready(api: InferenceAPI, request: IRequest) -> bytes:
    """Readiness, as ``/readyz`` (without its 429: an overloaded server is still ready)."""
    problem = api.health.problem()
    if api.health.draining:
        problem = "the server is stopping (draining)"
    elif problem is None and not api.repository.ready:
        problem = "models are still loading"
    if problem is not None:
        return _answer(request, {"ready": False, "error": problem}, 503)
    return _answer(request, {"ready": True})


def model_target(name: str, version: str | None) -> ModelTarget:
    if version is None:
        return ModelTarget(name)
    number = parse_version(version)
    if number is None:
        raise InvalidArgument(
            f"model {echo(name)!r}: the version in the URL must be a decimal number (digits "
            f"0-9) that fits in 64 bits, not {echo(version)!r}"
        )
    return ModelTarget(name, version=number)


def signature_name(signatures: Mapping[str, Any]) -> str:
    """The signature the v2 API serves: ``serving_default``, else the only one."""
    if DEFAULT_SIGNATURE not in signatures and len(signatures) == 1:
        (only,) = signatures
        return str(only)
    return DEFAULT_SIGNATURE  # absent: the lookup says which signatures there are


@counted("v2_model_metadata")
@forwarded
def v2_model_metadata(
    api: InferenceAPI, request: IRequest, name: str, version: str | None = None
) -> bytes:
    found = api.plane.metadata(model_target(name, version))
    serving(request, found.name, found.version)
    key = signature_name(found.signatures)
    signature = found.signatures.get(key)
    if signature is None:
        raise InvalidArgument(
            f"model {name!r} has no signature {key!r} and several others "
            f"({quoted(sorted(found.signatures))}); the v2 API serves {key!r} or the only one"
        )
    return _answer(
        request,
        {
            "name": found.name,
            "versions": [str(v) for v in found.versions],
            "platform": found.platform,
            "inputs": [tensor_metadata(t) for t in signature.inputs.values()],
            "outputs": [tensor_metadata(t) for t in signature.outputs.values()],
        },
    )


def tensor_metadata(info: TensorInfo) -> dict[str, Any]:
    """Name, datatype and shape (-1 for an unknown dimension; [-1] for an unknown rank)."""
    shape = [-1] if info.shape is None else [-1 if d is None else d for d in info.shape]
    return {"name": info.name, "datatype": V2_NAMES[info.dtype], "shape": shape}


@counted("v2_model_ready")
@forwarded
def v2_model_ready(
    api: InferenceAPI, request: IRequest, name: str, version: str | None = None
) -> bytes:
    """200 once the version (or, without one, some version) is AVAILABLE; 503 before."""
    target = model_target(name, version)
    try:
        with api.plane.lease(target):
            pass
    except Unavailable as error:
        return _answer(request, {"name": name, "ready": False, "error": error.message}, 503)
    return _answer(request, {"name": name, "ready": True})


@counted("v2_infer")
async def v2_infer(
    api: InferenceAPI, request: server.Request, name: str, version: str | None = None
) -> bytes:
    target = model_target(name, version)
    header_length = _header_length(request)
    deadline = deadline_of(request, api.plane.clock)
    async with api.plane.lease(target) as model:  # a swap unloads it only after the answer
        queued = serving(request, model.name, model.version)
        if model.hooks is not None and api.forward is not None:
            # A front process: hooks run in the main process, on the body as it came.
            return cast(bytes, await api.forward(request))
        key = signature_name(model.signature_defs())
        decoded = await decode_body(
            request,
            api.decoder,
            lambda body: v2_codec.decode_infer(body, header_length),
            INFER_CONTENT_TYPES,
            INFER_HINT,
            views_body=header_length is not None,  # binary tensors are read in place
        )
        signature = model.signature(key)
        if decoded.timeout_us is not None:
            timeout = float(api.plane.clock.seconds()) + decoded.timeout_us / 1e6
            deadline = timeout if deadline is None else min(deadline, timeout)
            note_deadline_ms(request, decoded.timeout_us / 1000)
        if model.hooks is not None:
            return send_encoded(
                request, await _through_hooks(request, model, key, decoded, deadline, queued)
            )
        wanted = _wanted_outputs(decoded, list(signature.outputs))
        outputs = await model.predict(
            key,
            decoded.inputs,
            deadline=deadline,
            cancellation=cancellation_of(request),
            dtype_names=V2_NAMES,  # a wrong datatype is named FP32, not DT_FLOAT
            queued=queued,
        )
    missing = [output for output, _ in wanted if output not in outputs]
    if missing:  # the model did not produce what its signature promised
        raise Internal(f"the model returned no output(s) {quoted(missing)}")
    return send_encoded(request, _encoded(model, decoded, wanted, outputs))


async def _through_hooks(
    request: server.Request,
    model: VersionLease,
    key: str,
    decoded: v2_codec.InferRequest,
    deadline: float | None,
    queued: Queued | None,
) -> Encoded:
    """Answer through the version's hooks (``service.model_hooks``): they get the decoded
    tensors as ``request.inputs`` and answer with tensors, a dict of output name -> array."""

    async def decode(_: Any) -> Decoded:
        return key, dict(decoded.inputs), None

    def encode(outputs: Mapping[str, np.ndarray], _: Any) -> Encoded:
        return _encoded(model, decoded, _wanted_outputs(decoded, list(outputs)), outputs)

    def encode_answer(answer: Any) -> Encoded:
        outputs = answer_tensors(answer, "the Open Inference Protocol")
        return _encoded(model, decoded, _wanted_outputs(decoded, list(outputs)), outputs)

    return await model.through_hooks(
        hook_request_of(request, model, "infer", b"", decoded.inputs),
        decode=decode,
        encode=encode,
        encode_answer=encode_answer,
        deadline=deadline,
        cancellation=cancellation_of(request),
        queued=queued,
    )


def _encoded(
    model: VersionLease,
    decoded: v2_codec.InferRequest,
    wanted: list[tuple[str, bool]],
    outputs: Mapping[str, np.ndarray],
) -> Encoded:
    body, json_length = v2_codec.encode_infer(
        model.name,
        model.version,
        decoded.id,
        [(output, outputs[output], binary) for output, binary in wanted],
    )
    if json_length is None:
        return Encoded(body, JSON)
    return Encoded(
        body, OCTET_STREAM, ((v2_codec.HEADER_LENGTH.encode(), str(json_length).encode()),)
    )


def _header_length(request: IRequest) -> int | None:
    header = request.getHeader(_HEADER_LENGTH)
    if header is None:
        return None
    text = header.decode("latin-1").strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise InvalidArgument(
            f"{v2_codec.HEADER_LENGTH} must be the length in bytes of the body's JSON, "
            f"not {echo(text)!r}"
        )
    return int(text)


def _wanted_outputs(decoded: v2_codec.InferRequest, names: list[str]) -> list[tuple[str, bool]]:
    """The outputs to answer, of ``names`` (the signature's, or a hook's answer's), in order,
    each with whether it goes as binary data."""
    if decoded.outputs is None:
        return [(name, decoded.binary_output) for name in names]
    unknown = [o.name for o in decoded.outputs if o.name not in names]
    if unknown:
        raise InvalidArgument(
            f"unknown output(s) {quoted(unknown)} requested; the model's outputs are "
            f"{quoted(names)}"
        )
    return [
        (o.name, decoded.binary_output if o.binary is None else o.binary) for o in decoded.outputs
    ]


#: Paths under /v2/ that name an endpoint, with the one method it takes.
_ENDPOINTS = (
    (re.compile(r"health/(live|ready)|models/[^/]+(/versions/[^/]+)?(/ready)?"), "GET"),
    (re.compile(r"models/[^/]+(/versions/[^/]+)?/infer"), "POST"),
)


@counted("v2_other")
def v2_other(api: InferenceAPI, request: IRequest, path: str = "") -> bytes:
    """Any other /v2 URL: 405 with ``Allow`` if the path is an endpoint's and only the method
    is wrong (as Triton answers a GET of an infer URL), else a 404 naming the endpoints
    there are. Klein would answer that 405 itself, but this catch-all takes GET and POST on
    every path, so it must tell the two apart."""
    method = request.method.decode(errors="replace")
    for pattern, allowed in _ENDPOINTS:
        if pattern.fullmatch(path):
            raise MethodNotAllowed(valid_methods=[allowed])
    raise NotFound(
        f"no such endpoint: {method} /v2/{echo(path)}; the v2 API has GET /v2, "
        "GET /v2/health/live, GET /v2/health/ready, GET /v2/models/NAME[/versions/N], "
        "GET /v2/models/NAME[/versions/N]/ready, POST /v2/models/NAME[/versions/N]/infer"
    )
