"""Keep one server instance registered in Consul exactly while it can serve.

``ConsulRegistration`` is a ``Service``: starting it never blocks and never fails, it
only starts a loop that registers the instance (retrying with capped, jittered backoff
while the agent is unreachable), then refreshes a TTL check from ``liveness()`` every
``ttl / 3``. Readiness is Consul's own HTTP check on the server's ``/readyz``: 200
passing, 429 warning, anything else critical; ``?passing`` watchers see only passing.

When the agent forgets the instance -- a TTL update answered "unknown check" after an
agent restarted empty, or the agent unreachable and then back -- the loop registers
again. Stopping deregisters first (bounded by a timeout), then waits ``drain_delay``
so watching clients drop this instance before the server stops answering.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

import attrs
from attrs import field, frozen
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from discovery.backoff import sleep
from discovery.consul import (
    CheckNotFound,
    CheckStatus,
    ConsulClient,
    ConsulError,
    ConsulFailure,
    ConsulUnavailable,
    HTTPCheck,
    ServiceDefinition,
    TTLCheck,
)
from wire.backoff import Backoff

__all__ = ["ConsulRegistration", "RegistrationSpec", "default_service_id"]

# Consul 1.8 raises any DeregisterCriticalServiceAfter below one minute to one minute,
# logging "check has deregister interval below minimum".
CONSUL_MIN_DEREGISTER_AFTER = 60.0


def default_service_id(name: str, host: str, port: int) -> str:
    """``<name>-<host>-<port>``: unique per instance as long as host names are."""
    return f"{name}-{host}-{port}"


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _not_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _port(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 < value < 65536:
        raise ValueError(f"{attribute.name} must be within 1..65535, got {value!r}")


def _non_empty(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must not be empty")


def _str_meta(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType({str(k): str(v) for k, v in (value or {}).items()})


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@frozen
class RegistrationSpec:
    """What this instance tells Consul about itself, and how often it proves it is alive.

    Durations are seconds. ``deregister_critical_after`` lets the agent drop an instance
    that crashed without deregistering; Consul raises values below one minute to one
    minute. ``check_timeout`` defaults to the interval, at most 5 s.
    """

    service_id: str = field(validator=_non_empty)
    address: str = field(validator=_non_empty)
    port: int = field(validator=_port)
    readiness_url: str = field(validator=_non_empty)
    name: str = field(default="inference", validator=_non_empty)
    tags: tuple[str, ...] = field(default=(), converter=_str_tuple)
    meta: Mapping[str, str] = field(factory=dict, converter=_str_meta, hash=False)
    check_interval: float = field(default=5.0, validator=_positive)
    check_timeout: float | None = None
    ttl: float = field(default=15.0, validator=_positive)
    deregister_critical_after: float = field(
        default=CONSUL_MIN_DEREGISTER_AFTER, validator=_positive
    )
    drain_delay: float = field(default=5.0, validator=_not_negative)
    tls_skip_verify: bool = False  # the agent checks an https readiness_url unverified

    @property
    def readiness_check_id(self) -> str:
        return f"service:{self.service_id}:readiness"

    @property
    def liveness_check_id(self) -> str:
        return f"service:{self.service_id}:liveness"

    @property
    def heartbeat_interval(self) -> float:
        """How often the TTL check is refreshed: three chances before it expires."""
        return self.ttl / 3

    def definition(self) -> ServiceDefinition:
        """The service with its HTTP readiness check and TTL liveness check."""
        timeout = self.check_timeout
        if timeout is None:
            timeout = min(self.check_interval, 5.0)
        return ServiceDefinition(
            name=self.name,
            service_id=self.service_id,
            address=self.address,
            port=self.port,
            tags=self.tags,
            meta=self.meta,
            checks=(
                HTTPCheck(
                    check_id=self.readiness_check_id,
                    name=f"{self.name} readiness",
                    url=self.readiness_url,
                    interval=self.check_interval,
                    timeout=timeout,
                    deregister_critical_after=self.deregister_critical_after,
                    tls_skip_verify=self.tls_skip_verify,
                ),
                TTLCheck(
                    check_id=self.liveness_check_id,
                    name=f"{self.name} inference threads",
                    ttl=self.ttl,
                    deregister_critical_after=self.deregister_critical_after,
                ),
            ),
        )


class ConsulRegistration(Service):
    """Registers ``spec`` while running; deregisters and drains on stop.

    ``liveness`` is called on the reactor thread every heartbeat and must be cheap: true
    while the inference threads are alive. ``rng`` draws the backoff jitter.
    """

    log = Logger()

    def __init__(
        self,
        spec: RegistrationSpec,
        client: ConsulClient,
        clock: IReactorTime,
        liveness: Callable[[], bool],
        *,
        rng: random.Random | None = None,
        backoff: Backoff | None = None,
        deregister_timeout: float = 5.0,
    ) -> None:
        self._spec = spec
        self._client = client
        self._clock = clock
        self._liveness_probe = liveness
        self._rng = rng if rng is not None else random.Random()
        self._backoff = backoff if backoff is not None else Backoff()
        self._deregister_timeout = deregister_timeout
        self._generation = 0  # bumped by update(); tells the loop to register again
        self._registered_generation: int | None = None  # what Consul has, as far as we know
        self._waiters: list[tuple[int, Deferred[bool]]] = []
        self._task: Deferred[None] | None = None
        self._token: object = None  # identifies the current run; a stale loop sees it change
        self._wake: Deferred[None] | None = None
        self._warned = False
        self._failed_attempts = 0
        self._attempted = False
        self._was_registered = False

    # --- public ------------------------------------------------------------------------------

    @property
    def spec(self) -> RegistrationSpec:
        return self._spec

    @property
    def registered(self) -> bool:
        """Whether the agent has our current spec, as far as we last heard."""
        return self._registered_generation == self._generation

    def update(self, tags: Iterable[str], meta: Mapping[str, str] | None = None) -> Deferred[bool]:
        """Register again with new tags (and meta, if given), e.g. after a model loads.

        The Deferred fires True once the agent has the new tags, or False if the service
        stops first (or is not running: then the next start uses them). It never fails.
        """
        new_meta = self._spec.meta if meta is None else meta
        self._spec = attrs.evolve(self._spec, tags=_str_tuple(tags), meta=new_meta)
        self._generation += 1
        if not self.running:
            return defer.succeed(False)
        waiter: Deferred[bool] = Deferred()
        self._waiters.append((self._generation, waiter))
        self._poke()
        return waiter

    def startService(self) -> None:
        super().startService()
        self._token = token = object()
        self._warned = False
        self._failed_attempts = 0
        self._attempted = False
        self._was_registered = False
        self._registered_generation = None
        self._task = Deferred.fromCoroutine(self._run(token))
        self._task.addErrback(self._loop_ended)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    # --- the loop ----------------------------------------------------------------------------

    def _current(self, token: object) -> bool:
        return bool(self.running) and token is self._token

    async def _run(self, token: object) -> None:
        while self._current(token):
            await self._register(token)
            if self._current(token):
                await self._heartbeat(token)

    async def _register(self, token: object) -> None:
        attempt = 0
        while self._current(token):
            spec, generation = self._spec, self._generation
            self._attempted = True
            try:
                await self._client.register(spec.definition())
                await self._client.update_check(spec.liveness_check_id, *self._liveness())
            except CancelledError:
                raise
            except ConsulFailure as e:
                self._trouble(f"Cannot register {spec.service_id} with Consul", e)
            except Exception:
                self.log.failure(
                    "Unexpected error registering {service_id} with Consul",
                    service_id=spec.service_id,
                )
            else:
                if self._current(token):
                    self._on_registered(spec, generation)
                return
            if not self._current(token):
                return
            self._failed_attempts += 1
            await self._nap(self._backoff.delay(attempt, self._rng))
            attempt += 1

    def _on_registered(self, spec: RegistrationSpec, generation: int) -> None:
        self._registered_generation = generation
        self._was_registered = True
        after = f" after {self._failed_attempts} failed attempts" if self._failed_attempts else ""
        self.log.info(
            "Registered {service_id} ({name} at {address}:{port}, tags {tags}) with Consul{after}",
            service_id=spec.service_id,
            name=spec.name,
            address=spec.address,
            port=spec.port,
            tags=",".join(spec.tags),
            after=after,
        )
        self._warned = False
        self._failed_attempts = 0
        self._release_waiters(generation, True)

    async def _heartbeat(self, token: object) -> None:
        refused = False
        while self._current(token) and self.registered:
            await self._nap(self._spec.heartbeat_interval)
            if not (self._current(token) and self.registered):
                return
            check_id = self._spec.liveness_check_id
            try:
                await self._client.update_check(check_id, *self._liveness())
            except CancelledError:
                raise
            except CheckNotFound:
                self.log.warn(
                    "Consul no longer knows check {check_id} (agent restarted?); registering again",
                    check_id=check_id,
                )
                self._registered_generation = None
                return
            except ConsulUnavailable as e:
                self._trouble("Lost contact with Consul; registering again once it is back", e)
                self._registered_generation = None
                return
            except ConsulError as e:
                if not refused:
                    self.log.warn(
                        "Consul refused the TTL update of {check_id}: {error}",
                        check_id=check_id,
                        error=e,
                    )
                refused = True
            except Exception:
                self.log.failure(
                    "Unexpected error refreshing TTL check {check_id}", check_id=check_id
                )
            else:
                if refused:
                    self.log.info(
                        "Consul accepts TTL updates of {check_id} again", check_id=check_id
                    )
                refused = False

    def _liveness(self) -> tuple[CheckStatus, str]:
        try:
            alive = bool(self._liveness_probe())
        except Exception:
            self.log.failure("The liveness probe raised; reporting critical")
            alive = False
        if alive:
            return CheckStatus.PASSING, "inference threads alive"
        return CheckStatus.CRITICAL, "inference threads not alive"

    def _trouble(self, what: str, error: ConsulFailure) -> None:
        """Warn once per outage; later failures of the same outage only go to debug."""
        if self._warned:
            self.log.debug("{what}: {error}", what=what, error=error)
            return
        self._warned = True
        self.log.warn(
            "{what}: {error}. Retrying with backoff (at most {cap:g} s apart); "
            "one message will say when it works.",
            what=what,
            error=error,
            cap=self._backoff.maximum,
        )

    async def _nap(self, seconds: float) -> None:
        """Sleep on the clock; ``update()`` cuts the nap short, cancelling it stops the timer."""
        timer = sleep(self._clock, seconds)
        wake: Deferred[None] = Deferred(lambda _: timer.cancel())
        timer.addCallbacks(lambda _: self._poke(), lambda _: None)
        self._wake = wake
        try:
            await wake
        finally:
            timer.cancel()
            if self._wake is wake:
                self._wake = None

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None and not wake.called:
            wake.callback(None)

    def _release_waiters(self, generation: int | None, result: bool) -> None:
        keep = []
        for wanted, waiter in self._waiters:
            if generation is None or wanted <= generation:
                waiter.callback(result)
            else:
                keep.append((wanted, waiter))
        self._waiters = keep

    def _loop_ended(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self.log.failure("The Consul registration loop stopped", failure)

    # --- stopping ----------------------------------------------------------------------------

    async def _stop(self) -> None:
        self._token = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        self._release_waiters(None, False)
        spec = self._spec
        if self._attempted:
            try:
                await Deferred.fromCoroutine(self._client.deregister(spec.service_id)).addTimeout(
                    self._deregister_timeout, self._clock
                )
            except (ConsulFailure, defer.TimeoutError) as e:
                self.log.warn(
                    "Could not deregister {service_id} from Consul ({error}); stopping anyway",
                    service_id=spec.service_id,
                    error=e,
                )
            except Exception:
                self.log.failure(
                    "Unexpected error deregistering {service_id}", service_id=spec.service_id
                )
            else:
                self.log.info("Deregistered {service_id} from Consul", service_id=spec.service_id)
        self._registered_generation = None
        if self._was_registered and spec.drain_delay > 0:
            self.log.info(
                "Waiting {delay:g} s for clients to notice before stopping", delay=spec.drain_delay
            )
            await sleep(self._clock, spec.drain_delay)
