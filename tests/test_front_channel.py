"""A front process's RemotePlane and the main process's FrontConnection, joined in memory:
leases, predicts through a ring, cancellation and a front process that goes away."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from service.access_log import AccessLog
from service.errors import Cancelled, InvalidArgument, NotFound, Unavailable
from service.front_main import FrontConnection, FrontStats
from service.front_remote import MainChannel, RemotePlane
from service.metrics import Metrics
from service.plane_types import Cancellation, ModelTarget
from service.shm_ring import Ring, halves
from tests.deferreds import result_of
from tests.test_dataplane import Held, make_plane


class _Pipe:
    """A transport that hands what is written straight to the other side's protocol."""

    def __init__(self) -> None:
        self.peer: Any = None
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.peer.dataReceived(data)

    def writeSequence(self, parts: list[bytes]) -> None:
        self.write(b"".join(parts))

    def loseConnection(self) -> None:
        self.closed = True


class _Segment:
    """What FrontConnection reads of a shared-memory segment: its buffer."""

    def __init__(self, size: int = 8192) -> None:
        self.buf = memoryview(bytearray(size))


def _joined(executor: Any = None) -> tuple[RemotePlane, FrontConnection, Any, Ring]:
    plane, version, clock = make_plane(executor) if executor else make_plane()
    segment = _Segment()
    ring, _ = halves(segment.buf)  # the front process's half
    front = MainChannel(on_stop=lambda _: None, on_lost=lambda: None)
    main = FrontConnection(
        plane,
        segment,  # type: ignore[arg-type]
        key=(0, 1),
        stats=FrontStats(Metrics(CollectorRegistry())),
        access_log=AccessLog("off"),
        ended=lambda: None,
    )
    to_main, to_front = _Pipe(), _Pipe()
    to_main.peer, to_front.peer = main, front
    front.makeConnection(to_main)  # type: ignore[arg-type]
    main.makeConnection(to_front)  # type: ignore[arg-type]
    return RemotePlane(front, ring, clock), main, version, ring


def _outputs_held(main: FrontConnection) -> int:
    """Bytes of the main process's output ring not yet given back."""
    assert main._outputs is not None
    return main._outputs.used


X = {"x": np.array([[1.0, 2.0]], dtype=np.float32)}


async def _predict(plane: RemotePlane, target: ModelTarget, **kwargs: Any) -> Any:
    async with plane.lease(target) as model:
        return await model.predict(None, X, **kwargs)


def test_a_predict_runs_in_the_main_process_and_frees_its_ring_region() -> None:
    """The outputs come back through the main process's ring; the lease, the input region
    and the output region are all given back."""
    plane, main, version, ring = _joined()
    outputs = result_of(Deferred.fromCoroutine(_predict(plane, ModelTarget("m"))))
    np.testing.assert_array_equal(outputs["y"], [[2.0, 4.0]])
    assert version.holders.count == 0
    assert ring.used == 0
    assert _outputs_held(main) == 0  # copied out, and given back with the release


def test_errors_come_back_as_the_same_serving_errors() -> None:
    """An unknown model is a 404 and bad inputs a 400, in the front process too."""
    plane, _, _, _ = _joined()
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
    plane, _, version, ring = _joined(held)
    cancellation = Cancellation()
    first = Deferred.fromCoroutine(_predict(plane, ModelTarget("m")))  # takes the one thread
    answer = Deferred.fromCoroutine(_predict(plane, ModelTarget("m"), cancellation=cancellation))
    assert ring.used > 0 and len(held.batches) == 1
    cancellation.cancel()
    with pytest.raises(Cancelled):
        result_of(answer)
    held.run_next()
    result_of(first)
    assert held.batches == []  # the cancelled rows never ran
    assert version.holders.count == 0 and ring.used == 0


def test_a_cancelled_request_already_running_keeps_its_region_until_it_ends() -> None:
    """Rows a thread may be reading are not given back before the batch has run; the outputs
    nobody reads are given back too."""
    held = Held()
    plane, main, version, ring = _joined(held)
    answer = Deferred.fromCoroutine(_predict(plane, ModelTarget("m")))
    assert len(held.batches) == 1  # running
    answer.cancel()  # Klein does this when the client leaves
    assert isinstance(_failure(answer).value, CancelledError)
    assert ring.used > 0
    held.run_next()
    assert ring.used == 0 and version.holders.count == 0
    plane.channel.notify({"op": "counts"})  # any next message gives the outputs back
    assert _outputs_held(main) == 0


def test_a_front_process_gone_releases_its_leases_once_its_work_has_run() -> None:
    """The socket closes: work not started is dropped, what runs finishes, then the leases go."""
    held = Held()
    plane, main, version, _ = _joined(held)
    running = Deferred.fromCoroutine(_predict(plane, ModelTarget("m")))
    waiting = Deferred.fromCoroutine(_predict(plane, ModelTarget("m")))
    plane.channel.connectionLost(Failure(ConnectionError("gone")))
    main.connectionLost(Failure(ConnectionError("gone")))
    assert isinstance(_failure(running).value, Unavailable)
    assert isinstance(_failure(waiting).value, Unavailable)
    assert version.holders.count == 2  # the running batch still holds the version
    held.run_next()
    assert held.batches == [] and version.holders.count == 0


def _failure(d: Deferred) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the Deferred did not fail"
    return failures[0]
