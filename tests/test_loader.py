"""The loader on its own: a version's load on its threads, the retry of a failed load with
backoff, its unload once the requests holding it are done. The repository is stood in for by
``Events`` that record what the loader tells it; threads run inline; time is a ``task.Clock``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from service.metrics import Metrics
from service.model_config import ModelConfig
from service.model_folders import VersionFolder
from service.repository.loader import Events, Loader, next_attempt
from service.repository.versions import AVAILABLE, END, LOADING, UNLOADING, LoadedVersion
from tests.deferreds import result_of
from tests.test_repository import FakeServable


class InlineThreads:
    def __init__(self) -> None:
        self.stopped = False

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return maybeDeferred(f, *args)

    def stop(self) -> None:
        self.stopped = True


@attrs.define
class Told:
    """What the loader told the repository."""

    running: bool = True
    said: list = attrs.Factory(list)
    retries: list = attrs.Factory(list)

    def events(self) -> Events:
        return Events(
            running=lambda: self.running,
            changed=lambda: self.said.append("changed"),
            settled=lambda name: self.said.append(f"settled {name}"),
            attempted=lambda: self.said.append("attempted"),
            retry=self.retries.append,
        )


def loader(told: Told, clock: Clock, load: Callable, released: list) -> Loader:
    return Loader(
        reactor=clock,
        metrics=Metrics(),
        load=load,
        make_threads=lambda size, name: InlineThreads(),
        max_retries=2,
        retry_interval=10.0,
        release_memory=lambda: released.append(True),
        events=told.events(),
    )


FOLDER = VersionFolder(1, Path("/models/m/1"), 5, True)
CONFIG = ModelConfig("m", Path("/models/m"))


def test_a_load_makes_the_version_available_and_says_so() -> None:
    told, clock, released = Told(), Clock(), []
    version = next_attempt("m", FOLDER, None)
    loader(told, clock, lambda name, n, path: FakeServable(name, n, path), released).load(
        CONFIG, version
    )
    assert version.state == AVAILABLE and set(version.queues) == {"serving_default"}
    assert told.said == ["settled m", "attempted"]


def test_a_failed_load_is_retried_after_a_jittered_backoff_then_given_up() -> None:
    """Each failure is in the status; the retry is due after at most the interval (less up to
    20 % jitter), doubling; after max_retries the version is END with its error."""
    told, clock, released = Told(), Clock(), []

    def fail(name: str, number: int, path: Path) -> Any:
        raise OSError("corrupt")

    load = loader(told, clock, fail, released)
    version = next_attempt("m", FOLDER, None)
    for attempt, ceiling in [(1, 10.0), (2, 20.0)]:
        load.load(CONFIG, version)
        assert version.state == LOADING and version.attempts == attempt
        assert f"load attempt {attempt} of 3 failed: OSError: corrupt" in version.error
        assert version.retry is not None
        assert 0.8 * ceiling <= version.retry.getTime() - clock.seconds() <= ceiling
        clock.advance(ceiling)
        assert (
            len(told.retries) == attempt and told.retries[-1] is version and version.retry is None
        )
        version = next_attempt("m", FOLDER, version)  # the repository loads the folder again
    load.load(CONFIG, version)
    assert version.state == END and version.retry is None
    assert version.error == "failed to load after 3 attempts: OSError: corrupt"
    assert told.said.count("attempted") == 3


def test_a_replaced_folder_counts_its_attempts_from_zero() -> None:
    failed = LoadedVersion("m", 1, state=END, fingerprint=5, attempts=3, error="failed")
    assert next_attempt("m", FOLDER, failed).attempts == 3
    replaced = VersionFolder(1, Path("/models/m/1"), 6, True)
    assert next_attempt("m", replaced, failed).attempts == 0


def test_an_unload_waits_for_the_requests_holding_the_version() -> None:
    told, clock, released = Told(), Clock(), []
    load = loader(told, clock, lambda name, n, path: FakeServable(name, n, path), released)
    version = next_attempt("m", FOLDER, None)
    load.load(CONFIG, version)
    servable = version.servable
    told.said.clear()
    with version.lease():
        load.unload(version)
        assert version.state == UNLOADING and load.busy and not released
    result_of(Deferred.fromCoroutine(load.settle()))
    assert version.state == END and servable.closed and released == [True]  # type: ignore[union-attr]
    assert told.said == ["changed", "settled m"]


def test_a_load_that_ends_after_the_stop_is_closed_not_served() -> None:
    told, clock, released = Told(running=False), Clock(), []
    version = next_attempt("m", FOLDER, None)
    loader(told, clock, lambda name, n, path: FakeServable(name, n, path), released).load(
        CONFIG, version
    )
    assert version.state == END and version.servable is None and told.said == []
