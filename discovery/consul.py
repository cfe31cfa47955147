"""An asynchronous client for the few Consul agent HTTP API calls kleinserve makes.

It is split three ways, so that all but the sending is pure and tested without a network:
pure ``build_*`` functions turn arguments into a
``ConsulRequest``; a ``Transport`` sends it and hands back a ``ConsulResponse``; pure
``parse_*`` functions turn that into a typed result -- ``(index, data)`` for blocking
queries -- or raise ``ConsulError`` (the agent answered, with a status and a body).
``ConsulUnavailable`` means the agent could not be reached or did not answer in time.
``ConsulClient`` is the three glued together; ``TreqTransport`` sends with an injected
``treq`` client over its own persistent connection pool.

Why our own thin client rather than py-consul's API classes over a treq transport:
py-consul's ``HTTPClient`` interface could return Deferreds (its aiohttp adapter does
the same with coroutines), but what sits on top of it does not fit:

- its API methods build and send in one call (``self.agent.http.put(CB.boolean(),
  path, params=..., data=...)``), so there is no pure build step to test, and the
  transport gets no timeout: it has to guess a blocking query's wait from the params;
- ``Consul.__init__`` reads ``CONSUL_HTTP_ADDR`` itself and lets ``CONSUL_HTTP_TOKEN``
  override a token passed in (``os.getenv("CONSUL_HTTP_TOKEN", token)``): global state
  where we inject;
- it has no ``PUT /v1/agent/check/update/<id>`` (status *and* Output), only
  ``ttl_pass/warn/fail`` with a note;
- its callbacks turn a 404 into ``None``/``False`` and other failures into exceptions
  whose status is only inside the message, while Consul 1.8 answers a TTL update for a
  check it does not know with ``500 CheckID "…" does not have associated TTL`` -- the
  sign of an agent restarted empty, which registration must tell from other 500s;
- results are untyped dicts.

The adapter plus the missing pieces would be as long as this module, so this module
keeps py-consul's shape (path + params + body, then a parsing callback) without the
package. Behaviour of Consul 1.8.7 relied on here is noted where it is used.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, cast

import treq
from attrs import field, frozen
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import Certificate, trustRootFromCertificates
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

from discovery.backends import Backend, Backends, aggregate_status, snapshot

__all__ = [
    "CheckNotFound",
    "CheckStatus",
    "ConsulAddress",
    "ConsulClient",
    "ConsulError",
    "ConsulFailure",
    "ConsulRequest",
    "ConsulResponse",
    "ConsulUnavailable",
    "HTTPCheck",
    "MalformedResponse",
    "ServiceDefinition",
    "TTLCheck",
    "Transport",
    "TreqTransport",
    "build_agent_checks",
    "build_agent_services",
    "build_check_update",
    "build_deregister",
    "build_health_service",
    "build_register",
    "build_status_leader",
    "go_duration",
    "https_policy",
    "next_index",
    "parse_agent_checks",
    "parse_agent_services",
    "parse_check_update",
    "parse_empty",
    "parse_health_entry",
    "parse_health_service",
    "parse_index",
    "parse_leader",
]

DEFAULT_PORT = 8500
DEFAULT_TIMEOUT = 10.0
# Consul holds a blocking query without ``wait`` for 5 minutes, and adds up to wait/16
# of jitter to any wait before it answers.
CONSUL_DEFAULT_WAIT = 300.0


# --- errors -----------------------------------------------------------------------------


class ConsulFailure(Exception):
    """Anything that kept a Consul call from succeeding."""


class ConsulUnavailable(ConsulFailure):
    """The agent could not be reached, or did not answer within the timeout."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConsulError(ConsulFailure):
    """The agent answered, with a status that is not success (or a body we cannot read)."""

    def __init__(self, status: int, body: str, message: str | None = None) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.message = message or f"Consul answered {status}: {body.strip()[:300]}"

    def __str__(self) -> str:
        return self.message


class CheckNotFound(ConsulError):
    """The agent does not know the check: it was restarted empty, or the service is gone."""


class MalformedResponse(ConsulError):
    """A success status whose body or index header is not what the API documents."""


# --- the agent's address ------------------------------------------------------------------


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "t", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "f", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r} is not a boolean (use true or false)")


@frozen
class ConsulAddress:
    """Where the local agent listens, and the ACL token to send it.

    Parsed the way Consul's own tools read ``CONSUL_HTTP_ADDR``: ``host:port``,
    ``http://host:port`` or ``https://host:port``. One deliberate difference: a bare
    ``host`` without a port means Consul's port 8500 (Go's client would try port 80);
    with an explicit scheme a missing port is that scheme's default, as in any URL.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    scheme: str = "http"
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @classmethod
    def parse(
        cls,
        address: str,
        *,
        token: str | None = None,
        ssl: bool = False,
        ca_file: str | None = None,
    ) -> ConsulAddress:
        """Read a ``CONSUL_HTTP_ADDR``-style address; ``ssl`` picks https when no scheme is given."""
        text = address.strip()
        if not text:
            raise ValueError(
                "the Consul address is empty (expected host:port or http[s]://host:port)"
            )
        scheme_given = "://" in text
        if scheme_given:
            scheme, _, rest = text.partition("://")
            scheme = scheme.lower()
            if scheme not in ("http", "https"):
                raise ValueError(
                    f"Consul address {address!r}: scheme {scheme!r} is not supported "
                    "(use http:// or https://)"
                )
        else:
            scheme, rest = ("https" if ssl else "http"), text
        parts = urllib.parse.urlsplit("//" + rest)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"Consul address {address!r} must not have a path or query")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"Consul address {address!r} must not carry credentials")
        try:
            port = parts.port
        except ValueError as e:
            raise ValueError(f"Consul address {address!r} has an invalid port") from e
        host = parts.hostname
        if not host:
            raise ValueError(f"Consul address {address!r} has no host")
        if port is None:
            port = (443 if scheme == "https" else 80) if scheme_given else DEFAULT_PORT
        if port == 0:
            raise ValueError(f"Consul address {address!r} has port 0")
        return cls(host=host, port=port, scheme=scheme, token=token or None, ca_file=ca_file)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ConsulAddress:
        """``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN``, ``CONSUL_HTTP_SSL``, ``CONSUL_CACERT``.

        Unset or empty ``CONSUL_HTTP_ADDR`` means ``127.0.0.1:8500``, as for the consul CLI.
        """
        env = os.environ if environ is None else environ
        return cls.parse(
            env.get("CONSUL_HTTP_ADDR", "").strip() or f"127.0.0.1:{DEFAULT_PORT}",
            token=env.get("CONSUL_HTTP_TOKEN", "").strip() or None,
            ssl=_parse_bool("CONSUL_HTTP_SSL", env.get("CONSUL_HTTP_SSL", "")),
            ca_file=env.get("CONSUL_CACERT", "").strip() or None,
        )


# --- requests, responses and what goes in them -----------------------------------------------


def go_duration(seconds: float) -> str:
    """Seconds as a Go duration string, the form Consul reads (``"3s"``, ``"1500ms"``)."""
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {seconds!r}")
    nanos = round(seconds * 1e9)
    for unit, size in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if nanos % size == 0:
            return f"{nanos // size}{unit}"
    return f"{nanos}ns"


def _lower_keys(headers: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType({k.lower(): v for k, v in headers.items()})


@frozen
class ConsulRequest:
    """One call to the agent, as data. ``wait`` is set for a blocking query."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    wait: float | None = None

    def url(self, base_url: str) -> str:
        query = f"?{urllib.parse.urlencode(self.params)}" if self.params else ""
        return f"{base_url}{self.path}{query}"

    def timeout(self, base: float) -> float:
        """The HTTP timeout: ``base``, plus for a blocking query its wait and Consul's jitter."""
        if self.wait is None:
            return base
        return base + self.wait + self.wait / 16


@frozen
class ConsulResponse:
    """What the agent answered. Header names are lower-cased; the first value is kept."""

    code: int
    headers: Mapping[str, str] = field(factory=dict, converter=_lower_keys, hash=False)
    body: bytes = b""

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class CheckStatus(StrEnum):
    """The statuses ``/v1/agent/check/update`` accepts (it refuses ``pass``/``warn``/``fail``)."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"


@frozen
class HTTPCheck:
    """Consul GETs ``url`` every ``interval``: 2xx passing, 429 warning, anything else critical."""

    check_id: str
    name: str
    url: str
    interval: float
    timeout: float | None = None
    deregister_critical_after: float | None = None
    tls_skip_verify: bool = False  # for an https url whose certificate the agent cannot verify

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "CheckID": self.check_id,
            "Name": self.name,
            "HTTP": self.url,
            "Method": "GET",
            "Interval": go_duration(self.interval),
        }
        if self.tls_skip_verify:
            body["TLSSkipVerify"] = True
        if self.timeout is not None:
            body["Timeout"] = go_duration(self.timeout)
        if self.deregister_critical_after is not None:
            body["DeregisterCriticalServiceAfter"] = go_duration(self.deregister_critical_after)
        return body


@frozen
class TTLCheck:
    """Critical unless updated at least every ``ttl`` (``/v1/agent/check/update/<check_id>``)."""

    check_id: str
    name: str
    ttl: float
    deregister_critical_after: float | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "CheckID": self.check_id,
            "Name": self.name,
            "TTL": go_duration(self.ttl),
        }
        if self.deregister_critical_after is not None:
            body["DeregisterCriticalServiceAfter"] = go_duration(self.deregister_critical_after)
        return body


def _str_meta(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType({str(k): str(v) for k, v in (value or {}).items()})


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _check_tuple(value: Iterable[HTTPCheck | TTLCheck]) -> tuple[HTTPCheck | TTLCheck, ...]:
    return tuple(value)


@frozen
class ServiceDefinition:
    """A service instance as the agent's register endpoint takes it."""

    name: str
    service_id: str
    address: str
    port: int
    tags: tuple[str, ...] = field(default=(), converter=_str_tuple)
    meta: Mapping[str, str] = field(factory=dict, converter=_str_meta, hash=False)
    checks: tuple[HTTPCheck | TTLCheck, ...] = field(default=(), converter=_check_tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "Name": self.name,
            "ID": self.service_id,
            "Address": self.address,
            "Port": self.port,
            "Tags": list(self.tags),
            "Meta": dict(self.meta),
            "Checks": [check.to_json() for check in self.checks],
        }


def _segment(value: str) -> str:
    if not value:
        raise ValueError("an empty name cannot go in a Consul API path")
    return urllib.parse.quote(value, safe=":@")


def _json_body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def build_register(
    service: ServiceDefinition, *, replace_existing_checks: bool = True
) -> ConsulRequest:
    """``PUT /v1/agent/service/register``; replacing checks drops any the definition no longer has."""
    params = (("replace-existing-checks", "true"),) if replace_existing_checks else ()
    return ConsulRequest("PUT", "/v1/agent/service/register", params, _json_body(service.to_json()))


def build_deregister(service_id: str) -> ConsulRequest:
    """``PUT /v1/agent/service/deregister/<id>`` (Consul 1.8 answers 200 even for unknown IDs)."""
    return ConsulRequest("PUT", f"/v1/agent/service/deregister/{_segment(service_id)}")


def build_check_update(check_id: str, status: CheckStatus, output: str = "") -> ConsulRequest:
    """``PUT /v1/agent/check/update/<id>`` with ``{"Status": …, "Output": …}`` for a TTL check."""
    body = {"Status": CheckStatus(status).value, "Output": output}
    return ConsulRequest(
        "PUT", f"/v1/agent/check/update/{_segment(check_id)}", (), _json_body(body)
    )


def build_health_service(
    name: str,
    *,
    passing: bool = True,
    tags: Iterable[str] = (),
    index: int = 0,
    wait: float | None = None,
) -> ConsulRequest:
    """``GET /v1/health/service/<name>``; with ``index > 0`` a blocking query for up to ``wait``.

    ``passing`` leaves out every instance with a warning or critical check (so a server
    answering 429 on its readiness check drops out). Each tag narrows the result to
    instances that carry it. ``wait`` is sent only with an index, as Consul ignores it
    otherwise; the request then carries the wait the agent will actually use.
    """
    params: list[tuple[str, str]] = []
    if passing:
        params.append(("passing", "1"))
    params.extend(("tag", tag) for tag in tags)
    effective_wait = None
    if index > 0:
        params.append(("index", str(index)))
        if wait is not None:
            params.append(("wait", go_duration(wait)))
        effective_wait = CONSUL_DEFAULT_WAIT if wait is None else wait
    return ConsulRequest(
        "GET", f"/v1/health/service/{_segment(name)}", tuple(params), None, effective_wait
    )


def build_agent_services() -> ConsulRequest:
    """``GET /v1/agent/services``: what the local agent has registered."""
    return ConsulRequest("GET", "/v1/agent/services")


def build_agent_checks() -> ConsulRequest:
    """``GET /v1/agent/checks``: the local agent's checks and their current status."""
    return ConsulRequest("GET", "/v1/agent/checks")


def build_agent_self() -> ConsulRequest:
    """``GET /v1/agent/self``: the local agent's configuration and its member entry."""
    return ConsulRequest("GET", "/v1/agent/self")


def build_status_leader() -> ConsulRequest:
    """``GET /v1/status/leader``: the Raft leader's address, ``""`` while there is none."""
    return ConsulRequest("GET", "/v1/status/leader")


# --- parsing ---------------------------------------------------------------------------------


def _raise_for_status(response: ConsulResponse) -> None:
    if not 200 <= response.code < 300:
        raise ConsulError(response.code, response.text())


def parse_empty(response: ConsulResponse) -> None:
    """For calls whose success carries nothing (register, deregister)."""
    _raise_for_status(response)


def parse_check_update(response: ConsulResponse) -> None:
    """Success, or ``CheckNotFound`` when the agent does not know the check.

    Consul 1.8 answers an unknown check with ``500 CheckID "…" does not have associated
    TTL``; later versions with 404 ``Unknown check ID``. All mean: register again.
    """
    if response.code == 404 or (
        response.code == 500
        and any(s in response.text() for s in ("does not have associated TTL", "Unknown check"))
    ):
        raise CheckNotFound(response.code, response.text())
    _raise_for_status(response)


def parse_index(value: str | None) -> int:
    """The ``X-Consul-Index`` header as an int; 0 ("no usable index") if missing or garbage."""
    if value is None:
        return 0
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        return 0
    return int(text)


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query, by Consul's rules for clients.

    An index that went backwards (an agent restarted, a snapshot restored) resets to 0,
    so the next query reads afresh instead of blocking on a number that may never come
    (``api/watch/plan.go``). An index of 0 otherwise becomes 1: a blocking query with
    index 0 returns at once, and looping on it would hammer the agent.
    """
    if returned < previous:
        return 0
    return max(returned, 1)


def _json(response: ConsulResponse) -> Any:
    _raise_for_status(response)
    try:
        return json.loads(response.body)
    except ValueError as e:
        raise MalformedResponse(
            response.code, response.text(), f"Consul sent invalid JSON: {e}"
        ) from e


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


def parse_health_entry(entry: Any) -> Backend:
    """One element of ``/v1/health/service`` as a ``Backend`` (``ValueError`` if malformed).

    An empty ``Service.Address`` means the node's address, as Consul's DNS does.
    """
    _require(isinstance(entry, dict), "entry is not an object")
    node, service, checks = entry.get("Node"), entry.get("Service"), entry.get("Checks") or []
    _require(isinstance(node, dict) and isinstance(service, dict), "entry lacks Node or Service")
    _require(isinstance(checks, list) and all(isinstance(c, dict) for c in checks), "bad Checks")
    service_id, port = service.get("ID"), service.get("Port")
    _require(isinstance(service_id, str) and bool(service_id), "Service.ID missing")
    _require(type(port) is int and 0 <= port <= 65535, "Service.Port invalid")
    address = service.get("Address") or node.get("Address")
    _require(isinstance(address, str) and bool(address), "no Service.Address nor Node.Address")
    tags, meta = service.get("Tags") or [], service.get("Meta") or {}
    _require(isinstance(tags, list) and all(isinstance(t, str) for t in tags), "bad Tags")
    _require(isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()), "bad Meta")
    node_name = node.get("Node") or ""
    _require(isinstance(node_name, str), "bad Node.Node")
    return Backend(
        service_id=service_id,
        address=address,
        port=port,
        tags=tags,
        meta=meta,
        status=aggregate_status(checks),
        node=node_name,
    )


def parse_health_service(response: ConsulResponse) -> tuple[int, Backends]:
    """``(index, backends)`` from ``/v1/health/service``; ``MalformedResponse`` if unreadable."""
    data = _json(response)
    try:
        _require(isinstance(data, list), "body is not a list")
        backends = snapshot(parse_health_entry(entry) for entry in data)
    except ValueError as e:
        raise MalformedResponse(
            response.code, response.text(), f"unexpected /v1/health/service answer: {e}"
        ) from e
    return parse_index(response.headers.get("x-consul-index")), backends


def _object_of_objects(response: ConsulResponse) -> Mapping[str, Mapping[str, Any]]:
    data = _json(response)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise MalformedResponse(response.code, response.text(), "expected an object of objects")
    return data


def parse_agent_services(response: ConsulResponse) -> Mapping[str, Mapping[str, Any]]:
    """``/v1/agent/services``: service ID → Consul's service object (ID, Service, Tags, Meta…)."""
    return _object_of_objects(response)


def parse_agent_checks(response: ConsulResponse) -> Mapping[str, Mapping[str, Any]]:
    """``/v1/agent/checks``: check ID → Consul's check object (Status, Output, ServiceID…)."""
    return _object_of_objects(response)


def parse_agent_address(response: ConsulResponse) -> str:
    """``/v1/agent/self``: the address the agent advertises to its cluster (``Member.Addr``,
    else ``DebugConfig.AdvertiseAddrLAN``), which a service registered without one shares."""
    _raise_for_status(response)
    data = _json(response)
    if not isinstance(data, dict):
        raise MalformedResponse(response.code, response.text(), "expected a JSON object")
    member, debug = data.get("Member") or {}, data.get("DebugConfig") or {}
    address = (member.get("Addr") if isinstance(member, dict) else None) or (
        debug.get("AdvertiseAddrLAN") if isinstance(debug, dict) else None
    )
    if not isinstance(address, str) or not address:
        raise MalformedResponse(
            response.code, response.text()[:200], "agent/self names no advertise address"
        )
    return address


def parse_leader(response: ConsulResponse) -> str:
    """``/v1/status/leader``: ``"host:port"`` of the leader, ``""`` if none is elected yet."""
    data = _json(response)
    if not isinstance(data, str):
        raise MalformedResponse(response.code, response.text(), "expected a JSON string")
    return data


# --- sending ---------------------------------------------------------------------------------


class Transport(Protocol):
    """Sends a request to the agent; raises ``ConsulUnavailable`` when it cannot."""

    async def send(self, request: ConsulRequest) -> ConsulResponse: ...


_UNREACHABLE = (
    net_error.ConnectError,  # refused, no route, connect timeout, …
    net_error.DNSLookupError,
    net_error.ConnectionLost,
    net_error.ConnectionDone,
    ResponseNeverReceived,
    ResponseFailed,
    RequestTransmissionFailed,
    RequestNotSent,
)


def _describe(exc: BaseException) -> str:
    reasons = getattr(exc, "reasons", None)
    if reasons:
        text = "; ".join(
            (r.getErrorMessage() or r.type.__name__) if isinstance(r, Failure) else str(r)
            for r in reasons
        )
        return f"{type(exc).__name__}: {text}"
    return str(exc) or type(exc).__name__


def _was_cancelled(exc: BaseException) -> bool:
    """Twisted's HTTP client reports a cancelled request as ResponseNeverReceived([CancelledError])
    or, while still connecting, as ConnectingCancelledError."""
    if isinstance(exc, net_error.ConnectingCancelledError):
        return True
    reasons = getattr(exc, "reasons", None) or ()
    return any(isinstance(r, Failure) and r.check(defer.CancelledError) for r in reasons)


def first_header_values(headers: Any) -> dict[str, str]:
    """A twisted ``Headers`` as ``{name: first value}`` (what both our HTTP clients read)."""
    return {
        name.decode("latin-1"): values[0].decode("latin-1")
        for name, values in headers.getAllRawHeaders()
        if values
    }


def https_policy(ca_file: str | None) -> BrowserLikePolicyForHTTPS:
    """How an HTTP client trusts https servers: the CA certificates in the PEM file
    ``ca_file`` (one or several), or the system's trusted CAs when it is None; either way the
    certificate must name the host called (a DNS name, or an IP address subjectAltName for
    an address). A file that holds no certificate is a ValueError naming it."""
    if not ca_file:
        return BrowserLikePolicyForHTTPS()
    end = b"-----END CERTIFICATE-----"
    pem = Path(ca_file).read_bytes()
    blocks = [block + end for block in pem.split(end) if b"-----BEGIN CERTIFICATE-----" in block]
    if not blocks:
        raise ValueError(f"the CA file {ca_file} holds no PEM certificate")
    trusted = trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])
    return BrowserLikePolicyForHTTPS(trustRoot=trusted)


class TreqTransport:
    """Sends requests with a ``treq`` ``HTTPClient``, bounding each by a timeout on ``clock``.

    The timeout covers connecting, the answer and reading the body; for a blocking
    query it is the base timeout plus the query's wait and Consul's jitter.
    """

    def __init__(
        self,
        address: ConsulAddress,
        http: HTTPClient,
        clock: IReactorTime,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        self.address = address
        self._http = http
        self._clock = clock
        self._timeout = timeout
        self._pool = pool

    @classmethod
    def create(
        cls, reactor: Any, address: ConsulAddress, *, timeout: float = DEFAULT_TIMEOUT
    ) -> TreqTransport:
        """A transport with its own persistent pool (and CA file from the address, for https)."""
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        policy = https_policy(address.ca_file)
        agent = Agent(reactor, contextFactory=policy, connectTimeout=timeout, pool=pool)
        return cls(address, HTTPClient(cast(IAgent, agent)), reactor, timeout=timeout, pool=pool)

    async def send(self, request: ConsulRequest) -> ConsulResponse:
        timeout = request.timeout(self._timeout)
        exchange = Deferred.fromCoroutine(self._exchange(request))
        exchange.addTimeout(timeout, self._clock)
        try:
            return await exchange
        except defer.TimeoutError as e:
            raise ConsulUnavailable(
                f"no answer from Consul at {self.address.base_url} within {timeout:g} s"
            ) from e
        except _UNREACHABLE as e:
            raise ConsulUnavailable(
                f"cannot reach Consul at {self.address.base_url}: {_describe(e)}"
            ) from e

    async def _exchange(self, request: ConsulRequest) -> ConsulResponse:
        headers = Headers({"Accept": ["application/json"]})
        if self.address.token:
            headers.setRawHeaders("X-Consul-Token", [self.address.token])
        if request.body is not None:
            headers.setRawHeaders("Content-Type", ["application/json"])
        try:
            response = await self._http.request(
                request.method,
                request.url(self.address.base_url),
                headers=headers,
                data=request.body,
                allow_redirects=False,
            )
            body = await treq.content(response)
        except (*_UNREACHABLE, net_error.ConnectingCancelledError) as e:
            if _was_cancelled(e):  # by our timeout or by the caller: say so, not "unreachable"
                raise defer.CancelledError() from e
            raise
        return ConsulResponse(response.code, first_header_values(response.headers), body)

    def close(self) -> Deferred[None]:
        """Close the pool's idle connections (call when the owning service stops)."""
        if self._pool is None:
            return defer.succeed(None)
        return self._pool.closeCachedConnections()


class ConsulClient:
    """The agent API calls kleinserve makes: build, send through ``transport``, parse."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    async def register(self, service: ServiceDefinition) -> None:
        parse_empty(await self.transport.send(build_register(service)))

    async def deregister(self, service_id: str) -> None:
        parse_empty(await self.transport.send(build_deregister(service_id)))

    async def update_check(self, check_id: str, status: CheckStatus, output: str = "") -> None:
        parse_check_update(await self.transport.send(build_check_update(check_id, status, output)))

    async def health_service(
        self,
        name: str,
        *,
        passing: bool = True,
        tags: Iterable[str] = (),
        index: int = 0,
        wait: float | None = None,
    ) -> tuple[int, Backends]:
        request = build_health_service(name, passing=passing, tags=tags, index=index, wait=wait)
        return parse_health_service(await self.transport.send(request))

    async def agent_services(self) -> Mapping[str, Mapping[str, Any]]:
        return parse_agent_services(await self.transport.send(build_agent_services()))

    async def agent_checks(self) -> Mapping[str, Mapping[str, Any]]:
        return parse_agent_checks(await self.transport.send(build_agent_checks()))

    async def leader(self) -> str:
        return parse_leader(await self.transport.send(build_status_leader()))

    async def agent_address(self) -> str:
        """The address the local agent advertises (what a service without one shares)."""
        return parse_agent_address(await self.transport.send(build_agent_self()))
