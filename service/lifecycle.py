"""Start and stop in order: the pieces of the service tree that Twisted's own classes leave out.

* ``OrderedServices`` stops its children one after another, last started first, each
  waiting for the one before (``MultiService`` stops them all at once). That is how
  "deregister, then drain the port, then stop the inference threads" happens in order.
* ``HTTPPort`` listens on an endpoint and, on stop, stops accepting and then waits
  (bounded) for the requests in flight to be answered.
* ``AfterReady`` starts a child service only once a readiness Deferred has fired: the
  Consul registration waits for the models to load and the port to listen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.application.service import IService, MultiService, Service
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from service.shutdown import CUT_MARGIN, StopDeadline, hard_exit

log = Logger()


class OrderedServices(MultiService):
    """A MultiService whose children stop sequentially, in reverse start order.

    With a ``deadline``, each child is waited for only until the stop's deadline: one that
    hangs is logged and left behind, and the ones after it still stop.
    """

    def __init__(self, deadline: StopDeadline | None = None, *, clock: Any = None) -> None:
        super().__init__()
        self._deadline = deadline
        self._clock = clock

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for child in reversed(list(self)):
            try:
                stopped = _as_deferred(child.stopService())
                if self._deadline is None or self._clock is None:
                    await stopped
                elif not await within(self._clock, self._deadline.remaining(), stopped):
                    log.warn("{child} did not stop before the stop deadline; going on", child=child)
            except Exception:  # one child failing to stop must not keep the rest running
                log.failure("stopping {child} failed", child=child)


async def within(clock: Any, seconds: float, d: Deferred) -> bool:
    """Wait for ``d`` at most ``seconds``: True if it fired in time (its failure is raised),
    False if not. ``d`` is not cancelled: what it waits for goes on, we only stop waiting."""
    waiter: Deferred = Deferred()

    def timed_out() -> None:
        if not waiter.called:
            waiter.callback(False)

    timer = clock.callLater(max(0.0, seconds), timed_out)

    def fired(result: object) -> None:
        if timer.active():
            timer.cancel()
        if waiter.called:
            if isinstance(result, Failure):
                log.failure("failed after the stop stopped waiting for it", result)
        elif isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(True)

    d.addBoth(fired)
    return bool(await waiter)


def _as_deferred(result: object) -> Deferred:
    if isinstance(result, Deferred):
        return result
    d: Deferred = Deferred()
    d.callback(result)
    return d


class InFlight:
    """Counts requests between arrival and response; ``idle()`` fires when none are left."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: list[Deferred] = []

    def started(self) -> None:
        self.count += 1

    def finished(self, _: object = None) -> None:
        self.count -= 1
        if self.count == 0:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def idle(self) -> Deferred:
        d: Deferred = Deferred()
        if self.count == 0:
            d.callback(None)
        else:
            self._idle.append(d)
        return d


class DrainableSite(Protocol):
    """What ``HTTPPort`` needs of its site to drain it (``service.http.InferenceSite``)."""

    def stop_keeping_alive(self) -> None: ...

    def all_closed(self) -> Deferred: ...


class HTTPPort(Service):
    """Listen on an endpoint; on stop, close the port and drain the requests in flight.

    Draining: idle keep-alive connections close at once and answers in flight carry
    ``Connection: close``; requests in flight are waited for until shortly before the
    stop deadline (``service.shutdown``), then what is still queued is answered 503 with
    Retry-After (``cut_queued``) and the count is logged.

    A port that cannot be had (in use, no permission) ends the process with a non-zero
    status once the reactor runs: a server that cannot be reached has nothing else to do.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        site: DrainableSite,
        in_flight: InFlight,
        *,
        reactor: Any,
        deadline: StopDeadline | None = None,
        cut_queued: Callable[[], int] = lambda: 0,
        exit: Callable[[int], object] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._site = site
        self._in_flight = in_flight
        self._reactor = reactor
        self._deadline = deadline or StopDeadline(
            reactor, drain_delay=0.0, drain_timeout=30.0, watchdog=False
        )
        self._cut_queued = cut_queued
        self._exit = exit or (lambda code: exit_after_stop(code, reactor))
        self._port: IListeningPort | None = None
        self.listening: Deferred = Deferred()  # fires with the IListeningPort

    def startService(self) -> None:
        super().startService()
        self._endpoint.listen(cast(IProtocolFactory, self._site)).addCallbacks(
            self._listened, self._cannot_listen
        )

    def _listened(self, port: IListeningPort) -> None:
        self._port = port
        log.info("listening on {address}", address=port.getHost())
        self.listening.callback(port)

    def _cannot_listen(self, failure: Failure) -> None:
        log.critical("cannot listen: {error}; exiting", error=failure.getErrorMessage())
        self._exit(EXIT_CANNOT_LISTEN)

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._deadline.begin()  # no-op when the stop already began it
        # Keep serving for --drain_delay after the stop began (the Consul registration waits
        # it too, after leaving): load balancers and clients notice /readyz first.
        await task.deferLater(self._reactor, self._deadline.drain_delay_left(), lambda: None)
        if self._port is not None:
            # Accept what already waits in the listen backlog: closing the socket would reset
            # connections whose clients have sent their requests.
            accept_waiting = getattr(self._port, "doRead", None)
            if accept_waiting is not None and getattr(self._port, "connected", False):
                accept_waiting()
            await _as_deferred(self._port.stopListening())
        self._site.stop_keeping_alive()
        # Every connection closes after its answer (idle ones after a short grace): once all
        # are closed, every request that reached this server has been answered.
        if await within(
            self._reactor, self._deadline.remaining(CUT_MARGIN), self._site.all_closed()
        ):
            return
        unanswered = self._in_flight.count
        cut = self._cut_queued()
        log.warn(
            "{n} requests unanswered at the drain deadline: {cut} still queued were answered "
            "503 (retry elsewhere), {running} still running are cut when the process exits",
            n=unanswered,
            cut=cut,
            running=max(0, unanswered - cut),
        )
        await within(self._reactor, self._deadline.remaining(), self._in_flight.idle())


EXIT_CANNOT_LISTEN = 75  # EX_TEMPFAIL: the port may be free again later (a supervisor retries)


def exit_after_stop(code: int, reactor: Any) -> None:
    """Stop the reactor (now, or as soon as it runs) and end the process with ``code``.

    twistd has no way to set its exit status, so the process ends right after the
    reactor's own shutdown has run.
    """

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    reactor.addSystemEventTrigger("after", "shutdown", hard_exit, code)
    reactor.callWhenRunning(stop)


class AfterReady(Service):
    """Once ``ready()`` fires, build a child from its result and start it; stop it on stop."""

    def __init__(
        self, make_child: Callable[[Any], IService], ready: Callable[[], Deferred]
    ) -> None:
        self._make_child = make_child
        self._ready = ready
        self._waiting: Deferred | None = None
        self._child: IService | None = None

    def startService(self) -> None:
        super().startService()
        self._waiting = self._ready()
        self._waiting.addCallback(self._start_child)
        self._waiting.addErrback(
            lambda f: None if f.check(CancelledError) else log.failure("not started", f)
        )

    def _start_child(self, result: object) -> None:
        self._child = self._make_child(result)
        self._child.startService()

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self._waiting is not None and not self._waiting.called:
            self._waiting.cancel()
        child, self._child = self._child, None
        return child.stopService() if child is not None else None
