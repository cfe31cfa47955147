"""The HTTP seam: one request to one backend, as data in and data out.

``HTTPTransport`` is what the dispatcher sends through. ``TreqTransport`` is the real one:
a ``treq`` client over a persistent connection pool of its own, sized for the
client's concurrency so that concurrent calls to one server reuse connections instead of
opening and closing one each. Unit tests put a fake or a ``StubTreq`` behind this seam.

A failed exchange raises Twisted's own exceptions; ``failure_kind`` sorts them into what
the retry policy needs to know: was the request never sent (always safe to send
elsewhere), did the connection die after it was sent (safe only for idempotent calls), or
could the server's TLS certificate not be verified (a configuration problem: the CA file,
or the certificate's names, which retrying does not fix).

A request's ``scheme`` is its backend's (``https`` for a server whose Consul registration
says so); over https the server's certificate is verified against the CA file given
(``ca_file``), else against the system's trusted CAs, and its subjectAltNames must name the
address called -- an IP address for the addresses Consul reports (Twisted verifies IP
address names with ``service_identity``).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType
from typing import Any, Protocol, cast

from attrs import field, frozen
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from discovery.consul import first_header_values, https_policy

__all__ = [
    "FailureKind",
    "HTTPRequest",
    "HTTPResponse",
    "HTTPTransport",
    "TreqTransport",
    "USER_AGENT",
    "describe",
    "failure_kind",
]


#: The User-Agent of every request the client sends.
USER_AGENT = "kleinserve-client/0.1"


def _frozen_headers(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType({k.lower(): v for k, v in value.items()})


@frozen
class HTTPRequest:
    """One request, without its backend: the dispatcher picks that per attempt."""

    method: str
    path: str  # with the query, e.g. "/v1/models/linear:predict"
    body: bytes | None = None
    headers: Mapping[str, str] = field(factory=dict, converter=_frozen_headers, hash=False)
    scheme: str = "http"  # the backend's: the dispatcher sets it per attempt

    def url(self, host: str, port: int) -> str:
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{port}{self.path}"


@frozen
class HTTPResponse:
    """What a backend answered. Header names are lower-cased; the first value is kept."""

    code: int
    headers: Mapping[str, str] = field(factory=dict, converter=_frozen_headers, hash=False)
    body: bytes = b""


class HTTPTransport(Protocol):
    """Sends a request to ``host:port``; fails with Twisted's exceptions when it cannot.

    Cancelling the Deferred abandons the request (and its connection).
    """

    def send(self, host: str, port: int, request: HTTPRequest) -> Deferred[HTTPResponse]: ...

    def close(self) -> Deferred[None]: ...


class FailureKind(Enum):
    NOT_SENT = "not sent"  # refused, unreachable, connect timeout: the server never saw it
    LOST = "connection lost"  # sent, then the connection died before a whole answer
    TLS = "TLS"  # the server's certificate could not be verified: nothing was sent
    OTHER = "other"


_NOT_SENT = (net_error.ConnectError, net_error.DNSLookupError, RequestNotSent)
_LOST = (
    ResponseNeverReceived,
    ResponseFailed,
    RequestTransmissionFailed,
    net_error.ConnectionLost,
    net_error.ConnectionDone,
)


def tls_failure(error: BaseException) -> bool:
    """Whether ``error`` is a TLS handshake that failed: a certificate not verified (OpenSSL
    says so, or its names do not match), or no TLS spoken. Twisted wraps it in the
    reasons of a ``ResponseNeverReceived``."""
    from OpenSSL import SSL
    from service_identity import VerificationError

    reasons = getattr(error, "reasons", None) or ()
    return any(isinstance(r, Failure) and r.check(SSL.Error, VerificationError) for r in reasons)


def failure_kind(error: BaseException) -> FailureKind:
    """Whether ``error`` means the request was never sent, was lost on the way back, or met
    a certificate that could not be verified."""
    if tls_failure(error):
        return FailureKind.TLS
    if isinstance(error, _NOT_SENT):
        return FailureKind.NOT_SENT
    if isinstance(error, _LOST):
        return FailureKind.LOST
    return FailureKind.OTHER


def describe(error: BaseException) -> str:
    """A short text for a transport failure, with the reasons Twisted wraps inside."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        inner = "; ".join(
            (r.getErrorMessage() if isinstance(r, Failure) else str(r)) for r in reasons
        )
        return f"{type(error).__name__} ({inner})"
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class TreqTransport:
    """``HTTPTransport`` over a ``treq`` ``HTTPClient`` (a real one, or ``StubTreq`` in tests)."""

    def __init__(self, http: Any, pool: HTTPConnectionPool | None = None) -> None:
        self._http = http
        self._pool = pool

    @classmethod
    def create(
        cls,
        reactor: Any,
        *,
        connections_per_backend: int = 64,
        connect_timeout: float = 5.0,
        ca_file: str | None = None,
    ) -> TreqTransport:
        """A transport with its own persistent pool keeping up to ``connections_per_backend``;
        https servers' certificates are verified against ``ca_file`` (PEM), else the system's
        trusted CAs."""
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = connections_per_backend
        policy: BrowserLikePolicyForHTTPS = https_policy(ca_file)
        agent = Agent(reactor, contextFactory=policy, connectTimeout=connect_timeout, pool=pool)
        return cls(HTTPClient(cast(IAgent, agent)), pool)

    def send(self, host: str, port: int, request: HTTPRequest) -> Deferred[HTTPResponse]:
        return Deferred.fromCoroutine(self._send(host, port, request))

    async def _send(self, host: str, port: int, request: HTTPRequest) -> HTTPResponse:
        headers = Headers({k.encode(): [v.encode()] for k, v in request.headers.items()})
        response = await self._http.request(
            request.method,
            request.url(host, port),
            headers=headers,
            data=request.body,
            allow_redirects=False,
        )
        body = await response.content()
        return HTTPResponse(response.code, first_header_values(response.headers), body)

    def close(self) -> Deferred[None]:
        """Close the idle pooled connections."""
        if self._pool is None:
            return defer.succeed(None)
        return self._pool.closeCachedConnections()
