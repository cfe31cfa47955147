"""The gRPC port: grpcio's asyncio server on a thread of its own, started and stopped with
the service tree.

It serves ``service.grpc_api``'s PredictionService and ModelService, ``service.v2_grpc``'s
Open Inference Protocol service (``inference.GRPCInferenceService``) and the standard
``grpc.health.v1.Health`` service. Health answers SERVING for the server ("") and for
``tensorflow.serving.PredictionService`` while the server is ready (every model it must
serve is AVAILABLE, the inference threads are not stalled, no stop has begun), NOT_SERVING
otherwise; it is refreshed every ``HEALTH_INTERVAL`` seconds and at once when a stop begins.

Stop, in the order of the HTTP port: health turns NOT_SERVING, the port keeps serving for
what is left of --drain_delay (Consul has been left before), then stops taking calls and
waits for those in flight until shortly before the stop deadline; grpcio cancels what is
left then, which cancels their queued work.

Bearer tokens (--auth_token_file, ``service.auth``): ``TokenInterceptor`` answers a call of
PredictionService or ModelService without a good ``authorization: Bearer …`` metadata entry
UNAUTHENTICATED before its request message is parsed, with its request id and access-log
line; ``grpc.health.v1.Health`` stays open, as the HTTP health checks do.

Threads: grpcio's ``grpc.aio`` server runs on an asyncio loop on one thread (``LoopThread``);
every handler is a coroutine there, which hands its data plane work to the reactor
(``service.grpc_api.ReactorCalls``). --grpc_max_calls bounds the calls in progress at once
(grpcio's ``maximum_concurrent_rpcs``): a call past them is refused RESOURCE_EXHAUSTED at
once, without a handler, so what gRPC holds is bounded by it times the largest message. A
refused call has no access-log line: grpcio answers it before any of our code runs.

Message size: like TF Serving, the receive limit is unbounded unless ``max_receive_bytes``
caps it (--grpc_max_receive_bytes); a larger message is refused by grpcio with
RESOURCE_EXHAUSTED before a handler sees it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
from tritonclient.grpc import service_pb2_grpc
from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from service.access_log import AccessLog
from service.auth import BearerTokens
from service.dataplane import DataPlane
from service.errors import Unauthenticated
from service.grpc_api import ModelService, PredictionService, ReactorCalls, status_code
from service.lifecycle import EXIT_CANNOT_LISTEN, exit_after_stop
from service.request_metrics import ModelRequestMetrics
from service.shutdown import CUT_MARGIN, StopDeadline
from service.v2_grpc import InferenceService
from wire.auth import AUTHORIZATION_HEADER

log = Logger()
T = TypeVar("T")

HEALTH_INTERVAL = 0.5
STOP_POLL = 0.05  # seconds between looks at whether grpcio has stopped
START_TIMEOUT = 30.0  # seconds the reactor waits for grpcio to bind the port
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
HEALTH_METHODS = "/grpc.health.v1.Health/"  # the prefix of the health service's methods
_AUTHORIZATION = AUTHORIZATION_HEADER.lower()  # gRPC metadata keys are lower case

# grpcio's handler makers by (request streaming, response streaming).
_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health's needs a bearer token ``tokens`` takes in its ``authorization``
    metadata; a call without one is answered UNAUTHENTICATED by a handler of its own, which
    parses no request message, files the call under a request id and writes its access-log
    line through ``calls``, as every other call does."""

    def __init__(self, tokens: BearerTokens, calls: ReactorCalls) -> None:
        self._tokens = tokens
        self._calls = calls

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        if details.method.startswith(HEALTH_METHODS):
            return await continuation(details)
        sent = [v for k, v in details.invocation_metadata or () if k == _AUTHORIZATION]
        try:
            self._tokens.check(sent)
        except Unauthenticated as error:
            return self._refusal(details.method, error, await continuation(details))
        return await continuation(details)

    def _refusal(self, method: str, error: Unauthenticated, handler: Any) -> Any:
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            record = self._calls.begin(context)
            code = status_code(error)
            size = len(request) if isinstance(request, bytes) else 0
            self._calls.finished(record, method, context, code, error.status, size, 0)
            await context.abort(code, error.message)

        streaming = (
            (handler.request_streaming, handler.response_streaming) if handler else (False, False)
        )
        return _HANDLERS[streaming](refuse)  # no deserializer: the message stays bytes


class LoopThread:
    """An asyncio loop on a daemon thread of its own: ``run(coroutine)`` runs a coroutine
    there from any thread (a ``concurrent.futures.Future`` of its result)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self) -> None:
        """Stop the loop (what it still runs is dropped); it is not closed, so a late
        ``call_soon_threadsafe`` from another thread is dropped rather than an error."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)


class GrpcPort(Service):
    """grpcio's asyncio server on ``address`` (``host:port``), on a ``LoopThread``.

    ``ready()``: whether health should say SERVING (and the v2 ServerReady ready);
    ``live()``: whether the v2 ServerLive says live (both called on the reactor thread).
    ``max_calls`` bounds the calls in progress at once; grpcio refuses the rest
    RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        address: str,
        plane: DataPlane,
        *,
        reactor: Any,
        ready: Callable[[], bool],
        reload: Callable[[Any], Awaitable[None]],
        live: Callable[[], bool] = lambda: True,
        deadline: StopDeadline | None = None,
        max_calls: int = 256,
        max_receive_bytes: int | None = None,
        exit: Callable[[int], object] | None = None,
        access_log: AccessLog | None = None,
        model_requests: ModelRequestMetrics | None = None,
        tokens: BearerTokens | None = None,
    ) -> None:
        self.address = address
        self._reactor = reactor
        self._ready = ready
        self._deadline = deadline or StopDeadline(
            reactor, drain_delay=0.0, drain_timeout=30.0, watchdog=False
        )
        self._exit = exit or (lambda code: exit_after_stop(code, reactor))
        self._options = [
            ("grpc.max_receive_message_length", max_receive_bytes or -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port in use is an error, as for HTTP
        ]
        self._max_calls = max_calls
        calls = ReactorCalls(reactor, access_log, model_requests)
        self._interceptors = [] if tokens is None else [TokenInterceptor(tokens, calls)]
        self._services = [
            (prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server,
             PredictionService(plane, calls)),
            (model_service_pb2_grpc.add_ModelServiceServicer_to_server,
             ModelService(plane, calls, reload)),
            (service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
             InferenceService(plane, calls, live=live, ready=ready)),
        ]  # fmt: skip
        self._thread = LoopThread("grpc")
        self.health: health_aio.HealthServicer | None = None  # made on the loop
        self._serving: bool | None = None  # what health says now
        self._server: grpc.aio.Server | None = None
        self._refresh = task.LoopingCall(self._update_health)
        self._refresh.clock = reactor
        self.port: int | None = None  # the port bound, once started

    async def _start(self) -> int:
        """On the loop: make the server, bind the port (0: grpcio could not), start."""
        self.health = health_aio.HealthServicer()
        await self._set_health(False)
        server = grpc.aio.server(
            options=self._options,
            interceptors=self._interceptors,
            maximum_concurrent_rpcs=self._max_calls,
        )
        for add, servicer in self._services:
            add(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = server.add_insecure_port(self.address)
        if port:
            await server.start()
            self._server = server
        return port

    def startService(self) -> None:
        super().startService()
        self._thread.start()
        reason = "grpcio could not bind it"
        try:  # the reactor waits: binding is quick, and start-up needs the answer
            self.port = self._thread.run(self._start()).result(START_TIMEOUT)
        except Exception as error:
            self.port = 0
            reason = str(error)
        if not self.port:
            log.critical(
                "cannot listen for gRPC on {address}: {reason}; exiting",
                address=self.address,
                reason=reason,
            )
            self._thread.stop()
            self._exit(EXIT_CANNOT_LISTEN)
            return
        log.info("gRPC listening on {address} (port {port})", address=self.address, port=self.port)
        self._refresh.start(HEALTH_INTERVAL, now=True)

    def _update_health(self) -> None:
        serving = self._ready() and self._deadline.started_at is None
        if serving != self._serving:
            self._serving = serving
            self._thread.run(self._set_health(serving))

    async def _set_health(self, serving: bool) -> None:
        assert self.health is not None
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", PREDICTION_SERVICE):
            await self.health.set(service, status)

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._deadline.begin()
        if self._refresh.running:
            self._refresh.stop()
        server = self._server
        if server is None:
            self._thread.stop()
            return
        self._serving = False
        self._thread.run(self._set_health(False))
        await task.deferLater(self._reactor, self._deadline.drain_delay_left(), lambda: None)
        grace = max(0.0, self._deadline.remaining(CUT_MARGIN))
        # No new calls; those in flight get ``grace``, then grpcio cancels them (which
        # cancels their queued work). Polled on the reactor: nothing here blocks.
        stopped = self._thread.run(server.stop(grace))
        while not stopped.done() and self._deadline.remaining() > 0:
            await task.deferLater(self._reactor, STOP_POLL, lambda: None)
        self._thread.stop()
