"""The data plane on its own: numpy in and out, no HTTP, driven synchronously.

The repository holds hand-built AVAILABLE versions whose models are numpy functions behind
real ``BatchingQueue`` s on a ``Clock``; a queue's executor either runs a batch at once
(``maybeDeferred``) or holds it (``Held``), so what is queued, run, cancelled or expired can
be checked step by step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import Clock

from service.batching import BatchingParameters, BatchingQueue
from service.dataplane import Cancellation, DataPlane, ModelTarget
from service.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ServingError,
    Unavailable,
)
from service.images import ImageDecoder
from service.repository import AVAILABLE, LoadedVersion, ModelConfig, ModelRepository
from service.signature import Signature
from tests.deferreds import result_of
from tests.test_classify_regress import SIGNATURES as EXAMPLE_SIGNATURES
from tests.test_classify_regress import FakeExampleServable, fake_model
from tests.test_http import SIGNATURE, FakeServable
from tests.test_images import FakeImageServable, light, scores, upload


class CountingServable(FakeServable):
    """``FakeServable`` that counts how often a signature is resolved."""

    def __init__(self) -> None:
        self.resolved = 0

    def signature(self, name: str | None) -> Signature:
        self.resolved += 1
        return super().signature(name)


class Held:
    """An executor that holds each batch until ``run_next``: work stays queued meanwhile."""

    def __init__(self) -> None:
        self.batches: list[tuple[Deferred, Any, tuple]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.batches.append((d, f, args))
        return d

    def run_next(self) -> None:
        d, f, args = self.batches.pop(0)
        d.callback(f(*args))


def double(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"] * 2}


def make_plane(
    executor: Any = maybeDeferred,
    *,
    servable: Any = None,
    labels: dict[str, int] | None = None,
    clock: Clock | None = None,
) -> tuple[DataPlane, LoadedVersion, Clock]:
    """Model "m", version 3 AVAILABLE: ``double`` behind one batch-of-one queue."""
    clock = clock or Clock()
    repository = ModelRepository(
        [ModelConfig("m", Path("/nonexistent"), labels=labels or {})], reactor=clock
    )
    version = LoadedVersion("m", 3, state=AVAILABLE, servable=servable or FakeServable())
    version.queues["serving_default"] = BatchingQueue(
        double, BatchingParameters(max_batch_size=1), clock=clock, executor=executor
    )
    repository.add_version(version)
    return DataPlane(repository), version, clock


def run(coroutine: Any) -> Deferred:
    return Deferred.fromCoroutine(coroutine)


X = {"x": np.array([[1.0, 2.0]], dtype=np.float32)}


def test_predict_answers_the_models_arrays() -> None:
    """predict takes numpy arrays and answers the signature's outputs as numpy arrays."""
    plane, _, _ = make_plane()
    outputs = result_of(run(plane.predict(ModelTarget("m"), None, X)))
    assert set(outputs) == {"y"}
    np.testing.assert_array_equal(outputs["y"], [[2.0, 4.0]])


def test_the_lease_is_held_until_the_answer() -> None:
    """The version is leased while its work waits in the queue, and given back with the answer."""
    held = Held()
    plane, version, _ = make_plane(held)
    answer = run(plane.predict(ModelTarget("m", version=3), None, X))
    assert version.holders.count == 1 and not answer.called
    held.run_next()
    assert version.holders.count == 0 and answer.called


def test_a_failure_gives_the_lease_back() -> None:
    """A request that fails (here: an unknown signature) holds no lease after its error."""
    plane, version, _ = make_plane()
    with pytest.raises(InvalidArgument, match="nope"):
        result_of(run(plane.predict(ModelTarget("m"), "nope", X)))
    assert version.holders.count == 0


def test_the_signature_is_resolved_once_per_request() -> None:
    """A decoder asking for the signature inside the lease and the predict after it share one
    resolution."""
    servable = CountingServable()
    plane, _, _ = make_plane(servable=servable)

    async def request() -> dict[str, np.ndarray]:
        with plane.lease(ModelTarget("m")) as model:
            assert model.signature(None) is SIGNATURE  # what a body decoder does
            return await model.predict(None, X)

    result_of(run(request()))
    assert servable.resolved == 1


def test_a_cancellation_drops_queued_work() -> None:
    """Cancelling a request whose work is still queued removes it from the queue unrun."""
    held = Held()
    plane, version, _ = make_plane(held)
    first = run(plane.predict(ModelTarget("m"), None, X))  # runs: held in the executor
    cancellation = Cancellation()
    second = run(plane.predict(ModelTarget("m"), None, X, cancellation=cancellation))
    queue = version.queues["serving_default"]
    assert queue.queued_rows == 1
    cancellation.cancel()
    assert queue.queued_rows == 0
    with pytest.raises(CancelledError):
        result_of(second)
    held.run_next()
    assert first.called and held.batches == [] and version.holders.count == 0


def test_cancelling_the_operations_deferred_drops_queued_work() -> None:
    """Cancelling the Deferred of an operation (as Klein does) also drops its queued work."""
    held = Held()
    plane, version, _ = make_plane(held)
    run(plane.predict(ModelTarget("m"), None, X))
    second = run(plane.predict(ModelTarget("m"), None, X))
    second.cancel()
    assert version.queues["serving_default"].queued_rows == 0
    assert version.holders.count == 1  # only the running first request holds it
    with pytest.raises(CancelledError):
        result_of(second)


def test_a_request_past_its_deadline_fails_unrun() -> None:
    """Work still queued at its deadline (clock seconds) fails with 504, and never runs."""
    held = Held()
    plane, _, clock = make_plane(held)
    run(plane.predict(ModelTarget("m"), None, X))
    late = run(plane.predict(ModelTarget("m"), None, X, deadline=clock.seconds() + 0.05))
    clock.advance(0.1)
    held.run_next()
    with pytest.raises(DeadlineExceeded):
        result_of(late)
    assert held.batches == []


def test_lookups_fail_with_serving_errors() -> None:
    """An unknown model or version is NotFound, an unknown label InvalidArgument."""
    plane, _, _ = make_plane(labels={"stable": 3})
    with pytest.raises(NotFound):
        result_of(run(plane.predict(ModelTarget("other"), None, X)))
    with pytest.raises(NotFound):
        result_of(run(plane.predict(ModelTarget("m", version=9), None, X)))
    with pytest.raises(InvalidArgument, match="Unrecognized servable version label: beta"):
        result_of(run(plane.predict(ModelTarget("m", label="beta"), None, X)))
    outputs = result_of(run(plane.predict(ModelTarget("m", label="stable"), None, X)))
    np.testing.assert_array_equal(outputs["y"], [[2.0, 4.0]])


def test_status_and_metadata_are_plain_data() -> None:
    """status and metadata answer the versions' states and signature defs, without a lease."""
    plane, version, _ = make_plane()
    assert plane.status(ModelTarget("m")) == [version.status()]
    metadata = plane.metadata(ModelTarget("m", version=3))
    assert (metadata.name, metadata.version) == ("m", 3)
    assert metadata.signature_defs == FakeServable.signature_defs
    assert version.holders.count == 0


def make_examples_plane() -> tuple[DataPlane, list[int]]:
    """Model "m", version 1, with the example-taking signatures of tests.test_classify_regress."""
    repository = ModelRepository([ModelConfig("m", Path("/nonexistent"))], reactor=Clock())
    version = LoadedVersion("m", 1, state=AVAILABLE, servable=FakeExampleServable())
    calls: list[int] = []
    for key in EXAMPLE_SIGNATURES:
        version.queues[key] = BatchingQueue(
            fake_model(key, 1, calls),
            BatchingParameters(max_batch_size=8),
            clock=Clock(),
            executor=maybeDeferred,
        )
    repository.add_version(version)
    return DataPlane(repository), calls


def example(x0: float, x1: float) -> bytes:
    from tensorflow.core.example import example_pb2

    proto = example_pb2.Example()
    proto.features.feature["x"].float_list.value.extend([x0, x1])
    return proto.SerializeToString()


def test_classify_and_regress_run_examples_as_rows() -> None:
    """classify and regress take serialized tf.Examples and run them as one request of k rows."""
    plane, calls = make_examples_plane()
    rows = [example(1.0, 1.0), example(0.5, 2.0)]
    classified = result_of(run(plane.classify(ModelTarget("m"), None, rows)))
    np.testing.assert_array_equal(classified["scores"][:, 1], [4.0, 5.5])  # z + version 1
    regressed = result_of(run(plane.regress(ModelTarget("m"), "regress", rows)))
    np.testing.assert_array_equal(regressed["outputs"], [4.0, 5.5])
    assert calls == [2, 2]


def test_classify_checks_the_signature_as_tf_serving_does() -> None:
    """A classify on a regress signature is refused before anything is queued."""
    plane, calls = make_examples_plane()
    with pytest.raises(InvalidArgument, match="Expected classification signature method_name"):
        result_of(run(plane.classify(ModelTarget("m"), "regress", [example(1.0, 1.0)])))
    assert calls == []


def make_image_plane() -> tuple[DataPlane, list[tuple]]:
    """Model "m", version 3: a 4x4 grayscale classifier (tests.test_images), images enabled."""
    clock = Clock()
    repository = ModelRepository([ModelConfig("m", Path("/nonexistent"))], reactor=clock)
    version = LoadedVersion("m", 3, state=AVAILABLE, servable=FakeImageServable())
    shapes: list[tuple] = []

    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes.append(inputs["image"].shape)
        return scores(inputs)

    version.queues["serving_default"] = BatchingQueue(
        model, BatchingParameters(max_batch_size=8), clock=clock, executor=maybeDeferred
    )
    repository.add_version(version)
    images = ImageDecoder(reactor=clock, executor=maybeDeferred)
    return DataPlane(repository, images=images), shapes


def test_classify_images_names_the_top_classes_of_each_image() -> None:
    """Two images run as one request of two rows; each answers its top classes, best first."""
    plane, shapes = make_image_plane()
    images = [upload(light(255)), upload(light(0))]
    results = result_of(run(plane.classify_images(ModelTarget("m"), images, 2)))
    assert (results.name, results.version) == ("m", 3)
    assert [[p["label"] for p in image] for image in results.predictions] == [
        ["light", "middle"],
        ["dark", "middle"],
    ]
    assert shapes == [(2, 4, 4, 1)]


def test_a_cancelled_upload_skips_its_decodes() -> None:
    """Images of a request cancelled before they are decoded are never decoded or run."""
    plane, shapes = make_image_plane()
    cancellation = Cancellation()
    cancellation.cancel()
    answer = run(
        plane.classify_images(ModelTarget("m"), [upload(light(255))], 1, cancellation=cancellation)
    )
    with pytest.raises(ServingError, match="closed the connection"):
        result_of(answer)
    assert shapes == []


def test_image_uploads_need_the_decoder_and_a_default_model() -> None:
    """Without a decoder an upload is 503; the default model is the only one served."""
    plane, _, _ = make_plane()
    with pytest.raises(Unavailable, match="not enabled"):
        result_of(run(plane.classify_images(ModelTarget("m"), [upload(light())], 1)))
    assert plane.default_model() == "m"


def test_a_cancellation_runs_what_is_registered_once() -> None:
    """Callbacks run once on cancel, and at once when registered after it."""
    cancellation = Cancellation()
    ran: list[str] = []
    cancellation.on_cancel(lambda: ran.append("before"))
    cancellation.cancel()
    cancellation.cancel()
    cancellation.on_cancel(lambda: ran.append("after"))
    assert ran == ["before", "after"] and cancellation.cancelled
