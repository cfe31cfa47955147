"""Integration tests of discovery against a real Consul agent (dev mode, free ports).

The code under test runs on a real reactor in crochet's thread; the test thread reads
what the agent holds with urllib (``ConsulAgent.get``) and polls, with a generous
deadline, until the state it expects appears -- then asserts it.
"""

from __future__ import annotations

import datetime
import inspect
import ipaddress
import random
import socket
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, cast

import crochet
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import LogEvent, LogLevel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from discovery.consul import (
    ConsulAddress,
    ConsulClient,
    ConsulUnavailable,
    ServiceDefinition,
    TreqTransport,
)
from discovery.registration import ConsulRegistration, RegistrationSpec
from discovery.watch import HealthWatch
from harness.consul import ConsulAgent
from harness.twistd import poll as poll_until
from tests.consul_agent import consul_agent, consul_agent_unstarted  # noqa: F401
from wire.backoff import Backoff

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:isSet:DeprecationWarning:crochet"),
    # Twisted's own TLS setup still hands pyOpenSSL objects to pyOpenSSL.
    pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning"),
]

DEADLINE = 20.0  # generous: Consul runs the HTTP check every second here
poll = partial(poll_until, timeout=DEADLINE)


@pytest.fixture(scope="module", autouse=True)
def reactor_thread() -> None:
    """The real reactor, running in crochet's thread for the whole session."""
    crochet.setup()


def reactor() -> Any:
    from twisted.internet import reactor as the_reactor

    return the_reactor


def in_reactor(fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
    """Call ``fn`` in the reactor thread and wait for its result (Deferred or coroutine)."""

    @crochet.wait_for(timeout=timeout)
    def call() -> Any:
        result = fn(*args)
        if inspect.iscoroutine(result):
            return Deferred.fromCoroutine(result)
        return result

    return call()


class Readiness(Resource):
    """A stand-in for the server's /readyz: answers with whatever code the test sets."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        return b'{"ready": %d}' % self.code


@pytest.fixture
def readiness() -> Iterator[tuple[Readiness, int]]:
    """A real twisted.web server on a free loopback port serving Readiness."""
    resource = Readiness()
    site = Site(resource)
    site.displayTracebacks = False
    port = in_reactor(lambda: reactor().listenTCP(0, site, interface="127.0.0.1"))
    try:
        yield resource, port.getHost().port
    finally:
        in_reactor(port.stopListening)


class Harness:
    """Builds clients, registrations and watches against one agent; stops them all at the end."""

    def __init__(self, agent: ConsulAgent) -> None:
        self.agent = agent
        self.transports: list[TreqTransport] = []
        self.services: list[ConsulRegistration | HealthWatch] = []

    def client(self) -> ConsulClient:
        transport = in_reactor(
            lambda: TreqTransport.create(reactor(), self.agent.address, timeout=2.0)
        )
        self.transports.append(transport)
        return ConsulClient(transport)

    def registration(
        self, port: int, alive: Callable[[], bool] = lambda: True, **spec: Any
    ) -> ConsulRegistration:
        fields: dict[str, Any] = {
            "service_id": f"inference-127.0.0.1-{port}",
            "address": "127.0.0.1",
            "port": port,
            "readiness_url": f"http://127.0.0.1:{port}/readyz",
            "tags": ("model:digits", "model:digits:1", "api:tfserving-rest"),
            "meta": {"kleinserve": "0.1.0"},
            "check_interval": 1.0,
            "ttl": 3.0,
            "drain_delay": 0.3,
        }
        fields.update(spec)
        service = ConsulRegistration(
            RegistrationSpec(**fields),
            self.client(),
            cast(IReactorTime, reactor()),
            alive,
            rng=random.Random(1),
            backoff=Backoff(initial=0.2, maximum=1.0),
            deregister_timeout=2.0,
        )
        self.services.append(service)
        return service

    def watch(self, **kwargs: Any) -> HealthWatch:
        watch = HealthWatch(
            self.client(),
            cast(IReactorTime, reactor()),
            wait=kwargs.pop("wait", 2.0),
            min_interval=kwargs.pop("min_interval", 0.05),
            backoff=Backoff(initial=0.2, maximum=1.0),
            rng=random.Random(2),
            **kwargs,
        )
        self.services.append(watch)
        return watch

    def close(self) -> None:
        for service in self.services:
            if service.running:
                in_reactor(service.stopService)
        for transport in self.transports:
            in_reactor(transport.close)

    # readbacks, straight from the agent

    def agent_service(self, service_id: str) -> dict[str, Any] | None:
        status, _, services = self.agent.get("/v1/agent/services")
        return services.get(service_id) if status == 200 else None

    def checks(self) -> dict[str, dict[str, Any]]:
        # The agent's own view: the catalog gets a changed Output only when the status
        # changes too, or after check_update_interval (5 min by default).
        status, _, checks = self.agent.get("/v1/agent/checks")
        return checks if status == 200 else {}

    def catalog_status(self) -> dict[str, str]:
        status, _, checks = self.agent.get("/v1/health/checks/inference")
        return {c["CheckID"]: c["Status"] for c in checks} if status == 200 else {}

    def passing_ids(self, query: str = "") -> set[str]:
        status, _, entries = self.agent.get(f"/v1/health/service/inference?passing{query}")
        return {e["Service"]["ID"] for e in entries} if status == 200 else set()

    def all_ids(self) -> set[str]:
        status, _, entries = self.agent.get("/v1/health/service/inference")
        return {e["Service"]["ID"] for e in entries} if status == 200 else set()


@pytest.fixture
def harness(consul_agent: ConsulAgent) -> Iterator[Harness]:  # noqa: F811
    h = Harness(consul_agent)
    try:
        yield h
    finally:
        h.close()


def ids(backends: Any) -> set[str]:
    return {b.service_id for b in backends}


# --- registration -------------------------------------------------------------------------------


def test_registers_with_tags_meta_and_both_checks(
    harness: Harness, readiness: tuple[Readiness, int]
) -> None:
    """The agent holds the service with its tags, meta, HTTP and TTL checks, and reports it passing."""
    _, port = readiness
    service = harness.registration(port)
    in_reactor(service.startService)
    sid = service.spec.service_id
    held = poll(lambda: harness.agent_service(sid), lambda s: s is not None)
    assert held is not None
    assert held["Service"] == "inference"
    assert held["Tags"] == ["model:digits", "model:digits:1", "api:tfserving-rest"]
    assert held["Meta"] == {"kleinserve": "0.1.0"}
    assert (held["Address"], held["Port"]) == ("127.0.0.1", port)
    _, _, agent_checks = harness.agent.get("/v1/agent/checks")
    assert agent_checks[f"service:{sid}:readiness"]["Type"] == "http"
    assert agent_checks[f"service:{sid}:liveness"]["Type"] == "ttl"
    assert {agent_checks[c]["ServiceID"] for c in agent_checks} == {sid}
    passing = poll(harness.passing_ids, lambda ids: sid in ids)
    assert passing == {sid}
    assert sid in harness.passing_ids("&tag=model:digits:1")
    assert harness.passing_ids("&tag=model:other") == set()
    assert service.registered


def test_deregister_critical_after_reaches_the_agent(
    harness: Harness, readiness: tuple[Readiness, int]
) -> None:
    """Both checks carry DeregisterCriticalServiceAfter: Consul 1.8 logs ours (30 s) as below its 1 m minimum."""
    _, port = readiness
    service = harness.registration(port, deregister_critical_after=30.0)
    in_reactor(service.startService)
    sid = service.spec.service_id
    wanted = [
        f"check has deregister interval below minimum: check=service:{sid}:{kind}"
        for kind in ("readiness", "liveness")
    ]
    log = poll(harness.agent.log_text, lambda text: all(w in text for w in wanted))
    assert all(w in log for w in wanted)


def test_ttl_check_follows_liveness(harness: Harness, readiness: tuple[Readiness, int]) -> None:
    """The TTL check is passing while liveness() is true and critical (out of ?passing) when false."""
    _, port = readiness
    alive = [True]
    service = harness.registration(port, alive=lambda: alive[0])
    in_reactor(service.startService)
    sid = service.spec.service_id
    check_id = f"service:{sid}:liveness"
    assert poll(harness.passing_ids, lambda ids: sid in ids) == {sid}
    alive[0] = False
    checks = poll(harness.checks, lambda c: c.get(check_id, {}).get("Status") == "critical")
    assert checks[check_id]["Status"] == "critical"
    assert checks[check_id]["Output"] == "inference threads not alive"
    assert poll(harness.passing_ids, lambda ids: sid not in ids) == set()
    alive[0] = True
    assert poll(harness.passing_ids, lambda ids: sid in ids) == {sid}


def test_http_check_maps_readiness_codes(
    harness: Harness, readiness: tuple[Readiness, int]
) -> None:
    """/readyz 503 makes the check critical, 429 warning (excluded by ?passing), 200 passing."""
    resource, port = readiness
    service = harness.registration(port)
    in_reactor(service.startService)
    sid = service.spec.service_id
    check_id = f"service:{sid}:readiness"
    for code, expected in [(503, "critical"), (429, "warning"), (200, "passing")]:
        resource.code = code

        def settled(checks: dict[str, Any], code: int = code, expected: str = expected) -> bool:
            check = checks.get(check_id, {})
            return check.get("Status") == expected and str(code) in check.get("Output", "")

        def synced(statuses: dict[str, str], expected: str = expected) -> bool:
            return statuses.get(check_id) == expected

        checks = poll(harness.checks, settled)
        assert checks[check_id]["Status"] == expected, code
        assert str(code) in checks[check_id]["Output"]
        # The agent syncs a status change to the catalog (what /v1/health reads) right after.
        catalog = poll(harness.catalog_status, synced)
        assert catalog[check_id] == expected, code
        assert (sid in harness.passing_ids()) == (expected == "passing")
        assert sid in harness.all_ids()


def test_registers_once_consul_comes_up(
    consul_agent_unstarted: ConsulAgent,  # noqa: F811
    readiness: tuple[Readiness, int],
    logs: list[LogEvent],
) -> None:
    """Started before Consul, the service retries quietly (one warning) and registers once Consul is up."""
    agent = consul_agent_unstarted
    harness = Harness(agent)
    try:
        _, port = readiness
        service = harness.registration(port)
        in_reactor(service.startService)
        retries = poll(
            lambda: logs.messages(LogLevel.debug, "discovery.registration"),
            lambda m: len(m) >= 3,
        )
        assert len(retries) >= 3 and not service.registered
        agent.start()
        sid = service.spec.service_id
        assert poll(lambda: harness.agent_service(sid), lambda s: s is not None) is not None
        assert poll(harness.passing_ids, lambda ids: sid in ids) == {sid}
        warnings = logs.messages(LogLevel.warn, "discovery.registration")
        assert len(warnings) == 1 and "Connection refused" in warnings[0], warnings
        infos = logs.messages(LogLevel.info, "discovery.registration")
        assert len(infos) == 1 and "failed attempts" in infos[0]
    finally:
        harness.close()


def test_reregisters_after_the_agent_restarts_empty(
    harness: Harness, readiness: tuple[Readiness, int]
) -> None:
    """A fresh, empty agent on the same address gets the service back, and it turns passing again."""
    _, port = readiness
    service = harness.registration(port)
    in_reactor(service.startService)
    sid = service.spec.service_id
    assert poll(harness.passing_ids, lambda ids: sid in ids) == {sid}
    harness.agent.restart()
    assert poll(lambda: harness.agent_service(sid), lambda s: s is not None) is not None
    assert poll(harness.passing_ids, lambda ids: sid in ids) == {sid}


def test_update_registers_new_tags(harness: Harness, readiness: tuple[Readiness, int]) -> None:
    """update() replaces the tags in Consul and the instance stays registered and passing."""
    _, port = readiness
    service = harness.registration(port)
    in_reactor(service.startService)
    sid = service.spec.service_id
    assert poll(harness.passing_ids, lambda ids: sid in ids) == {sid}
    assert in_reactor(lambda: service.update(["model:mnist", "model:mnist:3"])) is True
    held = harness.agent_service(sid)
    assert held is not None and held["Tags"] == ["model:mnist", "model:mnist:3"]
    assert poll(lambda: harness.passing_ids("&tag=model:mnist:3"), lambda ids: sid in ids) == {sid}


def test_stop_deregisters_before_it_finishes(
    harness: Harness, readiness: tuple[Readiness, int]
) -> None:
    """stopService removes the instance from the agent; by the time it fires the service is gone."""
    _, port = readiness
    service = harness.registration(port)
    in_reactor(service.startService)
    sid = service.spec.service_id
    assert poll(harness.passing_ids, lambda ids: sid in ids) == {sid}
    in_reactor(service.stopService)
    assert harness.agent_service(sid) is None
    assert harness.all_ids() == set()


# --- watch --------------------------------------------------------------------------------------


def register(client: ConsulClient, service_id: str, port: int, *tags: str) -> None:
    definition = ServiceDefinition("inference", service_id, "127.0.0.1", port, tags)
    in_reactor(lambda: client.register(definition))


def test_watch_sees_backends_come_and_go(harness: Harness) -> None:
    """A watch publishes each addition and removal; a tag-filtered watch sees only tagged instances."""
    client = harness.client()
    every, tagged = harness.watch(), harness.watch(tags=["model:b"])
    seen: list[Any] = []
    every.subscribe(seen.append)
    in_reactor(every.startService)
    in_reactor(tagged.startService)
    assert in_reactor(every.ready) == ()
    register(client, "a", 1001, "model:a")
    register(client, "b", 1002, "model:b")
    assert ids(poll(lambda: every.current, lambda c: ids(c) == {"a", "b"})) == {"a", "b"}
    assert ids(poll(lambda: tagged.current, lambda c: ids(c) == {"b"})) == {"b"}
    b = next(x for x in every.current if x.service_id == "b")
    assert (b.address, b.port, b.tags, b.status, b.node) == (
        "127.0.0.1", 1002, ("model:b",), "passing", "kleinserve-test",
    )  # fmt: skip
    in_reactor(lambda: client.deregister("a"))
    assert ids(poll(lambda: every.current, lambda c: ids(c) == {"b"})) == {"b"}
    assert all(isinstance(s, tuple) for s in seen) and ids(seen[-1]) == {"b"}
    assert ids(seen[0]) == set()
    assert tagged.current == poll(lambda: tagged.current, lambda c: ids(c) == {"b"})


def test_watch_keeps_the_last_snapshot_while_consul_is_down(harness: Harness) -> None:
    """With the agent gone the watch keeps its last snapshot; a fresh agent's view then replaces it."""
    client = harness.client()
    watch = harness.watch()
    in_reactor(watch.startService)
    register(client, "a", 1001)
    assert ids(poll(lambda: watch.current, lambda c: ids(c) == {"a"})) == {"a"}
    harness.agent.stop()
    assert poll(lambda: watch.reachable, lambda r: not r) is False
    assert ids(watch.current) == {"a"}
    harness.agent.start()  # fresh and empty: its index restarts too
    assert poll(lambda: watch.current, lambda c: c == ()) == ()
    assert watch.reachable
    register(client, "c", 1003)
    assert ids(poll(lambda: watch.current, lambda c: ids(c) == {"c"})) == {"c"}


def test_unreachable_agent_is_consul_unavailable(consul_agent_unstarted: ConsulAgent) -> None:  # noqa: F811
    """A call to an agent that is not listening fails with ConsulUnavailable, naming the address."""
    harness = Harness(consul_agent_unstarted)
    try:
        client = harness.client()
        with pytest.raises(ConsulUnavailable, match=consul_agent_unstarted.http_addr):
            in_reactor(client.agent_services)
    finally:
        harness.close()


# --- the transport against real sockets ------------------------------------------------------


class Silent(Protocol):
    """Accepts a connection and never answers."""


class FakeLeader(Resource):
    """Answers /v1/status/leader like an agent, remembering the token it was sent."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[bytes | None] = []

    def render_GET(self, request: Request) -> bytes:
        token = request.getHeader(b"X-Consul-Token")
        self.tokens.append(token if isinstance(token, bytes) or token is None else token.encode())
        return b'"127.0.0.1:8300"'


def self_signed_certificate(directory: Path) -> tuple[Path, bytes]:
    """A CA-flagged certificate for localhost/127.0.0.1: its path, and cert+key PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = directory / "consul-ca.pem"
    path.write_bytes(cert_pem)
    return path, cert_pem + key_pem


def call_leader(address: ConsulAddress, timeout: float = 2.0) -> Any:
    transport = in_reactor(lambda: TreqTransport.create(reactor(), address, timeout=timeout))
    try:
        return in_reactor(ConsulClient(transport).leader)
    finally:
        in_reactor(transport.close)


def test_silent_agent_times_out_as_unavailable() -> None:
    """A listener that never answers makes a real call fail with ConsulUnavailable at the timeout."""
    factory = Factory.forProtocol(Silent)
    port = in_reactor(lambda: reactor().listenTCP(0, factory, interface="127.0.0.1"))
    try:
        address = ConsulAddress.parse(f"127.0.0.1:{port.getHost().port}")
        with pytest.raises(ConsulUnavailable, match="no answer from Consul .* within 0.5 s"):
            call_leader(address, timeout=0.5)
    finally:
        in_reactor(port.stopListening)


def test_agent_that_never_accepts_times_out_as_unavailable() -> None:
    """A connect that never completes (full accept queue) also ends as ConsulUnavailable at the timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            with pytest.raises(ConsulUnavailable, match="no answer from Consul .* within 0.5 s"):
                call_leader(ConsulAddress.parse(f"127.0.0.1:{port}"), timeout=0.5)
        finally:
            for filler in fillers:
                filler.close()


def test_https_address_verifies_against_the_ca_file(tmp_path: Path) -> None:
    """https:// with CONSUL_CACERT's CA file works and sends the token; without that CA the call fails."""
    ca_file, pem = self_signed_certificate(tmp_path)
    resource = FakeLeader()
    options = PrivateCertificate.loadPEM(pem).options()
    port = in_reactor(
        lambda: reactor().listenSSL(0, Site(resource), options, interface="127.0.0.1")
    )
    try:
        env = {
            "CONSUL_HTTP_ADDR": f"https://localhost:{port.getHost().port}",
            "CONSUL_CACERT": str(ca_file),
            "CONSUL_HTTP_TOKEN": "s3cret",
        }
        assert call_leader(ConsulAddress.from_env(env)) == "127.0.0.1:8300"
        assert resource.tokens == [b"s3cret"]
        untrusted = ConsulAddress.from_env({**env, "CONSUL_CACERT": ""})
        with pytest.raises(ConsulUnavailable, match="cannot reach Consul at https://localhost"):
            call_leader(untrusted)
    finally:
        in_reactor(port.stopListening)
