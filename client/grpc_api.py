"""The client's gRPC protocol: TF Serving's ``PredictionService`` under the same dispatcher.

``AsyncInferenceClient(protocol="grpc")`` sends its calls as TF Serving gRPC calls instead of
REST JSON, through the same balancing, ejection, retry budget and deadlines
(``client.dispatch``): ``GrpcTransport`` stands behind the dispatcher's ``HTTPTransport``
seam. A request's ``path`` is the gRPC method and its body the serialized request; the
answer comes back as an ``HTTPResponse`` whose code is the HTTP status of the gRPC code
(``HTTP_STATUS``: INVALID_ARGUMENT 400, UNAUTHENTICATED 401, NOT_FOUND 404, UNAVAILABLE and
RESOURCE_EXHAUSTED 503, …) and whose body, for an error, is the usual ``{"error": …}``, so
the dispatcher's rules (a 4xx is the caller's mistake, a 5xx is retried elsewhere) apply
unchanged. The request id and the bearer token travel as ``x-request-id`` and
``authorization`` metadata.

Backends found in Consul are reached on the ``grpc_port`` their registration announces
(``grpc_sources``); a server without one is not used. A static list names gRPC ports.

Tensors travel as ``TensorProto``s made and read by TensorFlow's own ``make_tensor_proto``
and ``make_ndarray``: the ``tensorflow-serving-api`` protos need the ``tensorflow`` package,
so this protocol does too (it is imported on first use, never by the REST protocol).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
from twisted.internet import defer, error
from twisted.internet.defer import Deferred

from client.codec import Outputs, encode_json
from client.signature import ModelMetadata, SignatureSpec, named_inputs
from client.sources import Sources
from client.transport import HTTPRequest, HTTPResponse
from discovery.watch import Backends, BackendSource
from wire.auth import AUTHORIZATION_HEADER
from wire.consul_tags import GRPC_PORT
from wire.http import DEADLINE_HEADER, REQUEST_ID_HEADER, error_body

PREDICT = "/tensorflow.serving.PredictionService/Predict"
METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"

#: The HTTP status the dispatcher reads for each gRPC code (TF Serving's REST mapping).
HTTP_STATUS = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "RESOURCE_EXHAUSTED": 503,
    "DEADLINE_EXCEEDED": 504,
}


def _protos() -> Any:
    try:
        import tensorflow as tf
        from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2
    except ImportError as e:  # pragma: no cover - depends on what is installed
        raise RuntimeError(
            "protocol='grpc' needs the tensorflow and tensorflow-serving-api packages "
            f"({e}); the REST protocol needs neither"
        ) from None
    return tf, predict_pb2, get_model_metadata_pb2


def predict_body(
    model: str,
    version: int | None,
    signature_name: str | None,
    inputs: Any,
    signature: SignatureSpec | None,
) -> bytes:
    """A serialized PredictRequest: one array (the only input) or a dict of named arrays,
    each cast to the signature's dtype where numpy can do so without changing its kind."""
    tf, predict_pb2, _ = _protos()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if signature_name:
        request.model_spec.signature_name = signature_name
    specs = signature.inputs if signature is not None else {}
    inputs = named_inputs(inputs, signature)
    for name, value in inputs.items():
        spec = specs.get(name)
        array = np.asarray(value)
        declared = spec.dtype if spec is not None else None
        if array.dtype.kind == "U" or (declared is not None and declared.kind == "O"):
            array = np.vectorize(_as_bytes, otypes=[object])(array)
        elif declared is not None and np.can_cast(array.dtype, declared, "same_kind"):
            array = array.astype(declared, copy=False)
        request.inputs[str(name)].CopyFrom(tf.make_tensor_proto(array))
    data: bytes = request.SerializeToString()
    return data


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def decode_predict(body: bytes, signature: SignatureSpec | None) -> Outputs:
    """A PredictResponse's outputs: one array for a signature with one output, else a dict."""
    tf, predict_pb2, _ = _protos()
    response = predict_pb2.PredictResponse.FromString(body)
    outputs = {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}
    if signature is not None and len(signature.outputs) == 1 and len(outputs) == 1:
        return next(iter(outputs.values()))
    return outputs


def metadata_body(model: str, version: int | None) -> bytes:
    _, _, metadata_pb2 = _protos()
    request = metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    data: bytes = request.SerializeToString()
    return data


def decode_metadata(body: bytes) -> ModelMetadata:
    """A GetModelMetadataResponse read as the REST metadata document it mirrors."""
    from google.protobuf import json_format

    _, _, metadata_pb2 = _protos()
    response = metadata_pb2.GetModelMetadataResponse.FromString(body)
    signatures = metadata_pb2.SignatureDefMap()
    if not response.metadata["signature_def"].Unpack(signatures):
        raise ValueError("the answer holds no SignatureDefMap")
    doc = {
        "model_spec": {
            "name": response.model_spec.name,
            "version": str(response.model_spec.version.value),
        },
        "metadata": {
            "signature_def": json_format.MessageToDict(signatures, preserving_proto_field_name=True)
        },
    }
    return ModelMetadata.parse(doc)


class GrpcTransport:
    """``HTTPTransport`` over gRPC: one channel per backend, calls as raw bytes.

    grpcio runs its calls on its own threads; each answer is handed to the reactor with
    ``callFromThread``. Cancelling the Deferred cancels the call.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._channels: dict[tuple[str, int], Any] = {}

    def _channel(self, host: str, port: int) -> Any:
        import grpc

        channel = self._channels.get((host, port))
        if channel is None:
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            options = [
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1),
            ]
            channel = self._channels[(host, port)] = grpc.insecure_channel(target, options)
        return channel

    def send(self, host: str, port: int, request: HTTPRequest) -> Deferred[HTTPResponse]:
        import grpc

        millis = request.headers.get(DEADLINE_HEADER.lower())
        timeout = int(millis) / 1000 if millis else None
        # The headers gRPC carries as metadata: the request id and the bearer token.
        metadata = [
            (name, value)
            for name in (REQUEST_ID_HEADER.lower(), AUTHORIZATION_HEADER.lower())
            if (value := request.headers.get(name))
        ] or None
        call = self._channel(host, port).unary_unary(request.path)
        future = call.future(request.body or b"", timeout=timeout, metadata=metadata)
        answer: Deferred[HTTPResponse] = Deferred(lambda _: future.cancel())

        def done(finished: Any) -> None:
            if finished.cancelled():
                return  # the Deferred was cancelled: it has already fired
            try:
                body = finished.result()
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and _never_connected(e.details() or ""):
                    result: Any = error.ConnectError(string=e.details() or "")
                else:
                    status = HTTP_STATUS.get(code.name, 500)
                    text = f"{code.name}: {e.details()}"
                    result = HTTPResponse(status, {}, encode_json(error_body(text)))
            else:
                result = HTTPResponse(200, {}, body)
            self._reactor.callFromThread(_fire, answer, result)

        future.add_done_callback(done)
        return answer

    def close(self) -> Deferred[None]:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
        return defer.succeed(None)


def _never_connected(details: str) -> bool:
    """Whether an UNAVAILABLE means the call never reached a server (safe to send elsewhere)."""
    return "failed to connect" in details.lower() or "connection refused" in details.lower()


def _fire(answer: Deferred[HTTPResponse], result: Any) -> None:
    if answer.called:
        return
    if isinstance(result, Exception):
        answer.errback(result)
    else:
        answer.callback(result)


class GrpcPorts:
    """A ``BackendSource`` of the same backends, each on the gRPC port it announces."""

    def __init__(self, source: BackendSource) -> None:
        self._source = source

    @property
    def current(self) -> Backends:
        return _on_grpc_ports(self._source.current)

    def subscribe(self, callback: Callable[[Backends], object]) -> Callable[[], None]:
        return self._source.subscribe(lambda backends: callback(_on_grpc_ports(backends)))

    def ready(self) -> Deferred[Backends]:
        return self._source.ready().addCallback(_on_grpc_ports)


def _on_grpc_ports(backends: Backends) -> Backends:
    return tuple(
        attrs.evolve(b, port=int(b.meta[GRPC_PORT]))
        for b in backends
        if b.meta.get(GRPC_PORT, "").isdigit()
    )


class GrpcSources:
    """Consul sources whose backends are reached on their gRPC ports (see ``GrpcPorts``)."""

    def __init__(self, inner: Sources) -> None:
        self._inner = inner
        self._sources: dict[str | None, GrpcPorts] = {}

    def for_model(self, model: str) -> BackendSource:
        if model not in self._sources:
            self._sources[model] = GrpcPorts(self._inner.for_model(model))
        return self._sources[model]

    def for_service(self) -> BackendSource:
        if None not in self._sources:
            self._sources[None] = GrpcPorts(self._inner.for_service())
        return self._sources[None]

    def describe(self) -> str:
        return self._inner.describe() + " (their gRPC ports)"

    def close(self) -> Deferred[None]:
        return self._inner.close()


__all__ = [
    "GrpcSources",
    "GrpcTransport",
    "decode_metadata",
    "decode_predict",
    "metadata_body",
    "predict_body",
]
