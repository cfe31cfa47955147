"""Retry pacing: capped, jittered exponential backoff (a pure policy; no clock, no I/O).

Consul registration and health watches retry against an agent that may be gone for a
while, the client retries a failed request on another server, and the model repository
retries a version that failed to load. Without jitter every server of a fleet retries in
lockstep after an outage; without a cap a long outage leaves a server waiting minutes
after the other side is back. The caller draws the jitter from its own ``random.Random``
and sleeps on its own clock (``discovery.backoff.sleep``, or ``callLater``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Delays ``initial * factor**attempt``, capped at ``maximum``, less up to ``jitter`` of it.

    The jitter is subtracted rather than added so the cap stays a true upper bound:
    ``(1 - jitter) * ceiling <= delay(n) <= ceiling <= maximum``.
    """

    initial: float = 1.0
    maximum: float = 15.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        for name in ("initial", "maximum", "factor"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter!r}")

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
