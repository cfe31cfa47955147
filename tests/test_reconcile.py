"""The reconcile policy as data: (config, ready folders, versions held, labels served) -> actions.

``service.repository.reconcile.plan`` is pure, so each case below is its inputs and the
actions expected, and hypothesis checks the rules that hold for any input: what it loads and
unloads, that a model never goes without a serving version it had while a replacement loads,
and that carrying the plans out settles.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.model_config import ModelConfig, VersionPolicy
from service.model_folders import VersionFolder
from service.repository.reconcile import CancelRetry, Forget, Held, Load, Unload, plan
from service.repository.versions import AVAILABLE, END, LOADING, UNLOADING, State

BASE = Path("/models/m")
MOVED = Path("/elsewhere/m")


def folder(number: int, base: Path = BASE, fingerprint: int = 0) -> VersionFolder:
    return VersionFolder(number, base / str(number), fingerprint, True)


def folders(*numbers: int) -> dict[int, VersionFolder]:
    return {n: folder(n) for n in numbers}


def held(state: State, number: int, base: Path = BASE, **kw: object) -> Held:
    return Held(state, base / str(number), **kw)  # type: ignore[arg-type]


LATEST = ModelConfig("m", BASE)
ALL = ModelConfig("m", BASE, policy=VersionPolicy("all"))


def specific(*numbers: int, **labels: int) -> ModelConfig:
    return ModelConfig(
        "m", BASE, policy=VersionPolicy("specific", versions=frozenset(numbers)), labels=labels
    )


CASES = {
    "start: the highest version loads": (
        LATEST, folders(1, 2), {}, {},
        [Load(folder(2))],
    ),
    "start, all: every version loads, highest first": (
        ALL, folders(1, 2, 3), {}, {},
        [Load(folder(3)), Load(folder(2)), Load(folder(1))],
    ),
    "nothing to do once the aspired version serves": (
        LATEST, folders(1, 2), {2: held(AVAILABLE, 2)}, {},
        [],
    ),
    "a new version loads while the old one serves": (
        LATEST, folders(1, 2), {1: held(AVAILABLE, 1)}, {},
        [Load(folder(2))],
    ),
    "the old version stays while the new one loads": (
        LATEST, folders(1, 2), {1: held(AVAILABLE, 1), 2: held(LOADING, 2)}, {},
        [],
    ),
    "the old version unloads once the new one is AVAILABLE": (
        LATEST, folders(1, 2), {1: held(AVAILABLE, 1), 2: held(AVAILABLE, 2)}, {},
        [Unload(1)],
    ),
    "a failed new version waiting for its retry leaves the old one serving": (
        LATEST, folders(1, 2), {1: held(AVAILABLE, 1), 2: held(LOADING, 2, error="x", retrying=True)}, {},
        [],
    ),
    "a version that failed its last attempt stays END until its folder changes": (
        LATEST, folders(1, 2), {1: held(AVAILABLE, 1), 2: held(END, 2, fingerprint=0, error="failed")}, {},
        [],
    ),
    "a failed version whose folder was replaced loads again": (
        LATEST, folders(2), {2: held(END, 2, fingerprint=7, error="failed")}, {},
        [Load(folder(2))],
    ),
    "a version unloaded before (END, no error) loads again when aspired": (
        ALL, folders(1, 2), {1: held(END, 1), 2: held(AVAILABLE, 2)}, {},
        [Load(folder(1))],
    ),
    "an UNLOADING version aspired again waits for END": (
        ALL, folders(1), {1: held(UNLOADING, 1)}, {},
        [],
    ),
    "the base path moved: the version unloads, to load from the new path": (
        ModelConfig("m", MOVED), {2: folder(2, MOVED)}, {2: held(AVAILABLE, 2)}, {},
        [Unload(2, moved=True)],
    ),
    "the base path moved and the version ended: it loads from the new path": (
        ModelConfig("m", MOVED), {2: folder(2, MOVED)}, {2: held(END, 2)}, {},
        [Load(folder(2, MOVED))],
    ),
    "no folder is aspired any more (deleted): what serves unloads": (
        LATEST, {}, {1: held(AVAILABLE, 1)}, {},
        [Unload(1)],
    ),
    "a version no longer aspired whose load waits to retry is not retried": (
        LATEST, folders(1, 2), {1: held(LOADING, 1, error="x", retrying=True), 2: held(AVAILABLE, 2)}, {},
        [CancelRetry(1)],
    ),
    "a version no longer aspired that is still loading is left to finish": (
        LATEST, folders(1, 2), {1: held(LOADING, 1), 2: held(AVAILABLE, 2)}, {},
        [],
    ),
    "a policy change unloads what it leaves out, once what it keeps serves": (
        specific(1), folders(1, 2, 3), {1: held(AVAILABLE, 1), 2: held(AVAILABLE, 2), 3: held(AVAILABLE, 3)}, {},
        [Unload(2), Unload(3)],
    ),
    "a policy change to a version still to load keeps the old ones until it serves": (
        specific(1), folders(1, 2), {2: held(AVAILABLE, 2)}, {},
        [Load(folder(1))],
    ),
    "a label moved to a loading version keeps the one it served": (
        specific(2, 3, stable=3), folders(1, 2, 3),
        {1: held(AVAILABLE, 1), 2: held(AVAILABLE, 2), 3: held(LOADING, 3)}, {"stable": 1},
        [],
    ),
    "a label moved to a version about to load keeps the one it served": (
        specific(2, 3, stable=3), folders(1, 2, 3),
        {1: held(AVAILABLE, 1), 2: held(AVAILABLE, 2)}, {"stable": 1},
        [Load(folder(3))],
    ),
    "once the label's new version serves, the old one unloads": (
        specific(2, 3, stable=3), folders(1, 2, 3),
        {1: held(AVAILABLE, 1), 2: held(AVAILABLE, 2), 3: held(AVAILABLE, 3)}, {"stable": 3},
        [Unload(1)],
    ),
    "a model removed from the config: serving versions unload, retries stop": (
        None, folders(1, 2), {1: held(AVAILABLE, 1), 2: held(LOADING, 2, error="x", retrying=True)}, {},
        [Unload(1), CancelRetry(2)],
    ),
    "a model removed from the config is forgotten once all is END": (
        None, folders(1), {1: held(END, 1)}, {},
        [Forget()],
    ),
    "a model removed from the config whose retry is its last version is forgotten": (
        None, {}, {1: held(LOADING, 1, error="x", retrying=True)}, {},
        [CancelRetry(1), Forget()],
    ),
    "a model removed from the config, still loading, waits": (
        None, {}, {1: held(LOADING, 1)}, {},
        [],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_plan(case: str) -> None:
    config, ready, versions, served_labels, expected = CASES[case]
    assert plan(config, ready, versions, served_labels) == expected


# --- properties ------------------------------------------------------------------------------

NUMBERS = st.integers(1, 6)
STATES = st.sampled_from(list(State))


@st.composite
def configs(draw: st.DrawFn) -> ModelConfig | None:
    if draw(st.integers(0, 5)) == 0:
        return None
    policy = draw(
        st.one_of(
            st.builds(lambda n: VersionPolicy("latest", num_versions=n), st.integers(1, 3)),
            st.just(VersionPolicy("all")),
            st.builds(
                lambda v: VersionPolicy("specific", versions=v), st.frozensets(NUMBERS, min_size=1)
            ),
        )
    )
    labels = draw(st.dictionaries(st.sampled_from(["a", "b", "c"]), NUMBERS, max_size=3))
    base = draw(st.sampled_from([BASE, MOVED]))
    return ModelConfig("m", base, policy=policy, labels=labels)


@st.composite
def helds(draw: st.DrawFn) -> Held:
    state = draw(STATES)
    return Held(
        state,
        draw(st.sampled_from([BASE, MOVED])),
        draw(st.integers(0, 1)),
        "" if state == AVAILABLE else draw(st.sampled_from(["", "failed"])),
        retrying=state == LOADING and draw(st.booleans()),
    )


@st.composite
def worlds(draw: st.DrawFn) -> tuple:
    config = draw(configs())
    base = config.base_path if config is not None else BASE
    ready = {
        n: folder(n, base, fingerprint=draw(st.integers(0, 1)))
        for n in draw(st.sets(NUMBERS, max_size=5))
    }
    versions = {
        n: attrs.evolve(h, path=h.path / str(n))  # type: ignore[operator]
        for n, h in draw(st.dictionaries(NUMBERS, helds(), max_size=5)).items()
    }
    served_labels = draw(st.dictionaries(st.sampled_from(["a", "b", "c"]), NUMBERS, max_size=3))
    return config, ready, versions, served_labels


def aspired(config: ModelConfig | None, ready: dict) -> set[int]:
    return config.policy.select(ready) if config is not None else set()


@given(worlds())
def test_loads_are_of_aspired_versions_not_held_or_ended(world: tuple) -> None:
    """Every aspired version that is not held loads; only aspired versions load, and only when
    they are not held or are END; nothing is acted on twice."""
    config, ready, versions, served_labels = world
    actions = plan(config, ready, versions, served_labels)
    loads = {a.folder.number for a in actions if isinstance(a, Load)}
    wanted = aspired(config, ready)
    assert loads <= wanted
    assert wanted - set(versions) <= loads
    assert all(versions[n].state == END for n in loads if n in versions)
    assert all(a.folder == ready[a.folder.number] for a in actions if isinstance(a, Load))
    numbers = [number_of(a) for a in actions if not isinstance(a, Forget)]
    assert len(numbers) == len(set(numbers))


def number_of(action: Load | Unload | CancelRetry) -> int:
    return action.folder.number if isinstance(action, Load) else action.version


@given(worlds())
def test_only_available_versions_unload_and_never_leave_the_model_without_one(world: tuple) -> None:
    """An unload is always of an AVAILABLE version. One no longer aspired unloads only if the
    model left the config, nothing is aspired, or an aspired version serves from its folder."""
    config, ready, versions, served_labels = world
    actions = plan(config, ready, versions, served_labels)
    wanted = aspired(config, ready)
    serving = any(
        versions[n].state == AVAILABLE and versions[n].path == ready[n].path
        for n in wanted
        if n in versions
    )
    for action in actions:
        if isinstance(action, Unload):
            assert versions[action.version].state == AVAILABLE
            if action.moved:
                assert action.version in wanted
                assert versions[action.version].path != ready[action.version].path
            else:
                assert action.version not in wanted
                assert config is None or serving or not wanted
        if isinstance(action, CancelRetry):
            assert versions[action.version].retrying and action.version not in wanted


@given(worlds())
def test_a_label_keeps_the_version_it_served_until_its_new_one_serves(world: tuple) -> None:
    """While a label's version is not AVAILABLE (nor about to be), the version it served last is
    neither unloaded nor has its retry cancelled."""
    config, ready, versions, served_labels = world
    if config is None:
        return
    touched = {
        a.version
        for a in plan(config, ready, versions, served_labels)
        if isinstance(a, CancelRetry) or isinstance(a, Unload) and not a.moved
    }
    for label, number in config.labels.items():
        if number not in versions or versions[number].state != AVAILABLE:
            assert served_labels.get(label) not in touched


@given(worlds())
def test_forget_comes_last_and_only_for_a_model_out_of_the_config(world: tuple) -> None:
    config, ready, versions, served_labels = world
    actions = plan(config, ready, versions, served_labels)
    if Forget() in actions:
        assert config is None and actions[-1] == Forget() and actions.count(Forget()) == 1
        unfinished = [n for n, h in versions.items() if h.state != END and not h.retrying]
        assert not unfinished
    elif config is None:
        assert any(h.state != END and not h.retrying for h in versions.values())


def carry_out(actions: list, versions: dict, ready: dict) -> dict:
    """The held versions once each action has run to its end (loads succeed)."""
    after = dict(versions)
    for action in actions:
        match action:
            case Load(found):
                after[found.number] = Held(AVAILABLE, found.path, found.fingerprint)
            case Unload(number, moved=True):
                after[number] = attrs.evolve(after[number], state=END, error="")
            case Unload(number) | CancelRetry(number):
                after[number] = attrs.evolve(after[number], state=END, retrying=False)
            case Forget():
                after = {}
    return after


@given(worlds())
def test_carrying_the_plans_out_settles(world: tuple) -> None:
    """Planning again after each plan has run to its end (loads succeeding, labels following
    what serves) reaches a plan with nothing to do within five rounds; then every aspired
    version that has not failed is AVAILABLE, and a model out of the config is gone (or waits
    only for a load or unload that was under way)."""
    config, ready, versions, served_labels = world
    served_labels = dict(served_labels)
    for _ in range(5):
        actions = plan(config, ready, versions, served_labels)
        if not actions or actions == [Forget()] and not versions:
            break
        versions = carry_out(actions, versions, ready)
        for label, number in (config.labels if config is not None else {}).items():
            if number in versions and versions[number].state == AVAILABLE:
                served_labels[label] = number
    assert plan(config, ready, versions, served_labels) == (
        [Forget()] if config is None and not versions else []
    )
    if config is None:
        # nothing serves or waits to retry; what is left waits for a load or unload that was
        # under way already (it ends on its own, and the model is forgotten then)
        assert all(h.state != AVAILABLE and not h.retrying for h in versions.values())
        assert not versions or any(h.state in (LOADING, UNLOADING) for h in versions.values())
    for n in aspired(config, ready):
        h = versions[n]
        failed = h.state == END and h.error and h.fingerprint == ready[n].fingerprint
        assert h.state in (AVAILABLE, UNLOADING, LOADING) or failed, (n, h)
