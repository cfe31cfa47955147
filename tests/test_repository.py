"""The model repository's lifecycle, driven synchronously: real folders, fake servables.

Folders are real (``tmp_path``; a version folder is "complete" once it holds a
saved_model.pb), scans run inline, and each version's threads are ``ManualThreads``
whose work runs only when the test says so, so every intermediate state (a new
version LOADING while the old one serves, UNLOADING while a request holds it) can be
looked at. Time is a ``task.Clock``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from service.batching import BatchingParameters
from service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from service.model_config import ModelConfig, VersionPolicy
from service.repository import (
    AVAILABLE,
    END,
    LOADING,
    UNLOADING,
    LoadedVersion,
    ModelRepository,
    State,
)
from service.signature import Signature, TensorInfo
from tests.deferreds import result_of

SIGNATURE = Signature(
    name="serving_default",
    inputs={"x": TensorInfo("x", "DT_FLOAT", (None, 1), "x:0")},
    outputs={"y": TensorInfo("y", "DT_FLOAT", (None, 1), "y:0")},
    method_name="tensorflow/serving/predict",
)


@attrs.define(eq=False)
class FakeServable:
    """Answers x * version, so a test sees which version answered."""

    name: str
    version: int
    path: Path
    signatures: dict = attrs.Factory(lambda: {"serving_default": SIGNATURE})
    labels: Any = None
    closed: bool = False

    def signature(self, name):
        return self.signatures[name or "serving_default"]

    def run(self, key, inputs):
        return {"y": inputs["x"] * self.version}

    def warm_up(self, sizes):
        pass

    def close(self):
        self.closed = True


class ManualThreads:
    """A version's threads whose work runs when the test calls ``work()``."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self.stopped = False

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.board.pending.append((f, args, d))
        return d

    def stop(self) -> None:
        self.stopped = True


@attrs.define
class Board:
    """Everything a test drives: pending thread work, the loader's behaviour, what it made."""

    pending: list = attrs.Factory(list)
    failing: set = attrs.Factory(set)  # (name, version) whose load raises
    loaded: list = attrs.Factory(list)

    def load(self, name: str, version: int, path: Path) -> FakeServable:
        if (name, version) in self.failing:
            raise OSError(f"{path} is corrupt")
        servable = FakeServable(name, version, path)
        self.loaded.append(servable)
        return servable

    def work_one(self) -> None:
        """Run the oldest pending piece of thread work."""
        f, args, d = self.pending.pop(0)
        maybeDeferred(f, *args).chainDeferred(d)

    def work(self) -> None:
        """Run every pending piece of thread work (and what it queues in turn)."""
        while self.pending:
            f, args, d = self.pending.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)


def version_folder(base: Path, number: int, *, complete: bool = True) -> Path:
    folder = base / str(number)
    (folder / "variables").mkdir(parents=True, exist_ok=True)
    (folder / "variables" / "variables.data-00000-of-00001").write_bytes(b"w" * number)
    if complete:
        (folder / "saved_model.pb").write_bytes(b"graph")
        (folder / "variables" / "variables.index").write_bytes(b"index")
    return folder


@attrs.define
class Harness:
    repository: ModelRepository
    board: Board
    clock: Clock
    released: list

    def scan(self) -> None:
        """One file system poll, and the loads it starts."""
        self.clock.advance(1)
        self.board.work()

    def state(self, name: str = "m") -> dict[int, str]:
        return {n: v.state for n, v in sorted(self.repository.versions.get(name, {}).items())}

    def predict(self, name: str = "m", **kw: Any) -> float:
        version = self.repository.lookup(name, **kw)
        d = version.predict(None, {"x": np.ones((1, 1), np.float32)})
        self.board.work()
        return float(result_of(d)["y"][0, 0])


def start(models: list[ModelConfig], *, work: bool = True, **kw: Any) -> Harness:
    clock, board, released = Clock(), Board(), []
    repository = ModelRepository(
        models,
        reactor=clock,
        load=board.load,  # type: ignore[arg-type]
        make_threads=lambda size, name: ManualThreads(board),
        scan=lambda f, *args: maybeDeferred(f, *args),
        release_memory=lambda: released.append(True),
        freeze=lambda: None,
        load_retry_interval=10.0,
        max_load_retries=2,
        **kw,
    )
    repository.startService()
    if work:
        board.work()
    return Harness(repository, board, clock, released)


def model(base: Path, name: str = "m", **kw: Any) -> ModelConfig:
    return ModelConfig(name, base, batching=BatchingParameters(enabled=False), **kw)


def test_states_are_tf_servings_names_as_text() -> None:
    """A version's state is an enum whose members are TF Serving's state names as ``str``: they
    compare equal to the names and are written as them in JSON, logs and metric labels."""
    assert [str(s) for s in State] == ["LOADING", "AVAILABLE", "UNLOADING", "END"]
    version = LoadedVersion("m", 1, state="AVAILABLE")  # type: ignore[arg-type]
    assert version.state is AVAILABLE and version.state == "AVAILABLE"
    assert f"{version.state}" == "AVAILABLE"
    assert json.dumps(version.status()) == (
        '{"version": "1", "state": "AVAILABLE", '
        '"status": {"error_code": "OK", "error_message": ""}}'
    )
    assert type(version.status()["state"]) is str
    with pytest.raises(ValueError):
        LoadedVersion("m", 1, state="SERVING")  # type: ignore[arg-type]


def test_add_version_is_the_seam_to_hold_a_version_made_elsewhere() -> None:
    """add_version holds a version as it is: lookups, labels, served() and listeners follow;
    an unknown model, or a number already held, is refused."""
    repository = ModelRepository(
        [ModelConfig("m", Path("/nonexistent"), labels={"stable": 1})], reactor=Clock()
    )
    heard: list = []
    repository.subscribe(lambda: heard.append(repository.served()))
    version = LoadedVersion("m", 1, state=AVAILABLE, servable=FakeServable("m", 1, Path("/x")))  # type: ignore[arg-type]
    repository.add_version(version)
    assert repository.lookup("m") is version and repository.lookup("m", label="stable") is version
    assert heard == [frozenset({("m", 1)})] and repository.ready
    with pytest.raises(ValueError, match="holds version 1 already"):
        repository.add_version(LoadedVersion("m", 1))
    with pytest.raises(ValueError, match="not configured"):
        repository.add_version(LoadedVersion("other", 1))


def test_start_loads_the_highest_complete_version(tmp_path: Path) -> None:
    """At start the highest complete version folder is loaded, warmed up and made AVAILABLE."""
    version_folder(tmp_path, 1)
    version_folder(tmp_path, 2)
    version_folder(tmp_path, 3, complete=False)
    h = start([model(tmp_path)])
    assert h.state() == {2: AVAILABLE}
    assert h.repository.ready
    assert h.predict() == 2.0


def test_start_up_is_ready_once_every_aspired_version_had_its_first_load(tmp_path: Path) -> None:
    """At start, /readyz waits for all the versions the policy names (not just the first to
    load); a failed one does not hold it back; later loads never make it unready."""
    for n in (1, 2):
        version_folder(tmp_path, n)
    h = start([model(tmp_path, policy=VersionPolicy("all"))], work=False)
    ready: list = []
    h.repository.when_ready().addCallback(ready.append)
    for _ in range(3):  # load 2, load 1, warm up 2: version 2 serves, version 1 still loading
        h.board.work_one()
    assert h.state() == {1: LOADING, 2: AVAILABLE}
    assert not h.repository.ready and not ready
    h.board.work()
    assert h.state() == {1: AVAILABLE, 2: AVAILABLE} and h.repository.ready and ready
    version_folder(tmp_path, 3)
    h.clock.advance(1)
    h.clock.advance(1)
    assert h.state()[3] == LOADING and h.repository.ready


def test_a_failed_version_does_not_hold_start_up_back(tmp_path: Path) -> None:
    """A version that fails its first load at start (retry pending) leaves the others ready."""
    for n in (1, 2):
        version_folder(tmp_path, n)
    h = start([model(tmp_path, policy=VersionPolicy("all"))], work=False)
    h.board.failing.add(("m", 2))
    h.board.work()
    assert h.state() == {1: AVAILABLE, 2: LOADING} and h.repository.ready


def test_a_new_version_takes_over_only_once_available(tmp_path: Path) -> None:
    """A new folder is loaded once it is stable; the old version serves until the new is
    AVAILABLE, then unloads, closes its servable and gives memory back."""
    version_folder(tmp_path, 1)
    h = start([model(tmp_path)])
    version_folder(tmp_path, 2)
    h.clock.advance(1)  # first sight of 2: it may still be being copied
    assert h.state() == {1: AVAILABLE}
    h.clock.advance(1)  # unchanged since: load it (the load waits on ManualThreads)
    assert h.state() == {1: AVAILABLE, 2: LOADING}
    assert h.predict() == 1.0
    h.board.work()
    assert h.state() == {1: END, 2: AVAILABLE}
    assert h.predict() == 2.0
    old = h.board.loaded[0]
    assert old.version == 1 and old.closed
    assert h.released == [True]


def test_a_folder_still_being_written_is_not_loaded(tmp_path: Path) -> None:
    """A version folder whose files change between scans, or that lacks its graph, waits."""
    version_folder(tmp_path, 1)
    h = start([model(tmp_path)])
    folder = version_folder(tmp_path, 2, complete=False)
    h.scan()
    h.scan()
    assert h.state() == {1: AVAILABLE}  # no saved_model.pb yet
    (folder / "saved_model.pb").write_bytes(b"graph")
    (folder / "variables" / "variables.index").write_bytes(b"index")
    h.scan()  # complete now, but changed since the last scan
    assert h.state() == {1: AVAILABLE}
    data = folder / "variables" / "variables.data-00000-of-00001"
    data.write_bytes(b"more bytes arrive")
    h.scan()  # still changing
    assert h.state() == {1: AVAILABLE}
    h.scan()  # settled
    assert h.state() == {1: END, 2: AVAILABLE}


def test_a_request_holding_the_old_version_delays_its_unload(tmp_path: Path) -> None:
    """A request that looked up the old version can still use it while it is UNLOADING; the
    unload completes only after that request lets go, and new lookups get the new version."""
    version_folder(tmp_path, 1)
    h = start([model(tmp_path)])
    old = h.repository.lookup("m")
    with old.lease():
        version_folder(tmp_path, 2)
        h.scan()
        h.scan()
        assert h.state() == {1: UNLOADING, 2: AVAILABLE}
        assert h.repository.lookup("m").version == 2
        d = old.predict(None, {"x": np.ones((1, 1), np.float32)})
        h.board.work()
        assert result_of(d)["y"][0, 0] == 1.0
        assert not h.board.loaded[0].closed
    h.board.work()
    assert h.state() == {1: END, 2: AVAILABLE}
    assert h.board.loaded[0].closed


def test_a_failed_load_is_retried_with_backoff_and_the_old_version_keeps_serving(
    tmp_path: Path, logs
) -> None:
    """A corrupt new version shows its error in the status, is retried after the backoff up to
    the cap, leaves the old version serving, and is tried again once its folder is replaced."""
    version_folder(tmp_path, 1)
    h = start([model(tmp_path)])
    h.board.failing.add(("m", 2))
    folder = version_folder(tmp_path, 2)
    h.scan()
    h.scan()
    (status,) = [s for s in h.repository.status("m") if s["version"] == "2"]
    assert status["state"] == LOADING
    assert "load attempt 1 of 3 failed: OSError" in status["status"]["error_message"]
    assert any("failed to load" in m for m in logs.messages(LogLevel.critical, "service"))
    assert h.predict() == 1.0
    for _ in range(200):  # well past two backoffs of 10 s (at most 20 s) + polls
        h.scan()
    (status,) = [s for s in h.repository.status("m") if s["version"] == "2"]
    assert status["state"] == END
    assert status["status"]["error_message"].startswith("failed to load after 3 attempts")
    assert h.state() == {1: AVAILABLE, 2: END}
    assert h.predict() == 1.0
    h.board.failing.clear()
    (folder / "saved_model.pb").write_bytes(b"a good graph")  # replaced
    h.scan()
    h.scan()
    assert h.state() == {1: END, 2: AVAILABLE}


def test_version_policies_choose_the_versions(tmp_path: Path) -> None:
    """latest N, all and specific load exactly the versions they name."""
    for n in (1, 2, 3):
        version_folder(tmp_path, n)
    h = start([model(tmp_path, policy=VersionPolicy("latest", num_versions=2))])
    assert h.state() == {2: AVAILABLE, 3: AVAILABLE}
    h.repository.apply([model(tmp_path, policy=VersionPolicy("all"))])
    h.board.work()
    assert h.state() == {1: AVAILABLE, 2: AVAILABLE, 3: AVAILABLE}
    h.repository.apply([model(tmp_path, policy=VersionPolicy("specific", versions=frozenset({1})))])
    h.board.work()
    assert h.state() == {1: AVAILABLE, 2: END, 3: END}
    assert h.repository.lookup("m", version=1).version == 1
    with pytest.raises(Unavailable, match="version 3 is END"):
        h.repository.lookup("m", version=3)


def test_labels_resolve_and_move_without_a_gap(tmp_path: Path) -> None:
    """A label names a version; moved to a version still loading it keeps serving the old one;
    an unknown label is a 400 naming the labels there are."""
    version_folder(tmp_path, 1)
    version_folder(tmp_path, 2)
    specific = VersionPolicy("specific", versions=frozenset({1, 2}))
    h = start([model(tmp_path, policy=specific, labels={"stable": 1, "canary": 2})])
    assert h.predict(label="stable") == 1.0
    assert h.predict(label="canary") == 2.0
    assert h.repository.status("m", label="canary")[0]["version"] == "2"
    with pytest.raises(
        InvalidArgument, match="Unrecognized servable version label: beta.*canary, stable"
    ):
        h.repository.lookup("m", label="beta")
    version_folder(tmp_path, 3)
    h.scan()
    h.scan()
    three = VersionPolicy("specific", versions=frozenset({2, 3}))
    h.repository.apply([model(tmp_path, policy=three, labels={"stable": 3, "canary": 3})])
    assert h.state() == {1: AVAILABLE, 2: AVAILABLE, 3: LOADING}
    assert h.predict(label="stable") == 1.0  # 3 is loading: stable stays on 1
    h.board.work()
    assert h.state() == {1: END, 2: AVAILABLE, 3: AVAILABLE}
    assert h.predict(label="stable") == 3.0


def test_a_label_pointing_at_a_version_not_served_is_a_clear_error(tmp_path: Path) -> None:
    """A label whose version the policy does not load fails with a message saying so; one
    whose version is still loading is a retryable 503."""
    version_folder(tmp_path, 1)
    version_folder(tmp_path, 2)
    h = start([model(tmp_path, labels={"old": 1})])  # latest 1 serves only 2
    with pytest.raises(FailedPrecondition, match="points at version 1, which is not loaded"):
        h.repository.lookup("m", label="old")
    h.repository.apply([model(tmp_path, policy=VersionPolicy("all"), labels={"old": 1})])
    with pytest.raises(Unavailable, match="still LOADING"):
        h.repository.lookup("m", label="old")
    h.board.work()
    assert h.predict(label="old") == 1.0


def test_a_reload_adds_and_removes_models(tmp_path: Path) -> None:
    """apply() loads an added model (without taking the instance out of readiness while it
    loads) and unloads a removed one, which then answers 404; listeners hear each change."""
    a, b = tmp_path / "a", tmp_path / "b"
    version_folder(a, 1)
    version_folder(b, 4)
    h = start([model(a, "a")])
    changes: list = []
    h.repository.subscribe(lambda: changes.append(h.repository.served()))
    h.repository.apply([model(a, "a"), model(b, "b")])
    assert h.state("b") == {4: LOADING}
    assert h.repository.ready
    h.board.work()
    assert h.state("b") == {4: AVAILABLE}
    h.repository.apply([model(b, "b")])
    h.board.work()
    with pytest.raises(NotFound):
        h.repository.lookup("a")
    assert "a" not in h.repository.versions
    assert h.predict("b") == 4.0
    assert changes == [frozenset({("a", 1), ("b", 4)}), frozenset({("b", 4)})]


def test_an_unreadable_base_path_keeps_what_serves(tmp_path: Path, logs) -> None:
    """If the base path disappears (a network file system hiccup) the loaded version keeps
    serving and the error is logged once; removing a version folder unloads it."""
    base = tmp_path / "m"
    version_folder(base, 1)
    h = start([model(base)])
    os.rename(base, tmp_path / "elsewhere")
    h.scan()
    h.scan()
    assert h.state() == {1: AVAILABLE}
    assert len([m for m in logs.messages(LogLevel.error, "service") if "does not exist" in m]) == 1
    os.rename(tmp_path / "elsewhere", base)
    version_folder(base, 2)
    h.scan()
    h.scan()
    assert h.state() == {1: END, 2: AVAILABLE}


def test_stop_drains_and_unloads_everything(tmp_path: Path) -> None:
    """Stopping the repository unloads every version after its queued requests are answered."""
    version_folder(tmp_path, 1)
    h = start([model(tmp_path)])
    version = h.repository.lookup("m")
    queued = version.predict(None, {"x": np.ones((1, 1), np.float32)})
    stopped = h.repository.stopService()
    h.board.work()
    assert result_of(queued)["y"][0, 0] == 1.0
    result_of(stopped)
    assert h.state() == {1: END}
    assert h.board.loaded[0].closed


def test_lifecycle_metrics_follow_loads_and_states(tmp_path: Path) -> None:
    """/metrics counts loads by outcome and shows each version's current state."""
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    version_folder(tmp_path, 1)
    metrics = Metrics()
    h = start([model(tmp_path)], metrics=metrics)
    h.board.failing.add(("m", 2))
    version_folder(tmp_path, 2)
    h.scan()
    h.scan()
    text = generate_latest(metrics.registry).decode()
    assert 'kleinserve_model_loads_total{model="m",outcome="success"} 1.0' in text
    assert 'kleinserve_model_loads_total{model="m",outcome="failure"} 1.0' in text
    assert 'kleinserve_model_version_state{model="m",state="AVAILABLE",version="1"} 1.0' in text
    assert 'kleinserve_model_version_state{model="m",state="LOADING",version="2"} 1.0' in text
    assert 'kleinserve_model_load_seconds_count{model="m"} 1.0' in text


def test_request_metrics_follow_the_versions_that_serve(tmp_path: Path) -> None:
    """A loaded version's requests get its number as their label; once it unloads (a new
    version took over) its series are gone and the new version's requests are labelled
    with the new number; a model removed from the config becomes the placeholder."""
    from prometheus_client import generate_latest

    from service.metrics import Metrics
    from service.request_metrics import HTTP_ROUTES, NO_VERSION, UNKNOWN_MODEL
    from tests.metrics_text import samples

    version_folder(tmp_path, 1)
    metrics = Metrics()
    h = start([model(tmp_path)], metrics=metrics)
    requests = metrics.model_requests
    requests.observe(HTTP_ROUTES["predict"], "m", 1, 200, 0.01)
    assert requests.labels("m", 1) == ("m", "1")
    version_folder(tmp_path, 2)
    h.scan()
    h.scan()
    h.board.work()
    assert h.state() == {1: END, 2: AVAILABLE}
    assert requests.labels("m", 1) == ("m", NO_VERSION)
    assert requests.labels("m", 2) == ("m", "2")
    text = generate_latest(metrics.registry).decode()
    assert samples(text, "kleinserve_model_requests_total") == {}
    assert samples(text, "kleinserve_model_request_seconds_count") == {}
    h.repository.apply([])
    h.board.work()
    assert requests.labels("m", 2) == (UNKNOWN_MODEL, NO_VERSION)


def test_route_watchers_hear_of_label_moves_that_change_no_served_version(tmp_path: Path) -> None:
    """watch_routes fires when a label moves between two versions that both stay AVAILABLE
    (subscribe does not: the served set is the same), and not for a scan that changes nothing."""
    version_folder(tmp_path, 1)
    version_folder(tmp_path, 2)
    both = VersionPolicy("specific", versions=frozenset({1, 2}))
    h = start([model(tmp_path, policy=both, labels={"stable": 1})])
    routes: list = []
    served: list = []
    h.repository.watch_routes(lambda: routes.append(h.state()))
    h.repository.subscribe(lambda: served.append(True))
    h.scan()
    assert routes == [] and served == []
    h.repository.apply([model(tmp_path, policy=both, labels={"stable": 2})])
    assert len(routes) == 1 and served == []
    assert h.repository.lookup("m", label="stable").version == 2
    h.repository.apply([model(tmp_path, policy=VersionPolicy("specific", versions=frozenset({2})))])
    h.board.work()
    assert len(routes) >= 2 and served  # the label gone, version 1 unloaded
