"""The reconcile policy, as a pure function: given a model's config, the version folders that
may be loaded and the versions held, which loads and unloads bring what is served to what is
wanted (TF Serving's availability-preserving policy).

``plan`` reads nothing but its arguments and changes nothing: the repository takes a
snapshot (``Held.of`` each version), asks for the plan, and carries the actions out in order.
The rules:

* The config's version policy picks the *aspired* versions out of the ready folders.
* An aspired version not held is loaded; so is one held that is END, if it ended without an
  error (unloaded before) or its folder changed since its last failed load (replaced). One
  that failed its last attempt stays END with its error until its folder changes.
* An aspired version AVAILABLE from another path (the base path moved) is unloaded; once it
  is END the next plan loads it from the new path.
* A version no longer aspired is unloaded only once an aspired version of its model is
  AVAILABLE from its folder (or nothing is aspired any more, or the model left the config):
  a new version that is still loading, or failed to load, leaves the old one serving.
* A label moved to a version that is not AVAILABLE keeps the version it served before
  (``served_labels``) loaded until the label's new version is.
* A version no longer aspired whose failed load waits for its retry is not retried.
* A model that left the config is forgotten once every version of it is END.

Each action is decided on the states the plan's earlier actions leave (a loaded version is
LOADING, an unloaded one UNLOADING, a cancelled retry END), as if carried out at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import attrs

from service.model_config import ModelConfig
from service.model_folders import VersionFolder
from service.repository.versions import AVAILABLE, END, LOADING, UNLOADING, LoadedVersion, State

__all__ = ["Action", "CancelRetry", "Forget", "Held", "Load", "Unload", "plan"]


@attrs.frozen
class Held:
    """What the policy reads of a version the repository holds."""

    state: State = attrs.field(converter=State)
    path: Path | None = None
    fingerprint: int | None = None  # of the folder it was (last) loaded from
    error: str = ""
    retrying: bool = False  # a failed load waiting for its retry

    @classmethod
    def of(cls, version: LoadedVersion) -> Held:
        return cls(
            version.state,
            version.path,
            version.fingerprint,
            version.error,
            version.retry is not None,
        )


@attrs.frozen
class Load:
    """Load (or load again) the version in ``folder``."""

    folder: VersionFolder


@attrs.frozen
class Unload:
    """Unload an AVAILABLE version: no longer wanted, or (``moved``) to load it from the base
    path's new place once it is END."""

    version: int
    moved: bool = False


@attrs.frozen
class CancelRetry:
    """A version no longer wanted whose failed load waits for its retry: END, not retried."""

    version: int


@attrs.frozen
class Forget:
    """The model left the config and nothing of it is held any more: drop it."""


Action = Load | Unload | CancelRetry | Forget


def plan(
    config: ModelConfig | None,
    folders: Mapping[int, VersionFolder],
    held: Mapping[int, Held],
    served_labels: Mapping[str, int] = {},  # noqa: B006 (read only)
) -> list[Action]:
    """The actions, in order, that move the versions ``held`` of one model towards what
    ``config`` wants of ``folders`` (the ready version folders; ignored once ``config`` is
    None: the model left the config). ``served_labels``: label -> the version it last served."""
    if config is None:
        folders = {}
    aspired = config.policy.select(folders) if config is not None else set()
    states = {number: version.state for number, version in held.items()}
    actions: list[Action] = []

    for number in sorted(aspired, reverse=True):
        folder, current = folders[number], held.get(number)
        if current is None:
            actions.append(Load(folder))
            states[number] = LOADING
        elif current.path != folder.path and current.state == AVAILABLE:
            actions.append(Unload(number, moved=True))  # the base path moved
            states[number] = UNLOADING
        elif current.state == END and (
            not current.error or current.fingerprint != folder.fingerprint
        ):
            actions.append(Load(folder))  # unloaded before, or failed and then replaced
            states[number] = LOADING

    serving = any(
        states[n] == AVAILABLE and held[n].path == folders[n].path for n in aspired if n in held
    )
    pinned = set()
    if config is not None:
        for label, number in config.labels.items():
            if states.get(number) != AVAILABLE:
                pinned.add(served_labels.get(label))

    for number, version in held.items():
        if number in aspired or number in pinned:
            continue
        if version.retrying:
            actions.append(CancelRetry(number))
            states[number] = END
        elif version.state == AVAILABLE and (config is None or serving or not aspired):
            actions.append(Unload(number))
            states[number] = UNLOADING

    if config is None and all(state == END for state in states.values()):
        actions.append(Forget())
    return actions
