"""What the scans of the model store found, per model, and the faults they showed.

Faults show in the status and are logged once when they appear and once when they clear,
never every poll:

* a version unloaded because its folder is gone from the base path is END with a NOT_FOUND
  error naming the folder (``note_gone``); the folder back, the error clears;
* a numeric entry that is not a readable version folder (a broken symlink, a file, permission
  denied) is listed with its error (END if nothing was loaded from it; a version loaded from
  it before keeps serving), and the scan goes on with the others;
* a base path that cannot be scanned (missing, a file, unreadable) is the error of every
  version without one of its own, and of a 404 when the model has no version. The folders
  found before stay ready: an unreadable base path (a network file system hiccup) must not
  unload what serves.

Reactor thread only; the scans themselves run on the repository's scan thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import attrs
from twisted.logger import Logger

from service.errors import NotFound, ServingError
from service.model_config import ModelConfig
from service.model_folders import ModelScan, VersionFolder, ready_versions
from service.repository.versions import LoadedVersion

__all__ = ["ModelStore"]

log = Logger(namespace="service.repository")


@attrs.define
class ModelStore:
    """Per model (by name): its last scan, the folders that may be loaded, and its faults."""

    scans: dict[str, dict[int, VersionFolder]] = attrs.Factory(dict)  # the last scan
    ready: dict[str, dict[int, VersionFolder]] = attrs.Factory(dict)  # folders that may be loaded
    scan_errors: dict[str, ServingError] = attrs.Factory(dict)  # base paths it could not read
    faults: dict[str, dict[int, ServingError]] = attrs.Factory(dict)  # unreadable version entries
    gone: dict[str, set[int]] = attrs.Factory(dict)  # versions unloaded because their folder went

    def scan_failed(self, name: str, error: ServingError) -> None:
        """The base path of ``name`` could not be scanned: its error, logged once."""
        old = self.scan_errors.get(name)
        if old is None or old.message != error.message:  # log a lasting problem once
            log.error("model {name}: {error}", name=name, error=error.message)
        self.scan_errors[name] = error

    def scanned(
        self, name: str, base_path: Path, scan: ModelScan, versions: Mapping[int, LoadedVersion]
    ) -> None:
        """Take a scan of ``name``'s base path: its faults, the folders back, the ready ones."""
        old = self.scan_errors.pop(name, None)
        if old is not None:
            log.info(
                "model {name}: {path} can be scanned again (it was: {error})",
                name=name,
                path=base_path,
                error=old.message,
            )
        found = scan.folders
        if not found and not scan.faults and name not in self.scans:
            log.error(
                "model {name}: no numeric version folder in {path}", name=name, path=base_path
            )
        self._note_faults(name, base_path, scan)
        self._note_returned(name, found, versions)
        ready = ready_versions(
            found, self.scans.get(name), self.ready.get(name, {}), unreadable=scan.faults
        )
        self.scans[name] = found
        self.ready[name] = ready

    def _note_faults(self, name: str, base_path: Path, scan: ModelScan) -> None:
        """Log each unreadable version entry once when it appears, and once when it clears."""
        before = self.faults.get(name, {})
        for number, fault in sorted(scan.faults.items()):
            if number not in before or before[number].message != fault.message:
                log.error(
                    "model {name} version {v}: {error} (the other versions are scanned as usual)",
                    name=name,
                    v=number,
                    error=fault.message,
                )
        for number in sorted(set(before) - set(scan.faults)):
            now = "is readable again" if number in scan.folders else "was removed"
            log.info(
                "model {name} version {v}: {path} {now} (it was: {error})",
                name=name,
                v=number,
                path=base_path / str(number),
                now=now,
                error=before[number].message,
            )
        self.faults[name] = dict(scan.faults)

    def _note_returned(
        self, name: str, found: dict[int, VersionFolder], versions: Mapping[int, LoadedVersion]
    ) -> None:
        """A version folder that had gone is back: log it once, and clear its NOT_FOUND error
        (so that, like any version unloaded before, it loads again if the policy wants it)."""
        gone = self.gone.get(name, set())
        for number in sorted(gone & set(found)):
            gone.discard(number)
            log.info(
                "model {name} version {v}: {path} is back",
                name=name,
                v=number,
                path=found[number].path,
            )
            version = versions.get(number)
            if version is not None and version.error_code == NotFound.code:
                version.error, version.error_code = "", "UNKNOWN"

    def note_gone(self, config: ModelConfig | None, version: LoadedVersion, doing: str) -> None:
        """If ``version`` is no longer wanted because its folder is gone from its model's last
        scan (not left out by the policy, not merely unreadable), say so in its status and log
        it once."""
        name, number = version.name, version.version
        found = self.scans.get(name)
        if (
            config is None
            or found is None
            or number in found
            or number in self.faults.get(name, {})
        ):
            return
        folder = config.base_path / str(number)
        version.error = (
            f"version folder {folder} is gone from the model base path {config.base_path}"
        )
        version.error_code = NotFound.code
        self.gone.setdefault(name, set()).add(number)
        log.warn(
            "model {name} version {v}: {error}; {doing}",
            name=name,
            v=number,
            error=version.error,
            doing=doing,
        )

    def forget(self, name: str) -> None:
        """Drop all that is known of ``name``'s store (removed, or its base path changed)."""
        self.scans.pop(name, None)
        self.ready.pop(name, None)
        self.scan_errors.pop(name, None)
        self.faults.pop(name, None)
        self.gone.pop(name, None)

    def problem(self, config: ModelConfig | None, name: str) -> str | None:
        """Why a model has no version at all, if its store says why."""
        if name in self.scan_errors:
            return self.scan_errors[name].message
        if config is None or name not in self.scans:
            return None  # not scanned yet
        if not self.scans[name]:
            return f"{config.base_path} has no numeric version folder"
        return f"no version folder in {config.base_path} is complete and settled yet"

    def no_version(self, name: str, version: int) -> NotFound:
        """The 404 of a version that is not held, saying what the store knows of it."""
        why = f"model {name!r} has no version {version}"
        fault = self.faults.get(name, {}).get(version)
        if fault is not None:
            why += f" ({fault.message})"
        elif name in self.scan_errors:
            why += f" ({self.scan_errors[name].message})"
        return NotFound(f"Servable not found for request: Specific({name}, {version}): {why}")
