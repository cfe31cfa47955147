"""Model-store faults, driven synchronously: a version folder that is gone, a version entry that
cannot be read, a base path that cannot be scanned. Each shows in the status and is logged once.

Folders are real (``tmp_path``) and so are two kinds of unreadable entry: a broken symlink and a
file where a version folder is expected. Permission denied cannot be real here (the tests run as
root, whom ``chmod 000`` does not stop), so ``Denied`` stands in for it: the scanner's folder
reader raising the PermissionError that reading such a folder raises. The repository runs as in
``tests/test_repository.py`` (inline scans, ``ManualThreads``, a ``task.Clock``).
"""

from __future__ import annotations

import errno
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.logger import LogLevel

from service.errors import FailedPrecondition, NotFound, ServingError
from service.model_folders import VersionFolder, read_version_folder, scan_model
from service.repository import AVAILABLE, END, LOADING
from tests.test_repository import Harness, model, start, version_folder


@attrs.define
class Denied:
    """The scanner's folder reader, except that the versions in ``numbers`` raise the
    PermissionError an unreadable folder raises."""

    numbers: set[int] = attrs.Factory(set)

    def __call__(self, path: Path) -> VersionFolder:
        if int(path.name) in self.numbers:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_version_folder(path)


def start_denying(base: Path, denied: Denied, **kw: Any) -> Harness:
    return start([model(base, **kw)], scan_folders=partial(scan_model, read_folder=denied))


def status_of(h: Harness, version: int) -> tuple[str, str, str]:
    """(state, error_code, error_message) of one version in GET /v1/models/m."""
    (entry,) = [s for s in h.repository.status("m") if s["version"] == str(version)]
    return entry["state"], entry["status"]["error_code"], entry["status"]["error_message"]


def count(logs: Any, level: LogLevel, text: str) -> int:
    return len([m for m in logs.messages(level, "service") if text in m])


def polls(h: Harness, n: int = 5) -> None:
    for _ in range(n):
        h.scan()


# --- the scanner ----------------------------------------------------------------------------


def test_scan_reports_entries_that_are_not_readable_folders_and_reads_the_others(
    tmp_path: Path,
) -> None:
    """A broken symlink, a file and a folder that cannot be read are faults of their own versions
    (NOT_FOUND, FAILED_PRECONDITION, PERMISSION_DENIED, each naming its path); the valid folder
    beside them is read."""
    os.symlink(tmp_path / "missing", tmp_path / "1")
    (tmp_path / "2").write_bytes(b"not a folder")
    version_folder(tmp_path, 3)
    version_folder(tmp_path, 4)
    scan = scan_model(tmp_path, read_folder=Denied({4}))
    assert list(scan.folders) == [3] and scan.folders[3].complete
    faults = {n: (f.code, f.message) for n, f in scan.faults.items()}
    assert faults == {
        1: (
            "NOT_FOUND",
            f"version folder {tmp_path / '1'} is a broken symlink (to {tmp_path / 'missing'}, "
            "which does not exist)",
        ),
        2: ("FAILED_PRECONDITION", f"version folder {tmp_path / '2'} is not a folder"),
        4: (
            "PERMISSION_DENIED",
            f"version folder {tmp_path / '4'} cannot be read: [Errno 13] Permission denied: "
            f"'{tmp_path / '4'}'",
        ),
    }


def test_scan_of_a_base_path_that_is_not_a_folder_says_which_it_is(tmp_path: Path) -> None:
    """A missing base path is NOT_FOUND "does not exist" (a broken symlink says so), a file is
    FAILED_PRECONDITION "is not a folder"."""
    with pytest.raises(NotFound, match=f"^model base path {tmp_path / 'm'} does not exist$"):
        scan_model(tmp_path / "m")
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(NotFound, match="does not exist \\(a broken symlink to .*gone\\)$"):
        scan_model(tmp_path / "link")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(FailedPrecondition, match=f"^model base path {tmp_path / 'file'} is not"):
        scan_model(tmp_path / "file")


# --- a version folder that is gone ----------------------------------------------------------


def test_deleting_the_only_version_folder_ends_it_saying_the_folder_is_gone(
    tmp_path: Path, logs
) -> None:
    """The version is unloaded and its status is END with NOT_FOUND naming the gone folder;
    that is logged once across polls, and once more when the same folder is moved back and
    loads again."""
    base = tmp_path / "m"
    version_folder(base, 1)
    h = start([model(base)])
    os.rename(base / "1", tmp_path / "1")  # as `mv`: moved back below with the same files
    polls(h)
    assert h.state() == {1: END}
    assert status_of(h, 1) == (
        END,
        "NOT_FOUND",
        f"version folder {base / '1'} is gone from the model base path {base}",
    )
    assert count(logs, LogLevel.warn, "is gone from the model base path") == 1
    os.rename(tmp_path / "1", base / "1")
    polls(h)
    assert h.state() == {1: AVAILABLE}
    assert status_of(h, 1) == (AVAILABLE, "OK", "")
    assert count(logs, LogLevel.info, f"{base / '1'} is back") == 1
    assert count(logs, LogLevel.warn, "is gone from the model base path") == 1


def test_deleting_the_served_version_falls_back_to_the_older_and_says_why(tmp_path: Path) -> None:
    """With 1 and 2 on disk, deleting 2 loads 1; 2 serves until 1 is AVAILABLE and then ends
    with the reason."""
    version_folder(tmp_path, 1)
    version_folder(tmp_path, 2)
    h = start([model(tmp_path)])
    shutil.rmtree(tmp_path / "2")
    h.clock.advance(1)
    assert h.state() == {1: LOADING, 2: AVAILABLE}
    assert status_of(h, 2) == (AVAILABLE, "OK", "")
    h.board.work()
    assert h.state() == {1: AVAILABLE, 2: END}
    assert status_of(h, 2)[1:] == (
        "NOT_FOUND",
        f"version folder {tmp_path / '2'} is gone from the model base path {tmp_path}",
    )
    assert h.predict() == 1.0


def test_a_version_replaced_by_a_newer_one_ends_ok_even_once_its_folder_is_deleted(
    tmp_path: Path, logs
) -> None:
    """Only a version unloaded *because* its folder went carries that error: one replaced by a
    newer version is END/OK, and cleaning up its folder afterwards is not a fault."""
    version_folder(tmp_path, 1)
    h = start([model(tmp_path)])
    version_folder(tmp_path, 2)
    polls(h, 2)
    shutil.rmtree(tmp_path / "1")
    polls(h)
    assert h.state() == {1: END, 2: AVAILABLE}
    assert status_of(h, 1) == (END, "OK", "")
    assert count(logs, LogLevel.warn, "is gone") == 0


def test_a_failed_version_waiting_to_retry_whose_folder_goes_says_it_is_gone(
    tmp_path: Path,
) -> None:
    """A version whose load failed and waits for its retry ends with NOT_FOUND once its folder
    is deleted, instead of still announcing a retry."""
    version_folder(tmp_path, 1)
    h = start([model(tmp_path)])
    h.board.failing.add(("m", 2))
    version_folder(tmp_path, 2)
    polls(h, 2)
    state, _, message = status_of(h, 2)
    assert state == LOADING and "retrying in" in message
    shutil.rmtree(tmp_path / "2")
    h.scan()
    assert h.state() == {1: AVAILABLE, 2: END}
    assert status_of(h, 2)[1:] == (
        "NOT_FOUND",
        f"version folder {tmp_path / '2'} is gone from the model base path {tmp_path}",
    )


# --- a version entry that cannot be read ----------------------------------------------------


def test_an_unreadable_version_folder_does_not_stop_the_others(tmp_path: Path, logs) -> None:
    """With 1 and 3 unreadable (Denied) beside a valid 2, version 2 loads and serves; the status
    lists 1 and 3 as END with PERMISSION_DENIED naming their folders; each is logged once
    across polls, and once when it clears."""
    for n in (1, 2, 3):
        version_folder(tmp_path, n)
    denied = Denied({1, 3})
    h = start_denying(tmp_path, denied)
    polls(h)
    assert h.state() == {2: AVAILABLE} and h.predict() == 2.0
    assert [s["version"] for s in h.repository.status("m")] == ["3", "2", "1"]
    for n in (1, 3):
        state, code, message = status_of(h, n)
        assert (state, code) == (END, "PERMISSION_DENIED")
        assert message.startswith(f"version folder {tmp_path / str(n)} cannot be read: ")
        assert "Permission denied" in message
        assert count(logs, LogLevel.error, f"model m version {n}: version folder") == 1
    with pytest.raises(NotFound, match="has no version 3 \\(version folder .* cannot be read"):
        h.repository.lookup("m", version=3)
    denied.numbers.clear()
    polls(h)
    assert h.state() == {2: END, 3: AVAILABLE}  # 3 is readable now, and the highest
    assert [s["version"] for s in h.repository.status("m")] == ["3", "2"]
    for n in (1, 3):
        assert count(logs, LogLevel.info, f"{tmp_path / str(n)} is readable again") == 1
        assert count(logs, LogLevel.error, f"model m version {n}: version folder") == 1


def test_a_broken_symlink_and_a_file_beside_a_valid_version(tmp_path: Path, logs) -> None:
    """Real faults: 1 a broken symlink and 3 a file, beside a valid 2: version 2 serves, the
    status names 1 and 3 with their errors; replacing the file by a valid folder loads 3."""
    os.symlink(tmp_path / "nowhere", tmp_path / "1")
    version_folder(tmp_path, 2)
    (tmp_path / "3").write_bytes(b"a file")
    h = start([model(tmp_path)])
    polls(h)
    assert h.state() == {2: AVAILABLE} and h.predict() == 2.0
    assert status_of(h, 1)[:2] == (END, "NOT_FOUND") and "broken symlink" in status_of(h, 1)[2]
    assert status_of(h, 3) == (
        END,
        "FAILED_PRECONDITION",
        f"version folder {tmp_path / '3'} is not a folder",
    )
    (tmp_path / "3").unlink()
    version_folder(tmp_path, 3)
    polls(h)
    assert h.state() == {2: END, 3: AVAILABLE}
    assert count(logs, LogLevel.error, "is not a folder") == 1
    assert count(logs, LogLevel.info, f"{tmp_path / '3'} is readable again") == 1
    assert count(logs, LogLevel.error, "broken symlink") == 1


def test_a_served_version_whose_folder_becomes_unreadable_keeps_serving(tmp_path: Path) -> None:
    """A read error on the folder of the version that serves does not unload it (as for a base
    path); its status shows the error until the folder can be read again."""
    version_folder(tmp_path, 1)
    denied = Denied()
    h = start_denying(tmp_path, denied)
    denied.numbers.add(1)
    polls(h)
    assert h.state() == {1: AVAILABLE} and h.predict() == 1.0
    assert status_of(h, 1)[:2] == (AVAILABLE, "PERMISSION_DENIED")
    denied.numbers.clear()
    polls(h)
    assert status_of(h, 1) == (AVAILABLE, "OK", "")


# --- a base path that cannot be scanned -----------------------------------------------------


def test_a_base_path_that_is_missing_or_a_file_is_a_404_saying_so(tmp_path: Path, logs) -> None:
    """With no version loaded, the status is a 404 whose message says what is wrong with the
    base path (missing, a file, empty); each logged once across polls, and the clearing once."""
    base = tmp_path / "m"
    h = start([model(base)])
    polls(h)

    def error() -> ServingError:
        with pytest.raises(NotFound) as caught:
            h.repository.status("m")
        return caught.value

    assert (
        str(error())
        == f"Could not find any versions of model m: model base path {base} does not exist"
    )
    assert count(logs, LogLevel.error, "does not exist") == 1
    base.write_bytes(b"a file")
    polls(h)
    assert str(error()).endswith(f"model base path {base} is not a folder")
    assert count(logs, LogLevel.error, "is not a folder") == 1
    base.unlink()
    base.mkdir()
    polls(h)
    assert str(error()).endswith(f"{base} has no numeric version folder")
    assert count(logs, LogLevel.info, f"model m: {base} can be scanned again") == 1
    version_folder(base, 1)
    polls(h)
    assert h.state() == {1: AVAILABLE}


def test_a_base_path_removed_while_serving_is_the_error_of_each_version(
    tmp_path: Path, logs
) -> None:
    """The loaded version keeps serving and its status carries NOT_FOUND "does not exist" until
    the base path is back; logged once when it goes and once when it is back."""
    base = tmp_path / "m"
    version_folder(base, 1)
    h = start([model(base)])
    os.rename(base, tmp_path / "moved")
    polls(h)
    assert status_of(h, 1) == (
        AVAILABLE,
        "NOT_FOUND",
        f"model base path {base} does not exist",
    )
    assert h.predict() == 1.0
    os.rename(tmp_path / "moved", base)
    polls(h)
    assert status_of(h, 1) == (AVAILABLE, "OK", "")
    assert count(logs, LogLevel.error, "does not exist") == 1
    assert count(logs, LogLevel.info, "can be scanned again") == 1
