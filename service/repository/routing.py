"""Routing: the version a request names (a number, a label, or the highest AVAILABLE), the
errors that say why there is none, and TF Serving's version status.

Reactor thread only. ``Routes`` reads the repository's state and never changes it; a request
takes ``lease()`` on what ``lookup`` returns before its first await.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from service.model_config import ModelConfig
from service.repository.store import ModelStore
from service.repository.versions import AVAILABLE, END, LOADING, LoadedVersion, version_status

__all__ = ["Routes"]


@attrs.frozen
class Routes:
    """Lookups and status over the repository's models (live views, not copies)."""

    configs: Mapping[str, ModelConfig]
    versions: Mapping[str, Mapping[int, LoadedVersion]]
    store: ModelStore
    served_labels: Mapping[str, Mapping[str, int]]  # model -> label -> version it last served

    def lookup(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> LoadedVersion:
        """The version a request names: a number, a label, or (neither) the highest AVAILABLE.

        Only AVAILABLE versions are returned; take ``lease()`` on the result before any await.
        """
        versions = self.versions.get(name)
        config = self.configs.get(name)
        if versions is None or config is None:
            raise NotFound(
                f"Servable not found for request: Latest({name}): no model named {name!r}"
            )
        if label is not None:
            return self._by_label(config, versions, label)
        if version is not None:
            found = versions.get(version)
            if found is None:
                raise self.store.no_version(name, version)
            found.require()
            if found.state != AVAILABLE:
                raise Unavailable(
                    f"model {name!r} version {version} is {found.state}, not AVAILABLE",
                    retry_after=1,
                )
            return found
        available = [v for v in versions.values() if v.state == AVAILABLE]
        if not available:
            states = ", ".join(f"{v.version}: {v.state}" for v in versions.values())
            problem = self.store.problem(config, name)
            raise Unavailable(
                f"model {name!r} has no AVAILABLE version ({states or problem or 'none found yet'})",
                retry_after=1,
            )
        return max(available, key=lambda v: v.version)

    def _by_label(
        self, config: ModelConfig, versions: Mapping[int, LoadedVersion], label: str
    ) -> LoadedVersion:
        if label not in config.labels:
            known = ", ".join(sorted(config.labels)) or "none"
            raise InvalidArgument(
                f"Unrecognized servable version label: {label} "
                f"(model {config.name!r} has labels: {known})"
            )
        number = config.labels[label]
        wanted = versions.get(number)
        if wanted is not None and wanted.state == AVAILABLE:
            return wanted
        # Moving a label to a version that is still loading keeps it on the one it served.
        previous = versions.get(self.served_labels.get(config.name, {}).get(label, -1))
        if previous is not None and previous.state == AVAILABLE:
            return previous
        if wanted is not None and wanted.state == LOADING:
            raise Unavailable(
                f"label {label!r} of model {config.name!r} points at version {number}, which is "
                f"still LOADING{': ' + wanted.error if wanted.error else ''}",
                retry_after=1,
            )
        if wanted is None:
            why = f"{config.base_path / str(number)} is not a complete version folder"
            if number in self.store.ready.get(config.name, {}):
                why = f"the version policy ({config.policy.describe()}) does not serve it"
        else:
            why = f"it is {wanted.state}" + (f": {wanted.error}" if wanted.error else "")
        raise FailedPrecondition(
            f"label {label!r} of model {config.name!r} points at version {number}, which is not "
            f"loaded ({why}); a label may only point at a loaded version"
        )

    def status(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> list[dict[str, Any]]:
        """TF Serving's model_version_status, highest version first, with the model store's
        faults: an unreadable version entry is listed (END unless loaded before), and a base
        path that cannot be scanned is the error of each version without one of its own."""
        if label is not None:
            version = self.lookup(name, label=label).version
        entries = self._status_entries(name)
        if version is not None:
            if version not in entries:
                raise self.store.no_version(name, version)
            return [entries[version]]
        if name not in self.versions:
            raise NotFound(f"Could not find any versions of model {name}")
        if not entries:
            problem = self.store.problem(self.configs.get(name), name)
            raise NotFound(
                f"Could not find any versions of model {name}" + (f": {problem}" if problem else "")
            )
        return [entries[number] for number in sorted(entries, reverse=True)]

    def _status_entries(self, name: str) -> dict[int, dict[str, Any]]:
        faults = self.store.faults.get(name, {})
        scan_error = self.store.scan_errors.get(name)
        entries = {}
        for number, v in self.versions.get(name, {}).items():
            entries[number] = v.status(faults.get(number) or (None if v.error else scan_error))
        for number, fault in faults.items():
            if number not in entries:
                entries[number] = version_status(number, END, fault.code, fault.message)
        return entries
