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
Blocking (file system): runs on the repository's scan thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from service.errors import NotFound
from service.servables.registry import folder_complete


@attrs.frozen
class VersionFolder:
    """One numeric folder under a base path, as seen by one scan."""

    number: int
    path: Path
    fingerprint: int  # hash of (relative path, size, mtime) of every file inside
    complete: bool  # the files a loader needs are all there


def scan_model(base_path: Path) -> dict[int, VersionFolder]:
    """Every numeric version folder under ``base_path`` (NotFound if it is not a folder)."""
    if not base_path.is_dir():
        raise NotFound(f"model base path {base_path} does not exist")
    found = {}
    for entry in os.scandir(base_path):
        if entry.name.isdigit() and entry.is_dir():
            path = Path(entry.path)
            found[int(entry.name)] = VersionFolder(
                int(entry.name), path, _fingerprint(path), folder_complete(path)
            )
    return found


def ready_versions(
    now: dict[int, VersionFolder],
    before: dict[int, VersionFolder] | None,
    ready_before: dict[int, VersionFolder],
) -> dict[int, VersionFolder]:
    """The folders that may be loaded, given this scan, the previous one (None: this is the
    first) and what was ready after the previous one.

    A complete folder unchanged since the previous scan is ready (with its current
    fingerprint). A folder that was ready stays ready with its old fingerprint while it
    changes, so a version that serves is not unloaded because its files were touched, and a
    version that failed to load is retried only once its replacement has settled.
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
    return ready


def _fingerprint(path: Path) -> int:
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            file = os.path.join(root, name)
            try:
                st = os.stat(file)
                entries.append((os.path.relpath(file, path), st.st_size, st.st_mtime_ns))
            except FileNotFoundError:  # removed while we walked: the folder is changing
                entries.append((os.path.relpath(file, path), -1, -1))
    return hash(tuple(entries))
