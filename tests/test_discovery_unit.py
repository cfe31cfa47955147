"""Unit tests of discovery: pure build/parse logic, backoff, and the registration and watch
loops on ``task.Clock`` against in-memory transports (the injectable seam)."""

from __future__ import annotations

import json
import random
import re
import urllib.parse
from collections.abc import Callable
from typing import Any, cast

import attrs
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from discovery.backends import Backend, aggregate_status, snapshot
from discovery.backoff import sleep
from discovery.consul import (
    CheckNotFound,
    CheckStatus,
    ConsulAddress,
    ConsulClient,
    ConsulError,
    ConsulRequest,
    ConsulResponse,
    ConsulUnavailable,
    MalformedResponse,
    TreqTransport,
    build_check_update,
    build_deregister,
    build_health_service,
    build_register,
    go_duration,
    next_index,
    parse_agent_address,
    parse_check_update,
    parse_health_entry,
    parse_health_service,
    parse_index,
    parse_leader,
)
from discovery.registration import ConsulRegistration, RegistrationSpec, default_service_id
from discovery.watch import HealthWatch, StaticBackends
from wire.backoff import Backoff

_trial = SynchronousTestCase()
result_of = _trial.successResultOf
failure_of = _trial.failureResultOf
assert_no_result = _trial.assertNoResult

# --- helpers ---------------------------------------------------------------------------------


REG = "discovery.registration"
WATCH = "discovery.watch"


def response(code: int = 200, body: Any = None, index: str | None = None) -> ConsulResponse:
    headers = {"X-Consul-Index": index} if index is not None else {}
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    return ConsulResponse(code, headers, raw)


def entry(
    service_id: str,
    port: int = 8501,
    *,
    address: str = "10.0.0.1",
    tags: list[str] | None = None,
    meta: dict[str, str] | None = None,
    statuses: tuple[str, ...] = ("passing",),
    node: str = "n1",
    node_address: str = "10.9.9.9",
) -> dict[str, Any]:
    """One element of /v1/health/service as Consul 1.8 sends it (fields we do not read elided)."""
    return {
        "Node": {"Node": node, "Address": node_address, "Datacenter": "dc1"},
        "Service": {
            "ID": service_id,
            "Service": "inference",
            "Tags": tags,
            "Meta": meta,
            "Address": address,
            "Port": port,
            "Weights": {"Passing": 1, "Warning": 1},
        },
        "Checks": [
            {"CheckID": f"c{i}", "Status": status, "ServiceID": service_id}
            for i, status in enumerate(statuses)
        ],
    }


def parse_go_duration(text: str) -> float:
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    match = re.fullmatch(r"(\d+)(ns|us|ms|s|m|h)", text)
    assert match, text
    return int(match.group(1)) * units[match.group(2)]


class FakeAgent:
    """The agent endpoints registration uses, in memory, behind the Transport seam.

    ``available = False`` makes every call fail as a refused connection would;
    ``forget()`` is an agent restarted empty; ``hold`` parks answers to paths with
    those prefixes until the test fires (or the code cancels) them.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.available = True
        self.services: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[float, ConsulRequest]] = []
        self.hold: set[str] = set()
        self.held: list[Deferred[None]] = []
        self.cancelled = 0
        self.unknown_check_code = 500
        self.broken: Exception | None = None

    def forget(self) -> None:
        self.services.clear()
        self.checks.clear()

    def _count_cancel(self, _: Deferred[None]) -> None:
        self.cancelled += 1

    def calls(self, prefix: str) -> list[tuple[float, ConsulRequest]]:
        return [(t, r) for t, r in self.requests if r.path.startswith(prefix)]

    async def send(self, request: ConsulRequest) -> ConsulResponse:
        self.requests.append((self.clock.seconds(), request))
        if self.broken is not None:
            raise self.broken
        if not self.available:
            raise ConsulUnavailable("connection refused (fake agent)")
        if any(request.path.startswith(prefix) for prefix in self.hold):
            parked: Deferred[None] = Deferred(self._count_cancel)
            self.held.append(parked)
            await parked
        return self.answer(request)

    def answer(self, request: ConsulRequest) -> ConsulResponse:
        path = urllib.parse.unquote(request.path)
        if path == "/v1/agent/service/register":
            body = json.loads(request.body or b"{}")
            self.services[body["ID"]] = body
            for check in body["Checks"]:
                self.checks[check["CheckID"]] = {
                    "Status": "critical",
                    "Output": "",
                    "ServiceID": body["ID"],
                    "TTL": "TTL" in check,
                }
            return response(200)
        if path.startswith("/v1/agent/service/deregister/"):
            service_id = path.rsplit("/", 1)[1]
            self.services.pop(service_id, None)
            for check_id in [c for c, v in self.checks.items() if v["ServiceID"] == service_id]:
                del self.checks[check_id]
            return response(200)
        if path.startswith("/v1/agent/check/update/"):
            check_id = path.split("/v1/agent/check/update/", 1)[1]
            check = self.checks.get(check_id)
            if check is None or not check["TTL"]:
                if self.unknown_check_code == 404:
                    return response(404, f"Unknown check ID {check_id!r}".encode())
                return response(500, f'CheckID "{check_id}" does not have associated TTL'.encode())
            body = json.loads(request.body or b"{}")
            check.update(Status=body["Status"], Output=body["Output"])
            return response(200)
        return response(404, b"no such endpoint in the fake")


class ScriptedTransport:
    """Answers queries from a script, in order; with the script empty a query blocks
    (until cancelled), as a blocking query with nothing new does."""

    def __init__(self, clock: Clock, *answers: ConsulResponse | Exception) -> None:
        self.clock = clock
        self.script: list[ConsulResponse | Exception] = list(answers)
        self.requests: list[tuple[float, ConsulRequest]] = []
        self.pending: list[Deferred[ConsulResponse]] = []
        self.cancelled = 0

    async def send(self, request: ConsulRequest) -> ConsulResponse:
        self.requests.append((self.clock.seconds(), request))
        if self.script:
            answer = self.script.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        def cancelled(d: Deferred[ConsulResponse]) -> None:
            self.cancelled += 1

        waiting: Deferred[ConsulResponse] = Deferred(cancelled)
        self.pending.append(waiting)
        return await waiting

    def answer(self, answer: ConsulResponse | Exception) -> None:
        """Answer the query that is blocked now."""
        waiting = self.pending.pop(0)
        if isinstance(answer, Exception):
            waiting.errback(answer)
        else:
            waiting.callback(answer)

    def params(self, n: int) -> dict[str, str]:
        return dict(self.requests[n][1].params)


SPEC = RegistrationSpec(
    service_id="inference-host-8501",
    address="10.0.0.5",
    port=8501,
    readiness_url="http://10.0.0.5:8501/readyz",
    tags=("model:digits", "model:digits:1", "api:tfserving-rest"),
    meta={"version": "0.1.0"},
    check_interval=1.0,
    ttl=3.0,
    deregister_critical_after=90.0,
    drain_delay=2.0,
)


class Alive:
    """A liveness probe the test flips."""

    def __init__(self) -> None:
        self.value: bool | Exception = True

    def __call__(self) -> bool:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def registration(
    agent: FakeAgent, clock: Clock, alive: Callable[[], bool] | None = None, **kwargs: Any
) -> ConsulRegistration:
    return ConsulRegistration(
        kwargs.pop("spec", SPEC),
        ConsulClient(agent),
        time_of(clock),
        alive or Alive(),
        rng=random.Random(7),
        **kwargs,
    )


def time_of(clock: Clock) -> IReactorTime:
    """``clock`` as the interface it provides (mypy cannot see zope declarations)."""
    return cast(IReactorTime, clock)


def pending_delay(clock: Clock) -> float:
    """The delay until the one timer the loop has scheduled."""
    calls = clock.getDelayedCalls()
    assert len(calls) == 1, calls
    return cast(Any, calls[0]).getTime() - clock.seconds()


# --- parsing and building ---------------------------------------------------------------------

names = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=12)
statuses = st.sampled_from(["passing", "warning", "critical"])
meta_maps = st.dictionaries(names, st.text(max_size=10), max_size=3)
health_entries = st.builds(
    entry,
    names,
    st.integers(0, 65535),
    address=st.sampled_from(["", "10.0.0.1", "2001:db8::1", "host.example"]),
    tags=st.none() | st.lists(st.text(max_size=12), max_size=4),
    meta=st.none() | meta_maps,
    statuses=st.lists(statuses, max_size=4).map(tuple),
    node=names,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


@given(st.lists(health_entries, max_size=5), st.integers(0, 2**64 - 1))
def test_health_entries_parse_into_sorted_backends(
    entries: list[dict[str, Any]], index: int
) -> None:
    """Every Consul health entry becomes a Backend with its fields, snapshot sorted, index from the header."""
    got_index, backends = parse_health_service(response(200, entries, str(index)))
    assert got_index == index
    assert backends == snapshot(backends)
    expected = snapshot(
        Backend(
            service_id=e["Service"]["ID"],
            address=e["Service"]["Address"] or e["Node"]["Address"],
            port=e["Service"]["Port"],
            tags=e["Service"]["Tags"] or (),
            meta=e["Service"]["Meta"] or {},
            status=aggregate_status(e["Checks"]),
            node=e["Node"]["Node"],
        )
        for e in entries
    )
    assert backends == expected
    for backend in backends:
        hash(backend)
        with pytest.raises(TypeError):
            backend.meta["new"] = "x"  # type: ignore[index]


@given(json_values)
def test_health_parser_rejects_junk_with_a_typed_error(body: Any) -> None:
    """Any JSON that is not a list of health entries gives MalformedResponse, never another error."""
    try:
        _, backends = parse_health_service(response(200, body, "5"))
    except MalformedResponse as e:
        assert e.status == 200
    else:
        assert isinstance(body, list) and len(backends) == len(body)


def test_health_parser_rejects_invalid_json_and_error_statuses() -> None:
    """Invalid JSON is MalformedResponse; a non-2xx answer is ConsulError with its status and body."""
    with pytest.raises(MalformedResponse):
        parse_health_service(response(200, b"[{"))
    with pytest.raises(ConsulError) as raised:
        parse_health_service(response(500, b"rpc error: No cluster leader"))
    assert raised.value.status == 500 and "No cluster leader" in raised.value.body
    assert not isinstance(raised.value, MalformedResponse)


def test_aggregate_status_follows_consul_order() -> None:
    """Maintenance beats critical beats warning beats passing; no checks is passing."""
    assert aggregate_status([]) == "passing"
    assert aggregate_status([{"Status": "passing"}, {"Status": "warning"}]) == "warning"
    assert aggregate_status([{"Status": "warning"}, {"Status": "critical"}]) == "critical"
    maintenance = {"CheckID": "_service_maintenance:x", "Status": "critical"}
    assert aggregate_status([{"Status": "critical"}, maintenance]) == "maintenance"


def test_health_entry_without_service_address_uses_the_node_address() -> None:
    """An empty Service.Address means the node's address, as in Consul's DNS."""
    backend = parse_health_entry(entry("a", address="", node_address="192.0.2.7"))
    assert backend.address == "192.0.2.7"


@given(st.integers(0, 2**64 - 1))
def test_index_header_parses_decimal_integers(index: int) -> None:
    """A decimal X-Consul-Index parses to its value, surrounding blanks ignored."""
    assert parse_index(str(index)) == index
    assert parse_index(f" {index} ") == index


@given(st.text())
def test_garbage_index_header_parses_to_zero(text: str) -> None:
    """A missing, negative or non-decimal X-Consul-Index is 0: no usable index."""
    assume(not (text.strip().isascii() and text.strip().isdigit()))
    assert parse_index(text) == 0
    assert parse_index(None) == 0


def test_missing_index_header_gives_index_zero() -> None:
    """A health answer without X-Consul-Index parses, with index 0."""
    assert parse_health_service(response(200, [], None)) == (0, ())


@given(st.integers(0, 2**64), st.integers(0, 2**64))
def test_next_index_resets_when_the_index_goes_backwards(previous: int, returned: int) -> None:
    """Backwards resets to 0; otherwise the returned index, but never 0 (which never blocks)."""
    following = next_index(previous, returned)
    if returned < previous:
        assert following == 0
    else:
        assert following == max(returned, 1)


@given(
    names,
    st.booleans(),
    st.lists(st.text(min_size=1, max_size=10), max_size=3),
    st.integers(0, 10**12),
    st.none() | st.floats(0.001, 600),
)
def test_health_query_parameters(
    name: str, passing: bool, tags: list[str], index: int, wait: float | None
) -> None:
    """passing/tag always; index and wait only for a blocking query, whose timeout exceeds its wait."""
    request = build_health_service(name, passing=passing, tags=tags, index=index, wait=wait)
    params = request.params
    assert request.method == "GET" and request.path == f"/v1/health/service/{name}"
    assert (("passing", "1") in params) == passing
    assert [v for k, v in params if k == "tag"] == tags
    keys = [k for k, _ in params]
    if index == 0:
        assert "index" not in keys and "wait" not in keys and request.wait is None
        assert request.timeout(10.0) == 10.0
    else:
        assert ("index", str(index)) in params
        effective = 300.0 if wait is None else wait
        assert ("wait" in keys) == (wait is not None)
        if wait is not None:
            assert parse_go_duration(dict(params)["wait"]) == pytest.approx(wait, abs=1e-9)
        assert request.wait == effective
        assert request.timeout(1.0) > effective + 1.0
    query = urllib.parse.urlsplit(request.url("http://h:1")).query
    assert urllib.parse.parse_qsl(query) == list(params)


@given(st.floats(0, 10**6))
def test_go_duration_round_trips(seconds: float) -> None:
    """go_duration writes a Go duration Consul parses back to the same time (to the nanosecond)."""
    assert parse_go_duration(go_duration(seconds)) == pytest.approx(seconds, abs=1e-9, rel=1e-12)


def test_go_duration_prefers_readable_units() -> None:
    """Whole seconds are written in s, fractions in ms; negatives are refused."""
    assert go_duration(60) == "60s"
    assert go_duration(1.5) == "1500ms"
    assert go_duration(0) == "0s"
    with pytest.raises(ValueError):
        go_duration(-1)


def test_register_body_carries_checks_and_deregister_after() -> None:
    """The spec becomes a register call with tags, meta, an HTTP and a TTL check, both with DeregisterCriticalServiceAfter."""
    request = build_register(SPEC.definition())
    assert (request.method, request.path) == ("PUT", "/v1/agent/service/register")
    assert ("replace-existing-checks", "true") in request.params
    body = json.loads(request.body or b"")
    assert body["Name"] == "inference" and body["ID"] == "inference-host-8501"
    assert (body["Address"], body["Port"]) == ("10.0.0.5", 8501)
    assert body["Tags"] == ["model:digits", "model:digits:1", "api:tfserving-rest"]
    assert body["Meta"] == {"version": "0.1.0"}
    http, ttl = body["Checks"]
    assert http == {
        "CheckID": "service:inference-host-8501:readiness",
        "Name": "inference readiness",
        "HTTP": "http://10.0.0.5:8501/readyz",
        "Method": "GET",
        "Interval": "1s",
        "Timeout": "1s",
        "DeregisterCriticalServiceAfter": "90s",
    }
    assert ttl == {
        "CheckID": "service:inference-host-8501:liveness",
        "Name": "inference inference threads",
        "TTL": "3s",
        "DeregisterCriticalServiceAfter": "90s",
    }


def test_check_update_and_deregister_requests() -> None:
    """TTL updates PUT Status and Output to check/update/<id>; deregister PUTs to the service ID."""
    update = build_check_update("service:a b:liveness", CheckStatus.CRITICAL, "threads dead")
    assert update.method == "PUT"
    assert update.path == "/v1/agent/check/update/service:a%20b:liveness"
    assert json.loads(update.body or b"") == {"Status": "critical", "Output": "threads dead"}
    assert build_deregister("x/y").path == "/v1/agent/service/deregister/x%2Fy"


@pytest.mark.parametrize(
    ("code", "body", "error"),
    [
        (200, b"", None),
        (500, b'CheckID "x" does not have associated TTL', CheckNotFound),
        (404, b'Unknown check ID "x"', CheckNotFound),
        (500, b"rpc error", ConsulError),
        (403, b"Permission denied", ConsulError),
    ],
)
def test_check_update_answers(code: int, body: bytes, error: type[Exception] | None) -> None:
    """An unknown check (1.8's 500 "does not have associated TTL", or 404) is CheckNotFound."""
    if error is None:
        parse_check_update(response(code, body))
        return
    with pytest.raises(error) as raised:
        parse_check_update(response(code, body))
    assert isinstance(raised.value, ConsulError) and raised.value.status == code
    assert (error is CheckNotFound) == isinstance(raised.value, CheckNotFound)


def test_leader_parses_a_json_string() -> None:
    """/v1/status/leader gives the leader address, "" while there is none."""
    assert parse_leader(response(200, "127.0.0.1:8300")) == "127.0.0.1:8300"
    assert parse_leader(response(200, "")) == ""
    with pytest.raises(MalformedResponse):
        parse_leader(response(200, [1]))


def test_agent_address_is_the_members_address_else_the_advertised_lan_address() -> None:
    """/v1/agent/self: what a service registered without an address would share."""
    assert parse_agent_address(response(200, {"Member": {"Addr": "10.0.0.7"}})) == "10.0.0.7"
    doc = {"Member": {}, "DebugConfig": {"AdvertiseAddrLAN": "10.0.0.8"}}
    assert parse_agent_address(response(200, doc)) == "10.0.0.8"
    with pytest.raises(MalformedResponse, match="names no advertise address"):
        parse_agent_address(response(200, {"Config": {}}))
    with pytest.raises(ConsulError):
        parse_agent_address(response(403, "Permission denied"))


def test_an_https_readiness_check_skips_verification_only_when_asked() -> None:
    checks = attrs.evolve(SPEC, readiness_url="https://10.0.0.5:8501/readyz").definition()
    http_check = checks.to_json()["Checks"][0]
    assert http_check["HTTP"] == "https://10.0.0.5:8501/readyz"
    assert "TLSSkipVerify" not in http_check
    skipping = attrs.evolve(SPEC, tls_skip_verify=True).definition().to_json()["Checks"][0]
    assert skipping["TLSSkipVerify"] is True


# --- the treq transport -------------------------------------------------------------------------


class FakeConsulResource(Resource):
    """Answers like the agent for the calls the transport tests make; records what it got."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, Headers, bytes]] = []

    def render(self, request: Request) -> bytes | int:
        body = request.content.read() if request.content is not None else b""
        self.seen.append((request.method, request.uri, request.requestHeaders, body))
        if request.path.startswith(b"/v1/health/service/"):
            request.setHeader(b"X-Consul-Index", b"42")
            return json.dumps([entry("a", tags=["t"])]).encode()
        if request.path.startswith(b"/v1/agent/check/update/"):
            request.setResponseCode(500)
            return b'CheckID "x" does not have associated TTL'
        if request.path == b"/v1/status/leader":
            return NOT_DONE_YET  # an agent that never answers
        return b""


def stub_client(
    resource: Resource, clock: Clock, token: str | None = "s3cret"
) -> tuple[ConsulClient, StubTreq]:
    stub = StubTreq(resource)
    address = ConsulAddress.parse("consul.test:8500", token=token)
    transport = TreqTransport(address, cast(HTTPClient, stub), time_of(clock), timeout=5.0)
    return ConsulClient(transport), stub


def test_treq_transport_sends_query_and_token_and_parses_the_index() -> None:
    """A health query goes out with its parameters and X-Consul-Token; the answer parses with its index."""
    resource, clock = FakeConsulResource(), Clock()
    client, stub = stub_client(resource, clock)
    d = Deferred.fromCoroutine(client.health_service("inference", tags=["t"], index=5, wait=10))
    stub.flush()
    index, backends = result_of(d)
    assert index == 42 and [b.service_id for b in backends] == ["a"]
    method, uri, headers, _ = resource.seen[0]
    assert method == b"GET"
    assert uri == b"/v1/health/service/inference?passing=1&tag=t&index=5&wait=10s"
    assert headers.getRawHeaders(b"X-Consul-Token") == [b"s3cret"]


def test_treq_transport_sends_json_bodies_and_raises_typed_errors() -> None:
    """Register sends the definition as JSON; an unknown-check answer raises CheckNotFound; no token, no header."""
    resource, clock = FakeConsulResource(), Clock()
    client, stub = stub_client(resource, clock, token=None)
    d = Deferred.fromCoroutine(client.register(SPEC.definition()))
    stub.flush()
    assert result_of(d) is None
    method, uri, headers, body = resource.seen[0]
    assert (method, uri) == (b"PUT", b"/v1/agent/service/register?replace-existing-checks=true")
    assert json.loads(body) == SPEC.definition().to_json()
    assert headers.getRawHeaders(b"Content-Type") == [b"application/json"]
    assert not headers.hasHeader(b"X-Consul-Token")
    update = Deferred.fromCoroutine(client.update_check("x", CheckStatus.PASSING))
    stub.flush()
    assert failure_of(update, CheckNotFound).value.status == 500


def test_treq_transport_times_out_as_unavailable() -> None:
    """An agent that never answers fails the call with ConsulUnavailable after the timeout on the clock."""
    resource, clock = FakeConsulResource(), Clock()
    client, stub = stub_client(resource, clock)
    d = Deferred.fromCoroutine(client.leader())
    stub.flush()
    clock.advance(4.9)
    assert_no_result(d)
    clock.advance(0.1)
    error = failure_of(d, ConsulUnavailable).value
    assert "within 5 s" in str(error) and "consul.test:8500" in str(error)


# --- addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "host", "port"),
    [
        ("127.0.0.1:8500", "http", "127.0.0.1", 8500),
        ("consul.internal:18500", "http", "consul.internal", 18500),
        ("http://consul:8500", "http", "consul", 8500),
        ("https://consul:8501", "https", "consul", 8501),
        ("HTTPS://consul:8501/", "https", "consul", 8501),
        ("https://consul", "https", "consul", 443),
        ("http://consul", "http", "consul", 80),
        ("consul", "http", "consul", 8500),
        ("[::1]:8500", "http", "::1", 8500),
        (" 10.1.2.3:8500 ", "http", "10.1.2.3", 8500),
    ],
)
def test_consul_http_addr_forms(text: str, scheme: str, host: str, port: int) -> None:
    """host:port, http://host:port and https://host:port all parse; a bare host means port 8500."""
    address = ConsulAddress.parse(text)
    assert (address.scheme, address.host, address.port) == (scheme, host, port)


def test_base_url_brackets_ipv6() -> None:
    """An IPv6 host is bracketed in the base URL."""
    assert ConsulAddress.parse("[::1]:8500").base_url == "http://[::1]:8500"
    assert ConsulAddress.parse("https://c:1").base_url == "https://c:1"


@pytest.mark.parametrize(
    "text",
    ["", "   ", "unix:///tmp/consul.sock", "ftp://c:1", "c:notaport", "c:99999", "http://c:8500/v1",
     "http://u:p@c:8500", "http://:8500", "c:0"],
)  # fmt: skip
def test_bad_consul_addresses_are_refused(text: str) -> None:
    """Unsupported schemes, paths, credentials and bad ports raise ValueError naming the address."""
    with pytest.raises(ValueError):
        ConsulAddress.parse(text)


def test_address_from_env() -> None:
    """CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_HTTP_SSL and CONSUL_CACERT are honoured."""
    assert ConsulAddress.from_env({}) == ConsulAddress("127.0.0.1", 8500, "http")
    env = {"CONSUL_HTTP_ADDR": "c:8501", "CONSUL_HTTP_TOKEN": "s3cret", "CONSUL_HTTP_SSL": "true",
           "CONSUL_CACERT": "/etc/ca.pem"}  # fmt: skip
    address = ConsulAddress.from_env(env)
    assert (address.scheme, address.host, address.port) == ("https", "c", 8501)
    assert address.token == "s3cret" and address.ca_file == "/etc/ca.pem"
    assert "s3cret" not in repr(address)
    explicit = ConsulAddress.from_env({"CONSUL_HTTP_ADDR": "http://c:1", "CONSUL_HTTP_SSL": "1"})
    assert explicit.scheme == "http"
    with pytest.raises(ValueError, match="CONSUL_HTTP_SSL"):
        ConsulAddress.from_env({"CONSUL_HTTP_SSL": "maybe"})


# --- backoff ----------------------------------------------------------------------------------


@given(
    st.floats(0.01, 10),
    st.floats(0.01, 100),
    st.floats(1.0, 4.0),
    st.floats(0, 1),
    st.integers(0, 10_000),
    st.integers(0, 2**32),
)
def test_backoff_is_capped_jittered_and_growing(
    initial: float, maximum: float, factor: float, jitter: float, attempt: int, seed: int
) -> None:
    """Each delay lies in [(1-jitter)*ceiling, ceiling]; ceilings grow with the attempt up to the cap."""
    backoff = Backoff(initial, maximum, factor, jitter)
    ceiling = backoff.ceiling(attempt)
    assert ceiling <= maximum
    assert backoff.ceiling(attempt + 1) >= ceiling
    delay = backoff.delay(attempt, random.Random(seed))
    assert (1 - jitter) * ceiling - 1e-9 <= delay <= ceiling + 1e-9


def test_backoff_jitter_spreads_delays() -> None:
    """Two retriers with different random sources do not retry in lockstep."""
    backoff = Backoff()
    a = [backoff.delay(n, random.Random(1)) for n in range(8)]
    b = [backoff.delay(n, random.Random(2)) for n in range(8)]
    assert a != b
    assert backoff.ceiling(100) == backoff.maximum


def test_sleep_fires_on_the_clock_and_can_be_cancelled() -> None:
    """sleep() fires after its delay on the injected clock; cancelling removes the timer."""
    clock = Clock()
    d = sleep(time_of(clock), 2.0)
    clock.advance(1.9)
    assert_no_result(d)
    clock.advance(0.1)
    assert result_of(d) is None
    cancelled = sleep(time_of(clock), 5.0)
    cancelled.cancel()
    failure_of(cancelled, CancelledError)
    assert clock.getDelayedCalls() == []


# --- registration -------------------------------------------------------------------------------


def test_spec_validation_and_defaults() -> None:
    """A spec refuses bad ports and durations; default service IDs are name-host-port."""
    assert default_service_id("inference", "gpu-1", 8501) == "inference-gpu-1-8501"
    assert SPEC.heartbeat_interval == 1.0
    with pytest.raises(ValueError):
        RegistrationSpec("id", "h", 0, "http://h/readyz")
    with pytest.raises(ValueError):
        RegistrationSpec("id", "h", 1, "http://h/readyz", ttl=0)
    with pytest.raises(ValueError):
        RegistrationSpec("", "h", 1, "http://h/readyz")
    spec = RegistrationSpec("id", "h", 1, "http://h/readyz", check_interval=30)
    assert spec.definition().checks[0].to_json()["Timeout"] == "5s"


def test_start_registers_at_once_and_sets_the_ttl_check() -> None:
    """Starting registers the service with its checks and passes the TTL check right away."""
    clock, alive = Clock(), Alive()
    agent = FakeAgent(clock)
    service = registration(agent, clock, alive)
    service.startService()
    assert service.registered
    assert agent.services["inference-host-8501"]["Tags"] == list(SPEC.tags)
    assert agent.checks[SPEC.liveness_check_id]["Status"] == "passing"
    assert agent.checks[SPEC.readiness_check_id]["Status"] == "critical"  # Consul's to run


def test_registration_retries_until_consul_answers_and_warns_once(logs: list[LogEvent]) -> None:
    """While Consul is unreachable the loop retries with capped, jittered, growing backoff and logs ONE warning; success logs one info."""
    clock = Clock()
    agent = FakeAgent(clock)
    agent.available = False
    backoff = Backoff(initial=1.0, maximum=8.0, jitter=0.5)
    service = registration(agent, clock, backoff=backoff)
    service.startService()  # must neither raise nor block
    delays = []
    for _ in range(8):
        delays.append(pending_delay(clock))
        clock.advance(delays[-1])
    assert len(agent.calls("/v1/agent/service/register")) == 9
    for attempt, delay in enumerate(delays):
        ceiling = backoff.ceiling(attempt)
        assert 0.5 * ceiling <= delay <= ceiling <= 8.0
    assert max(delays[:3]) < min(delays[4:])  # it grows: 1, 2, 4 against 8 ... (jittered)
    assert not service.registered
    assert len(logs.messages(LogLevel.warn, REG)) == 1
    assert "Cannot register inference-host-8501" in logs.messages(LogLevel.warn, REG)[0]

    agent.available = True
    clock.advance(pending_delay(clock))
    assert service.registered and "inference-host-8501" in agent.services
    infos = logs.messages(LogLevel.info, REG)
    assert len(infos) == 1 and "after 9 failed attempts" in infos[0]
    assert len(logs.messages(LogLevel.warn, REG)) == 1


def test_ttl_refresh_follows_liveness(logs: list[LogEvent]) -> None:
    """Every ttl/3 the TTL check is set passing while liveness() is true, critical when false or raising."""
    clock, alive = Clock(), Alive()
    agent = FakeAgent(clock)
    service = registration(agent, clock, alive)
    service.startService()
    check = agent.checks[SPEC.liveness_check_id]
    assert pending_delay(clock) == pytest.approx(SPEC.ttl / 3)
    updates = len(agent.calls("/v1/agent/check/update/"))
    clock.advance(1.0)
    assert len(agent.calls("/v1/agent/check/update/")) == updates + 1
    assert check["Status"] == "passing" and check["Output"] == "inference threads alive"
    alive.value = False
    clock.advance(1.0)
    assert check["Status"] == "critical" and check["Output"] == "inference threads not alive"
    alive.value = True
    clock.advance(1.0)
    assert check["Status"] == "passing"
    alive.value = RuntimeError("probe broke")
    clock.advance(1.0)
    assert check["Status"] == "critical"
    assert any("liveness probe raised" in m for m in logs.messages(LogLevel.critical, REG))
    assert service.registered


@pytest.mark.parametrize("code", [500, 404])
def test_unknown_check_reregisters(code: int, logs: list[LogEvent]) -> None:
    """When the agent forgets the check (restarted empty), the next TTL update registers again at once."""
    clock = Clock()
    agent = FakeAgent(clock)
    agent.unknown_check_code = code
    service = registration(agent, clock)
    service.startService()
    agent.forget()
    clock.advance(1.0)
    assert "inference-host-8501" in agent.services
    assert agent.checks[SPEC.liveness_check_id]["Status"] == "passing"
    assert len(agent.calls("/v1/agent/service/register")) == 2
    assert any("no longer knows" in m for m in logs.messages(LogLevel.warn, REG))
    assert service.registered


def test_connection_recovery_reregisters(logs: list[LogEvent]) -> None:
    """A heartbeat that cannot reach Consul switches to registering, which succeeds once Consul is back."""
    clock = Clock()
    agent = FakeAgent(clock)
    service = registration(agent, clock, backoff=Backoff(initial=1.0, maximum=4.0))
    service.startService()
    agent.available = False
    clock.advance(1.0)  # heartbeat fails; an immediate register attempt fails too
    assert not service.registered
    for _ in range(3):
        clock.advance(pending_delay(clock))
    registers = len(agent.calls("/v1/agent/service/register"))
    agent.forget()
    agent.available = True
    clock.advance(pending_delay(clock))
    assert len(agent.calls("/v1/agent/service/register")) == registers + 1
    assert service.registered and "inference-host-8501" in agent.services
    assert len(logs.messages(LogLevel.warn, REG)) == 1


def test_other_ttl_errors_are_logged_once_and_heartbeats_go_on(logs: list[LogEvent]) -> None:
    """A TTL update refused for another reason (e.g. 403) warns once and the heartbeat keeps running."""
    clock = Clock()
    agent = FakeAgent(clock)
    service = registration(agent, clock)
    service.startService()
    original = agent.answer
    agent.answer = lambda request: response(403, b"Permission denied")  # type: ignore[method-assign]
    clock.advance(1.0)
    clock.advance(1.0)
    assert len(logs.messages(LogLevel.warn, REG)) == 1
    agent.answer = original  # type: ignore[method-assign]
    clock.advance(1.0)
    assert any("accepts TTL updates" in m for m in logs.messages(LogLevel.info, REG))
    assert service.registered and len(clock.getDelayedCalls()) == 1


def test_unexpected_errors_never_escape_start(logs: list[LogEvent]) -> None:
    """Even a non-Consul error from the client is logged and retried; startService does not raise."""
    clock = Clock()
    agent = FakeAgent(clock)
    agent.broken = RuntimeError("bug")
    service = registration(agent, clock)
    service.startService()
    assert any("Unexpected error" in m for m in logs.messages(LogLevel.critical, REG))
    agent.broken = None
    clock.advance(pending_delay(clock))
    assert service.registered


def test_update_reregisters_with_new_tags() -> None:
    """update() registers again at once with the new tags and meta; its Deferred fires True."""
    clock = Clock()
    agent = FakeAgent(clock)
    service = registration(agent, clock)
    service.startService()
    d = service.update(["model:other"], {"version": "2"})
    assert result_of(d) is True
    assert agent.services["inference-host-8501"]["Tags"] == ["model:other"]
    assert agent.services["inference-host-8501"]["Meta"] == {"version": "2"}
    assert service.spec.tags == ("model:other",)
    assert service.registered and len(clock.getDelayedCalls()) == 1


def test_update_while_consul_is_down_applies_when_it_is_back() -> None:
    """Tags updated during an outage are the ones registered once Consul answers again."""
    clock = Clock()
    agent = FakeAgent(clock)
    agent.available = False
    service = registration(agent, clock)
    service.startService()
    d = service.update(["model:late"])
    assert_no_result(d)
    agent.available = True
    clock.advance(pending_delay(clock))
    assert result_of(d) is True
    assert agent.services["inference-host-8501"]["Tags"] == ["model:late"]


def test_update_when_not_running_fires_false_and_applies_on_start() -> None:
    """update() on a stopped service fires False and the next start registers the new tags."""
    clock = Clock()
    agent = FakeAgent(clock)
    service = registration(agent, clock)
    assert result_of(service.update(["model:x"])) is False
    service.startService()
    assert agent.services["inference-host-8501"]["Tags"] == ["model:x"]


def test_stop_deregisters_then_waits_the_drain_delay(logs: list[LogEvent]) -> None:
    """stopService deregisters first, then fires only after drain_delay on the clock; no heartbeat follows."""
    clock = Clock()
    agent = FakeAgent(clock)
    service = registration(agent, clock)
    service.startService()
    d = service.stopService()
    assert agent.services == {}
    assert agent.calls("/v1/agent/service/deregister/")[0][0] == 0.0
    clock.advance(SPEC.drain_delay - 0.01)
    assert_no_result(d)
    clock.advance(0.01)
    assert result_of(d) is None
    requests = len(agent.requests)
    clock.advance(60)
    assert len(agent.requests) == requests and clock.getDelayedCalls() == []
    assert any("Deregistered" in m for m in logs.messages(LogLevel.info, REG))
    assert logs.messages(LogLevel.critical, REG) == []


def test_stop_goes_on_when_consul_is_down(logs: list[LogEvent]) -> None:
    """If deregistering fails the stop logs it and goes on; never registered means no drain wait."""
    clock = Clock()
    agent = FakeAgent(clock)
    agent.available = False
    service = registration(agent, clock)
    service.startService()
    d = service.stopService()
    assert result_of(d) is None
    assert any("Could not deregister" in m for m in logs.messages(LogLevel.warn, REG))
    assert clock.getDelayedCalls() == []


def test_stop_bounds_a_hanging_deregister_by_its_timeout() -> None:
    """A deregister the agent never answers is abandoned after deregister_timeout; the drain follows."""
    clock = Clock()
    agent = FakeAgent(clock)
    service = registration(agent, clock, deregister_timeout=3.0)
    service.startService()
    agent.hold.add("/v1/agent/service/deregister/")
    d = service.stopService()
    clock.advance(2.9)
    assert_no_result(d)
    clock.advance(0.1)  # timeout: the held request is cancelled
    assert agent.cancelled == 1
    assert_no_result(d)
    clock.advance(SPEC.drain_delay)
    assert result_of(d) is None


def test_stop_cancels_an_in_flight_registration(logs: list[LogEvent]) -> None:
    """Stopping while a register call hangs cancels it, deregisters, and schedules nothing more."""
    clock = Clock()
    agent = FakeAgent(clock)
    agent.hold.add("/v1/agent/service/register")
    service = registration(agent, clock, spec=SPEC)
    service.startService()
    assert len(agent.held) == 1
    agent.hold.clear()
    d = service.stopService()
    assert agent.cancelled == 1
    assert agent.calls("/v1/agent/service/deregister/")
    assert result_of(d) is None  # never registered: no drain
    assert clock.getDelayedCalls() == []
    assert logs.messages(LogLevel.critical, REG) == []


# --- watch --------------------------------------------------------------------------------------


def test_watch_publishes_the_first_snapshot_and_each_change() -> None:
    """The first answer and every changed answer reach subscribers as immutable snapshots."""
    clock = Clock()
    transport = ScriptedTransport(clock, response(200, [entry("b"), entry("a")], "10"))
    watch = HealthWatch(ConsulClient(transport), time_of(clock), tags=["model:digits"], wait=30)
    seen: list[tuple[Backend, ...]] = []
    watch.subscribe(seen.append)
    ready = watch.ready()
    watch.startService()
    assert [b.service_id for b in result_of(ready)] == ["a", "b"]
    assert seen == [watch.current] and isinstance(watch.current, tuple)
    assert transport.params(0) == {"passing": "1", "tag": "model:digits"}
    clock.advance(0.5)  # min_interval
    assert transport.params(1) == {
        "passing": "1",
        "tag": "model:digits",
        "index": "10",
        "wait": "30s",
    }
    assert transport.requests[1][1].timeout(10.0) > 30
    transport.answer(response(200, [entry("a")], "11"))
    assert [b.service_id for b in seen[-1]] == ["a"] and len(seen) == 2
    assert watch.index == 11


def test_watch_skips_unchanged_results() -> None:
    """An answer equal to the current snapshot (same or new index) is not published again."""
    clock = Clock()
    transport = ScriptedTransport(clock, response(200, [entry("a")], "10"))
    watch = HealthWatch(ConsulClient(transport), time_of(clock), min_interval=0)
    seen: list[tuple[Backend, ...]] = []
    watch.subscribe(seen.append)
    watch.startService()
    transport.answer(response(200, [entry("a")], "10"))  # wait elapsed, nothing new
    transport.answer(response(200, [entry("a")], "12"))  # something else changed
    assert len(seen) == 1
    assert watch.index == 12


def test_watch_resets_the_index_when_it_goes_backwards() -> None:
    """An index lower than the last one (agent restarted) makes the next query a fresh read (no index)."""
    clock = Clock()
    transport = ScriptedTransport(
        clock, response(200, [entry("a")], "100"), response(200, [entry("a")], "7")
    )
    watch = HealthWatch(ConsulClient(transport), time_of(clock), min_interval=0)
    watch.startService()
    assert transport.params(1)["index"] == "100"
    assert "index" not in transport.params(2)
    transport.answer(response(200, [], "9"))
    assert transport.params(3)["index"] == "9"
    assert watch.current == ()


def test_watch_with_missing_index_blocks_on_index_one() -> None:
    """An answer without a usable index never leads to a loop of non-blocking queries."""
    clock = Clock()
    transport = ScriptedTransport(clock, response(200, [], None))
    watch = HealthWatch(ConsulClient(transport), time_of(clock), min_interval=0)
    watch.startService()
    assert transport.params(1)["index"] == "1"


def test_watch_keeps_the_last_snapshot_and_backs_off_on_errors(logs: list[LogEvent]) -> None:
    """Errors keep the last snapshot, retry with jittered backoff from index 0, and warn once."""
    clock = Clock()
    transport = ScriptedTransport(
        clock,
        response(200, [entry("a")], "10"),
        ConsulUnavailable("refused"),
        ConsulUnavailable("refused"),
        response(500, b"No cluster leader"),
        response(200, [entry("a"), entry("b")], "3"),
    )
    backoff = Backoff(initial=1.0, maximum=4.0)
    watch = HealthWatch(ConsulClient(transport), time_of(clock), min_interval=0, backoff=backoff)
    watch.startService()
    snapshot_before = watch.current
    assert not watch.reachable and watch.current == snapshot_before
    for attempt in range(3):
        delay = pending_delay(clock)
        assert 0.5 * backoff.ceiling(attempt) <= delay <= backoff.ceiling(attempt)
        clock.advance(delay)
    assert [b.service_id for b in watch.current] == ["a", "b"] and watch.reachable
    assert all("index" not in transport.params(n) for n in (2, 3, 4))
    assert transport.params(5)["index"] == "3"
    warnings = logs.messages(LogLevel.warn, WATCH)
    assert len(warnings) == 1 and "Keeping the last 1 known backends" in warnings[0]
    assert any("again after 3 failed" in m for m in logs.messages(LogLevel.info, WATCH))


def test_watch_rate_limits_quick_answers() -> None:
    """Queries that return at once are spaced by min_interval."""
    clock = Clock()
    transport = ScriptedTransport(clock, response(200, [], "5"), response(200, [], "6"))
    watch = HealthWatch(ConsulClient(transport), time_of(clock), min_interval=0.5)
    watch.startService()
    assert len(transport.requests) == 1
    clock.advance(0.5)
    assert len(transport.requests) == 2
    clock.advance(0.5)
    assert [t for t, _ in transport.requests] == [0.0, 0.5, 1.0]


def test_watch_subscriber_errors_do_not_stop_the_watch(logs: list[LogEvent]) -> None:
    """A subscriber that raises is logged; other subscribers and the loop carry on."""
    clock = Clock()
    transport = ScriptedTransport(clock, response(200, [entry("a")], "5"))
    watch = HealthWatch(ConsulClient(transport), time_of(clock), min_interval=0)

    def broken(_: object) -> None:
        raise ValueError("subscriber bug")

    seen: list[object] = []
    watch.subscribe(broken)
    unsubscribe = watch.subscribe(seen.append)
    watch.startService()
    assert len(seen) == 1 and len(transport.pending) == 1
    assert any("subscriber raised" in m for m in logs.messages(LogLevel.critical, WATCH))
    unsubscribe()
    transport.answer(response(200, [], "6"))
    assert len(seen) == 1 and watch.current == ()


def test_watch_stop_cancels_the_blocking_query() -> None:
    """stopService cancels the pending query and leaves no timer; the last snapshot remains."""
    clock = Clock()
    transport = ScriptedTransport(clock, response(200, [entry("a")], "5"))
    watch = HealthWatch(ConsulClient(transport), time_of(clock), min_interval=0)
    watch.startService()
    result_of(watch.stopService())
    assert transport.cancelled == 1 and clock.getDelayedCalls() == []
    assert [b.service_id for b in watch.current] == ["a"]


def test_static_backends_offer_the_watch_interface() -> None:
    """StaticBackends is ready at once, and set() publishes a new sorted snapshot to subscribers."""
    static = StaticBackends.from_addresses([("h2", 2), ("h1", 1)])
    assert [b.service_id for b in result_of(static.ready())] == ["static-h1-1", "static-h2-2"]
    seen: list[object] = []
    static.subscribe(seen.append)
    static.set([Backend("x", "h3", 3)])
    assert seen == [(Backend("x", "h3", 3),)] == [static.current]
    static.set([Backend("x", "h3", 3)])
    assert len(seen) == 1
