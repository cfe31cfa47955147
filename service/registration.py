"""This server's Consul registration: its tags, and the registration that keeps them current.

Part of the composition root (``service.tap`` builds it when --consul is given; the flags
are read by ``service.options``), which is where the server reaches ``discovery``. The tag
format is the wire contract's (``wire.consul_tags``); what this module adds is the policy: a
model is announced only once it has an AVAILABLE version, since a client choosing backends
by ``model:NAME`` would otherwise send it requests it can only answer with 503.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from discovery.consul import ConsulClient, ConsulFailure, TreqTransport
from discovery.registration import ConsulRegistration, RegistrationSpec, default_service_id
from service.options import DiscoveryConfig
from service.repository import AVAILABLE, ModelRepository
from wire import consul_tags
from wire.backoff import Backoff

log = Logger()

# Asking the local agent for its address, when it does not answer yet.
AGENT_RETRY = Backoff(initial=0.5, maximum=15.0, jitter=0.2)


def model_tags(
    repository: ModelRepository, grpc_port: int | None = None, scheme: str = "http"
) -> tuple[list[str], dict[str, str]]:
    """Consul tags and meta naming every model with an AVAILABLE version, and those versions
    (and the gRPC API and its port, when it is served; ``scheme`` https for a TLS port)."""
    available = {
        name: [number for number, v in versions.items() if v.state == AVAILABLE]
        for name, versions in repository.versions.items()
    }
    return consul_tags.registration(available, grpc_port=grpc_port, scheme=scheme)


def make_registration(
    discovery: DiscoveryConfig,
    repository: ModelRepository,
    listening_port: int,
    health: Any,
    reactor: Any,
    grpc_port: int | None = None,
    host: str | None = None,
    client: ConsulClient | None = None,
) -> ConsulRegistration:
    """The registration of this server, listening on ``listening_port``, with its tags now;
    ``host``: the address to register when ``--advertise`` named none (the agent's)."""
    port = discovery.advertise_port or listening_port
    host = discovery.advertise_host or host
    if host is None:
        raise ValueError("no address to register: --advertise, or the local agent's")
    tags, meta = model_tags(repository, grpc_port, discovery.check_scheme)
    url_host = f"[{host}]" if ":" in host else host
    spec = RegistrationSpec(
        service_id=default_service_id(discovery.service_name, host, port),
        address=host,
        port=port,
        readiness_url=f"{discovery.check_scheme}://{url_host}:{port}/readyz",
        tls_skip_verify=discovery.check_tls_skip_verify,
        name=discovery.service_name,
        tags=tags,
        meta=meta,
        check_interval=discovery.check_interval,
        ttl=discovery.ttl,
        deregister_critical_after=discovery.deregister_critical_after,
        drain_delay=discovery.drain_delay,
    )
    client = client or consul_client(discovery, reactor)
    return ConsulRegistration(spec, client, reactor, health.alive)


def consul_client(discovery: DiscoveryConfig, reactor: Any) -> ConsulClient:
    return ConsulClient(TreqTransport.create(reactor, discovery.consul))


async def advertised_host(
    discovery: DiscoveryConfig, client: ConsulClient, reactor: Any, backoff: Backoff = AGENT_RETRY
) -> str:
    """The address to register: ``--advertise``'s, else the one the local agent advertises
    (a server listening on all interfaces, as Consul's own services register). Asked again,
    after a doubling delay, until the agent answers."""
    if discovery.advertise_host is not None:
        return discovery.advertise_host
    rng = random.Random()
    for attempt in itertools.count():
        try:
            return await client.agent_address()
        except ConsulFailure as e:
            delay = backoff.delay(attempt, rng)
            log.warn(
                "cannot ask the Consul agent for its address ({error}); again in {delay:.1f} s",
                error=e,
                delay=delay,
            )
            await task.deferLater(reactor, delay, lambda: None)
    raise AssertionError("unreachable")


def registration_factory(
    discovery: DiscoveryConfig,
    repository: ModelRepository,
    health: Any,
    reactor: Any,
    grpc_port: int | None = None,
) -> Callable[[Any], ConsulRegistration]:
    """Given the listening port and the address to register (``advertised_host``), the
    registration, kept following the AVAILABLE versions."""

    def register(ready: tuple[Any, str]) -> ConsulRegistration:
        listening, host = ready
        registration = make_registration(
            discovery, repository, listening.getHost().port, health, reactor, grpc_port, host
        )
        scheme = discovery.check_scheme
        repository.subscribe(
            lambda: registration.update(*model_tags(repository, grpc_port, scheme))
        )
        return registration

    return register
