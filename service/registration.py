"""This server's Consul registration: its tags, and the registration that keeps them current.

Part of the composition root (``service.tap`` builds it when --consul is given; the flags
are read by ``service.options``), which is where the server reaches ``discovery``. The tag
format is the wire contract's (``wire.consul_tags``); what this module adds is the policy: a
model is announced only once it has an AVAILABLE version, since a client choosing backends
by ``model:NAME`` would otherwise send it requests it can only answer with 503.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from discovery.consul import ConsulClient, TreqTransport
from discovery.registration import ConsulRegistration, RegistrationSpec, default_service_id
from service.options import DiscoveryConfig
from service.repository import AVAILABLE, ModelRepository
from wire import consul_tags


def model_tags(
    repository: ModelRepository, grpc_port: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """Consul tags and meta naming every model with an AVAILABLE version, and those versions
    (and the gRPC API and its port, when it is served)."""
    available = {
        name: [number for number, v in versions.items() if v.state == AVAILABLE]
        for name, versions in repository.versions.items()
    }
    return consul_tags.registration(available, grpc_port=grpc_port)


def make_registration(
    discovery: DiscoveryConfig,
    repository: ModelRepository,
    listening_port: int,
    health: Any,
    reactor: Any,
    grpc_port: int | None = None,
) -> ConsulRegistration:
    """The registration of this server, listening on ``listening_port``, with its tags now."""
    port = discovery.advertise_port or listening_port
    host = discovery.advertise_host
    tags, meta = model_tags(repository, grpc_port)
    spec = RegistrationSpec(
        service_id=default_service_id(discovery.service_name, host, port),
        address=host,
        port=port,
        readiness_url=f"http://{f'[{host}]' if ':' in host else host}:{port}/readyz",
        name=discovery.service_name,
        tags=tags,
        meta=meta,
        check_interval=discovery.check_interval,
        ttl=discovery.ttl,
        deregister_critical_after=discovery.deregister_critical_after,
        drain_delay=discovery.drain_delay,
    )
    client = ConsulClient(TreqTransport.create(reactor, discovery.consul))
    return ConsulRegistration(spec, client, reactor, health.alive)


def registration_factory(
    discovery: DiscoveryConfig,
    repository: ModelRepository,
    health: Any,
    reactor: Any,
    grpc_port: int | None = None,
) -> Callable[[Any], ConsulRegistration]:
    """Given the listening port, the registration, kept following the AVAILABLE versions."""

    def register(listening: Any) -> ConsulRegistration:
        registration = make_registration(
            discovery, repository, listening.getHost().port, health, reactor, grpc_port
        )
        repository.subscribe(lambda: registration.update(*model_tags(repository, grpc_port)))
        return registration

    return register
