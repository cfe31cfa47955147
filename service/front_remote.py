"""A front process's view of the main process (``--http_processes``, docs/scaling.md).

``MainChannel`` is the unix socket to the main process: calls with an id, each answered
once, and notices (access-log entries, request metrics, output regions given back, leases
released, cancels, counts), which ride on the next frame sent or go together as one frame at
the end of the reactor turn. ``RemotePlane`` is the data plane as the HTTP front doors
(``service.http``, ``service.v2``) use it, with its work done by the main process:

* ``lease(target)``: for a target this process knows (what the last lease answer said it
  resolves to: the version, its signatures, the main process's epoch for that load of it),
  nothing is sent and no lease is held; otherwise the main process is asked to look the
  version up and hold it until the ``async with`` block ends (a round trip), and its answer
  is remembered. The main process sends a version's signatures the first time this process
  sees that version (and again when it was reloaded), so ``signature(name)`` needs no round
  trip. Known targets are forgotten when the main process says routes changed (``routes``);
* ``predict`` checks the inputs against the signature here (the same messages as in one
  process), writes them into the shared-memory ring and asks the main process to run them
  through the version's batching queue: under the lease, or, for a known target, on the
  version and epoch assumed, which the main process leases for that predict or answers
  "stale" (then the target is leased for real, the inputs checked again and sent again). The
  outputs come back in the main process's ring.

So a request for a known target is one frame to the main process and one back.

Everything else a front door can be asked (status, metadata, health, metrics, uploads,
hooks, classify and regress) is forwarded whole, as HTTP over a unix socket, to the main
process (``Forwarder``), which answers it as a single process would.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import attrs
import numpy as np
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IRequest
from zope.interface import implementer

from service.batching import Queued
from service.errors import ServingError, Unavailable
from service.front_frames import (
    Header,
    error_of,
    pack,
    put_tensors,
    shared_regions,
    take_tensors,
    unpack,
)
from service.plane_types import Cancellation, ModelTarget, Tensors
from service.shm_ring import Ring
from service.signature import Signature, TensorInfo, check_inputs, find_signature

log = Logger()

GONE = "the server's main process did not answer; retry"


def _nothing(_: Header | None) -> None:
    pass


class MainChannel(Int32StringReceiver):
    """The front process's end of the socket to the main process.

    Notices (``notify``: access-log entries, request metrics, leases released, cancels, HTTP
    counters; ``give_back``: output regions read) are not sent one frame each: they ride on
    the next frame sent (a call), or all those of one reactor turn go as one frame at its
    end (``clock.callLater(0)``), so the main process unpacks one frame for many.
    """

    MAX_LENGTH = 2**31 - 1  # bounded by the HTTP limits of what produced the frame

    def __init__(
        self,
        on_stop: Callable[[float], object],
        on_lost: Callable[[], object],
        on_reload: Callable[[], object] = lambda: None,
        *,
        clock: IReactorTime,
        on_routes: Callable[[], object] = lambda: None,
    ):
        self._on_stop = on_stop
        self._on_lost = on_lost
        self._on_reload = on_reload
        self._on_routes = on_routes
        self._clock = clock
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[Deferred, Callable[[Header | None], object]]] = {}
        self._notices: list[list[Any]] = []  # [op, value], in the order raised
        self._freed: list[int] = []  # the main process's output regions, to give back
        self._flush: IDelayedCall | None = None
        self.lost = False

    def call(
        self,
        header: Header,
        tail: list[bytes] | None = None,
        done: Callable[[Header | None], object] = _nothing,
    ) -> tuple[int, Deferred]:
        """Send ``header`` with a fresh id; the Deferred fires with the answer (header, tail).

        ``done`` runs with the answer's header when it arrives (None if the main process is
        gone), whether or not the Deferred was cancelled meanwhile: the ring regions the call
        used are freed then, and a lease whose request has left is released.
        """
        if self.lost:
            raise Unavailable(GONE, retry_after=1)
        call_id = next(self._ids)
        header["id"] = call_id
        answer: Deferred = Deferred()
        self._waiting[call_id] = (answer, done)
        self._send(header, tail)
        return call_id, answer

    def notify(self, op: str, value: Any = None) -> None:
        """A notice for the main process: with the next frame, by the end of this turn."""
        if not self.lost:
            self._notices.append([op, value])
            self._flush_soon()

    def give_back(self, offsets: list[int]) -> None:
        """Output regions read: they go back with the next frame, by the end of this turn."""
        if offsets and not self.lost:
            self._freed.extend(offsets)
            self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flush is None:
            self._flush = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Send the notices not sent yet, as one frame (none if there are none)."""
        if self._flush is not None:
            if self._flush.active():
                self._flush.cancel()
            self._flush = None
        if (self._notices or self._freed) and not self.lost:
            self._send({"op": "notices"})

    def _send(self, header: Header, tail: list[bytes] | None = None) -> None:
        if self._notices:
            header["notices"], self._notices = self._notices, []
        if self._freed:
            header["freed"], self._freed = self._freed, []
        self.sendString(pack(header, tail))

    def stringReceived(self, frame: bytes) -> None:
        header, tail = unpack(frame)
        op = header.get("op")
        if op is None:
            waiting = self._waiting.pop(header["id"], None)
            if waiting is not None:
                answer, done = waiting
                done(header)
                if not answer.called:
                    answer.callback((header, tail))
        elif op == "routes":
            self._on_routes()  # what a target resolves to may have changed
        elif op == "stop":
            self._on_stop(float(header.get("within", 30.0)))
        elif op == "reload":
            self._on_reload()  # SIGHUP reached the main process: re-read the token file

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        self._notices, self._freed = [], []
        waiting, self._waiting = self._waiting, {}
        for answer, done in waiting.values():
            done(None)
            if not answer.called:
                answer.errback(Failure(Unavailable(GONE, retry_after=1)))
        self._on_lost()


def _checked(header: Header) -> Header:
    error = header.get("error")
    if error is not None:
        raise error_of(error)
    return header


@attrs.frozen
class VersionInfo:
    """What a front process keeps of a version: its signatures, for decoding and checks."""

    name: str
    version: int
    signatures: Mapping[str, Signature]
    signature_defs: Mapping[str, Any]


@attrs.frozen
class Resolved:
    """What the main process last said a target resolves to: the version (its signatures),
    which load of it (``epoch``, the main process's number for it), and whether it has hooks."""

    info: VersionInfo
    epoch: int
    hooks: bool


TargetKey = tuple[str, int | None, str | None]


def _key(target: ModelTarget) -> TargetKey:
    return (target.name, target.version, target.label)


class RemotePlane:
    """The data plane of the front doors, done by the main process over ``channel``.

    A target whose version this process knows (``Resolved``, from an earlier lease answer,
    forgotten when the main process says routes changed) is leased without a round trip:
    its predict names the target and the version assumed, and the main process leases it for
    that predict, or answers "stale" if the target resolves otherwise now.
    """

    MAX_TARGETS = 1024  # targets remembered; past it all are forgotten (a new lease each)

    def __init__(self, channel: MainChannel, ring: Ring | None, clock: Any) -> None:
        self.channel = channel
        self.ring = ring
        self.clock = clock
        self._versions: dict[tuple[str, int], VersionInfo] = {}
        self._targets: dict[TargetKey, Resolved] = {}

    def forget_targets(self) -> None:
        """The main process says what a target resolves to may have changed."""
        self._targets.clear()

    def forget(self, target: ModelTarget) -> None:
        self._targets.pop(_key(target), None)

    @contextlib.asynccontextmanager
    async def lease(self, target: ModelTarget) -> AsyncIterator[RemoteLease]:
        known = self._targets.get(_key(target))
        lease_id = None
        if known is None:
            lease_id, known = await self.take_lease(target)
        model = RemoteLease(self, target, lease_id, known)
        try:
            yield model
        finally:
            model.release()

    async def take_lease(self, target: ModelTarget) -> tuple[int, Resolved]:
        """A lease of ``target`` held by the main process (a round trip), and what it
        resolved to, remembered for the next requests."""
        left = [False]  # the request left before its lease came: release it when it comes

        def arrived(header: Header | None) -> None:
            if header is None:
                return
            # Kept even when the request left: the main process sends a version's
            # signatures once, so an answer dropped with them would leave this process
            # unable to serve that version (every later lease: "did not answer; retry").
            self._keep_signatures(header)
            if left[0] and "lease" in header:
                self.channel.notify("release", header["lease"])

        _, answering = self.channel.call(
            {"op": "lease", "target": [target.name, target.version, target.label]},
            done=arrived,
        )
        try:
            reply, _ = await answering
        except CancelledError:
            left[0] = True
            raise
        answer = _checked(reply)
        key = (answer["name"], int(answer["version"]))
        info = self._versions.get(key)
        if info is None:  # the main process sends them once per version: it must have them
            self.channel.notify("release", answer["lease"])
            raise Unavailable(GONE, retry_after=1)
        known = Resolved(info, int(answer["epoch"]), bool(answer["hooks"]))
        if len(self._targets) >= self.MAX_TARGETS:
            self._targets.clear()
        self._targets[_key(target)] = known
        return int(answer["lease"]), known

    def _keep_signatures(self, answer: Header) -> None:
        """A lease answer's signatures, when it carries them (the first time this process
        sees a version, and again once it was reloaded), kept per name and version."""
        if "signatures" in answer and "error" not in answer:
            key = (answer["name"], int(answer["version"]))
            self._versions[key] = VersionInfo(
                key[0],
                key[1],
                {k: signature_from(v) for k, v in answer["signatures"].items()},
                answer["signature_defs"],
            )


class RemoteLease:
    """One request's hold on a version (``RemotePlane.lease``): a lease the main process
    holds (``lease_id``), or none when the version was known here; then each predict is
    leased by the main process for its own length, if the target still resolves to it."""

    def __init__(
        self, plane: RemotePlane, target: ModelTarget, lease_id: int | None, known: Resolved
    ) -> None:
        self._plane = plane
        self._target = target
        self._lease = lease_id
        self._adopt(known)

    def _adopt(self, known: Resolved) -> None:
        self._known = known
        self._info = info = known.info
        self.name = info.name
        self.version = info.version
        # Only whether the version has hooks: a request for it is forwarded whole.
        self.hooks: object | None = True if known.hooks else None
        self._signature: Signature | None = None

    def release(self) -> None:
        """The request is done: the main process's lease, if one was taken, is released."""
        lease, self._lease = self._lease, None
        if lease is not None:
            self._plane.channel.notify("release", lease)

    def signature(self, name: str | None) -> Signature:
        if self._signature is None:
            self._signature = find_signature(self._info.signatures, name, self.name, self.version)
        return self._signature

    def signature_defs(self) -> Mapping[str, Any]:
        return self._info.signature_defs

    async def predict(
        self,
        signature_name: str | None,
        inputs: Mapping[str, np.ndarray],
        *,
        deadline: float | None = None,
        cancellation: Cancellation | None = None,
        dtype_names: Mapping[str, str] | None = None,
        queued: Queued | None = None,
    ) -> Tensors:
        """As ``service.dataplane.VersionLease.predict``, run by the main process.

        Sent on the version known here (no lease), the main process may answer that the
        target resolves otherwise now: then the target is leased for real, the inputs are
        checked against that version's signature, and sent again under that lease.
        """
        signature = self.signature(signature_name)
        check_inputs(signature, inputs, dtype_names)
        reply, reply_tail = await self._send(signature, inputs, deadline, cancellation)
        if reply.get("stale"):
            plane = self._plane
            plane.forget(self._target)
            self._lease, known = await plane.take_lease(self._target)
            self._adopt(known)
            if self.hooks is not None:  # it runs through hooks now: the adapter forwards those
                raise Unavailable(
                    f"model {self.name!r} is now served by version {self.version}, which has "
                    "hooks; retry",
                    retry_after=1,
                )
            signature = self.signature(signature_name)
            check_inputs(signature, inputs, dtype_names)
            reply, reply_tail = await self._send(signature, inputs, deadline, cancellation)
        answer = _checked(reply)
        if queued is not None and answer.get("batch") is not None:
            queued.batched(float(answer["wait"]), int(answer["batch"]))
        specs = answer["outputs"]
        plane = self._plane
        shared = plane.ring.buffer if plane.ring is not None else None
        outputs = take_tensors(specs, reply_tail, shared, copy=True)
        plane.channel.give_back(shared_regions(specs))
        return outputs

    async def _send(
        self,
        signature: Signature,
        inputs: Mapping[str, np.ndarray],
        deadline: float | None,
        cancellation: Cancellation | None,
    ) -> tuple[Header, memoryview]:
        """One predict frame, and its answer: under the lease, or on the version known."""
        plane = self._plane
        specs, tail, regions = put_tensors(inputs, plane.ring)

        abandoned = [False]  # the request left: nobody reads the outputs when they come

        def free(answer: Header | None = None) -> None:
            if plane.ring is not None:
                for offset in regions:
                    plane.ring.free(offset)
            if answer is not None and abandoned[0]:
                plane.channel.give_back(shared_regions(answer.get("outputs", ())))

        header: Header = {
            "op": "predict",
            "signature": signature.name,
            "inputs": specs,
            "timeout": None if deadline is None else deadline - plane.clock.seconds(),
        }
        if self._lease is not None:
            header["lease"] = self._lease
        else:
            target = self._target
            header["target"] = [target.name, target.version, target.label]
            header["version"] = self.version
            header["epoch"] = self._known.epoch
        try:
            call_id, answering = plane.channel.call(header, tail, done=free)
        except ServingError:
            free()
            raise
        pending = [True]

        def cancel() -> None:
            if pending[0]:
                plane.channel.notify("cancel", call_id)

        if cancellation is not None:
            cancellation.on_cancel(cancel)
        answering.addErrback(_cancelled_also, cancel)
        try:
            reply, reply_tail = await answering
        except CancelledError:
            abandoned[0] = True
            raise
        finally:
            pending[0] = False
        return reply, reply_tail


def _cancelled_also(failure: Failure, cancel: Callable[[], object]) -> Failure:
    """A call's Deferred cancelled (Klein does, for a client that left): tell the main
    process too."""
    if failure.check(CancelledError):
        cancel()
    return failure


def signature_from(doc: Mapping[str, Any]) -> Signature:
    """A ``Signature`` from ``signature_doc``'s plain data."""

    def infos(side: Mapping[str, Any]) -> dict[str, TensorInfo]:
        return {
            key: TensorInfo(
                info["name"],
                info["dtype"],
                None if info["shape"] is None else tuple(info["shape"]),
                info["tensor_name"],
            )
            for key, info in side.items()
        }

    return Signature(doc["name"], infos(doc["inputs"]), infos(doc["outputs"]), doc["method_name"])


def signature_doc(signature: Signature) -> dict[str, Any]:
    """A ``Signature`` as plain data (JSON)."""

    def infos(side: Mapping[str, TensorInfo]) -> dict[str, Any]:
        return {
            key: {
                "name": info.name,
                "dtype": info.dtype,
                "shape": None if info.shape is None else list(info.shape),
                "tensor_name": info.tensor_name,
            }
            for key, info in side.items()
        }

    return {
        "name": signature.name,
        "inputs": infos(signature.inputs),
        "outputs": infos(signature.outputs),
        "method_name": signature.method_name,
    }


# -- whole requests, forwarded ----------------------------------------------------------------

#: Headers not passed on: hop-by-hop ones, and those the forwarded body or answer redoes.
_NOT_FORWARDED = {
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"content-length",
    b"content-encoding",  # the body was inflated here
    b"te",
    b"upgrade",
    b"proxy-connection",
}
_NOT_ANSWERED = _NOT_FORWARDED | {b"date", b"server", b"x-request-id"}


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


@implementer(IAgentEndpointFactory)
class _UNIXEndpoints:
    def __init__(self, reactor: Any, path: str) -> None:
        self._reactor, self._path = reactor, path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._path)


class Forwarder:
    """Requests answered by the main process: the same request, as HTTP over its unix socket."""

    def __init__(self, reactor: Any, path: str) -> None:
        pool = HTTPConnectionPool(reactor)
        pool._factory = _QuietClientFactory  # no "Starting factory" line per connection
        pool.maxPersistentPerHost = 16
        self._agent = Agent.usingEndpointFactory(reactor, _UNIXEndpoints(reactor, path), pool)

    def __call__(self, request: IRequest) -> Deferred:
        return ensureDeferred(self._forward(request))

    async def _forward(self, request: IRequest) -> bytes:
        content = request.content
        body = b""
        if content is not None:
            content.seek(0)
            body = content.read()
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _NOT_FORWARDED:
                headers.setRawHeaders(name, values)
        record = getattr(request, "record", None)
        if record is not None:  # the main process files it under the same id
            headers.setRawHeaders(b"x-request-id", [record.request_id.encode()])
        producer = FileBodyProducer(io.BytesIO(body)) if body else None
        try:
            response = await self._agent.request(
                request.method, b"http://main" + request.uri, headers, producer
            )
            answer: bytes = await readBody(response)
        except CancelledError:
            raise  # the client left
        except Exception as e:  # the main process is gone or stopping: the client may retry
            log.info("forwarding {uri} failed: {error}", uri=request.uri, error=repr(e))
            raise Unavailable(GONE, retry_after=1) from None
        request.setResponseCode(response.code)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in _NOT_ANSWERED:
                request.responseHeaders.setRawHeaders(name, values)
        return answer
