"""A stop that always ends: one deadline for the whole ordered stop, and a last resort.

SIGTERM (or SIGINT) starts the ordered stop (``service.tap.makeService``): readiness
fails, the server leaves Consul, waits ``--drain_delay`` for clients to notice,
closes the port and waits for requests in flight, then unloads the models. Any of
those steps can hang on something outside our control — a model call that never
returns, a client that never reads. ``StopDeadline`` is the one clock they share:
it starts when the stop starts and ends ``drain_delay + drain_timeout`` later.

* Each step of ``OrderedServices`` is awaited only until the deadline.
* ``HTTPPort`` cuts what is still queued at ``cut_at`` (a little before the deadline)
  with 503 + Retry-After, so those clients get an answer rather than a dropped
  connection, and logs how many it cut.
* A daemon watchdog thread ends the process at the deadline if the interpreter is
  still alive then — an inference thread stuck inside TensorFlow cannot be stopped
  any other way, and Python waits for such threads at exit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

CUT_MARGIN = 1.0
"""Seconds before the deadline at which queued requests are answered 503: time to write
the answers and unload what can be unloaded before the watchdog ends the process."""

EXIT_STUCK = 70  # EX_SOFTWARE: the stop could not finish in time (an inference thread is stuck)


class StopDeadline:
    """When the stop must be over; ``begin()`` starts the clock (once)."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        drain_delay: float,
        drain_timeout: float,
        exit: Callable[[int], object] | None = None,
        watchdog: bool = True,
    ) -> None:
        self._clock = clock
        self.drain_delay = drain_delay
        self.drain_timeout = drain_timeout
        self._exit = exit or hard_exit
        self._watchdog = watchdog
        self.started_at: float | None = None

    @property
    def budget(self) -> float:
        return self.drain_delay + self.drain_timeout

    def begin(self) -> None:
        if self.started_at is not None:
            return
        self.started_at = self._clock.seconds()
        log.info(
            "stopping: at most {budget:g} s (--drain_delay {delay:g} + --drain_timeout {timeout:g})",
            budget=self.budget,
            delay=self.drain_delay,
            timeout=self.drain_timeout,
        )
        if self._watchdog:
            threading.Thread(
                target=self._watch,
                args=(time.monotonic() + self.budget,),
                daemon=True,
                name="stop-watchdog",
            ).start()

    def remaining(self, margin: float = 0.0) -> float:
        """Seconds left until ``margin`` before the deadline (the full budget before ``begin``)."""
        if self.started_at is None:
            return self.budget - margin
        return max(0.0, self.started_at + self.budget - margin - self._clock.seconds())

    def drain_delay_left(self) -> float:
        """Seconds of --drain_delay still to wait (all of it before ``begin``)."""
        if self.started_at is None:
            return self.drain_delay
        return max(0.0, self.started_at + self.drain_delay - self._clock.seconds())

    def _watch(self, deadline: float) -> None:
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))
        log.critical(
            "the stop did not finish within {budget:g} s (an inference thread is stuck?); exiting",
            budget=self.budget,
        )
        self._exit(EXIT_STUCK)


def hard_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class BeginStop(Service):
    """The first child to stop (add it last): starts the deadline and fails readiness."""

    def __init__(self, deadline: StopDeadline, on_begin: Callable[[], object]) -> None:
        self._deadline = deadline
        self._on_begin = on_begin

    def stopService(self) -> None:
        super().stopService()
        self._deadline.begin()
        self._on_begin()


def stop_signals_once(reactor: Any) -> None:
    """Make a second SIGTERM or SIGINT during a stop a logged no-op.

    Twisted's own handlers call ``reactor.stop()`` on every signal, and a second one while
    the reactor is already stopping logs a ReactorNotRunning traceback (supervisors and
    impatient people send two). The stop deadline, not a second signal, bounds the stop;
    SIGKILL remains the way to end it at once. Installed once the reactor runs, over
    Twisted's handlers, which it then calls for the first signal.
    """
    stopping = False

    def began() -> None:
        nonlocal stopping
        stopping = True

    def handle(number: int, frame: Any) -> None:
        if stopping:
            reactor.callFromThread(
                log.info, "signal {number} while stopping: already stopping", number=number
            )
            return
        began()
        (reactor.sigTerm if number == signal.SIGTERM else reactor.sigInt)(number, frame)

    def install() -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, handle)

    reactor.addSystemEventTrigger("before", "shutdown", began)
    reactor.callWhenRunning(install)
