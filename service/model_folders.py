"""What is on disk under a model's base path: version folders, and whether each is whole.

TF Serving's layout is ``base_path/<number>/`` per version. A folder that is
still being copied in (``cp -r export/3 /models/digits/3``) must not be loaded
half-written, so a scan records a fingerprint of every file in each version
folder (path, size, modification time) and a folder counts as *ready* when:

* it looks complete (``service.servables.registry.folder_complete``): ``saved_model.pb``
  (or ``.pbtxt``) with, if it has a ``variables/`` folder, the ``variables.index`` that
  ``tf.saved_model.save`` writes; or a TF1 frozen graph file; and
* its fingerprint has not changed since the previous scan (a copy in progress
  changes sizes and times between two scans), except at the very first scan of
  a model, when folders are taken as they are: the server is starting, not
  watching a copy.

Copying to a hidden or non-numeric name and renaming it into place (``mv``) is
the atomic way to publish a version; it still waits for one stable scan.

A numeric entry that is not a readable folder (a broken symlink, a file, a folder
the server may not read) is a *fault* of that version only: the scan goes on with
the others, so one bad entry never keeps a good version from loading, and the
fault (a ``ServingError`` with TF Serving's error code) is reported for the
repository to show in the version's status. A base path that is not a readable
folder fails the whole scan with a ``ServingError`` saying which it is.
Blocking (file system): runs on the repository's scan thread.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection
from pathlib import Path

import attrs

from service.errors import FailedPrecondition, NotFound, PermissionDenied, ServingError
from service.servables.registry import folder_complete


@attrs.frozen
class VersionFolder:
    """One numeric folder under a base path, as seen by one scan."""

    number: int
    path: Path
    fingerprint: int  # hash of (relative path, size, mtime) of every file inside
    complete: bool  # the files a loader needs are all there


@attrs.frozen
class ModelScan:
    """One scan of a base path: the version folders read, and the numeric entries that could
    not be read as version folders, each with why."""

    folders: dict[int, VersionFolder]
    faults: dict[int, ServingError] = attrs.Factory(dict)


def read_version_folder(path: Path) -> VersionFolder:
    """The version folder at ``path``.

    Raises a ServingError if the entry is not a folder (a broken symlink, a file), an
    OSError if it cannot be read, and FileNotFoundError if it vanished since it was listed.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise NotFound(
                f"version folder {path} is a broken symlink (to {_link_target(path)}, "
                "which does not exist)"
            ) from None
        raise
    if not stat.S_ISDIR(st.st_mode):
        raise FailedPrecondition(f"version folder {path} is not a folder")
    return VersionFolder(int(path.name), path, _fingerprint(path), folder_complete(path))


def scan_model(
    base_path: Path, read_folder: Callable[[Path], VersionFolder] = read_version_folder
) -> ModelScan:
    """Every numeric entry under ``base_path``: read as a version folder, or its fault.

    ``read_folder`` reads one entry (tests pass one that fails as a file system would).
    Raises a ServingError if ``base_path`` itself is not a readable folder.
    """
    names = _numeric_entries(base_path)
    folders, faults = {}, {}
    for name in names:
        path = base_path / name
        try:
            folders[int(name)] = read_folder(path)
        except FileNotFoundError:
            continue  # removed between listing and reading: it is simply not there
        except ServingError as e:
            faults[int(name)] = e
        except OSError as e:
            faults[int(name)] = os_fault(e, f"version folder {path}")
    return ModelScan(folders, faults)


def os_fault(error: OSError, what: str) -> ServingError:
    """A file system error while reading ``what``, with TF Serving's error code for it."""
    message = f"{what} cannot be read: {error}"
    if isinstance(error, PermissionError):
        return PermissionDenied(message)
    if isinstance(error, FileNotFoundError | NotADirectoryError):
        return NotFound(message)
    return ServingError(message)


def _numeric_entries(base_path: Path) -> list[str]:
    try:
        st = os.stat(base_path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(base_path):
            raise NotFound(
                f"model base path {base_path} does not exist (a broken symlink to "
                f"{_link_target(base_path)})"
            ) from None
        raise NotFound(f"model base path {base_path} does not exist") from None
    except OSError as e:
        raise os_fault(e, f"model base path {base_path}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FailedPrecondition(f"model base path {base_path} is not a folder")
    try:
        with os.scandir(base_path) as entries:
            # ASCII only: str.isdigit() also accepts digits int() does not take, such as "²".
            return sorted(e.name for e in entries if e.name.isascii() and e.name.isdigit())
    except OSError as e:
        raise os_fault(e, f"model base path {base_path}") from None


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:  # replaced since: the message still says it was a broken symlink
        return "?"


def ready_versions(
    now: dict[int, VersionFolder],
    before: dict[int, VersionFolder] | None,
    ready_before: dict[int, VersionFolder],
    unreadable: Collection[int] = (),
) -> dict[int, VersionFolder]:
    """The folders that may be loaded, given this scan, the previous one (None: this is the
    first), what was ready after the previous one, and the versions this scan could not read.

    A complete folder unchanged since the previous scan is ready (with its current
    fingerprint). A folder that was ready stays ready with its old fingerprint while it
    changes, so a version that serves is not unloaded because its files were touched, and a
    version that failed to load is retried only once its replacement has settled. It also
    stays ready while it cannot be read: a read error (a network file system hiccup, a
    permission changed by mistake) must not unload what serves; a folder that is gone does.
    """
    ready = {}
    for number, folder in now.items():
        stable = before is None or (
            number in before and before[number].fingerprint == folder.fingerprint
        )
        if stable and folder.complete:
            ready[number] = folder
        elif number in ready_before:
            ready[number] = ready_before[number]
    for number in unreadable:
        if number in ready_before and number not in now:
            ready[number] = ready_before[number]
    return ready


def _fingerprint(path: Path) -> int:
    entries = []
    for root, dirs, files in os.walk(path, onerror=_walk_error):
        dirs.sort()
        for name in sorted(files):
            file = os.path.join(root, name)
            try:
                st = os.stat(file)
                entries.append((os.path.relpath(file, path), st.st_size, st.st_mtime_ns))
            except FileNotFoundError:  # removed while we walked: the folder is changing
                entries.append((os.path.relpath(file, path), -1, -1))
    return hash(tuple(entries))


def _walk_error(error: OSError) -> None:
    """os.walk skips what it cannot list; a folder we cannot read is a fault, not empty."""
    if not isinstance(error, FileNotFoundError):  # removed while we walked: it is changing
        raise error
