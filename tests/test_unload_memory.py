"""Unloading a version: ``close()`` lets its TensorFlow objects be freed, and nothing else holds it.

Whether the memory then really returns is measured, not tested: ``scripts/memory_cycles.py``
(numbers in ``service.memory``). These tests check the preconditions with weak references:
after ``close()`` and a collection, the restored object, its functions, the Session and its
Graph are gone, even while the servable object itself is still held.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tensorflow.python.eager import context
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from service.errors import FailedPrecondition
from service.images import ImageDecoder, ImagePlan
from service.memory import release_memory
from service.servables import Servable
from service.servables.frozen_graph import FrozenGraphServable
from service.servables.registry import load_servable
from tests import models
from wire.dtypes import DEFAULT_SIGNATURE


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """One model of each kind, made once: SavedModels (numeric and image bytes), a frozen graph."""
    root = tmp_path_factory.mktemp("unload")
    return {
        "linear": models.make_linear(root / "linear"),
        "linear2": models.make_linear(root / "linear", version=2, scale=2.0),
        "image_bytes": models.make_image_bytes(root / "image_bytes"),
        "frozen": models.make_frozen_float_graph(root / "frozen"),
    }


def load(paths: dict[str, Path], kind: str, version: int = 1) -> Servable:
    return load_servable(kind, version, paths[kind])


def rows(kind: str) -> dict[str, np.ndarray]:
    if kind == "frozen":
        return {"image": np.full((2, 8, 8, 3), 0.5, np.float32)}
    return {"x": np.ones((2, 3), np.float32)}


def function_names() -> set[str]:
    return set(context.context().list_function_names())


def test_close_frees_a_saved_models_objects(paths) -> None:
    """After close() and a collection the restored object and its functions are gone."""
    servable = load(paths, "linear")
    servable.run(DEFAULT_SIGNATURE, rows("linear"))
    loaded = weakref.ref(servable._open.restored)
    function = weakref.ref(servable._open.functions[DEFAULT_SIGNATURE])
    servable.close()
    gc.collect()
    assert loaded() is None and function() is None
    assert servable.closed and servable.signatures  # plain data stays for status and metadata


def test_close_removes_the_versions_functions_from_tensorflows_context(paths) -> None:
    """The functions a SavedModel load adds to the eager context leave it once closed and collected."""
    load(paths, "linear").close()  # the process-wide functions a first load makes stay put
    gc.collect()
    before = function_names()
    servable = load(paths, "linear")
    added = function_names() - before
    servable.close()
    gc.collect()
    assert added and not added & function_names()


def test_close_frees_a_frozen_graphs_session_and_graph(paths) -> None:
    """After close() and a collection a frozen graph's Session and Graph are gone."""
    servable = load(paths, "frozen")
    assert isinstance(servable, FrozenGraphServable)
    servable.run(DEFAULT_SIGNATURE, rows("frozen"))
    session = weakref.ref(servable._open.session)
    graph = weakref.ref(servable._open.session.graph)
    servable.close()
    gc.collect()
    assert session() is None and graph() is None


def test_close_closes_the_frozen_graphs_session(paths) -> None:
    """close() closes the Session at once, before any collection frees it."""
    servable = load(paths, "frozen")
    session = servable._open.session
    servable.close()
    assert session._closed


def test_release_memory_frees_a_version_frozen_while_loaded(paths) -> None:
    """A version alive at gc.freeze() is freed by release_memory(), which gc.collect() cannot do."""
    load(paths, "linear").close()  # the process-wide functions a first load makes stay put
    gc.collect()
    already_frozen = gc.get_freeze_count()
    before = function_names()
    servable = load(paths, "linear")
    added = function_names() - before
    gc.freeze()  # as ModelRepository does once its first versions are loaded
    try:
        servable.close()
        del servable
        gc.collect()
        stuck = added & function_names()  # frozen cycles keep its functions (and variables)
        release_memory()
        assert added and stuck == added and not added & function_names()
    finally:
        gc.unfreeze()
        if already_frozen:
            gc.freeze()


@pytest.mark.parametrize("kind", ["linear", "frozen"])
@pytest.mark.parametrize(
    "call",
    [
        lambda s, kind: s.run(DEFAULT_SIGNATURE, rows(kind)),
        lambda s, kind: s.warm_up((1,)),
    ],
    ids=["run", "warm_up"],
)
def test_running_a_closed_version_is_a_clear_error(
    paths, kind: str, call: Callable[[Servable, str], object]
) -> None:
    """run() and warm_up() after close() raise FailedPrecondition naming the version."""
    servable = load(paths, kind)
    servable.close()
    with pytest.raises(FailedPrecondition, match=rf"model '{kind}' version 1 is unloaded"):
        call(servable, kind)


@pytest.mark.parametrize("kind", ["linear", "frozen"])
def test_close_is_idempotent(paths, kind: str) -> None:
    """A second close() does nothing and raises nothing."""
    servable = load(paths, kind)
    servable.close()
    servable.close()
    assert servable.closed


def test_closing_one_version_leaves_another_of_the_same_model_running(paths) -> None:
    """Two versions share nothing: closing version 1 leaves version 2's answers intact."""
    one, two = load(paths, "linear"), load(paths, "linear2", version=2)
    x = {"x": np.ones((1, 3), np.float32)}
    expected = two.run(DEFAULT_SIGNATURE, x)["y"]
    one.close()
    del one
    gc.collect()
    np.testing.assert_allclose(two.run(DEFAULT_SIGNATURE, x)["y"], expected)
    np.testing.assert_allclose(expected, [[9 * 2.0 + 0.5, 12 * 2.0 - 0.5]])


@pytest.mark.parametrize("kind", ["image_bytes", "frozen"])
def test_image_decoder_does_not_keep_a_servable_alive(paths, kind: str) -> None:
    """The decoder's cached plan does not keep a dropped servable (either class) alive."""
    decoder = ImageDecoder(reactor=Clock(), executor=maybeDeferred)
    servable = load(paths, kind)
    d = Deferred.fromCoroutine(decoder.plan(servable, kind))
    assert isinstance(d.result, ImagePlan) and d.result.model == kind  # built and cached
    del d
    ref = weakref.ref(servable)
    servable.close()
    del servable
    gc.collect()
    assert ref() is None
