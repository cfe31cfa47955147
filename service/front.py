"""A front process of ``--http_processes``: ``python -m service.front SETTINGS``.

Started (and restarted) by the main process (``service.front_main.FrontProcesses``) with
file descriptor 3 the listening socket it opened, and 4 its end of a unix socket pair (the
channel, ``service.front_remote.MainChannel``). It runs the HTTP front doors
(``service.http``, ``service.v2``) over the same ``InferenceSite`` as a single process, up
to and including decoding bodies into tensors, with a ``RemotePlane`` whose work the main
process does. It never imports TensorFlow.

It ignores SIGTERM and SIGINT (a terminal's Ctrl-C reaches the whole process group): the
main process tells it when to stop (``{"op": "stop"}``): stop accepting, let connections
close after their answers, exit. It exits at once when the channel closes (the main process
is gone). Its log lines go to its standard output, which the main process copies into its
own log; access-log entries and request metrics go over the channel to the main process, as
notices (many to a frame).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, cast

import orjson
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, Logger, eventAsText, globalLogBeginner

from service.access_log import AccessLog
from service.auth import BearerTokens, HTTPAuth
from service.budget import RequestBudget
from service.decoding import BodyDecoder
from service.front_remote import Forwarder, MainChannel, RemotePlane
from service.health import Health
from service.http import InferenceAPI, InferenceSite
from service.lifecycle import within
from service.metrics import Metrics
from service.shm_ring import attach_segment, halves

log = Logger()

LISTEN_FD = 3
CHANNEL_FD = 4
REPORT_INTERVAL = 1.0  # seconds between reports of the HTTP counters to the main process


class ForwardedAccessLog(AccessLog):
    """The access log of a front process: each entry goes to the main process's log."""

    def __init__(self, format: str, send: Any) -> None:
        super().__init__(format)
        self._send = send

    def write(self, fields: dict[str, Any]) -> None:
        if self.enabled:
            self._send("log", fields)


class ForwardedModelRequests:
    """The request metrics of a front process's inference requests
    (``service.request_metrics``): each observation goes to the main process, which holds the
    configured models and loaded versions that label values are checked against."""

    def __init__(self, send: Any) -> None:
        self._send = send

    def observe(self, *args: Any) -> None:
        self._send("observe", list(args))


class Front:
    """The front process's parts: channel, remote plane, site, adopted port, reports."""

    def __init__(self, reactor: Any, settings: dict[str, Any]) -> None:
        self.reactor = reactor
        self.settings = settings
        self.stopping = False
        self.channel = MainChannel(
            self.stop,
            self._main_gone,
            self._reload,
            clock=reactor,
            on_routes=lambda: self.plane.forget_targets(),
        )
        segment = settings.get("segment")
        self.segment = attach_segment(segment) if segment else None
        # Our inputs go in the first half; the main process's outputs come in the second.
        self.ring = halves(self.segment.buf)[0] if self.segment and self.segment.buf else None
        self.plane = RemotePlane(self.channel, self.ring, reactor)
        self.metrics = Metrics()
        self.metrics.model_requests = ForwardedModelRequests(self.channel.notify)  # type: ignore[assignment]
        token_file = settings.get("auth_token_file")
        self.tokens = BearerTokens.load(Path(token_file)) if token_file else None
        self.decoder = BodyDecoder(reactor=reactor)
        api = InferenceAPI(
            None,  # type: ignore[arg-type]  # the repository is the main process's
            metrics=self.metrics,
            health=Health(None, stall_seconds=60.0),  # type: ignore[arg-type]  # forwarded
            decoder=self.decoder,
            plane=self.plane,
            prometheus_path=settings.get("prometheus_path"),
            forward=Forwarder(reactor, settings["forward_socket"]),
        )
        self.site = InferenceSite(
            api,
            max_body_bytes=settings["max_request_bytes"],
            budget=RequestBudget(settings["max_inflight_request_bytes"]),
            request_header_timeout=settings["request_header_timeout"],
            request_read_timeout=settings["request_read_timeout"],
            max_connections=settings["max_connections"],
            access_log=ForwardedAccessLog(settings["access_log"], self.channel.notify),
            auth=None
            if self.tokens is None
            else HTTPAuth(
                self.tokens,
                prometheus_path=settings.get("prometheus_path"),
                protect_metrics=settings.get("auth_metrics", False),
            ),
            reactor=reactor,
        )
        self.port: Any = None
        self._reports = task.LoopingCall(self.report)
        self._reports.clock = reactor

    def start(self) -> None:
        factory = Factory()
        factory.buildProtocol = lambda addr: self.channel  # type: ignore[method-assign]
        self.reactor.adoptStreamConnection(CHANNEL_FD, socket.AF_UNIX, factory)
        os.close(CHANNEL_FD)
        self.decoder.startService()
        family = socket.AF_INET6 if self.settings.get("ipv6") else socket.AF_INET
        self.port = self.reactor.adoptStreamPort(LISTEN_FD, family, self.site)
        self.site.noisy = False
        os.close(LISTEN_FD)
        self._reports.start(REPORT_INTERVAL, now=False).addErrback(
            lambda f: log.failure("reporting stopped", f)
        )
        log.info("front process {pid} serving", pid=os.getpid())

    def report(self) -> None:
        """The HTTP counters (requests, connections refused past --max_connections) as totals
        since this process started (the main process adds the differences to its own), and
        the gauges now (requests in flight, body bytes held, connections open)."""
        try:
            totals = [
                [s.labels["route"], s.labels["code"], s.value]
                for metric in self.metrics.requests.collect()
                for s in metric.samples
                if s.name.endswith("_total")
            ]
            refused = [
                [s.labels["how"], s.value]
                for metric in self.metrics.refused_connections.collect()
                for s in metric.samples
                if s.name.endswith("_total")
            ]
            self.channel.notify(
                "counts",
                {
                    "requests": totals,
                    "refused": refused,
                    "in_flight": self.site.in_flight.count,
                    "body_bytes": self.site.budget.held,
                    "connections": self.site.open_connections,
                },
            )
        except Exception:  # a report failing must not stop the next one
            log.failure("reporting the HTTP counters failed")

    def _reload(self) -> None:
        if self.tokens is not None:
            self.tokens.reload()  # a bad file keeps the tokens held, and says so

    def stop(self, seconds: float) -> None:
        if not self.stopping:
            self.stopping = True
            Deferred.fromCoroutine(self._stop(seconds)).addErrback(
                lambda f: log.failure("stopping failed", f)
            )

    async def _stop(self, seconds: float) -> None:
        """Stop accepting (taking what waits in the backlog first), close connections after
        their answers, and exit once all are closed or ``seconds`` have passed."""
        port = self.port
        if port is not None:
            if getattr(port, "connected", False):
                port.doRead()
            await port.stopListening()
        self.site.stop_keeping_alive()
        await within(self.reactor, seconds, self.site.all_closed())
        if self._reports.running:
            self._reports.stop()
        self.report()
        self.channel.flush()  # the last notices, before the channel closes
        if self.channel.transport is not None:
            self.channel.transport.loseConnection()  # after what was written: then we exit
        else:
            self._main_gone()

    def _main_gone(self) -> None:
        if self.reactor.running:
            self.reactor.stop()


def _log_to_stdout(event: dict[str, Any]) -> None:
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    if text:
        level = event.get("log_level")
        sys.stdout.write(f"{getattr(level, 'name', 'info')} {text}\n")
        sys.stdout.flush()


def main(argv: list[str]) -> None:
    settings = orjson.loads(argv[1])
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)  # the main process says when to stop
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, _log_to_stdout)], redirectStandardIO=False)
    from twisted.internet import reactor

    front = Front(reactor, settings)
    reactor.callWhenRunning(front.start)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    sys.stdout.flush()
    os._exit(0)  # the body decoder's thread is not waited for


if __name__ == "__main__":
    main(sys.argv)
