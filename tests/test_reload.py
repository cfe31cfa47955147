"""The config reloader: re-reads on a timer and on a real SIGHUP, applies only changes, and
keeps the running config when the file is bad."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from service.model_config import ModelConfigError, load_model_config
from service.reload import ConfigReloader


class Reactor(Clock):
    """A clock whose callFromThread runs at once (as the reactor would, soon after)."""

    def callFromThread(self, f, *args, **kw):  # noqa: N802 (Twisted's name)
        f(*args, **kw)


def config_text(*names: str) -> str:
    models = " ".join(f"config {{ name: '{n}' base_path: '/models/{n}' }}" for n in names)
    return f"model_config_list {{ {models} }}"


@pytest.fixture
def setup(tmp_path: Path):
    path = tmp_path / "models.config"
    path.write_text(config_text("a"))
    applied: list[list[str]] = []
    rescans: list[bool] = []
    reactor = Reactor()
    reloader = ConfigReloader(
        path,
        load_model_config,
        lambda models: applied.append([m.name for m in models]),
        reactor=reactor,
        poll_wait=30,
        rescan=lambda: rescans.append(True),
    )
    reloader.started_with(load_model_config(path))
    reloader.startService()
    yield path, reloader, reactor, applied, rescans
    reloader.stopService()


def test_the_poll_applies_a_changed_file_once(setup) -> None:
    """Every poll re-reads the file; a change is applied once, an unchanged file not at all."""
    path, _, reactor, applied, rescans = setup
    reactor.advance(30)
    assert applied == []
    path.write_text(config_text("a", "b"))
    reactor.advance(30)
    reactor.advance(30)
    assert applied == [["a", "b"]]
    assert rescans == []


def test_a_real_sighup_reloads_and_rescans_at_once(setup) -> None:
    """SIGHUP (sent to this process) re-reads the file without waiting for the poll and asks
    for a scan of the model folders."""
    path, _, _, applied, rescans = setup
    path.write_text(config_text("c"))
    os.kill(os.getpid(), signal.SIGHUP)
    assert applied == [["c"]]
    assert rescans == [True]


def test_a_bad_file_keeps_the_running_config_and_says_why(setup, logs) -> None:
    """A file that does not parse is not applied; the error, with the field, is logged as
    critical; the next good file is applied."""
    path, reloader, _, applied, _ = setup
    path.write_text("model_config_list { config { nmae: 'a' } }")
    assert reloader.reload() is False
    assert applied == []
    (message,) = logs.messages(LogLevel.critical, "service.reload")
    assert 'no field named "nmae"' in message and "still serving the previous config" in message
    path.write_text(config_text("d"))
    assert reloader.reload() is True
    assert applied == [["d"]]


def test_without_a_config_file_sighup_only_rescans(tmp_path: Path) -> None:
    """With one model from --model_base_path, SIGHUP rescans the folders and never kills;
    stopping puts the previous handler back."""
    rescans: list[bool] = []
    before = signal.getsignal(signal.SIGHUP)

    def read(path: Path):
        raise ModelConfigError("never read")

    reloader = ConfigReloader(
        None, read, lambda models: None, reactor=Reactor(), poll_wait=5,
        rescan=lambda: rescans.append(True),
    )  # fmt: skip
    reloader.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
    finally:
        reloader.stopService()
    assert rescans == [True]
    assert signal.getsignal(signal.SIGHUP) == before
