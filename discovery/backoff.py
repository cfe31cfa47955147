"""Retry pacing on an injected clock: capped, jittered exponential backoff and sleeping.

Registration and health watches both retry against an agent that may be gone for a
while. Without jitter every server of a fleet retries in lockstep after an agent
restart; without a cap a long outage leaves a server waiting minutes after Consul is
back. Time only ever comes from the clock passed in, so tests drive it with
``task.Clock``.
"""

from __future__ import annotations

import random
from typing import Any, cast

from attrs import field, frozen
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

__all__ = ["Backoff", "now", "sleep"]


def _positive(instance: object, attribute: object, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{getattr(attribute, 'name', attribute)} must be > 0, got {value!r}")


def _fraction(instance: object, attribute: object, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"jitter must be within [0, 1], got {value!r}")


@frozen
class Backoff:
    """Delays ``initial * factor**attempt``, capped at ``maximum``, less up to ``jitter`` of it.

    The jitter is subtracted rather than added so the cap stays a true upper bound:
    ``(1 - jitter) * ceiling <= delay(n) <= ceiling <= maximum``.
    """

    initial: float = field(default=1.0, validator=_positive)
    maximum: float = field(default=15.0, validator=_positive)
    factor: float = field(default=2.0, validator=_positive)
    jitter: float = field(default=0.5, validator=_fraction)

    def ceiling(self, attempt: int) -> float:
        """The delay before jitter for the ``attempt``-th retry (0-based)."""
        delay = self.initial
        for _ in range(max(0, attempt)):
            if delay >= self.maximum:
                break
            delay *= self.factor
        return min(delay, self.maximum)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """A jittered delay for the ``attempt``-th retry, drawing from ``rng``."""
        return self.ceiling(attempt) * (1.0 - self.jitter * rng.random())


def sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    """A Deferred that fires after ``seconds`` on ``clock``; cancelling it stops the timer."""
    return task.deferLater(clock, max(0.0, seconds), lambda: None)


def now(clock: IReactorTime) -> float:
    """``clock.seconds()`` (spelled so because zope interfaces confuse mypy about ``self``)."""
    return cast(Any, clock).seconds()
