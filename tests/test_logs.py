"""The text log (``service.logs``): ``ClassicText`` writes Twisted's own lines, and
``use_text_log`` / ``text_observer`` write them where twistd would."""

from __future__ import annotations

import io
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import Logger, LogLevel, LogPublisher, formatEventAsClassicLogText, formatTime
from twisted.python.failure import Failure

from service import logs
from service.logs import ClassicText, text_observer, use_text_log


def twisted_line(event: dict[str, Any]) -> str | None:
    """What twistd's own text observer writes for ``event``."""
    return formatEventAsClassicLogText(event, formatTime=formatTime)


def failure() -> Failure:
    try:
        raise ValueError("broken")
    except ValueError:
        return Failure()


EVENTS: list[dict[str, Any]] = [
    {"log_format": "{access_line}", "access_line": 'a "b" c', "log_namespace": "kleinserve.access"},
    {"log_format": "{x}", "x": "two\nlines", "log_level": LogLevel.warn},
    {"log_format": "{x}", "x": "", "log_level": LogLevel.info},  # empty: no line
    {"log_format": "{x}", "x": 3, "log_level": LogLevel.info},  # not text: the formatter's
    {"log_format": "{x}", "log_level": LogLevel.info},  # missing field
    {"log_format": "model {name} version {v}", "name": "m", "v": 2, "log_level": LogLevel.error},
    {"log_format": "{x}", "x": "with system", "log_system": "sys"},
    {"log_format": "{x}", "x": "failed", "log_failure": failure(), "log_level": LogLevel.critical},
    {"log_format": b"{x}", "x": "bytes format"},
    {"log_format": "{x!r}", "x": "conversion"},
    {"log_format": "{x:>8}", "x": "spec"},
    {"log_format": None},
    {"x": "no format"},
    {"log_format": "{x}", "x": "no namespace", "log_namespace": None},
]


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("when", [None, 0.0, 1_764_000_000.999, 1_764_000_001.0])
def test_classic_text_writes_twisteds_line(event: dict[str, Any], when: float | None) -> None:
    """Every kind of event, with and without a time: the line Twisted's formatter writes."""
    event = dict(event, **({} if when is None else {"log_time": when}))
    assert ClassicText()(event) == twisted_line(event)


@given(text=st.text(), times=st.lists(st.floats(0, 4e9), min_size=1, max_size=5))
def test_classic_text_matches_for_any_text_and_times(text: str, times: list[float]) -> None:
    """One formatter over a run of times (its time text is kept per second): each line is
    Twisted's line for that event."""
    classic = ClassicText()
    for when in times:
        event = {
            "log_format": "{line}",
            "line": text,
            "log_time": when,
            "log_namespace": "n",
            "log_level": LogLevel.info,
        }
        assert classic(event) == twisted_line(event)


def test_a_logger_event_through_the_observer() -> None:
    """A real Logger event, as the access log emits it, comes out as twistd's line."""
    out = io.StringIO()
    publisher = LogPublisher()
    publisher.addObserver(logs.FileLogObserver(out, ClassicText()))
    seen: list[dict[str, Any]] = []
    publisher.addObserver(seen.append)
    Logger(namespace="kleinserve.access", observer=publisher).info(
        "{access_line}", access_line="hi"
    )
    assert out.getvalue() == twisted_line(seen[0])
    assert out.getvalue().endswith(" [kleinserve.access#info] hi\n")


@pytest.fixture
def destination() -> Any:
    saved, handler = dict(logs._twistd_destination), signal.getsignal(signal.SIGUSR1)
    yield logs._twistd_destination
    logs._twistd_destination.clear()
    logs._twistd_destination.update(saved)
    signal.signal(signal.SIGUSR1, handler)  # text_observer may have set one (as twistd does)


def test_use_text_log_leaves_a_given_logger_or_syslog(destination: dict[str, Any]) -> None:
    """twistd's --logger or --syslog stand; otherwise --logger becomes the text observer."""
    given_logger = {"logger": "other.observer", "logfile": None, "nodaemon": True}
    use_text_log(given_logger)
    assert given_logger["logger"] == "other.observer"
    syslog = {"logger": None, "syslog": True, "logfile": None, "nodaemon": False}
    use_text_log(syslog)
    assert syslog["logger"] is None
    plain = {"logger": None, "logfile": "x.log", "nodaemon": True}
    use_text_log(plain)
    assert plain["logger"] == "service.logs.text_observer"
    assert destination == {"logfile": "x.log", "nodaemon": True}


def test_text_observer_writes_to_twistds_logfile(
    destination: dict[str, Any], tmp_path: Path
) -> None:
    """--logfile=PATH: the lines go to that file."""
    path = tmp_path / "server.log"
    use_text_log({"logger": None, "logfile": str(path), "nodaemon": True})
    observer = text_observer()
    Logger(namespace="t", observer=observer).warn("{x}", x="in the file")
    assert path.read_text().endswith(" [t#warn] in the file\n")


@pytest.mark.parametrize("logfile", ["-", None])
def test_text_observer_writes_to_standard_output_with_n(
    destination: dict[str, Any], logfile: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-n with --logfile=- or none: standard output, as twistd does."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    use_text_log({"logger": None, "logfile": logfile, "nodaemon": True})
    Logger(namespace="t", observer=text_observer()).info("{x}", x="on stdout")
    assert out.getvalue().endswith(" [t#info] on stdout\n")


def test_a_daemon_cannot_log_to_standard_output(destination: dict[str, Any]) -> None:
    """As twistd: a daemon with --logfile=- stops with twistd's own message."""
    use_text_log({"logger": None, "logfile": "-", "nodaemon": False})
    with pytest.raises(SystemExit, match="Daemons cannot log to stdout"):
        text_observer()
