"""``AsyncInferenceClient``: the core of the client, on Twisted. Every call returns a Deferred.

It resolves backends per model from Consul (or a static list), spreads calls over them
(``client.balancer``), retries within a budget and a deadline (``client.dispatch``), and
turns numpy arrays into the Open Inference Protocol's binary tensors (``client.v2_api``), TF
Serving's JSON (``client.codec``) or its gRPC messages (``client.grpc_api``) and back, with
the dtypes of the model's signature, read once per model and version.
``client.blocking.InferenceClient`` runs this same object on a reactor thread.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import frozen
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from client import grpc_api, v2_api
from client.balancer import BackendLoad, Balancer, EjectionPolicy, Strategy
from client.budget import RetryBudget
from client.codec import (
    Classification,
    Outputs,
    decode_classifications,
    decode_outputs,
    encode_inputs,
    encode_json,
    loads,
)
from client.dispatch import Attempt, Deadline, Dispatcher, DispatchStats, Exchange, within
from client.errors import DeadlineExceeded, ServerError
from client.grpc_api import GrpcSources, GrpcTransport
from client.multipart import Part, encode_multipart
from client.signature import DEFAULT_SIGNATURE, ModelMetadata, SignatureSpec
from client.sources import ConsulSources, Sources, StaticSources
from client.transport import USER_AGENT, HTTPRequest, HTTPResponse, HTTPTransport, TreqTransport
from discovery.backends import Backend
from discovery.consul import ConsulAddress
from wire.auth import token_problem
from wire.consul_tags import served_models
from wire.paths import model_path

__all__ = ["AsyncInferenceClient", "BackendInfo", "Image"]

#: An image to classify: its bytes, or ``(filename, bytes)`` (the name sets the part's type).
Image = bytes | tuple[str, bytes]

#: How ``predict`` travels: the Open Inference Protocol with binary tensors to each server
#: that announces it and TF Serving's REST JSON to the others (``auto``, the default), TF
#: Serving's REST JSON, the Open Inference Protocol to every server (``client.v2_api``), or
#: TF Serving's gRPC API (``client.grpc_api``).
PROTOCOLS = ("auto", "rest", "v2", "grpc")
_GET_HEADERS = {"Accept": "application/json", "User-Agent": USER_AGENT}
_JSON_HEADERS = {**_GET_HEADERS, "Content-Type": "application/json"}


@frozen
class BackendInfo:
    """A backend as the client sees it: where, which models, and this client's load on it."""

    backend: Backend
    models: tuple[str, ...]  # "name:version" as the server registered them
    load: BackendLoad


class AsyncInferenceClient:
    """Inference calls on a kleinserve (or TF Serving) fleet, for code running on a reactor.

    Give ``consul`` (an address, ``host:port`` or ``http[s]://host:port``; default
    ``$CONSUL_HTTP_ADDR`` or ``127.0.0.1:8500``) to find the servers of ``service`` in
    Consul, or ``backends=[(host, port), …]`` for a fixed list. ``timeout`` is the default
    deadline of one call in seconds, retries included. ``attempt_timeout`` is how long one
    attempt waits for an answer before it is cancelled and retried on another server
    (default ``None``: the call's timeout divided by ``max_attempts``; the last attempt
    always gets the rest of the deadline; see ``client.dispatch``). ``balancer`` is
    ``"peak_ewma"`` (the default: of two random backends, the lower answer time for the
    model times requests in flight + 1; see ``client.balancer``), ``"p2c"`` (fewest requests
    in flight of two random backends) or ``"round_robin"``.
    ``on_attempt`` hears about every attempt (an ``Attempt``), on the reactor thread.
    ``protocol`` says how ``predict`` (and its signature lookup) travels: ``"auto"`` (the
    default) sends the Open Inference Protocol with binary tensors to each server whose
    Consul registration has the tag ``api:v2`` and TF Serving's REST JSON to the others (and
    to static ``backends``, which carry no tags; a call naming a ``signature_name`` other than
    the default goes as REST JSON too, since v2 serves one signature); ``"rest"`` REST JSON to
    every server; ``"v2"`` the Open Inference Protocol to every server, Consul's or static
    (any v2 server: kleinserve, Triton); ``"grpc"`` TF Serving gRPC calls to each server's
    announced gRPC port (static ``backends`` then name gRPC ports; it needs the
    ``tensorflow`` and ``tensorflow-serving-api`` packages). The other calls are REST's (over
    gRPC: to the servers' REST ports found in Consul; with static gRPC ports they raise
    ValueError).

    ``token``: a bearer token (``wire.auth``) sent with every call, REST, v2 and gRPC alike,
    for servers started with ``--auth_token_file``; a server that refuses it answers 401
    (gRPC UNAUTHENTICATED), raised as ``Unauthenticated`` and never retried.
    A server registered in Consul with the meta ``scheme: https`` (a kleinserve server with
    an ``ssl:`` ``--listen``) is called over https; its certificate is verified against the
    CA certificates in the PEM file ``ca_file``, else the system's trusted CAs, and must name
    the address called. Static ``backends`` are called over https when ``ca_file`` is given,
    http otherwise. A certificate that cannot be verified fails the call at once with
    ``CertificateError``. (gRPC is plain: the server's gRPC port has no TLS.)

    Without ``reactor`` the global reactor is used; it must be running for calls to make
    progress. ``close()`` stops the Consul watches and closes pooled connections.
    """

    def __init__(
        self,
        consul: str | ConsulAddress | None = None,
        service: str = "inference",
        *,
        backends: Sequence[tuple[str, int]] | None = None,
        reactor: Any = None,
        timeout: float = 30.0,
        balancer: str | Strategy = Strategy.PEAK_EWMA,
        max_attempts: int = 3,
        attempt_timeout: float | None = None,
        connections_per_backend: int = 64,
        retry_budget: RetryBudget | None = None,
        ejection: EjectionPolicy | None = None,
        rng: random.Random | None = None,
        on_attempt: Callable[[Attempt], object] | None = None,
        transport: HTTPTransport | None = None,
        sources: Sources | None = None,
        protocol: str = "auto",
        token: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        if consul is not None and backends is not None:
            raise ValueError("give consul= or backends=, not both")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
        if token is not None and (problem := token_problem(token)) is not None:
            raise ValueError(f"token must be a bearer token; this one is {problem}")
        self.protocol = protocol
        self.timeout = timeout
        self._clock: IReactorTime = reactor
        self._rng = rng if rng is not None else random.Random()
        rest_sources: Sources | None = sources  # where REST calls go (None: nowhere known)
        if sources is None:
            if backends is not None:
                sources = StaticSources(backends, scheme="https" if ca_file else "http")
                rest_sources = None if protocol == "grpc" else sources  # it lists gRPC ports
            else:
                address = (
                    consul
                    if isinstance(consul, ConsulAddress)
                    else ConsulAddress.parse(consul)
                    if consul
                    else ConsulAddress.from_env()
                )
                sources = rest_sources = ConsulSources(reactor, address, service, rng=self._rng)
                if protocol == "grpc":  # each server on the gRPC port it announces
                    sources = GrpcSources(sources)
        self._sources = sources
        if transport is None:
            transport = (
                GrpcTransport(reactor)
                if protocol == "grpc"
                else TreqTransport.create(
                    reactor, connections_per_backend=connections_per_backend, ca_file=ca_file
                )
            )
        self._transport = transport
        budget = retry_budget or RetryBudget(reactor)

        def dispatcher(sources: Sources, transport: HTTPTransport) -> Dispatcher:
            return Dispatcher(
                sources,
                transport,
                reactor,
                self._rng,
                balancer=Balancer(reactor, self._rng, strategy=balancer, ejection=ejection),
                budget=budget,
                max_attempts=max_attempts,
                attempt_timeout=attempt_timeout,
                on_attempt=on_attempt,
                token=token,
            )

        self._dispatcher = dispatcher(sources, transport)
        # REST calls (metadata, status, predict_json, classify_image): the same dispatcher,
        # except over gRPC, where they need the servers' REST ports and an HTTP transport.
        self._rest: Dispatcher | None = self._dispatcher
        self._rest_transport: HTTPTransport | None = None
        if protocol == "grpc" and rest_sources is not sources:
            self._rest = None
            if rest_sources is not None:
                self._rest_transport = TreqTransport.create(
                    reactor, connections_per_backend=connections_per_backend, ca_file=ca_file
                )
                self._rest = dispatcher(rest_sources, self._rest_transport)
        self._metadata: dict[tuple[str, int | None], ModelMetadata] = {}
        self._pending: dict[tuple[str, int | None], list[Deferred[ModelMetadata]]] = {}

    @property
    def stats(self) -> DispatchStats:
        """Calls, attempts, retries and budget refusals so far."""
        return self._dispatcher.stats

    @property
    def balancer(self) -> Balancer:
        return self._dispatcher.balancer

    @property
    def attempt_timeout(self) -> float | None:
        """Seconds one attempt waits, or None for a share of each call's timeout."""
        return self._dispatcher.attempt_timeout

    def _rest_calls(self) -> Dispatcher:
        if self._rest is None:
            raise ValueError(
                "with protocol='grpc', static backends are gRPC ports: this REST call has no "
                "server to go to; make it with a client of protocol='rest' (or find the "
                "servers in Consul, which announces both ports)"
            )
        return self._rest

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline.after(self._clock, self.timeout if timeout is None else timeout)

    # --- the calls -----------------------------------------------------------------------------

    def predict(
        self,
        model: str,
        inputs: Any,
        *,
        version: int | None = None,
        signature_name: str | None = None,
        timeout: float | None = None,
    ) -> Deferred[Outputs]:
        """Run the model on ``inputs``: an array (or nested list), or a dict of named arrays.

        Fires with one array for a signature with one output, else a dict of arrays, each
        with the dtype the signature declares.
        """
        return Deferred.fromCoroutine(
            self._predict(model, inputs, version, signature_name, self._deadline(timeout))
        )

    async def _predict(
        self,
        model: str,
        inputs: Any,
        version: int | None,
        signature_name: str | None,
        deadline: Deadline,
    ) -> Outputs:
        named = signature_name not in (None, DEFAULT_SIGNATURE)
        if named and self.protocol == "v2":
            raise ValueError(
                f"protocol='v2' calls the one signature the server's v2 API serves "
                f"({DEFAULT_SIGNATURE}, or a model's only one), not {signature_name!r}; "
                "use protocol='rest' or 'auto' to name a signature"
            )
        signature = await self._signature(model, version, signature_name, deadline)
        if self.protocol == "grpc":
            body = grpc_api.predict_body(model, version, signature_name, inputs, signature)
            call = HTTPRequest("POST", grpc_api.PREDICT, body)
            answer = await self._dispatcher.call(model, version, call, deadline)
            return _read(answer, model, lambda: grpc_api.decode_predict(answer.body, signature))
        written: dict[bool, HTTPRequest] = {}  # each way written once, whatever the retries

        def request_for(backend: Backend) -> HTTPRequest:
            v2 = self.protocol == "v2" or (
                self.protocol == "auto" and not named and v2_api.speaks_v2(backend)
            )
            if v2 not in written:
                written[v2] = (
                    v2_api.infer_request(model, version, inputs, signature)
                    if v2
                    else HTTPRequest(
                        "POST",
                        model_path(model, version, ":predict"),
                        encode_inputs(inputs, signature, signature_name),
                        _JSON_HEADERS,
                    )
                )
            return written[v2]

        answered = await self._dispatcher.exchange(model, version, request_for, deadline)
        return _read(answered.response, model, lambda: _outputs(answered, signature))

    def predict_json(
        self,
        model: str,
        body: Mapping[str, Any],
        *,
        version: int | None = None,
        timeout: float | None = None,
    ) -> Deferred[Any]:
        """Send a TF Serving ``:predict`` body as is (row or columnar); fires with the answer."""
        return Deferred.fromCoroutine(
            self._json_call(
                model, version, "POST", ":predict", encode_json(body), self._deadline(timeout)
            )
        )

    def metadata(
        self, model: str, *, version: int | None = None, timeout: float | None = None
    ) -> Deferred[Any]:
        """The model's ``/metadata`` document (signatures with dtypes and shapes)."""
        return Deferred.fromCoroutine(
            self._json_call(model, version, "GET", "/metadata", None, self._deadline(timeout))
        )

    def status(
        self, model: str, *, version: int | None = None, timeout: float | None = None
    ) -> Deferred[Any]:
        """The model's version status (``model_version_status``), from one of its backends."""
        return Deferred.fromCoroutine(
            self._json_call(model, version, "GET", "", None, self._deadline(timeout))
        )

    async def _json_call(
        self,
        model: str,
        version: int | None,
        method: str,
        verb: str,
        body: bytes | None,
        deadline: Deadline,
    ) -> Any:
        headers = _JSON_HEADERS if body is not None else _GET_HEADERS
        request = HTTPRequest(method, model_path(model, version, verb), body, headers)
        response = await self._rest_calls().call(model, version, request, deadline)
        return _read(response, model, lambda: loads(response.body))

    def classify_image(
        self,
        model: str,
        image: Image,
        *,
        top_k: int | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> Deferred[list[Classification]]:
        """The model's ranked labels for one image (its encoded bytes: PNG, JPEG, …)."""
        d = self.classify_images(model, [image], top_k=top_k, version=version, timeout=timeout)
        return d.addCallback(lambda results: results[0])

    def classify_images(
        self,
        model: str,
        images: Sequence[Image],
        *,
        top_k: int | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> Deferred[list[list[Classification]]]:
        """Ranked labels for several images sent in one request, in the order given."""
        return Deferred.fromCoroutine(
            self._classify(model, list(images), top_k, version, self._deadline(timeout))
        )

    async def _classify(
        self,
        model: str,
        images: list[Image],
        top_k: int | None,
        version: int | None,
        deadline: Deadline,
    ) -> list[list[Classification]]:
        if not images:
            return []
        parts = [_image_part(n, image) for n, image in enumerate(images)]
        if top_k is not None:
            if top_k < 1:
                raise ValueError(f"top_k must be at least 1, got {top_k}")
            parts.append(Part("top_k", str(top_k).encode()))
        body, content_type = encode_multipart(parts, f"kleinserve-{secrets.token_hex(16)}")
        headers = {**_GET_HEADERS, "Content-Type": content_type}
        path = model_path(model, version, ":classify_image")
        response = await self._rest_calls().call(
            model, version, HTTPRequest("POST", path, body, headers), deadline
        )
        results = _read(response, model, lambda: decode_classifications(response.body))
        if len(results) != len(images):
            raise _unreadable(model, response, f"{len(results)} results for {len(images)} images")
        return [ranked[:top_k] if top_k else ranked for ranked in results]

    def backends(
        self, model: str | None = None, *, timeout: float | None = None
    ) -> Deferred[list[BackendInfo]]:
        """The healthy backends (of ``model``, or of the whole service) and this client's load."""
        return Deferred.fromCoroutine(self._backends(model, self._deadline(timeout)))

    async def _backends(self, model: str | None, deadline: Deadline) -> list[BackendInfo]:
        source = self._sources.for_model(model) if model else self._sources.for_service()
        await self._dispatcher.ready(source, deadline)
        return [
            BackendInfo(b, served_models(b.meta, b.tags), self._dispatcher.balancer.load(b))
            for b in source.current
        ]

    # --- metadata, read once per model and version ---------------------------------------------

    async def _signature(
        self, model: str, version: int | None, name: str | None, deadline: Deadline
    ) -> SignatureSpec | None:
        key = (model, version)
        metadata = self._metadata.get(key)
        if metadata is None:
            waiter: Deferred[ModelMetadata] = Deferred()
            waiting = self._pending.get(key)
            if waiting is not None:
                waiting.append(waiter)
            else:
                self._pending[key] = [waiter]  # before fetching: it may finish at once
                fetch = Deferred.fromCoroutine(self._fetch_metadata(model, version))
                fetch.addBoth(self._metadata_arrived, key)
            metadata = await within(
                self._clock, waiter, deadline, lambda d: _metadata_timeout(model, d)
            )
        return metadata.signature(name)

    async def _fetch_metadata(self, model: str, version: int | None) -> ModelMetadata:
        deadline = self._deadline(None)
        if self.protocol == "grpc":
            call = HTTPRequest("POST", grpc_api.METADATA, grpc_api.metadata_body(model, version))
            answer = await self._dispatcher.call(model, version, call, deadline)
            return _read(answer, model, lambda: grpc_api.decode_metadata(answer.body))
        if self.protocol == "v2":
            call = v2_api.metadata_request(model, version)
            found = await self._dispatcher.call(model, version, call, deadline)
            return _read(found, model, lambda: v2_api.decode_metadata(found.body, version))
        request = HTTPRequest("GET", model_path(model, version, "/metadata"), None, _GET_HEADERS)
        response = await self._dispatcher.call(model, version, request, deadline)
        return _read(response, model, lambda: ModelMetadata.parse(loads(response.body)))

    def _metadata_arrived(
        self, result: ModelMetadata | Failure, key: tuple[str, int | None]
    ) -> None:
        waiting = self._pending.pop(key, [])
        if not isinstance(result, Failure):
            self._metadata[key] = result
        for waiter in waiting:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def forget_metadata(self) -> None:
        """Read signatures afresh on next use (after a model changed its signature)."""
        self._metadata.clear()

    def close(self) -> Deferred[None]:
        """Stop watching Consul and close idle connections."""
        closing = [self._sources.close(), self._transport.close()]
        if self._rest_transport is not None:
            closing.append(self._rest_transport.close())
        return defer.gatherResults(closing).addCallback(lambda _: None)


def _image_part(index: int, image: Image) -> Part:
    if isinstance(image, tuple):
        filename, data = image
    else:
        filename, data = f"image-{index}", image
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(
            f"an image is its encoded bytes (or (filename, bytes)), not {type(data).__name__}"
        )
    return Part("data", bytes(data), filename=filename)


def _outputs(answer: Exchange, signature: SignatureSpec | None) -> Outputs:
    """A predict answer, read the way its request was written."""
    if v2_api.is_v2(answer.request):
        return v2_api.decode_infer(answer.response, signature)
    return decode_outputs(answer.response.body, signature)


def _read(response: HTTPResponse, model: str, parse: Callable[[], Any]) -> Any:
    try:
        return parse()
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise _unreadable(model, response, str(e)) from None


def _unreadable(model: str, response: HTTPResponse, why: str) -> ServerError:
    return ServerError(
        f"model {model!r}: cannot read the server's answer ({why}); is it a kleinserve or "
        "TF Serving server of the same API version?",
        status=response.code,
        server_message="",
        attempts=1,
    )


def _metadata_timeout(model: str, deadline: Deadline) -> Exception:
    return DeadlineExceeded(
        f"model {model!r}: its signature (GET …/metadata) did not arrive within the timeout "
        f"of {deadline.timeout:g} s; raise the timeout or check the servers",
        timeout=deadline.timeout,
        attempts=0,
    )
