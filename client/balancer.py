"""Which backend gets the next attempt: power of two choices (or round-robin), with ejection.

Power of two choices (Mitzenmacher; Finagle's ``P2CLeastLoaded``, Envoy's least-request):
draw two distinct eligible backends at random and take the one with fewer requests in
flight *from this client*. It needs no shared state between clients, it stays almost as
even as round-robin when the servers are alike, and a slow or stalled server holds its
requests longer, so it is chosen less.

Outlier ejection (Envoy's outlier detection, simplified): a connection error, a timeout
or a 5xx ejects the backend for ``EjectionPolicy.period`` -- 1 s, doubling with each
ejection that follows without a success, capped at 30 s. When the period ends the backend
is *probing*: it is offered one attempt (a probe) only when nothing at all is in flight to
it -- neither an earlier probe nor an attempt begun before the ejection, which a hung
server holds until its attempt timeout -- so from its ejection until a probe succeeds it
sees at most one attempt at a time, never a share of the traffic, while the other
backends take the rest. A successful probe ends the episode; a failed one ejects it
again, for longer. Outcomes of attempts begun before an ejection neither extend it nor
end it (a burst of requests lost with one dead server is one failure, and an old success
says nothing about now). Ejection is advice, never a wall: only when no candidate is
usable (every one ejected or busy with its probe) is the least recently ejected one used
anyway, since a call sent to a server that may have recovered beats a call refused.

Time comes from the injected clock, randomness from the injected ``random.Random``.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from enum import Enum

from attrs import define, field, frozen
from twisted.internet.interfaces import IReactorTime

from discovery.backends import Backend
from discovery.backoff import now

__all__ = ["Balancer", "BackendLoad", "EjectionPolicy", "Strategy", "Ticket", "backend_key"]

Key = tuple[str, int]


def backend_key(backend: Backend) -> Key:
    """Where a backend listens: its state survives a re-registration with new tags."""
    return (backend.address, backend.port)


class Strategy(Enum):
    P2C = "p2c"
    ROUND_ROBIN = "round_robin"


def _positive(instance: object, attribute: object, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{getattr(attribute, 'name', attribute)} must be > 0, got {value!r}")


@frozen
class EjectionPolicy:
    """Ejection periods: ``base * factor**n`` for the n-th ejection in a row, at most ``maximum``."""

    base: float = field(default=1.0, validator=_positive)
    maximum: float = field(default=30.0, validator=_positive)
    factor: float = field(default=2.0, validator=_positive)

    def period(self, previous_ejections: int) -> float:
        delay = self.base
        for _ in range(previous_ejections):
            if delay >= self.maximum:
                break
            delay *= self.factor
        return min(delay, self.maximum)


@define
class _State:
    in_flight: int = 0
    ejections: int = 0  # ejections since the last success that ended an episode
    ejected_at: float = 0.0
    ejected_until: float = 0.0
    ejected_seq: int = -1  # attempts numbered at or below this began before the last ejection


@frozen
class Ticket:
    """One attempt on one backend, from ``Balancer.begin`` to ``Balancer.end``.

    ``probe`` is True for an attempt begun while the backend was ejected or probing (a
    probe, or an attempt sent there because no backend was usable).
    """

    key: Key
    seq: int
    probe: bool


@frozen
class BackendLoad:
    """This client's view of one backend, for listings."""

    in_flight: int
    ejected_for: float  # seconds left of its ejection, 0 if not ejected
    ejections: int


class Balancer:
    """Picks backends, counts attempts in flight, ejects outliers (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        rng: random.Random,
        *,
        strategy: Strategy | str = Strategy.P2C,
        ejection: EjectionPolicy | None = None,
    ) -> None:
        self.strategy = Strategy(strategy)
        self.ejection = ejection if ejection is not None else EjectionPolicy()
        self._clock = clock
        self._rng = rng
        self._states: dict[Key, _State] = {}
        self._seq = 0
        self._turn = 0

    def _state(self, key: Key) -> _State:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _State()
        return state

    def load(self, backend: Backend) -> BackendLoad:
        state = self._states.get(backend_key(backend), _State())
        left = max(0.0, state.ejected_until - now(self._clock))
        return BackendLoad(state.in_flight, left, state.ejections)

    def is_ejected(self, backend: Backend) -> bool:
        state = self._states.get(backend_key(backend))
        return state is not None and now(self._clock) < state.ejected_until

    def _usable(self, state: _State, at: float) -> bool:
        """Not ejected; and while probing, only when nothing is in flight to it (one probe)."""
        if not state.ejections:
            return True
        return at >= state.ejected_until and state.in_flight == 0

    def pick(self, backends: Sequence[Backend], exclude: Collection[Key] = ()) -> Backend:
        """The backend for the next attempt, preferring ones not in ``exclude`` (already tried)."""
        if not backends:
            raise ValueError("no backends to pick from")
        at = now(self._clock)
        fresh = [b for b in backends if backend_key(b) not in exclude] or list(backends)
        for group in (fresh, backends):
            usable = [b for b in group if self._usable(self._state(backend_key(b)), at)]
            if usable:
                return self._choose(usable)
        # Nothing usable (every backend ejected or busy with its probe): never refuse a
        # call, use the least recently ejected backend.
        return min(fresh, key=lambda b: (self._state(backend_key(b)).ejected_at, b.sort_key()))

    def _choose(self, usable: Sequence[Backend]) -> Backend:
        if len(usable) == 1:
            return usable[0]
        if self.strategy is Strategy.ROUND_ROBIN:
            ordered = sorted(usable, key=Backend.sort_key)
            self._turn += 1
            return ordered[(self._turn - 1) % len(ordered)]
        first, second = self._rng.sample(range(len(usable)), 2)
        a, b = usable[first], usable[second]
        load_a = self._state(backend_key(a)).in_flight
        load_b = self._state(backend_key(b)).in_flight
        return b if load_b < load_a else a

    def begin(self, backend: Backend) -> Ticket:
        """An attempt is sent to ``backend``: count it in flight."""
        key = backend_key(backend)
        state = self._state(key)
        self._seq += 1
        state.in_flight += 1
        return Ticket(key, self._seq, probe=bool(state.ejections))

    def end(self, ticket: Ticket, healthy: bool | None) -> None:
        """The attempt finished: ``healthy`` True (any answer but 5xx), False (eject), None (no verdict)."""
        state = self._state(ticket.key)
        state.in_flight -= 1
        if healthy is None or ticket.seq <= state.ejected_seq:
            return  # begun before the last ejection: says nothing about the backend now
        at = now(self._clock)
        if healthy:
            state.ejections = 0
            state.ejected_until = 0.0
            return
        if at < state.ejected_until:
            return
        state.ejected_until = at + self.ejection.period(state.ejections)
        state.ejections += 1
        state.ejected_at = at
        state.ejected_seq = self._seq
