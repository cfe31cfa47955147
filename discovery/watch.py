"""Healthy backends as a stream of immutable snapshots.

``HealthWatch`` is the blocking-query loop on ``/v1/health/service/<name>?passing``,
run the way Consul's ``api/watch/plan.go`` runs one: reset the index to 0 when it goes
backwards (and after an error), skip results that did not change, back off with jitter
on errors, use an HTTP timeout above the query's wait (``ConsulRequest.timeout``), and
publish each change as a new ``Backends`` snapshot. While Consul is unreachable the last
snapshot stays current: a client keeps using the servers it knew rather than none.

``StaticBackends`` offers the same interface for a fixed list (no Consul).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from discovery.backends import Backend, Backends, snapshot
from discovery.backoff import now, sleep
from discovery.consul import ConsulClient, ConsulFailure, next_index
from wire.backoff import Backoff

__all__ = ["Backend", "BackendSource", "Backends", "HealthWatch", "StaticBackends"]

Subscriber = Callable[[Backends], object]


class BackendSource(Protocol):
    """What a client reads backends from: a Consul watch or a fixed list."""

    @property
    def current(self) -> Backends: ...

    def subscribe(self, callback: Subscriber) -> Callable[[], None]: ...

    def ready(self) -> Deferred[Backends]: ...


class _Snapshots:
    """The latest snapshot, its subscribers, and who waits for the first one."""

    log = Logger()

    def __init__(self, initial: Backends = ()) -> None:
        self.current: Backends = initial
        self.has_snapshot = False
        self._subscribers: list[Subscriber] = []
        self._waiting: list[Deferred[Backends]] = []

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def ready(self) -> Deferred[Backends]:
        if self.has_snapshot:
            return defer.succeed(self.current)
        waiter: Deferred[Backends] = Deferred()
        self._waiting.append(waiter)
        return waiter

    def publish(self, backends: Backends) -> bool:
        """Make ``backends`` current; tell subscribers if it changed. True if it did."""
        first, self.has_snapshot = not self.has_snapshot, True
        changed = backends != self.current
        self.current = backends
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(backends)
        if changed or first:
            for callback in list(self._subscribers):
                try:
                    callback(backends)
                except Exception:
                    self.log.failure("A backends subscriber raised")
        return changed


class HealthWatch(Service):
    """Watches ``/v1/health/service/<service_name>`` (passing only, narrowed by ``tags``).

    Subscribers are called with each new snapshot -- the first one read, then every
    change -- on the reactor thread; one that raises is logged and the others still run.
    ``wait`` is the blocking query's wait; ``min_interval`` spaces queries that come back
    at once, as Consul asks clients to (a burst of changes arrives as one snapshot).
    """

    log = Logger()

    def __init__(
        self,
        client: ConsulClient,
        clock: IReactorTime,
        service_name: str = "inference",
        *,
        tags: Iterable[str] = (),
        passing: bool = True,
        wait: float = 30.0,
        min_interval: float = 0.5,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.service_name = service_name
        self.tags = tuple(tags)
        self.passing = passing
        self._client = client
        self._clock = clock
        self._wait = wait
        self._min_interval = min_interval
        self._backoff = backoff if backoff is not None else Backoff()
        self._rng = rng if rng is not None else random.Random()
        self._snapshots = _Snapshots()
        self._index = 0
        self._reachable = False
        self._task: Deferred[None] | None = None
        self._token: object = None

    @property
    def current(self) -> Backends:
        """The latest snapshot: ``()`` before the first answer, the last known one after errors."""
        return self._snapshots.current

    @property
    def index(self) -> int:
        """The index the next blocking query will send (0: a fresh, non-blocking read)."""
        return self._index

    @property
    def reachable(self) -> bool:
        """Whether the last query succeeded."""
        return self._reachable

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(snapshot)`` on every change; returns a function that unsubscribes."""
        return self._snapshots.subscribe(callback)

    def ready(self) -> Deferred[Backends]:
        """Fires with the first snapshot read from Consul (at once if there is one)."""
        return self._snapshots.ready()

    def startService(self) -> None:
        super().startService()
        self._token = token = object()
        self._index = 0
        self._task = Deferred.fromCoroutine(self._run(token))
        self._task.addErrback(self._loop_ended)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._token = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return defer.succeed(None)

    def _current(self, token: object) -> bool:
        return bool(self.running) and token is self._token

    async def _run(self, token: object) -> None:
        failures = 0
        while self._current(token):
            started = now(self._clock)
            try:
                returned, backends = await self._client.health_service(
                    self.service_name,
                    passing=self.passing,
                    tags=self.tags,
                    index=self._index,
                    wait=self._wait if self._index else None,
                )
            except CancelledError:
                raise
            except Exception as e:
                if not self._current(token):
                    return
                self._failed(e, failures)
                failures += 1
                self._index = 0  # as plan.go: after an error, read afresh
                await sleep(self._clock, self._backoff.delay(failures - 1, self._rng))
                continue
            if not self._current(token):
                return
            if failures:
                self.log.info(
                    "Watching {name} in Consul again after {failures} failed queries",
                    name=self.service_name,
                    failures=failures,
                )
                failures = 0
            self._reachable = True
            self._index = next_index(self._index, returned)
            self._snapshots.publish(backends)
            elapsed = now(self._clock) - started
            if elapsed < self._min_interval:
                await sleep(self._clock, self._min_interval - elapsed)

    def _failed(self, error: Exception, failures_before: int) -> None:
        self._reachable = False
        if not isinstance(error, ConsulFailure):
            self.log.failure("Unexpected error watching {name} in Consul", name=self.service_name)
        elif failures_before == 0:
            self.log.warn(
                "Cannot watch {name} in Consul: {error}. Keeping the last {count} known "
                "backends and retrying with backoff.",
                name=self.service_name,
                error=error,
                count=len(self.current),
            )
        else:
            self.log.debug(
                "Still cannot watch {name}: {error}", name=self.service_name, error=error
            )

    def _loop_ended(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self.log.failure("The Consul health watch stopped", failure)


class StaticBackends(Service):
    """A fixed list of backends behind the ``HealthWatch`` interface (no Consul).

    ``set`` replaces the list and tells subscribers, e.g. for an operator's override.
    """

    def __init__(self, backends: Iterable[Backend]) -> None:
        self._snapshots = _Snapshots()
        self._snapshots.publish(snapshot(backends))

    @classmethod
    def from_addresses(
        cls, addresses: Iterable[tuple[str, int]], meta: Mapping[str, str] | None = None
    ) -> StaticBackends:
        """Backends for ``(host, port)`` pairs, with IDs ``static-<host>-<port>`` (and the
        same ``meta``, e.g. the scheme to call them with)."""
        return cls(
            Backend(f"static-{host}-{port}", host, port, meta=meta) for host, port in addresses
        )

    @property
    def current(self) -> Backends:
        return self._snapshots.current

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        return self._snapshots.subscribe(callback)

    def ready(self) -> Deferred[Backends]:
        return self._snapshots.ready()

    def set(self, backends: Iterable[Backend]) -> None:
        self._snapshots.publish(snapshot(backends))
