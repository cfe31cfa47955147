"""The threads versions' hooks run on (``service.model_hooks``): never the reactor thread nor an
inference thread.

``HookPool`` bounds the calls waiting (503 past ``threads * WAITING_PER_THREAD``), answers a call
past its request's deadline with 504 at the deadline, and skips a call whose client left
before it started. Python cannot stop a running thread: the thread of a hook past its deadline
is taken until the hook returns, so the pool recovers when it does, and a hook that never
returns holds its thread for good (its daemon thread holds neither the stop nor the exit).
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from service.errors import DeadlineExceeded, ResourceExhausted, ServingError

__all__ = ["WAITING_PER_THREAD", "HookPool", "HookThreads"]

log = Logger(namespace="service.model_hooks")

# Hook calls waiting for a thread, per thread of the pool, before a request gets 503.
WAITING_PER_THREAD = 64


class HookPool(Service):
    """The threads hooks run on: ``threads`` of them, at most ``threads * WAITING_PER_THREAD``
    calls waiting, each call bounded by its request's deadline and dropped when its client
    leaves (see the module's docstring for what that means for the thread)."""

    def __init__(
        self,
        *,
        reactor: Any,
        threads: int,
        max_waiting: int | None = None,
        submit: Callable[[Callable[[], Any]], Deferred] | None = None,
    ) -> None:
        self._reactor = reactor
        self._workers = HookThreads(reactor, threads)
        self._max = max_waiting if max_waiting is not None else threads * WAITING_PER_THREAD
        # Runs a call on a hook thread, its result a Deferred fired on the reactor (tests
        # inject their own, to run calls when they choose).
        self._submit = submit or self._workers.submit
        self.size = threads
        self.pending = 0  # calls waiting for a thread or running

    def stopService(self) -> None:
        super().stopService()
        self._workers.stop()

    def call(
        self,
        what: str,
        f: Callable[..., Any],
        *args: Any,
        deadline: float | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Deferred:
        """``f(*args)`` on a hook thread; ``what`` names it in errors ("hook preprocess of …").

        503 when too many calls wait; 504 at ``deadline`` (clock seconds) if it has not
        returned by then; a call not yet started when its deadline passed or ``cancelled()``
        turned true is skipped. Cancelling the Deferred abandons the call.
        """
        if self.pending >= self._max:
            raise ResourceExhausted(
                f"{what}: {self.pending} hook calls are waiting for the {self.size} hook "
                "threads (--hook_threads); retry later",
                retry_after=1,
            )
        abandoned = False

        def abandon(result: Deferred) -> None:
            nonlocal abandoned
            abandoned = True

        def run() -> Any:
            if abandoned or cancelled():
                raise _Skipped()
            return f(*args)

        out: Deferred = Deferred(abandon)
        self.pending += 1
        running = self._submit(run)
        timer = None
        if deadline is not None:

            def expire() -> None:
                nonlocal abandoned
                abandoned = True
                out.errback(DeadlineExceeded(f"{what} did not return before the deadline"))

            timer = self._reactor.callLater(max(0.0, deadline - self._reactor.seconds()), expire)

        def finished(result: Any) -> None:
            self.pending -= 1
            if timer is not None and timer.active():
                timer.cancel()
            if not out.called:
                out.callback(result) if not isinstance(result, Failure) else out.errback(result)
            elif isinstance(result, Failure) and not result.check(_Skipped, ServingError):
                log.failure("{what} failed after its request was answered", result, what=what)

        running.addBoth(finished)
        return out


class HookThreads:
    """The hook threads: one queue of calls, ``size`` threads taking them, results handed
    back to the reactor in bunches.

    A thread that finishes a call puts its result on a list and wakes the reactor only if no
    wake-up is pending, so under load one reactor turn fires many calls' Deferreds. Threads
    start with the first call. They are daemon threads and ``stop`` does not join them
    (Twisted's ThreadPool does, on the reactor thread): a hook that never returns can hold
    neither the server's stop nor the process's exit.
    """

    def __init__(self, reactor: Any, size: int) -> None:
        self._reactor = reactor
        self._size = size
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Deferred] | None] = (
            queue.SimpleQueue()
        )
        self._done: collections.deque[tuple[Deferred, bool, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._threads: list[threading.Thread] = []

    def submit(self, f: Callable[[], Any]) -> Deferred:
        """``f()`` on a hook thread; a Deferred fired on the reactor with what it returned."""
        if len(self._threads) < self._size:
            thread = threading.Thread(
                target=self._work, name=f"model-hooks-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        d: Deferred = Deferred()
        self._calls.put((f, d))
        return d

    def stop(self) -> None:
        """Each thread ends after the calls queued before this (none wait for them)."""
        for _ in self._threads:
            self._calls.put(None)
        self._threads = []

    def _work(self) -> None:
        while (item := self._calls.get()) is not None:
            f, d = item
            try:
                self._done.append((d, True, f()))
            except BaseException:
                self._done.append((d, False, Failure()))
            with self._lock:
                if self._wake_pending:
                    continue
                self._wake_pending = True
            self._reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            self._wake_pending = False  # before draining: a result added later wakes again
        while self._done:
            d, ok, result = self._done.popleft()
            if ok:
                d.callback(result)
            else:
                d.errback(result)


class _Skipped(Exception):
    """A hook call dropped unrun: its request was answered (deadline) or its client left."""
