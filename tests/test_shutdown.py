"""The bounded stop, on a task.Clock: the deadline, the ordered services, the port's drain,
and the health checks that see a stuck model (service.shutdown, service.lifecycle, service.health)."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from service.batching import BatchingParameters, BatchingQueue
from service.errors import Unavailable
from service.health import Health
from service.lifecycle import HTTPPort, InFlight, OrderedServices, within
from service.shutdown import CUT_MARGIN, BeginStop, StopDeadline
from tests.deferreds import result_of


def deadline_on(clock: Clock, delay: float = 2.0, timeout: float = 10.0) -> StopDeadline:
    return StopDeadline(clock, drain_delay=delay, drain_timeout=timeout, watchdog=False)


def test_deadline_counts_from_the_stop_and_bounds_the_drain_delay() -> None:
    """remaining() and drain_delay_left() count from begin(); a second begin() changes nothing."""
    clock = Clock()
    deadline = deadline_on(clock)
    assert deadline.remaining() == 12 and deadline.drain_delay_left() == 2
    clock.advance(100)
    deadline.begin()
    clock.advance(3)
    deadline.begin()
    assert deadline.remaining() == 9 and deadline.drain_delay_left() == 0
    assert deadline.remaining(CUT_MARGIN) == 9 - CUT_MARGIN
    clock.advance(20)
    assert deadline.remaining() == 0


def test_within_reports_whether_the_deferred_fired_in_time() -> None:
    """within(): True when the Deferred fires first, False at the timeout (the Deferred goes on)."""
    clock = Clock()
    fast: Deferred = Deferred()
    waited = Deferred.fromCoroutine(within(clock, 5, fast))
    fast.callback("x")
    assert result_of(waited) is True
    slow: Deferred = Deferred()
    waited = Deferred.fromCoroutine(within(clock, 5, slow))
    clock.advance(5)
    assert result_of(waited) is False
    slow.callback(None)  # late: nothing breaks


class Hanging(Service):
    """A child whose stop never finishes (a model call that never returns)."""

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred()


@attrs.define
class Recorded(Service):
    stopped: list[str]
    label: str

    def stopService(self) -> Any:
        super().stopService()
        self.stopped.append(self.label)
        return succeed(None)


def test_ordered_stop_goes_on_past_a_child_that_hangs() -> None:
    """A child that never stops holds the stop only until the deadline; the ones after it stop."""
    clock = Clock()
    deadline = deadline_on(clock, delay=0, timeout=10)
    stopped: list[str] = []
    top = OrderedServices(deadline, clock=clock)
    Recorded(stopped, "first-started").setServiceParent(top)
    Hanging().setServiceParent(top)
    BeginStop(deadline, lambda: stopped.append("draining")).setServiceParent(top)
    top.startService()
    done = top.stopService()
    assert stopped == ["draining"] and not done.called
    clock.advance(10)
    assert stopped == ["draining", "first-started"] and done.called


class FakeSite:
    """The drain seam of InferenceSite: connections close when the test says so."""

    def __init__(self) -> None:
        self.stopping = False
        self.closed: Deferred = Deferred()

    def stop_keeping_alive(self) -> None:
        self.stopping = True

    def all_closed(self) -> Deferred:
        return self.closed


class FakePort:
    def __init__(self) -> None:
        self.listening = True

    def stopListening(self) -> Deferred:
        self.listening = False
        return succeed(None)


def started_port(clock: Clock, deadline: StopDeadline, cut: list[int]) -> tuple[HTTPPort, FakeSite]:
    site = FakeSite()
    in_flight = InFlight()
    in_flight.started()

    def cut_queued() -> int:
        cut.append(1)
        in_flight.finished()  # the 503 answers it
        return 1

    port = HTTPPort(
        endpoint=None,  # type: ignore[arg-type]  # never listens in these tests
        site=site,
        in_flight=in_flight,
        reactor=clock,
        deadline=deadline,
        cut_queued=cut_queued,
    )
    port._port = FakePort()  # type: ignore[assignment]
    return port, site


def test_port_serves_through_the_drain_delay_then_waits_for_connections() -> None:
    """The port stays open for --drain_delay after the stop began, then closes and waits for its
    connections; nothing is cut when they all close in time."""
    clock = Clock()
    deadline = deadline_on(clock, delay=2, timeout=10)
    deadline.begin()
    cut: list[int] = []
    port, site = started_port(clock, deadline, cut)
    done = port.stopService()
    clock.advance(1.9)
    assert not site.stopping and port._port.listening  # type: ignore[union-attr]
    clock.advance(0.1)
    assert site.stopping and not port._port.listening  # type: ignore[union-attr]
    site.closed.callback(None)
    assert done.called and cut == []


def test_port_cuts_queued_requests_shortly_before_the_deadline() -> None:
    """Connections still open CUT_MARGIN before the deadline: queued requests are answered 503."""
    clock = Clock()
    deadline = deadline_on(clock, delay=0, timeout=5)
    deadline.begin()
    cut: list[int] = []
    port, _ = started_port(clock, deadline, cut)
    done = port.stopService()
    clock.advance(5 - CUT_MARGIN - 0.01)
    assert cut == []
    clock.advance(0.01)
    assert cut == [1] and done.called


def _queue(clock: Clock) -> tuple[BatchingQueue, list[Deferred]]:
    handed: list[Deferred] = []

    def executor(f: Any, *args: Any) -> Deferred:
        d: Deferred = Deferred()
        handed.append(d)
        return d

    queue = BatchingQueue(
        lambda inputs: inputs, BatchingParameters(max_batch_size=4), clock=clock, executor=executor
    )
    return queue, handed


@attrs.define
class FakeVersion:
    queues: dict[str, BatchingQueue]


@attrs.define
class FakeRepository:
    versions: dict[str, dict[int, FakeVersion]]


def test_health_fails_when_a_batch_runs_past_the_stall_bound_and_recovers() -> None:
    """problem() names the model and says a thread is stuck once a batch runs past the bound."""
    import numpy as np

    clock = Clock()
    queue, handed = _queue(clock)
    health = Health(
        FakeRepository({"m": {3: FakeVersion({"serving_default": queue})}}),  # type: ignore[arg-type]
        stall_seconds=60,
    )
    queue.submit({"x": np.zeros((1, 2))}, 1)
    clock.advance(60)
    assert health.problem() is None and health.alive()
    clock.advance(1)
    problem = health.problem()
    assert problem is not None and "model m version 3" in problem and "stuck" in problem
    assert not health.alive()
    handed[0].callback(([{"x": np.zeros((1, 2))}], 0.0, 1))
    assert health.problem() is None


def test_health_fails_when_rows_wait_with_a_thread_idle() -> None:
    """Rows waiting past the batch timeout with a thread idle (scheduling broke) fail liveness."""
    import numpy as np

    clock = Clock()
    queue, _ = _queue(clock)
    health = Health(
        FakeRepository({"m": {1: FakeVersion({"s": queue})}}),  # type: ignore[arg-type]
        stall_seconds=60,
        queue_stall_seconds=5,
    )
    queue._idle_threads = 0  # simulate the broken scheduling of the wedge
    queue.submit({"x": np.zeros((1, 2))}, 1).addErrback(lambda f: f.trap(Unavailable))
    queue._idle_threads = 1
    clock.advance(6)
    problem = health.problem()
    assert problem is not None and "queue is stuck" in problem
    assert queue.abort_waiting(Unavailable("x")) == 1
    assert health.problem() is None
