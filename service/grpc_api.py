"""TF Serving's gRPC API over the data plane: PredictionService and ModelService.

The servicers are the generated ones of the ``tensorflow-serving-api`` package, so every TF
Serving client (``PredictionServiceStub`` with ``tf.make_tensor_proto``) works unchanged.

Threads: the handlers are coroutines of ``grpc.aio``, on the gRPC thread's asyncio loop
(``service.grpc_port``). A handler parses the request's protos into numpy arrays there
(``service.tensor_proto``), then hands one coroutine to the reactor and awaits its answer
(``ReactorCalls``): the data plane, the repository and the batching queues are only ever
touched on the reactor thread, and a request from gRPC joins the same batches as one from
REST. The answer is turned back into protos on the gRPC thread. One thread and one loop for
every call, rather than a thread per call, is what keeps a call cheap: a batch's answers
wake one thread, not one per call (measured in docs/grpc.md).

The call's deadline (``context.time_remaining()``) is the request's deadline in the batching
queue; a call the client cancels (or whose deadline passes) has its handler cancelled by
grpcio, which cancels its queued work. A
``ServingError`` is answered with its TF Serving code (``status_code``); any other exception
is logged with its traceback (and the call's request id) and answered INTERNAL, without the
traceback.

Each call is filed under a request id: the ``x-request-id`` metadata when it is usable (the
rules of the HTTP header, ``wire.http``), else a fresh one, sent back as ``x-request-id``
trailing metadata; and each answered call writes an access-log line (``service.access_log``,
``protocol`` "grpc"), with its queue wait and batch size.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.wrappers_pb2 import Int64Value
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
    status_pb2,
)
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from service import examples
from service.access_log import AccessLog, RequestRecord
from service.access_log import entry as access_entry
from service.dataplane import Cancellation, DataPlane, Decoded, ModelTarget, VersionLease
from service.errors import Cancelled, DeadlineExceeded, InvalidArgument, ServingError
from service.model_hooks import HookRequest, answer_tensors
from service.request_metrics import GRPC_METHODS, ModelRequestMetrics
from service.tensor_proto import to_array, to_proto
from wire.http import REQUEST_ID_HEADER

log = Logger()
T = TypeVar("T")

#: grpcio reports "no deadline" as a time this far away or more.
_NO_DEADLINE = 10**8
_METADATA_FIELD = "signature_def"
_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower()  # gRPC metadata keys are lower case


def status_code(error: ServingError) -> grpc.StatusCode:
    """The gRPC code of a ServingError: its TF Serving code (``INVALID_ARGUMENT`` …)."""
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN)


def target_of(spec: model_pb2.ModelSpec) -> ModelTarget:
    """The model a ModelSpec names: a version, a label, or neither."""
    if not spec.name:
        raise InvalidArgument("Missing ModelSpec")
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return ModelTarget(spec.name, version=spec.version.value)
    if which == "version_label":
        return ModelTarget(spec.name, label=spec.version_label)
    return ModelTarget(spec.name)


def spec_of(name: str, version: int, signature_name: str = "") -> model_pb2.ModelSpec:
    return model_pb2.ModelSpec(
        name=name, version=Int64Value(value=version), signature_name=signature_name
    )


def peer_of(context: grpc.ServicerContext) -> str:
    """``host:port`` (``[v6]:port``) of the caller, from grpcio's ``ipv4:…``/``ipv6:…``."""
    peer: str = context.peer() or "-"
    kind, _, address = peer.partition(":")
    return address if kind in ("ipv4", "ipv6") else peer


class Mailbox:
    """Calls posted from any thread for another thread's loop to run, in the order posted.

    Only the first call posted while none wait wakes that loop (``wake(run)``: one wake-up,
    one write to its waker); the loop then runs every call posted by then. A batch of
    answers thus wakes the gRPC loop once rather than once per call, and the calls one loop
    turn makes wake the reactor once.
    """

    def __init__(self, wake: Callable[[Callable[[], None]], object]) -> None:
        self._wake = wake
        self._calls: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self._lock = threading.Lock()

    def post(self, function: Callable[..., object], *args: Any) -> None:
        with self._lock:
            self._calls.append((function, args))
            if len(self._calls) > 1:
                return  # a wake-up is on its way
        self._wake(self._run)

    def _run(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for function, args in calls:
            try:
                function(*args)
            except Exception:
                log.failure("a call handed between the gRPC loop and the reactor failed")


def _wake_loop(loop: asyncio.AbstractEventLoop) -> Callable[[Callable[[], None]], None]:
    def wake(run: Callable[[], None]) -> None:
        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed: the gRPC port has stopped; nobody waits
            pass

    return wake


class ReactorCalls:
    """Runs a data plane coroutine on the reactor for a gRPC handler (a coroutine on the gRPC
    thread's loop) and gives it the answer; and files each call under a request id and in
    the access log (``begin``, ``finished``)."""

    def __init__(
        self,
        reactor: Any,
        access_log: AccessLog | None = None,
        model_requests: ModelRequestMetrics | None = None,
    ) -> None:
        self._reactor = reactor
        self._access_log = access_log or AccessLog("off")
        self._model_requests = model_requests
        self._to_reactor = Mailbox(reactor.callFromThread)
        self._to_loop: Mailbox | None = None  # made on the loop, by the first call

    def begin(self, context: grpc.ServicerContext) -> RequestRecord:
        """The record of a call that has just arrived: its id (sent back at once as trailing
        metadata) and the deadline it came with."""
        sent = [
            value.encode("utf-8") if isinstance(value, str) else value
            for key, value in context.invocation_metadata() or ()
            if key == _REQUEST_ID_KEY
        ]
        record = RequestRecord.begin(sent, self._reactor.seconds())
        remaining = context.time_remaining()
        if remaining is not None and remaining < _NO_DEADLINE:
            record.deadline_ms = round(remaining * 1000, 3)
        context.set_trailing_metadata(((_REQUEST_ID_KEY, record.request_id),))
        return record

    def finished(
        self,
        record: RequestRecord,
        path: str,
        context: grpc.ServicerContext,
        code: grpc.StatusCode,
        status: int,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """Count an inference call under its model (``service.request_metrics``) and write
        the call's access-log line, both on the reactor thread, as for every HTTP request."""
        finished = self._reactor.seconds()
        method = path.rpartition("/")[2]
        api = GRPC_METHODS.get(method) if self._model_requests is not None else None
        fields = None
        if self._access_log.enabled:
            fields = access_entry(
                record,
                finished=finished,
                peer=peer_of(context),
                method=b"POST",
                path=path.encode(),
                route=method,
                status=status,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                protocol="grpc",
                grpc_status=code.name,
            )
        if api is None and fields is None:
            return
        observed = (api, record.model, record.version, status, finished - record.started)
        self._to_reactor.post(self._answered, observed, fields)

    def _answered(self, observed: tuple[Any, ...], fields: dict[str, Any] | None) -> None:
        if observed[0] is not None and self._model_requests is not None:
            self._model_requests.observe(*observed)
        if fields is not None:
            self._access_log.write(fields)

    async def run(
        self,
        context: grpc.aio.ServicerContext,
        operation: Callable[[float | None, Cancellation], Awaitable[T]],
    ) -> T:
        """``operation(deadline, cancellation)``'s result; its ServingError is raised here.
        The handler cancelled (the client cancelled, or the deadline passed) cancels it."""
        remaining = context.time_remaining()
        cancellation = Cancellation()

        def start() -> Deferred:
            deadline = None
            if remaining is not None and remaining < _NO_DEADLINE:
                deadline = self._reactor.seconds() + remaining
            return Deferred.fromCoroutine(_as_coroutine(operation(deadline, cancellation)))

        try:
            return cast(T, await self._on_reactor(start))
        except asyncio.CancelledError:
            self._to_reactor.post(cancellation.cancel)
            raise
        except CancelledError:
            raise Cancelled("the call was cancelled") from None

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the reactor thread (a lookup), for a handler."""
        return cast(T, await self._on_reactor(lambda: maybeDeferred(function, *args)))

    def _on_reactor(self, start: Callable[[], Deferred]) -> asyncio.Future[Any]:
        """What the Deferred ``start()`` returns on the reactor thread fires with, as a future
        of the calling loop (through the mailboxes: wake-ups shared with other calls)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        to_loop = self._to_loop
        if to_loop is None:
            to_loop = self._to_loop = Mailbox(_wake_loop(loop))

        def settle(result: object) -> None:  # on the loop
            if answer.done():  # the handler was cancelled meanwhile
                return
            if isinstance(result, Failure):
                answer.set_exception(result.value)
            else:
                answer.set_result(result)

        def begin() -> None:  # on the reactor
            try:
                running = start()
            except BaseException:
                running = Deferred()
                running.errback(Failure())
            running.addBoth(lambda result: to_loop.post(settle, result))

        self._to_reactor.post(begin)
        return answer


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def handled(method: Callable[..., Any]) -> Callable[..., Any]:
    """Answer a ServingError raised by the handler with its code, log anything else
    (with the call's request id), and write the call's access-log line.

    The method is called with the call's ``RequestRecord`` after its context: it notes the
    model and version answering there, and passes its ``queued`` to the data plane.
    """

    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        calls: ReactorCalls = self._calls
        record = calls.begin(context)
        code, status, response = grpc.StatusCode.OK, 200, None
        try:
            response = await method(self, request, context, record)
            return response
        except ServingError as error:
            code, status = status_code(error), error.status
            await context.abort(code, error.message)
        except asyncio.CancelledError:  # grpcio ended the call: the client left, or time ran out
            left = context.time_remaining()
            gone = DeadlineExceeded if left is not None and left <= 0 else Cancelled
            code, status = getattr(grpc.StatusCode, gone.code), gone.status
            raise
        except Exception:
            code, status = grpc.StatusCode.INTERNAL, 500
            log.failure(
                "unexpected error answering gRPC {method} (request id {request_id})",
                method=method.__name__,
                request_id=record.request_id,
            )
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        finally:
            calls.finished(
                record,
                f"/{self.service_name}/{method.__name__}",
                context,
                code,
                status,
                request.ByteSize(),
                0 if response is None else response.ByteSize(),
            )

    handler.__name__ = method.__name__
    handler.__doc__ = method.__doc__
    return handler


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService`` on the data plane."""

    service_name = "tensorflow.serving.PredictionService"

    def __init__(self, plane: DataPlane, calls: ReactorCalls) -> None:
        self._plane = plane
        self._calls = calls

    @handled
    async def Predict(
        self, request: predict_pb2.PredictRequest, context: Any, record: RequestRecord
    ) -> Any:
        target = target_of(request.model_spec)
        note_target(record, target)
        inputs = {name: to_array(proto, name) for name, proto in request.inputs.items()}
        wanted = list(request.output_filter)
        signature_name = request.model_spec.signature_name or None

        headers = {key: value for key, value in context.invocation_metadata() or ()}

        async def predict(deadline: float | None, cancellation: Cancellation) -> Any:
            with self._plane.lease(target) as model:
                record.version = model.version
                signature = model.signature(signature_name)
                if model.hooks is not None:  # the version's own Python (service.model_hooks)
                    outputs = await tensors_through_hooks(
                        model, "Predict", "TF Serving's Predict", signature.name, inputs,
                        headers, deadline, cancellation, record,
                    )  # fmt: skip
                    _check_filter(wanted, outputs)
                else:
                    _check_filter(wanted, signature.outputs)
                    outputs = await model.predict(
                        signature_name,
                        inputs,
                        deadline=deadline,
                        cancellation=cancellation,
                        queued=record.queued,
                    )
                return model.name, model.version, signature.name, outputs

        name, version, resolved, outputs = await self._calls.run(context, predict)
        response = predict_pb2.PredictResponse(model_spec=spec_of(name, version, resolved))
        for key in wanted or outputs:
            response.outputs[key].CopyFrom(to_proto(outputs[key], key))
        return response

    @handled
    async def Classify(
        self,
        request: classification_pb2.ClassificationRequest,
        context: Any,
        record: RequestRecord,
    ) -> Any:
        name, version, resolved, results = await self._examples(
            request.model_spec, request.input, examples.CLASSIFY, context, record
        )
        response = classification_pb2.ClassificationResponse(
            model_spec=spec_of(name, version, resolved)
        )
        _fill_classifications(response.result, results)
        return response

    @handled
    async def Regress(
        self, request: regression_pb2.RegressionRequest, context: Any, record: RequestRecord
    ) -> Any:
        name, version, resolved, results = await self._examples(
            request.model_spec, request.input, examples.REGRESS, context, record
        )
        response = regression_pb2.RegressionResponse(model_spec=spec_of(name, version, resolved))
        _fill_regressions(response.result, results)
        return response

    @handled
    async def MultiInference(
        self, request: inference_pb2.MultiInferenceRequest, context: Any, record: RequestRecord
    ) -> Any:
        """Each task (classify or regress) on the same examples, of one model and version."""
        if not request.tasks:
            raise InvalidArgument("Inference task is not specified")
        names = {task.model_spec.name for task in request.tasks}
        if len(names) != 1:
            raise InvalidArgument(
                "All ModelSpecs in a MultiInferenceRequest must access the same model name."
            )
        verbs = {
            examples.METHOD_NAMES[examples.CLASSIFY]: examples.CLASSIFY,
            examples.METHOD_NAMES[examples.REGRESS]: examples.REGRESS,
        }
        seen: set[str] = set()
        for task in request.tasks:
            if task.method_name not in verbs:
                raise InvalidArgument(f"Unsupported signature method_name: {task.method_name}")
            key = task.model_spec.signature_name or "serving_default"
            if key in seen:
                raise InvalidArgument(f"Duplicate evaluation of signature: {key}")
            seen.add(key)
        response = inference_pb2.MultiInferenceResponse()
        for task in request.tasks:
            verb = verbs[task.method_name]
            name, version, resolved, results = await self._examples(
                task.model_spec, request.input, verb, context, record
            )
            result = response.results.add(model_spec=spec_of(name, version, resolved))
            if verb == examples.CLASSIFY:
                _fill_classifications(result.classification_result, results)
            else:
                _fill_regressions(result.regression_result, results)
        return response

    async def _examples(
        self,
        spec: model_pb2.ModelSpec,
        input_: Any,
        verb: str,
        context: Any,
        record: RequestRecord,
    ) -> tuple[str, int, str, Any]:
        target = target_of(spec)
        note_target(record, target)
        serialized = examples.serialized_examples(input_)
        signature_name = spec.signature_name or None

        async def run(deadline: float | None, cancellation: Cancellation) -> Any:
            with self._plane.lease(target) as model:
                record.version = model.version
                call = model.classify if verb == examples.CLASSIFY else model.regress
                outputs = await call(
                    signature_name,
                    serialized,
                    deadline=deadline,
                    cancellation=cancellation,
                    queued=record.queued,
                )
                resolved = model.signature(signature_name).name
                return model.name, model.version, resolved, outputs

        name, version, resolved, outputs = await self._calls.run(context, run)
        if verb == examples.CLASSIFY:
            return name, version, resolved, examples.classifications(outputs, len(serialized))
        return name, version, resolved, examples.regressions(outputs, len(serialized))

    @handled
    async def GetModelMetadata(
        self,
        request: get_model_metadata_pb2.GetModelMetadataRequest,
        context: Any,
        record: RequestRecord,
    ) -> Any:
        target = target_of(request.model_spec)
        note_target(record, target)
        if not request.metadata_field:
            raise InvalidArgument(
                "GetModelMetadataRequest must specify at least one metadata_field"
            )
        for field in request.metadata_field:
            if field != _METADATA_FIELD:
                raise InvalidArgument(f"Metadata field {field} is not supported")
        metadata = await self._calls.call(self._plane.metadata, target)
        record.version = metadata.version
        signatures = get_model_metadata_pb2.SignatureDefMap()
        json_format.ParseDict({"signature_def": dict(metadata.signature_defs)}, signatures)
        response = get_model_metadata_pb2.GetModelMetadataResponse(
            model_spec=spec_of(metadata.name, metadata.version)
        )
        response.metadata[_METADATA_FIELD].Pack(signatures)
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: version status, and config reloads.

    ``reload``: applies a ``ModelServerConfig`` proto as a SIGHUP reload of the config file
    does (a coroutine, on the reactor thread), and returns once the models it adds serve;
    it raises ServingError for a config the server refuses or a model that failed to load.
    """

    service_name = "tensorflow.serving.ModelService"

    def __init__(
        self, plane: DataPlane, calls: ReactorCalls, reload: Callable[[Any], Awaitable[None]]
    ) -> None:
        self._plane = plane
        self._calls = calls
        self._reload = reload

    @handled
    async def GetModelStatus(
        self,
        request: get_model_status_pb2.GetModelStatusRequest,
        context: Any,
        record: RequestRecord,
    ) -> Any:
        target = target_of(request.model_spec)
        note_target(record, target)
        entries = await self._calls.call(self._plane.status, target)
        response = get_model_status_pb2.GetModelStatusResponse()
        for entry in entries:
            json_format.ParseDict(entry, response.model_version_status.add())
        return response

    @handled
    async def HandleReloadConfigRequest(
        self,
        request: model_management_pb2.ReloadConfigRequest,
        context: Any,
        record: RequestRecord,
    ) -> Any:
        async def reload(deadline: float | None, cancellation: Cancellation) -> None:
            await self._reload(request.config)

        await self._calls.run(context, reload)
        return model_management_pb2.ReloadConfigResponse(
            status=status_pb2.StatusProto(error_code=0)
        )


async def tensors_through_hooks(
    model: VersionLease,
    method: str,
    protocol: str,
    signature_name: str,
    inputs: dict[str, np.ndarray],
    headers: dict[str, Any],
    deadline: float | None,
    cancellation: Cancellation,
    record: RequestRecord,
) -> dict[str, np.ndarray]:
    """Predict through the version's hooks for the gRPC ``method``: they get the request's
    tensors as ``request.inputs`` and answer with tensors, a dict of output name -> array
    (``protocol`` names the API in the error for any other answer)."""

    async def decode(_: Any) -> Decoded:
        return signature_name, inputs, None

    request = HookRequest(
        model.name,
        model.version,
        method,
        b"",
        content_type="application/grpc",
        headers={k: v for k, v in headers.items() if isinstance(v, str)},
        inputs=inputs,
    )
    outputs: dict[str, np.ndarray] = await model.through_hooks(
        request,
        decode=decode,
        encode=lambda outputs, _: outputs,
        encode_answer=lambda answer: answer_tensors(answer, protocol),
        deadline=deadline,
        cancellation=cancellation,
        queued=record.queued,
    )
    return outputs


def note_target(record: RequestRecord, target: ModelTarget) -> None:
    """The model (and version, if one is named) a call asks for, for its access-log line."""
    record.model, record.version = target.name, target.version


def _check_filter(wanted: list[str], outputs: Mapping[str, Any]) -> None:
    """TF Serving's checks of a PredictRequest's output_filter."""
    if len(set(wanted)) != len(wanted):
        raise InvalidArgument("duplicate output tensor alias in output_filter")
    for key in wanted:
        if key not in outputs:
            raise InvalidArgument(
                f"output tensor alias not found in signature: {key} Outputs expected to be in "
                f"the set {{{','.join(sorted(outputs))}}}."
            )


def _fill_classifications(result: Any, rows: list[list[tuple[str, float]]]) -> None:
    for row in rows:
        classes = result.classifications.add()
        for label, score in row:
            classes.classes.add(label=label, score=float(score))


def _fill_regressions(result: Any, values: list[Any]) -> None:
    for value in values:
        result.regressions.add(value=float(np.float32(value)))
