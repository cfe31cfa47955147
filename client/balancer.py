"""Which backend gets the next attempt: power of two choices (or round-robin), with ejection.

Power of two choices (Mitzenmacher; Finagle's ``P2CLeastLoaded``, Envoy's least-request):
draw two distinct eligible backends at random and take the one with the lower cost. It
needs no shared state between clients and stays almost as even as round-robin when the
servers are alike. Two costs (``Strategy``):

* ``p2c``: requests in flight *from this client*. A slow or stalled server holds its
  requests longer, so it is chosen less -- but only once requests pile up on it, so at low
  concurrency a slow server still gets its even share.
* ``peak_ewma`` (Finagle's and Linkerd's Peak-EWMA): the backend's answer time for this
  model, times (requests in flight + 1). The answer time is an exponentially weighted
  moving average over time (``PeakEwma.decay`` seconds), except that a sample above the
  average replaces it at once (the peak): a backend that turns slow is avoided from its
  first slow answer, and earns traffic back only gradually. While a backend gets no
  answers its average decays toward zero, so one avoided for being slow is tried again.
  A backend with no average yet costs nothing when idle and a penalty while it has an
  attempt in flight, so a new server gets one attempt, not a stampede, until it answers.
  Averages are kept per backend *and model* (one server's big model says nothing about
  its small one); requests in flight count per backend, whatever their model.

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

import math
import random
from collections.abc import Collection, Sequence
from enum import Enum

from attrs import define, field, frozen
from twisted.internet.interfaces import IReactorTime

from discovery.backends import Backend
from discovery.backoff import now

__all__ = [
    "Balancer",
    "BackendLoad",
    "EjectionPolicy",
    "PeakEwma",
    "Strategy",
    "Ticket",
    "backend_key",
]

Key = tuple[str, int]


def backend_key(backend: Backend) -> Key:
    """Where a backend listens: its state survives a re-registration with new tags."""
    return (backend.address, backend.port)


class Strategy(Enum):
    P2C = "p2c"
    PEAK_EWMA = "peak_ewma"
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


@frozen
class PeakEwma:
    """Peak-EWMA's settings: ``decay`` seconds is the average's time constant (Finagle's and
    Linkerd's default, 10 s); ``penalty`` seconds is the cost of a backend with no answer
    time yet while it has an attempt in flight."""

    decay: float = field(default=10.0, validator=_positive)
    penalty: float = field(default=1e6, validator=_positive)


@define
class _Latency:
    """One backend's answer time for one model: the average and when it last changed."""

    seconds: float = 0.0
    at: float = 0.0

    def now(self, at: float, decay: float) -> float:
        """The average decayed toward zero over the time since the last answer."""
        return self.seconds * math.exp(-max(0.0, at - self.at) / decay)

    def observe(self, seconds: float, at: float, decay: float) -> None:
        """An answer took ``seconds``: above the (decayed) average it becomes the average (the
        peak); below it, it is averaged in, weighted by the time since the last answer."""
        if seconds > self.now(at, decay):
            self.seconds = seconds
        else:
            weight = math.exp(-max(0.0, at - self.at) / decay)
            self.seconds = self.seconds * weight + seconds * (1.0 - weight)
        self.at = at


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
    model: str = ""
    started: float = 0.0


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
        peak_ewma: PeakEwma | None = None,
    ) -> None:
        self.strategy = Strategy(strategy)
        self.ejection = ejection if ejection is not None else EjectionPolicy()
        self.peak_ewma = peak_ewma if peak_ewma is not None else PeakEwma()
        self._clock = clock
        self._rng = rng
        self._states: dict[Key, _State] = {}
        self._latencies: dict[tuple[Key, str], _Latency] = {}
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

    def latency(self, backend: Backend, model: str = "") -> float:
        """Peak-EWMA's answer time of ``backend`` for ``model`` now, in seconds (0 if none yet)."""
        latency = self._latencies.get((backend_key(backend), model))
        return 0.0 if latency is None else latency.now(now(self._clock), self.peak_ewma.decay)

    def pick(
        self, backends: Sequence[Backend], exclude: Collection[Key] = (), model: str = ""
    ) -> Backend:
        """The backend for the next attempt at ``model``, preferring ones not in ``exclude``
        (already tried)."""
        if not backends:
            raise ValueError("no backends to pick from")
        at = now(self._clock)
        fresh = [b for b in backends if backend_key(b) not in exclude] or list(backends)
        for group in (fresh, backends):
            usable = [b for b in group if self._usable(self._state(backend_key(b)), at)]
            if usable:
                return self._choose(usable, model, at)
        # Nothing usable (every backend ejected or busy with its probe): never refuse a
        # call, use the least recently ejected backend.
        return min(fresh, key=lambda b: (self._state(backend_key(b)).ejected_at, b.sort_key()))

    def _choose(self, usable: Sequence[Backend], model: str, at: float) -> Backend:
        if len(usable) == 1:
            return usable[0]
        if self.strategy is Strategy.ROUND_ROBIN:
            ordered = sorted(usable, key=Backend.sort_key)
            self._turn += 1
            return ordered[(self._turn - 1) % len(ordered)]
        first, second = self._rng.sample(range(len(usable)), 2)
        a, b = usable[first], usable[second]
        return b if self._cost(b, model, at) < self._cost(a, model, at) else a

    def _cost(self, backend: Backend, model: str, at: float) -> float:
        key = backend_key(backend)
        in_flight = self._state(key).in_flight
        if self.strategy is not Strategy.PEAK_EWMA:
            return in_flight
        latency = self._latencies.get((key, model))
        seconds = 0.0 if latency is None else latency.now(at, self.peak_ewma.decay)
        if seconds == 0.0 and in_flight:
            return self.peak_ewma.penalty + in_flight
        return seconds * (in_flight + 1)

    def begin(self, backend: Backend, model: str = "") -> Ticket:
        """An attempt at ``model`` is sent to ``backend``: count it in flight."""
        key = backend_key(backend)
        state = self._state(key)
        self._seq += 1
        state.in_flight += 1
        return Ticket(
            key, self._seq, probe=bool(state.ejections), model=model, started=now(self._clock)
        )

    def end(self, ticket: Ticket, healthy: bool | None) -> None:
        """The attempt finished: ``healthy`` True (any answer but 5xx), False (eject), None (no verdict)."""
        state = self._state(ticket.key)
        state.in_flight -= 1
        if healthy is None:
            return
        at = now(self._clock)
        self._observe(ticket, healthy, at)
        if ticket.seq <= state.ejected_seq:
            return  # begun before the last ejection: says nothing about the backend now
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

    def _observe(self, ticket: Ticket, healthy: bool, at: float) -> None:
        """Peak-EWMA's sample: the attempt's time; a failure's never lowers the average (a
        refused connection is quick, and says nothing about how fast the server answers)."""
        latency = self._latencies.setdefault((ticket.key, ticket.model), _Latency(at=at))
        seconds = at - ticket.started
        if not healthy:
            seconds = max(seconds, latency.now(at, self.peak_ewma.decay))
        latency.observe(seconds, at, self.peak_ewma.decay)
