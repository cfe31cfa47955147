"""Where backends come from: one Consul health watch per model name, or a fixed list.

``ConsulSources`` makes a ``discovery.watch.HealthWatch`` for ``model:<name>`` the first
time a model is used and shares it between calls (one blocking query per model, not per
call); a watch without a tag serves listings of the whole service. While Consul is
unreachable a watch keeps its last snapshot. ``StaticSources`` serves one fixed list for
every model, through the same interface.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred

from discovery.consul import ConsulAddress, ConsulClient, TreqTransport
from discovery.watch import BackendSource, HealthWatch, StaticBackends
from wire.consul_tags import SCHEME, SCHEMES, model_tag

__all__ = ["ConsulSources", "Sources", "StaticSources"]


class Sources(Protocol):
    def for_model(self, model: str) -> BackendSource: ...

    def for_service(self) -> BackendSource: ...

    def describe(self) -> str: ...

    def close(self) -> Deferred[None]: ...


class ConsulSources:
    """Health watches on ``service`` in the Consul agent at ``address``, made on first use."""

    def __init__(
        self,
        reactor: Any,
        address: ConsulAddress,
        service: str = "inference",
        *,
        rng: random.Random | None = None,
        make_watch: Callable[[tuple[str, ...]], HealthWatch] | None = None,
    ) -> None:
        self.address = address
        self.service = service
        self._transport: TreqTransport | None = None
        if make_watch is None:
            self._transport = TreqTransport.create(reactor, address)
            consul = ConsulClient(self._transport)
            shared_rng = rng if rng is not None else random.Random()

            def make_watch(tags: tuple[str, ...]) -> HealthWatch:
                return HealthWatch(consul, reactor, service, tags=tags, rng=shared_rng)

        self._make_watch = make_watch
        self._watches: dict[tuple[str, ...], HealthWatch] = {}

    def _watch(self, tags: tuple[str, ...]) -> HealthWatch:
        watch = self._watches.get(tags)
        if watch is None:
            watch = self._watches[tags] = self._make_watch(tags)
            watch.startService()
        return watch

    def for_model(self, model: str) -> BackendSource:
        return self._watch((model_tag(model),))

    def for_service(self) -> BackendSource:
        return self._watch(())

    def describe(self) -> str:
        return f"service {self.service!r} in Consul at {self.address.base_url}"

    def close(self) -> Deferred[None]:
        watches, self._watches = list(self._watches.values()), {}
        stopped = [defer.maybeDeferred(watch.stopService) for watch in watches]
        if self._transport is not None:
            stopped.append(self._transport.close())
        return defer.gatherResults(stopped).addCallback(lambda _: None)


class StaticSources:
    """The same fixed list of ``(host, port)`` backends for every model (no Consul), all
    called with ``scheme`` (http or https)."""

    def __init__(self, addresses: Iterable[tuple[str, int]], scheme: str = "http") -> None:
        self.addresses = tuple((str(host), int(port)) for host, port in addresses)
        if not self.addresses:
            raise ValueError("a static backend list needs at least one (host, port)")
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
        meta = {SCHEME: scheme} if scheme != "http" else None  # as a server registers it
        self._backends = StaticBackends.from_addresses(self.addresses, meta)

    def for_model(self, model: str) -> BackendSource:
        return self._backends

    def for_service(self) -> BackendSource:
        return self._backends

    def describe(self) -> str:
        listed = ", ".join(f"{host}:{port}" for host, port in self.addresses)
        return f"the static backends {listed}"

    def close(self) -> Deferred[None]:
        return defer.succeed(None)
