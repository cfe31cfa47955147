"""Model-store faults in a real ``twistd -n inference`` scanning every 0.2 s: a version folder
moved away, an unreadable version entry beside a valid one, a base path removed. Each shows in
``GET /v1/models/m`` and is logged once, however many scans see it.

Permission denied cannot be made real here (the tests run as root, whom ``chmod 000`` does not
stop), so the unreadable entries are the two that are real for root: a broken symlink where a
version folder should be, and a file. "Several scans passed" is shown, not timed: ``scans_pass``
makes a stray file ``99`` appear and go in a base path and waits for the server to log each,
which takes at least one scan each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from harness.twistd import TwistdServer
from harness.twistd import poll as poll_until
from tests import models
from tests.test_lifecycle_integration import (
    linear_y,
    log_lines,
    model_entry,
    predict,
    version_status,
    write_config,
)

pytestmark = pytest.mark.integration

STARTUP = 180.0  # three TensorFlow processes starting at once on a busy 2-core machine
poll = partial(poll_until, timeout=60.0)
POLL_WAIT = "--file_system_poll_wait_seconds=0.2"
V1, V2 = linear_y(1), linear_y(2)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models: gone/1, faulty/2 beside a broken symlink faulty/1, base/1 and probe/1."""
    root = tmp_path_factory.mktemp("store")
    models.make_linear(root / "gone", version=1, scale=1)
    models.make_linear(root / "faulty", version=2, scale=2)
    os.symlink(root / "nowhere", root / "faulty" / "1")
    models.make_linear(root / "base", version=1, scale=1)
    models.make_linear(root / "probe", version=1, scale=1)
    return root


@pytest.fixture(scope="module")
def servers(
    root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, TwistdServer]]:
    """One server per test, all started at once; each test waits for its own to be ready."""
    logs = tmp_path_factory.mktemp("logs")
    # The base path of m goes away in its test; probe stays, for scans_pass.
    write_config(
        root / "base.conf", model_entry("m", root / "base"), model_entry("probe", root / "probe")
    )
    args = {
        "gone": ["--model_name=m", f"--model_base_path={root / 'gone'}", POLL_WAIT],
        "faulty": ["--model_name=m", f"--model_base_path={root / 'faulty'}", POLL_WAIT],
        "base": [f"--model_config_file={root / 'base.conf'}", POLL_WAIT],
    }
    started = {name: TwistdServer(a, logs).start() for name, a in args.items()}
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


def scans_pass(server: TwistdServer, base: Path, rounds: int = 3) -> None:
    """Return once at least 2 × ``rounds`` more scans of ``base`` have run: each round a file
    ``99`` appears in it and goes again, and the server logs each (a scan each)."""
    marker = base / "99"
    for _ in range(rounds):
        after(server, "#error]", f"{marker} is not a folder", partial(marker.write_bytes, b""))
        after(server, "#info]", f"{marker} was removed", marker.unlink)


def after(server: TwistdServer, level: str, text: str, change: Callable[[], object]) -> None:
    """Make ``change`` and wait for the one log line of ``level`` with ``text`` it causes."""
    before = len(log_lines(server, level, text))
    change()
    now = poll(lambda: len(log_lines(server, level, text)), lambda n: n > before)
    assert now == before + 1, server.log()


def test_moving_away_the_only_version_ends_it_with_the_reason(
    servers: dict[str, TwistdServer], root: Path
) -> None:
    """The version goes END with NOT_FOUND naming the gone folder, logged once across scans;
    moved back, it serves again and that is logged once."""
    server = servers["gone"].wait_ready(STARTUP)
    base = root / "gone"
    assert predict(server, "m") == (200, {"predictions": V1})
    os.rename(base / "1", root / "gone-1")
    ended = poll(lambda: version_status(server, "m", 1), lambda s: s.get("state") == "END")
    assert ended == {
        "version": "1",
        "state": "END",
        "status": {
            "error_code": "NOT_FOUND",
            "error_message": f"version folder {base / '1'} is gone from the model base path {base}",
        },
    }, server.log()
    assert predict(server, "m")[0] == 503
    scans_pass(server, base)
    os.rename(root / "gone-1", base / "1")
    assert poll(lambda: predict(server, "m"), lambda r: r[0] == 200) == (200, {"predictions": V1})
    assert version_status(server, "m", 1)["status"] == {"error_code": "OK", "error_message": ""}
    assert len(log_lines(server, "#warn]", f"{base / '1'} is gone from the model base")) == 1
    assert len(log_lines(server, "#info]", f"model m version 1: {base / '1'} is back")) == 1


def test_an_unreadable_version_entry_beside_a_newer_valid_one(
    servers: dict[str, TwistdServer], root: Path
) -> None:
    """With 1 a broken symlink, 2 serves and the status names 1 with its error; a file 3 that
    appears later is listed too, 2 keeps serving, and each is logged once across scans."""
    server = servers["faulty"].wait_ready(STARTUP)
    base = root / "faulty"
    assert predict(server, "m") == (200, {"predictions": V2})
    code, doc = server.get("/v1/models/m")
    assert code == 200 and doc["model_version_status"] == [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
        {
            "version": "1",
            "state": "END",
            "status": {
                "error_code": "NOT_FOUND",
                "error_message": f"version folder {base / '1'} is a broken symlink "
                f"(to {root / 'nowhere'}, which does not exist)",
            },
        },
    ], server.log()
    (base / "3").write_bytes(b"not a SavedModel folder")
    three = poll(lambda: version_status(server, "m", 3), lambda s: bool(s))
    assert three == {
        "version": "3",
        "state": "END",
        "status": {
            "error_code": "FAILED_PRECONDITION",
            "error_message": f"version folder {base / '3'} is not a folder",
        },
    }
    scans_pass(server, base)
    assert predict(server, "m") == (200, {"predictions": V2})
    (base / "3").unlink()
    assert poll(lambda: server.get("/v1/models/m/versions/3")[0], lambda c: c == 404) == 404
    assert len(log_lines(server, "#error]", f"model m version 1: version folder {base / '1'}")) == 1
    assert len(log_lines(server, "#error]", f"model m version 3: version folder {base / '3'}")) == 1
    assert len(log_lines(server, "#info]", f"model m version 3: {base / '3'} was removed")) == 1


def test_a_base_path_removed_while_serving_shows_in_the_status(
    servers: dict[str, TwistdServer], root: Path
) -> None:
    """Base path gone: version 1 keeps serving and its status says the base path does not
    exist; a file in its place says it is not a folder; back, the status is OK. Each logged
    once across scans."""
    server = servers["base"].wait_ready(STARTUP)
    base = root / "base"
    os.rename(base, root / "base-moved")
    missing = poll(
        lambda: version_status(server, "m", 1), lambda s: s["status"]["error_code"] != "OK"
    )
    assert missing == {
        "version": "1",
        "state": "AVAILABLE",
        "status": {
            "error_code": "NOT_FOUND",
            "error_message": f"model base path {base} does not exist",
        },
    }, server.log()
    assert predict(server, "m") == (200, {"predictions": V1})
    scans_pass(server, root / "probe")
    base.write_bytes(b"a file")
    a_file = poll(
        lambda: version_status(server, "m", 1),
        lambda s: s["status"]["error_code"] == "FAILED_PRECONDITION",
    )
    assert a_file["status"]["error_message"] == f"model base path {base} is not a folder"
    scans_pass(server, root / "probe")
    base.unlink()
    os.rename(root / "base-moved", base)
    back = poll(lambda: version_status(server, "m", 1), lambda s: s["status"]["error_code"] == "OK")
    assert back == {
        "version": "1",
        "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    }
    assert len(log_lines(server, "#error]", f"model m: model base path {base} does not exist")) == 1
    assert (
        len(log_lines(server, "#error]", f"model m: model base path {base} is not a folder")) == 1
    )
    assert len(log_lines(server, "#info]", f"model m: {base} can be scanned again")) == 1
