"""A front process's RemotePlane and the main process's FrontConnection, joined in memory:
leases, predicts through a ring, cancellation and a front process that goes away."""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from service.access_log import AccessLog
from service.batching import BatchingParameters, BatchingQueue
from service.errors import Cancelled, InvalidArgument, NotFound, Unavailable
from service.front_main import FrontConnection, FrontProcesses, FrontStats
from service.front_remote import MainChannel, RemotePlane
from service.metrics import Metrics
from service.plane_types import Cancellation, ModelTarget
from service.repository import AVAILABLE, LoadedVersion
from service.shm_ring import Ring, halves
from service.signature import Signature, TensorInfo, check_inputs
from tests.deferreds import result_of
from tests.test_dataplane import Held, make_plane
from tests.test_http import SIGNATURE, FakeServable


class _Pipe:
    """A transport that hands what is written straight to the other side's protocol, and
    counts the frames (``Int32StringReceiver.sendString`` writes one frame per call)."""

    def __init__(self) -> None:
        self.peer: Any = None
        self.closed = False
        self.frames = 0

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.frames += 1
            self.peer.dataReceived(data)

    def writeSequence(self, parts: list[bytes]) -> None:
        self.write(b"".join(parts))

    def loseConnection(self) -> None:
        self.closed = True


class _Segment:
    """What FrontConnection reads of a shared-memory segment: its buffer."""

    def __init__(self, size: int = 8192) -> None:
        self.buf = memoryview(bytearray(size))


class _Lines:
    """An access log that keeps the entries written to it."""

    def __init__(self) -> None:
        self.entries: list[Any] = []

    def write(self, entry: Any) -> None:
        self.entries.append(entry)


@attrs.define
class Joined:
    """A RemotePlane and a FrontConnection joined in memory, and what a test looks at."""

    plane: RemotePlane
    main: FrontConnection
    version: LoadedVersion
    ring: Ring
    clock: Clock
    to_main: _Pipe
    to_front: _Pipe
    stats: FrontStats
    access_log: _Lines

    def leases(self) -> float:
        """Lease round trips the main process answered."""
        return self.stats.leases.labels("0")._value.get()


def _joined(executor: Any = None) -> Joined:
    plane, version, clock = make_plane(executor) if executor else make_plane()
    segment = _Segment()
    ring, _ = halves(segment.buf)  # the front process's half
    remote: list[RemotePlane] = []
    front = MainChannel(
        on_stop=lambda _: None,
        on_lost=lambda: None,
        clock=clock,
        on_routes=lambda: remote[0].forget_targets(),
    )
    stats = FrontStats(Metrics(CollectorRegistry()))
    lines = _Lines()
    main = FrontConnection(
        plane,
        segment,  # type: ignore[arg-type]
        key=(0, 1),
        stats=stats,
        access_log=lines,  # type: ignore[arg-type]
        ended=lambda: None,
    )
    to_main, to_front = _Pipe(), _Pipe()
    to_main.peer, to_front.peer = main, front
    front.makeConnection(to_main)  # type: ignore[arg-type]
    main.makeConnection(to_front)  # type: ignore[arg-type]
    remote.append(RemotePlane(front, ring, clock))
    return Joined(remote[0], main, version, ring, clock, to_main, to_front, stats, lines)


def _outputs_held(main: FrontConnection) -> int:
    """Bytes of the main process's output ring not yet given back."""
    assert main._outputs is not None
    return main._outputs.used


X = {"x": np.array([[1.0, 2.0]], dtype=np.float32)}


async def _predict(plane: RemotePlane, target: ModelTarget, **kwargs: Any) -> Any:
    async with plane.lease(target) as model:
        return await model.predict(None, X, **kwargs)


async def _predict_version(plane: RemotePlane, target: ModelTarget) -> tuple[int, Any]:
    """The version that answered, as the front door sees it after the predict, and the answer."""
    async with plane.lease(target) as model:
        outputs = await model.predict(None, X)
        return model.version, outputs


def test_a_predict_runs_in_the_main_process_and_frees_its_ring_region() -> None:
    """The outputs come back through the main process's ring; the lease, the input region
    and the output region are all given back."""
    j = _joined()
    outputs = result_of(Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m"))))
    np.testing.assert_array_equal(outputs["y"], [[2.0, 4.0]])
    assert j.ring.used == 0
    j.clock.advance(0)  # the end of the reactor turn: the release and the regions go
    assert j.version.holders.count == 0
    assert _outputs_held(j.main) == 0  # copied out, and given back


def test_errors_come_back_as_the_same_serving_errors() -> None:
    """An unknown model is a 404 and bad inputs a 400, in the front process too."""
    plane = _joined().plane
    with pytest.raises(NotFound):
        result_of(Deferred.fromCoroutine(_predict(plane, ModelTarget("nope"))))

    async def bad() -> Any:
        async with plane.lease(ModelTarget("m")) as model:
            return await model.predict(None, {"x": np.zeros((1, 3), np.float32)})

    with pytest.raises(InvalidArgument):
        result_of(Deferred.fromCoroutine(bad()))


def test_a_cancelled_request_not_started_is_dropped_and_its_region_freed() -> None:
    """The client leaves while its rows wait: they leave the queue, the main process
    answers, and lease and region are given back."""
    held = Held()
    j = _joined(held)
    cancellation = Cancellation()
    first = Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m")))  # takes the one thread
    answer = Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m"), cancellation=cancellation))
    assert j.ring.used > 0 and len(held.batches) == 1
    cancellation.cancel()
    j.clock.advance(0)  # the cancel goes by the end of the reactor turn it was raised in
    with pytest.raises(Cancelled):
        result_of(answer)
    held.run_next()
    result_of(first)
    j.clock.advance(0)
    assert held.batches == []  # the cancelled rows never ran
    assert j.version.holders.count == 0 and j.ring.used == 0


def test_a_cancelled_request_already_running_keeps_its_region_until_it_ends() -> None:
    """Rows a thread may be reading are not given back before the batch has run; the outputs
    nobody reads are given back too."""
    held = Held()
    j = _joined(held)
    answer = Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m")))
    assert len(held.batches) == 1  # running
    answer.cancel()  # Klein does this when the client leaves
    assert isinstance(_failure(answer).value, CancelledError)
    j.clock.advance(0)
    assert j.ring.used > 0
    held.run_next()
    assert j.ring.used == 0
    j.clock.advance(0)  # the end of the reactor turn: the outputs go back
    assert j.version.holders.count == 0
    assert _outputs_held(j.main) == 0


def test_a_front_process_gone_releases_its_leases_once_its_work_has_run() -> None:
    """The socket closes: work not started is dropped (and its version let go), what runs
    finishes, then the leases go."""
    held = Held()
    j = _joined(held)
    running = Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m")))  # leased for real
    waiting = Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m")))  # leased per predict
    assert j.version.holders.count == 2
    j.plane.channel.connectionLost(Failure(ConnectionError("gone")))
    j.main.connectionLost(Failure(ConnectionError("gone")))
    assert isinstance(_failure(running).value, Unavailable)
    assert isinstance(_failure(waiting).value, Unavailable)
    assert j.version.holders.count == 1  # the running batch still holds the version
    held.run_next()
    assert held.batches == [] and j.version.holders.count == 0


def _failure(d: Deferred) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the Deferred did not fail"
    return failures[0]


class _Tripling(FakeServable):
    """Another version: its own signatures (another load), answering x * 3."""

    signatures = {"serving_default": SIGNATURE}


class _Narrow(FakeServable):
    """Another version whose input has three columns, not two."""

    narrow = Signature(
        "serving_default",
        {"x": TensorInfo("x", "DT_FLOAT", (None, 3))},
        {"y": TensorInfo("y", "DT_FLOAT", (None, 3))},
        "tensorflow/serving/predict",
    )
    signatures = {"serving_default": narrow}

    def signature(self, name: str | None) -> Signature:
        return self.narrow


def _add_version(j: Joined, number: int, servable: Any, run: Any) -> LoadedVersion:
    """Version ``number`` of "m", AVAILABLE in the main process's repository (a hot swap)."""
    version = LoadedVersion("m", number, state=AVAILABLE, servable=servable)
    version.queues["serving_default"] = BatchingQueue(
        run, BatchingParameters(max_batch_size=1), clock=j.clock, executor=maybeDeferred
    )
    j.main._plane.repository.add_version(version)
    return version


def test_a_known_target_costs_one_frame_each_way_and_no_lease() -> None:
    """Once a lease answer said what "m" resolves to, each predict is one frame to the main
    process and one back: no lease, no release; the notices go with the next frame."""
    j = _joined()
    result_of(Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m"))))  # lease + predict
    assert (j.to_main.frames, j.leases()) == (2, 1)
    for _ in range(5):
        outputs = result_of(Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m"))))
        np.testing.assert_array_equal(outputs["y"], [[2.0, 4.0]])
    assert (j.to_main.frames, j.to_front.frames, j.leases()) == (7, 7, 1)
    assert j.stats.predicts.labels("0")._value.get() == 6
    assert j.version.holders.count == 0  # the first lease went back with the next predict
    j.clock.advance(0)  # the last output region goes back at the end of the turn
    assert j.to_main.frames == 8 and _outputs_held(j.main) == 0
    j.clock.advance(0)
    assert j.to_main.frames == 8  # nothing left to send: no empty frame


def test_signatures_whose_request_left_before_they_came_are_kept() -> None:
    """The first lease of a version carries its signatures, and the main process sends them
    once. A request that leaves before that answer arrives must not lose them: its lease is
    released, and the next request for the version is served (it was 503 "did not answer"
    for good)."""
    j = _joined()
    held: list[bytes] = []
    deliver = j.to_front.write
    j.to_front.write = held.append  # type: ignore[method-assign]  # the answer is on its way
    first = Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m")))
    first.cancel()  # the client left
    with pytest.raises(CancelledError):
        result_of(first)
    j.to_front.write = deliver  # type: ignore[method-assign]
    for frame in held:
        deliver(frame)
    j.clock.advance(0)  # the release goes at the end of the turn
    assert j.version.holders.count == 0
    outputs = result_of(Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m"))))
    np.testing.assert_array_equal(outputs["y"], [[2.0, 4.0]])


def test_a_stale_version_is_leased_again_checked_and_sent_again() -> None:
    """A new version serves "m" and the front process has not heard (a late notice): its
    predict is answered "stale", it leases "m" again, and the answer is the new version's."""
    j = _joined()
    result_of(Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m"))))
    four = _add_version(j, 4, _Tripling(), lambda inputs: {"y": inputs["x"] * 3})
    version, outputs = result_of(
        Deferred.fromCoroutine(_predict_version(j.plane, ModelTarget("m")))
    )
    assert version == 4
    np.testing.assert_array_equal(outputs["y"], [[3.0, 6.0]])
    assert (j.to_main.frames, j.leases()) == (2 + 3, 2)  # stale predict, lease, predict
    j.clock.advance(0)
    assert j.version.holders.count == 0 and four.holders.count == 0
    assert j.ring.used == 0 and _outputs_held(j.main) == 0
    result_of(Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m"))))
    assert (j.to_main.frames, j.leases()) == (6 + 1, 2)  # known again: one frame


def test_a_stale_versions_new_signature_checks_the_inputs_again() -> None:
    """After a stale answer the inputs are checked against the new version's signature, with
    the same message as any request's, and nothing more is sent."""
    j = _joined()
    result_of(Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m"))))
    _add_version(j, 4, _Narrow(), lambda inputs: inputs)
    with pytest.raises(InvalidArgument) as raised:
        result_of(Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m"))))
    with pytest.raises(InvalidArgument) as direct:
        check_inputs(_Narrow.narrow, X)
    assert raised.value.message == direct.value.message
    assert j.to_main.frames == 2 + 2  # the stale predict and the lease; no second predict


def test_the_routes_notice_makes_the_front_process_lease_again() -> None:
    """A version loaded: the main process tells its front processes at once, and the next
    request leases "m" for real instead of sending a predict the main process would refuse."""
    j = _joined()
    fronts = FrontProcesses(
        "tcp:0",
        1,
        j.main._plane,
        reactor=j.clock,
        deadline=None,  # type: ignore[arg-type]
        stats=j.stats,
        access_log=AccessLog("off"),
        settings={},
    )
    fronts.slots[0].connection = j.main
    result_of(Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m"))))
    received = j.to_front.frames
    _add_version(j, 4, _Tripling(), lambda inputs: {"y": inputs["x"] * 3})
    assert j.to_front.frames == received + 1  # the routes notice
    version, _ = result_of(Deferred.fromCoroutine(_predict_version(j.plane, ModelTarget("m"))))
    assert version == 4
    assert (j.to_main.frames, j.leases()) == (2 + 2, 2)  # a lease and one predict: no stale


def test_notices_of_one_reactor_turn_go_as_one_frame() -> None:
    """Access-log entries, a lease released, a cancel and counts raised in one turn reach the
    main process as one frame at its end; a frame sent meanwhile carries them instead."""
    j = _joined()

    async def lease_only() -> None:
        async with j.plane.lease(ModelTarget("m", version=3)):
            pass

    result_of(Deferred.fromCoroutine(lease_only()))
    assert j.version.holders.count == 1  # its release waits for the end of the turn
    frames = j.to_main.frames
    for n in range(3):
        j.plane.channel.notify("log", {"n": n})
    j.plane.channel.notify("cancel", 12345)  # a call already answered: nothing to do
    j.plane.channel.notify("counts", {"requests": [], "in_flight": 0, "body_bytes": 0})
    assert j.to_main.frames == frames and j.access_log.entries == []
    j.clock.advance(0)
    assert j.to_main.frames == frames + 1
    assert j.access_log.entries == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert j.version.holders.count == 0
    j.plane.channel.notify("log", {"n": 3})
    result_of(Deferred.fromCoroutine(_predict(j.plane, ModelTarget("m", version=3))))
    assert j.to_main.frames == frames + 2  # the entry went with the predict
    assert j.access_log.entries[-1] == {"n": 3}


def test_front_reports_add_up_to_one_view_of_the_http_metrics() -> None:
    """Each front process reports totals since it started and its gauges now: the main
    process's /metrics shows the sums (requests, connections refused past --max_connections,
    in flight, body bytes, open connections), and a process that ended leaves the gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    stats = FrontStats(Metrics(registry))

    def report(key: tuple[int, int], requests: float, refused: float, gauges: int) -> None:
        stats.report(
            key,
            {
                "requests": [["predict", "200", requests]],
                "refused": [["503", refused]],
                "in_flight": gauges,
                "body_bytes": 100 * gauges,
                "connections": 10 * gauges,
            },
        )

    def samples() -> dict[str, float]:
        from prometheus_client import generate_latest

        text = generate_latest(registry).decode()
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name
            in (
                "kleinserve_requests_total",
                "kleinserve_refused_connections_total",
                "kleinserve_in_flight_requests",
                "kleinserve_request_body_bytes",
                "kleinserve_open_connections",
            )
        }

    report((0, 1), requests=5, refused=1, gauges=1)
    report((1, 1), requests=3, refused=0, gauges=2)
    report((0, 1), requests=7, refused=2, gauges=3)  # totals since start: +2 and +1
    assert samples() == {
        "kleinserve_requests_total": 10,
        "kleinserve_refused_connections_total": 2,
        "kleinserve_in_flight_requests": 5,
        "kleinserve_request_body_bytes": 500,
        "kleinserve_open_connections": 50,
    }
    stats.ended((0, 1))
    assert samples()["kleinserve_open_connections"] == 20
    assert samples()["kleinserve_refused_connections_total"] == 2  # counters never go back
