"""A retry budget: retries may add at most a fraction to the load, however bad things get.

Per-request retry limits alone multiply load exactly when servers are failing from too
much of it: with 3 attempts a struggling fleet sees up to 3x the requests. A token
bucket bounds the total instead, as Finagle's ``RetryBudget`` and gRPC's retry throttling
do: each request deposits ``ratio`` tokens (0.2: retries add at most 20%), each retry
withdraws one, and the bucket holds at most ``cap``. ``min_per_second`` tokens trickle in
with time (Finagle's ``minRetriesPerSec``) so that a client sending few requests can still
retry the odd failure. Under total failure retries are therefore at most
``initial + ratio * requests + min_per_second * elapsed``.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from discovery.backoff import now

__all__ = ["RetryBudget"]


class RetryBudget:
    """The token bucket; time comes from ``clock``."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        ratio: float = 0.2,
        cap: float = 50.0,
        min_per_second: float = 10.0,
        initial: float | None = None,
    ) -> None:
        if ratio < 0 or cap < 1 or min_per_second < 0:
            raise ValueError("a retry budget needs ratio >= 0, cap >= 1 and min_per_second >= 0")
        self.ratio = ratio
        self.cap = cap
        self.min_per_second = min_per_second
        self._clock = clock
        self._tokens = cap if initial is None else min(cap, initial)
        self._last = now(clock)

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        at = now(self._clock)
        elapsed, self._last = max(0.0, at - self._last), at
        self._tokens = min(self.cap, self._tokens + elapsed * self.min_per_second)

    def deposit(self) -> None:
        """A request was made (once per call, not per attempt)."""
        self._refill()
        self._tokens = min(self.cap, self._tokens + self.ratio)

    def withdraw(self) -> bool:
        """Take a token for one retry; False (and nothing taken) when the budget is spent."""
        self._refill()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
