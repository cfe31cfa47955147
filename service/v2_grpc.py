"""The Open Inference Protocol's gRPC API (KServe v2, ``inference.GRPCInferenceService``) over
the data plane, on the gRPC port beside TF Serving's services.

The servicer is the generated one of the ``tritonclient`` package (Triton's
``grpc_service.proto``, package ``inference``: the Open Inference Protocol's
``GRPCInferenceService`` with Triton's extra RPCs), so ``tritonclient.grpc`` and KServe's
``InferenceGRPCClient`` work unchanged. Served: ``ServerLive``, ``ServerReady``,
``ModelReady``, ``ServerMetadata``, ``ModelMetadata``, ``ModelInfer``; Triton's own extra RPCs
(statistics, repository, shared memory, trace, log settings, model config, streaming) answer
UNIMPLEMENTED, saying which RPCs are served.

``ModelInfer`` follows the protocol and Triton's rules:

* inputs come either all as ``raw_input_contents`` (one bytes entry per input, in order, in
  the layout of the HTTP binary extension, ``wire.v2_tensors``: numeric inputs become
  ``np.frombuffer`` views) or all as typed ``contents`` (``fp32_contents`` …; FP16 has no
  typed field and must come raw); mixing the two is INVALID_ARGUMENT;
* outputs are answered as ``raw_output_contents``, in the order of the response's outputs,
  as Triton does; ``outputs`` in the request picks a subset;
* ``model_version`` "" is the default version; ``parameters["timeout"]`` (microseconds)
  shortens the call's deadline, as on the HTTP route.

Threads, deadlines, cancellation, request ids and access-log lines are ``service.grpc_api``'s:
the request is parsed on the gRPC thread's loop, the data plane runs on the reactor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service.access_log import RequestRecord
from service.dataplane import Cancellation, DataPlane, ModelTarget
from service.errors import Internal, InvalidArgument, NotFound, Unavailable
from service.grpc_api import ReactorCalls, handled, note_target, tensors_through_hooks
from service.signature import quoted
from service.v2 import (
    EXTENSIONS,
    SERVER_NAME,
    model_target,
    server_version,
    signature_name,
    tensor_metadata,
)
from service.v2_codec import MAX_RANK, datatype_of
from wire import v2_tensors
from wire.dtypes import V2_NAMES
from wire.v2_tensors import NUMPY_DTYPES, TensorDataError, tensor_bytes

__all__ = ["InferenceService"]

#: The typed field of ``InferTensorContents`` of each datatype (FP16 has none).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}  # fmt: skip


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` on the data plane (see the module docstring).

    ``live`` and ``ready`` are the server's liveness and readiness, as ``/v2/health/*``
    answer them; they are called on the reactor thread.
    """

    service_name = "inference.GRPCInferenceService"

    def __init__(self, plane: DataPlane, calls: ReactorCalls, *, live: Any, ready: Any) -> None:
        self._plane = plane
        self._calls = calls
        self._live = live
        self._ready = ready

    @handled
    async def ServerLive(self, request: Any, context: Any, record: RequestRecord) -> Any:
        return service_pb2.ServerLiveResponse(live=bool(await self._calls.call(self._live)))

    @handled
    async def ServerReady(self, request: Any, context: Any, record: RequestRecord) -> Any:
        return service_pb2.ServerReadyResponse(ready=bool(await self._calls.call(self._ready)))

    @handled
    async def ServerMetadata(self, request: Any, context: Any, record: RequestRecord) -> Any:
        return service_pb2.ServerMetadataResponse(
            name=SERVER_NAME, version=server_version(), extensions=list(EXTENSIONS)
        )

    @handled
    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: Any, record: RequestRecord
    ) -> Any:
        """Ready once the version (or, without one, some version) is AVAILABLE; not ready,
        without an error, for a model or version not served (as Triton answers)."""
        target = _model_target(request.name, request.version)
        note_target(record, target)

        def ready() -> bool:
            try:
                with self._plane.lease(target):
                    return True
            except (Unavailable, NotFound):
                return False

        return service_pb2.ModelReadyResponse(ready=await self._calls.call(ready))

    @handled
    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: Any, record: RequestRecord
    ) -> Any:
        target = _model_target(request.name, request.version)
        note_target(record, target)
        found = await self._calls.call(self._plane.metadata, target)
        record.version = found.version
        key = signature_name(found.signatures)
        signature = found.signatures.get(key)
        if signature is None:
            raise InvalidArgument(
                f"model {found.name!r} has no signature {key!r} and several others; the v2 API "
                f"serves {key!r} or the only one"
            )
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=found.name,
            versions=[str(v) for v in found.versions],
            platform=found.platform,
            inputs=[tensor(**tensor_metadata(t)) for t in signature.inputs.values()],
            outputs=[tensor(**tensor_metadata(t)) for t in signature.outputs.values()],
        )

    @handled
    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: Any, record: RequestRecord
    ) -> Any:
        target = _model_target(request.model_name, request.model_version)
        note_target(record, target)
        inputs = decode_inputs(request)
        wanted = [output.name for output in request.outputs]
        if len(set(wanted)) != len(wanted):
            raise InvalidArgument(f"an output is requested more than once: {quoted(wanted)}")
        timeout_us = _timeout_us(request)
        headers = {key: value for key, value in context.invocation_metadata() or ()}

        async def infer(deadline: float | None, cancellation: Cancellation) -> Any:
            if timeout_us is not None:
                timeout = float(self._plane.clock.seconds()) + timeout_us / 1e6
                deadline = timeout if deadline is None else min(deadline, timeout)
            with self._plane.lease(target) as model:
                record.version = model.version
                key = signature_name(model.signature_defs())
                signature = model.signature(key)
                if model.hooks is not None:  # the version's own Python (service.model_hooks)
                    outputs = await tensors_through_hooks(
                        model, "ModelInfer", "the Open Inference Protocol", key, inputs,
                        headers, deadline, cancellation, record,
                    )  # fmt: skip
                else:
                    _check_outputs(wanted, list(signature.outputs))
                    outputs = await model.predict(
                        key,
                        inputs,
                        deadline=deadline,
                        cancellation=cancellation,
                        dtype_names=V2_NAMES,  # a wrong datatype is named FP32, not DT_FLOAT
                        queued=record.queued,
                    )
                return model.name, model.version, outputs

        name, version, outputs = await self._calls.run(context, infer)
        _check_outputs(wanted, list(outputs))
        response = service_pb2.ModelInferResponse(
            model_name=name, model_version=str(version), id=request.id
        )
        for key in wanted or outputs:
            array = outputs.get(key)
            if array is None:  # the model did not produce what its signature promised
                raise Internal(f"the model returned no output {key!r}")
            response.outputs.add(name=key, datatype=datatype_of(array, key), shape=array.shape)
            response.raw_output_contents.append(tensor_bytes(array))
        return response


SERVED = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
)


def _unimplemented(name: str) -> Callable[..., Any]:
    """The answer to one of Triton's own RPCs: UNIMPLEMENTED, and what is served instead."""

    async def answer(self: Any, request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{name} is one of Triton's own RPCs, which kleinserve does not serve; it serves "
            f"the Open Inference Protocol's: {', '.join(SERVED)}",
        )

    answer.__name__ = name
    return answer


for _method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    if _method.name not in SERVED:
        setattr(InferenceService, _method.name, _unimplemented(_method.name))


def _model_target(name: str, version: str) -> ModelTarget:
    if not name:
        raise InvalidArgument("the request names no model (model_name is empty)")
    return model_target(name, version or None)


def _check_outputs(wanted: list[str], names: list[str]) -> None:
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise InvalidArgument(
            f"unknown output(s) {quoted(unknown)} requested; the model's outputs are "
            f"{quoted(names)}"
        )


def _timeout_us(request: service_pb2.ModelInferRequest) -> int | None:
    if "timeout" not in request.parameters:
        return None
    parameter = request.parameters["timeout"]
    if parameter.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
        raise InvalidArgument("parameters.timeout must be an integer (microseconds)")
    value = getattr(parameter, str(parameter.WhichOneof("parameter_choice")))
    if value < 0:
        raise InvalidArgument(f"parameters.timeout must not be negative, got {value}")
    return int(value)


def decode_inputs(request: service_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors (see the module docstring); InvalidArgument saying what is
    wrong with any of them."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: with "
            "raw_input_contents, every input's data comes there, one entry per input, in order"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        where = f"input {tensor.name!r}"
        if tensor.name in inputs:
            raise InvalidArgument(f"{where} is given more than once")
        datatype = tensor.datatype
        if datatype not in NUMPY_DTYPES:
            raise InvalidArgument(
                f"{where}: unknown datatype {datatype!r}; the datatypes are "
                f"{', '.join(NUMPY_DTYPES)}"
            )
        shape = tuple(tensor.shape)
        if len(shape) > MAX_RANK or any(d < 0 for d in shape):
            raise InvalidArgument(
                f"{where}: shape {list(shape)} must be at most {MAX_RANK} non-negative sizes"
            )
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"{where} has contents while raw_input_contents is used: send every "
                    "input one way"
                )
            data = memoryview(raw[i])
            try:
                array = v2_tensors.array_from_bytes(data, 0, len(data), datatype, shape, where)
            except TensorDataError as e:
                raise InvalidArgument(str(e)) from None
        else:
            array = _from_contents(tensor, datatype, shape, where)
        inputs[tensor.name] = array
    return inputs


def _from_contents(tensor: Any, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"{where} ({datatype}) has no typed contents: send it raw")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"{where}: {field} has {len(values)} elements, but shape {list(shape)} holds {count}"
        )
    dtype = NUMPY_DTYPES[datatype]
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    # Read at the field's own width (int32/int64 fields as int64, uint32/uint64 as uint64),
    # then checked against the datatype's range before narrowing.
    wide_type = {"f": np.float64, "i": np.int64, "u": np.uint64, "b": np.bool_}[dtype.kind]
    wide: np.ndarray = np.array(list(values), dtype=wide_type)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(
                f"{where}: a value of {field} is outside {datatype}'s range "
                f"[{info.min}, {info.max}]"
            )
    return wide.astype(dtype).reshape(shape)
