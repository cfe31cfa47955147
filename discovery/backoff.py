"""Sleeping and reading the time on an injected clock, for retries paced by ``wire.backoff``.

Time only ever comes from the clock passed in, so tests drive it with ``task.Clock``.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

__all__ = ["now", "sleep"]


def sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    """A Deferred that fires after ``seconds`` on ``clock``; cancelling it stops the timer."""
    return task.deferLater(clock, max(0.0, seconds), lambda: None)


def now(clock: IReactorTime) -> float:
    """``clock.seconds()`` (spelled so because zope interfaces confuse mypy about ``self``)."""
    return cast(Any, clock).seconds()
