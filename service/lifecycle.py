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
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

log = Logger()


class OrderedServices(MultiService):
    """A MultiService whose children stop sequentially, in reverse start order."""

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for child in reversed(list(self)):
            try:
                await _as_deferred(child.stopService())
            except Exception:  # one child failing to stop must not keep the rest running
                log.failure("stopping {child} failed", child=child)


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


class HTTPPort(Service):
    """Listen on an endpoint; on stop, close the port and wait for in-flight requests.

    A port that cannot be had (in use, no permission) stops the reactor: a server
    that cannot be reached has nothing else to do.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        site: Site,
        in_flight: InFlight,
        *,
        reactor: Any,
        drain_timeout: float = 30.0,
    ) -> None:
        self._endpoint = endpoint
        self._site = site
        self._in_flight = in_flight
        self._reactor = reactor
        self._drain_timeout = drain_timeout
        self._port: IListeningPort | None = None
        self.listening: Deferred = Deferred()  # fires with the IListeningPort

    def startService(self) -> None:
        super().startService()
        self._endpoint.listen(self._site).addCallbacks(self._listened, self._cannot_listen)

    def _listened(self, port: IListeningPort) -> None:
        self._port = port
        log.info("listening on {address}", address=port.getHost())
        self.listening.callback(port)

    def _cannot_listen(self, failure: Failure) -> None:
        log.failure("cannot listen; stopping", failure)
        self._reactor.stop()

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._port is not None:
            await _as_deferred(self._port.stopListening())
        if self._in_flight.count:
            log.info("waiting for {n} requests in flight", n=self._in_flight.count)
            idle = self._in_flight.idle()
            timeout = self._reactor.callLater(self._drain_timeout, idle.cancel)
            try:
                await idle
            except CancelledError:
                log.warn(
                    "{n} requests still unanswered after {s} s; stopping anyway",
                    n=self._in_flight.count,
                    s=self._drain_timeout,
                )
            if timeout.active():
                timeout.cancel()


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
