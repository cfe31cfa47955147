"""The main process's side of ``--http_processes=N`` (N > 1; docs/scaling.md).

``FrontProcesses`` (a Service, in place of ``HTTPPort``) opens the listening socket once,
never accepts on it itself, and starts N front processes (``service.front``) that adopt it;
each gets a shared-memory ring (``service.shm_ring``) and a unix socket pair to this process.
A front process that dies is started again after a backoff (a new ring; the old one is
unlinked at once). On stop it waits ``--drain_delay`` (the front processes keep serving),
tells each front process to stop accepting and drain, waits for them until shortly before the
stop deadline, answers what is still queued 503, waits again until the deadline, kills what
is left, and closes the socket. Rings are unlinked when their process ends and at stop.

``FrontConnection`` serves one front process over its socket: leases (held here until the
front process releases them or dies), predicts (inputs read in place from the ring and
submitted to the version's batching queue with the request's deadline, so every front
process's requests share batches; outputs written into the ring's second half, whose
regions the front process gives back once it has copied them out), and the notices a frame
carries: cancels, releases, access-log entries, request metrics and HTTP counter reports
(``FrontStats``). A predict sent without a lease names its target and the version and epoch
the front process checked it against: the target is leased here for that predict alone, or,
if it resolves to another version or load of it now, answered "stale" (the front process
then leases it and sends the predict again). ``FrontProcesses`` tells every front process
``routes`` when what a target resolves to may have changed
(``ModelRepository.watch_routes``), so that such retries stay rare.

A region of a ring is the front process's again once its predict is answered, so a predict
is answered only when no thread can still read it: a cancelled request whose rows have not
started is dropped from the queue and answered at once; one whose rows have started runs to
the end (a batch cannot be taken back from the model) and is answered then.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from collections.abc import Callable
from functools import partial
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import orjson
from prometheus_client import Counter
from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from service.access_log import AccessLog
from service.batching import Queued
from service.dataplane import DataPlane, VersionLease
from service.errors import Cancelled, Internal, ServingError
from service.front_frames import Header, error_spec, pack, put_tensors, take_tensors, unpack
from service.front_remote import signature_doc
from service.lifecycle import EXIT_CANNOT_LISTEN, exit_after_stop, within
from service.metrics import Metrics
from service.plane_types import Cancellation, ModelTarget
from service.shm_ring import create_segment, halves, release_segment
from service.shutdown import CUT_MARGIN, StopDeadline
from wire.backoff import Backoff

log = Logger()

RING_BYTES = 64 * 1024 * 1024  # per front process; tmpfs pages are only used as touched
RESTART_BACKOFF = Backoff(initial=0.5, maximum=10.0)
STABLE_SECONDS = 60.0  # a front process that served this long restarts after the shortest delay


class FrontStats:
    """The front processes' HTTP counters and gauges, in the main process's metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._totals: dict[tuple[int, int], dict[tuple[str, ...], float]] = {}
        self._gauges: dict[tuple[int, int], tuple[int, int, int]] = {}
        self.predicts = Counter(
            "kleinserve_front_predicts",
            "Predicts the main process ran for each front process (--http_processes)",
            ("process",),
            registry=metrics.registry,
        )
        self.leases = Counter(
            "kleinserve_front_leases",
            "Leases front processes asked for, a round trip each: a front process that "
            "knows what a target resolves to sends none (--http_processes)",
            ("process",),
            registry=metrics.registry,
        )
        self.frames = Counter(
            "kleinserve_front_frames",
            "Frames the main process received from each front process (--http_processes)",
            ("process",),
            registry=metrics.registry,
        )
        metrics.in_flight.set_function(lambda: sum(g[0] for g in self._gauges.values()))
        metrics.request_body_bytes.set_function(lambda: sum(g[1] for g in self._gauges.values()))
        metrics.open_connections.set_function(lambda: sum(g[2] for g in self._gauges.values()))

    def report(self, key: tuple[int, int], header: Header) -> None:
        """A front process's totals since it started: the differences go to our counters."""
        last = self._totals.setdefault(key, {})
        for route, code, total in header.get("requests", ()):
            seen = last.get((route, code), 0.0)
            if total > seen:
                self._metrics.requests.labels(route, code).inc(total - seen)
                last[(route, code)] = total
        for how, total in header.get("refused", ()):
            seen = last.get(("refused", how), 0.0)
            if total > seen:
                self._metrics.refused_connections.labels(how).inc(total - seen)
                last[("refused", how)] = total
        self._gauges[key] = (
            int(header.get("in_flight", 0)),
            int(header.get("body_bytes", 0)),
            int(header.get("connections", 0)),
        )

    def observe(self, args: list[Any]) -> None:
        """An inference request a front process answered, for the request metrics: (api,
        model, version, status, seconds), checked against the served models here."""
        api, model, version, status, seconds = args
        self._metrics.model_requests.observe(api, model, version, int(status), float(seconds))

    def ended(self, key: tuple[int, int]) -> None:
        self._totals.pop(key, None)
        self._gauges.pop(key, None)


class _Work:
    """One predict of a front process, in flight here."""

    def __init__(self, cancellation: Cancellation, queued: Queued) -> None:
        self.cancellation = cancellation
        self.queued = queued

    def cancel(self) -> None:
        """Drop it if none of its rows has started (they no longer read the ring); a request
        whose rows run finishes, and is answered then."""
        if self.queued.wait_seconds is None:
            self.cancellation.cancel()


class FrontConnection(Int32StringReceiver):
    """This process's end of the socket to one front process."""

    MAX_LENGTH = 2**31 - 1

    def __init__(
        self,
        plane: DataPlane,
        segment: SharedMemory | None,
        *,
        key: tuple[int, int],
        stats: FrontStats,
        access_log: AccessLog,
        ended: Callable[[], object],
    ) -> None:
        self._plane = plane
        self._shared = segment.buf if segment is not None else None
        # The front process's inputs are in the first half; our outputs go in the second.
        self._outputs = halves(self._shared)[1] if self._shared is not None else None
        self._key = key
        self._stats = stats
        self._access_log = access_log
        self._ended = ended
        self._leases: dict[int, tuple[Any, VersionLease]] = {}
        self._next_lease = 0
        # Per version, the signatures sent and the epoch they were sent with (a reloaded
        # version's signatures are another mapping: they are sent again, with a new epoch).
        self._sent: dict[tuple[str, int], tuple[Any, int]] = {}
        self._epochs = 0
        self._work: dict[int, _Work] = {}
        self._running: list[Deferred] = []
        process = str(key[0])
        self._predicted = stats.predicts.labels(process)
        self._leased = stats.leases.labels(process)
        self._framed = stats.frames.labels(process)
        self.lost = False

    def stringReceived(self, frame: bytes) -> None:
        self._framed.inc()
        try:
            header, tail = unpack(frame)
            if self._outputs is not None:
                for offset in header.get("freed", ()):
                    self._outputs.free(int(offset))
            for op, value in header.get("notices", ()):
                self._notice(op, value)
            op = header.get("op")
            if op == "predict":
                self._predict(header, tail)
            elif op == "lease":
                self._lease(header)
            elif op != "notices":
                log.warn("front process sent an unknown message {op!r}", op=op)
        except Exception:  # one bad message must not end the connection's other requests
            log.failure("a front process's message failed")

    def _notice(self, op: str, value: Any) -> None:
        try:
            if op == "log":
                self._access_log.write(value)
            elif op == "observe":
                self._stats.observe(value)
            elif op == "release":
                self._release(int(value))
            elif op == "cancel":
                work = self._work.get(int(value))
                if work is not None:
                    work.cancel()
            elif op == "counts":
                self._stats.report(self._key, value)
            else:
                log.warn("front process sent an unknown notice {op!r}", op=op)
        except Exception:  # one bad notice must not lose the others of its frame
            log.failure("a front process's notice failed")

    def send(self, header: Header, tail: list[bytes] | None = None) -> None:
        if not self.lost:
            self.sendString(pack(header, tail))

    def _lease(self, header: Header) -> None:
        self._leased.inc()
        name, version, label = header["target"]
        held = self._plane.lease(ModelTarget(name, version, label))
        try:
            lease = held.__enter__()
        except ServingError as error:
            self.send({"id": header["id"], "error": error_spec(error)})
            return
        try:
            signatures = lease.signatures()
        except ServingError as error:
            held.__exit__(None, None, None)
            self.send({"id": header["id"], "error": error_spec(error)})
            return
        self._next_lease += 1
        self._leases[self._next_lease] = (held, lease)
        answer: Header = {
            "id": header["id"],
            "lease": self._next_lease,
            "name": lease.name,
            "version": lease.version,
            "hooks": lease.hooks is not None,
        }
        key = (lease.name, lease.version)
        sent = self._sent.get(key)
        if sent is None or sent[0] is not signatures:  # first time, or the version was reloaded
            self._epochs += 1
            sent = self._sent[key] = (signatures, self._epochs)
            answer["signatures"] = {k: signature_doc(s) for k, s in signatures.items()}
            answer["signature_defs"] = lease.signature_defs()
        answer["epoch"] = sent[1]
        self.send(answer)

    def _release(self, lease_id: int) -> None:
        held = self._leases.pop(lease_id, None)
        if held is not None:
            held[0].__exit__(None, None, None)

    def _lease_assumed(self, header: Header) -> tuple[Any, VersionLease] | None:
        """A predict sent without a lease: the target leased here for the predict's length,
        if it resolves to the version (and load of it) the front process assumed; else None,
        and the front process leases it for real (which also says why it cannot be)."""
        name, version, label = header["target"]
        held = self._plane.lease(ModelTarget(name, version, label))
        try:
            lease = held.__enter__()
        except ServingError:
            return None
        try:
            sent = self._sent.get((lease.name, lease.version))
            if (
                lease.version == header["version"]
                and sent is not None
                and sent[1] == header["epoch"]
                and sent[0] is lease.signatures()
            ):
                return held, lease
        except ServingError:
            pass
        held.__exit__(None, None, None)
        return None

    def _predict(self, header: Header, tail: memoryview) -> None:
        call_id = int(header["id"])
        hold = None  # a lease taken for this predict alone
        if "lease" in header:
            held = self._leases.get(int(header["lease"]))
            if held is None:
                self.send({"id": call_id, "error": error_spec(Internal("unknown lease"))})
                return
            _, lease = held
        else:
            assumed = self._lease_assumed(header)
            if assumed is None:
                self.send({"id": call_id, "stale": True})
                return
            hold, lease = assumed
        work = _Work(Cancellation(), Queued())
        timeout = header.get("timeout")
        clock = self._plane.clock
        try:
            inputs = take_tensors(header["inputs"], tail, self._shared)
        except (ValueError, TypeError) as e:
            if hold is not None:
                hold.__exit__(None, None, None)
            self.send({"id": call_id, "error": error_spec(Internal(f"bad tensors: {e}"))})
            return
        running = Deferred.fromCoroutine(
            lease.predict(
                header["signature"],
                inputs,
                deadline=None if timeout is None else clock.seconds() + float(timeout),
                cancellation=work.cancellation,
                queued=work.queued,
            )
        )
        del inputs
        self._work[call_id] = work
        self._predicted.inc()
        self._running.append(running)
        running.addBoth(self._answer, call_id, work, running)
        if hold is not None:  # released once answered
            running.addBoth(_let_go, hold)

    def _answer(self, result: Any, call_id: int, work: _Work, running: Deferred) -> None:
        self._work.pop(call_id, None)
        self._running.remove(running)
        if isinstance(result, Failure):
            if result.check(ServingError):
                error: ServingError = result.value
            elif result.check(CancelledError):
                error = Cancelled("the request was cancelled")
            else:
                log.failure("a front process's predict failed", result)
                error = Internal("internal error; see the server log")
            self.send({"id": call_id, "error": error_spec(error)})
            return
        specs, tail, _ = put_tensors(result, self._outputs)
        queued = work.queued
        self.send(
            {
                "id": call_id,
                "outputs": specs,
                "wait": queued.wait_seconds,
                "batch": queued.batch_size,
            },
            tail,
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The front process is gone: drop its work not yet started, release its leases
        once the rest has run."""
        self.lost = True
        for work in list(self._work.values()):
            work.cancel()

        def release(_: object = None) -> None:
            for lease_id in list(self._leases):
                self._release(lease_id)
            self._ended()

        if self._running:  # each fires once its answer is sent (or dropped)
            DeferredList(list(self._running)).addCallback(release)
        else:
            release()


def _let_go(_: object, held: Any) -> None:
    held.__exit__(None, None, None)


class _Output(ProcessProtocol):
    """A front process's standard output and error, line by line into our log."""

    def __init__(self, slot: _Slot) -> None:
        self._slot = slot
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            self._slot.log_line(fd, line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._slot.log_line(fd, rest.decode("utf-8", "replace"))
        self._slot.ended(reason)


class _Slot:
    """One of the N front processes, started again when it dies."""

    def __init__(self, owner: FrontProcesses, number: int) -> None:
        self.owner = owner
        self.number = number
        self.generation = 0
        self.process: Any = None
        self.segment: SharedMemory | None = None
        self.connection: FrontConnection | None = None
        self.exited: Deferred | None = None
        self.failures = 0
        self.started_at = 0.0
        self._restart: Any = None

    def start(self) -> None:
        owner = self.owner
        self.generation += 1
        name = f"kleinserve-{os.getpid()}-{self.number}-{self.generation}"
        self.segment = create_segment(name, owner.ring_bytes)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        key = (self.number, self.generation)
        connection = FrontConnection(
            owner.plane,
            self.segment,
            key=key,
            stats=owner.stats,
            access_log=owner.access_log,
            ended=partial(self._connection_ended, key, self.segment),
        )
        self.connection = connection
        factory = Factory()
        factory.buildProtocol = lambda addr: connection  # type: ignore[method-assign]
        owner.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        ours.close()
        settings = dict(owner.settings, segment=name, process=self.number)
        self.exited = Deferred()
        self.started_at = owner.reactor.seconds()
        try:
            self.process = owner.reactor.spawnProcess(
                _Output(self),
                sys.executable,
                [sys.executable, "-m", "service.front", orjson.dumps(settings).decode()],
                env=dict(os.environ),
                childFDs={0: "w", 1: "r", 2: "r", 3: owner.listen_fd, 4: theirs.fileno()},
            )
        finally:
            theirs.close()
        log.info("front process {n} started (pid {pid})", n=self.number, pid=self.process.pid)

    def _connection_ended(self, key: tuple[int, int], segment: SharedMemory) -> None:
        self.owner.stats.ended(key)
        release_segment(segment)

    def log_line(self, fd: int, line: str) -> None:
        level, _, text = line.partition(" ")
        emit = {"error": log.error, "critical": log.critical, "warn": log.warn}.get(level, log.info)
        if fd == 2:
            emit, text = log.warn, line
        emit("front process {n}: {line}", n=self.number, line=text)

    def ended(self, reason: Failure) -> None:
        """The process exited: its ring is unlinked; started again unless we are stopping."""
        if self.segment is not None:
            try:
                self.segment.unlink()
            except FileNotFoundError:
                pass
        if self.connection is not None and self.connection.transport is not None:
            self.connection.transport.loseConnection()
        exited, self.exited = self.exited, None
        if exited is not None:
            exited.callback(None)
        if self.owner.stopping:
            return
        if self.owner.reactor.seconds() - self.started_at > STABLE_SECONDS:
            self.failures = 0  # it had been serving: not a crash loop
        self.failures += 1
        delay = RESTART_BACKOFF.delay(self.failures - 1, self.owner.random)
        log.warn(
            "front process {n} ended ({why}); starting it again in {delay:.1f} s",
            n=self.number,
            why=reason.getErrorMessage(),
            delay=delay,
        )
        self._restart = self.owner.reactor.callLater(delay, self._start_again)

    def _start_again(self) -> None:
        self._restart = None
        if not self.owner.stopping:
            self.start()

    def cancel_restart(self) -> None:
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None


class FrontProcesses(Service):
    """The listening socket, and N front processes serving HTTP on it (see the module)."""

    def __init__(
        self,
        listen: str,
        count: int,
        plane: DataPlane,
        *,
        reactor: Any,
        deadline: StopDeadline,
        stats: FrontStats,
        access_log: AccessLog,
        settings: dict[str, Any],
        cut_queued: Callable[[], int] = lambda: 0,
        ring_bytes: int = RING_BYTES,
    ) -> None:
        self.listen = listen
        self.count = count
        self.plane = plane
        self.reactor = reactor
        self.deadline = deadline
        self.stats = stats
        self.access_log = access_log
        self.settings = settings
        self.cut_queued = cut_queued
        self.ring_bytes = ring_bytes
        self.random = random.Random()
        self.slots = [_Slot(self, n) for n in range(count)]
        self.stopping = False
        self.listen_fd = -1
        self._port: Any = None
        self.listening: Deferred = Deferred()  # fires with the IListeningPort, as HTTPPort's
        plane.repository.watch_routes(self.routes_changed)

    def routes_changed(self) -> None:
        """What a target resolves to may have changed: each front process forgets what it
        knew (a predict sent on what it knew before this notice arrives is answered "stale",
        and sent again under a real lease: the notice only keeps that rare)."""
        for slot in self.slots:
            if slot.connection is not None:
                slot.connection.send({"op": "routes"})

    def startService(self) -> None:
        super().startService()
        endpoint = serverFromString(self.reactor, self.listen)
        never = Factory.forProtocol(Protocol)  # never accepts: the front processes do
        never.noisy = False
        endpoint.listen(never).addCallbacks(self._listened, self._cannot_listen)

    def _listened(self, port: Any) -> None:
        port.stopReading()  # the front processes accept; this process never does
        self._port = port
        self.listen_fd = port.fileno()
        self.settings["ipv6"] = port.getHost().type == "TCP" and ":" in port.getHost().host
        log.info(
            "listening on {address} with {n} front processes", address=port.getHost(), n=self.count
        )
        for slot in self.slots:
            slot.start()
        self.listening.callback(port)

    def _cannot_listen(self, failure: Failure) -> None:
        log.critical("cannot listen: {error}; exiting", error=failure.getErrorMessage())
        exit_after_stop(EXIT_CANNOT_LISTEN, self.reactor)

    def reload(self) -> None:
        """SIGHUP: each front process re-reads what it reads from files (the token file)."""
        for slot in self.slots:
            if slot.connection is not None:
                slot.connection.send({"op": "reload"})

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.deadline.begin()
        await task.deferLater(self.reactor, self.deadline.drain_delay_left(), lambda: None)
        self.stopping = True
        for slot in self.slots:
            slot.cancel_restart()
        exits = [slot.exited for slot in self.slots if slot.exited is not None]
        within_seconds = self.deadline.remaining(CUT_MARGIN)
        for slot in self.slots:
            if slot.connection is not None:
                slot.connection.send({"op": "stop", "within": within_seconds})
        if not await within(self.reactor, self.deadline.remaining(CUT_MARGIN), _all(exits)):
            cut = self.cut_queued()
            log.warn(
                "front processes still draining at the drain deadline: {cut} requests still "
                "queued were answered 503 (retry elsewhere)",
                cut=cut,
            )
            if not await within(self.reactor, self.deadline.remaining(), _all(exits)):
                for slot in self.slots:
                    if slot.exited is not None and slot.process is not None:
                        log.warn("front process {n} killed at the deadline", n=slot.number)
                        slot.process.signalProcess("KILL")
        if self._port is not None:
            await self._port.stopListening()
        for slot in self.slots:
            if slot.segment is not None:
                release_segment(slot.segment)


def _all(ds: list[Deferred]) -> Deferred:
    return gatherResults(ds) if ds else _fired()


def _fired() -> Deferred:
    d: Deferred = Deferred()
    d.callback(None)
    return d
