"""The server's log: twistd's text lines, written cheaply, or JSON lines for log shippers.

twistd picks the process's log observer before the service tree is built, from its
``--logger`` option (a factory of the observer). ``twistd -n inference --log_format=json``
sets that option to ``json_observer`` while the options are parsed
(``service.options.use_json_log``). Every twisted.logger event then goes to standard output
(twistd's ``--logfile`` is refused with it) as one JSON object on one line, from twistd's
first line on::

    {"time": "2026-12-04T06:00:00.123Z", "level": "info", "namespace": "kleinserve.access",
     "message": "…", "access": {…}}

``time`` is RFC 3339 in UTC, ``level`` one of debug, info, warn, error, critical,
``message`` the event's text; an event with a failure adds ``traceback`` (its text), and an
access-log event (``service.access_log``) adds its entry as ``access``.

Text (the default) is twistd's own format, ``2026-12-04T06:00:00+0000 [namespace#level]
message``, to twistd's own destination (``--logfile``, or standard output with ``-n``), but
written by ``text_observer`` rather than twistd's observer (``use_text_log`` sets twistd's
``--logger`` to it unless ``--logger`` or ``--syslog`` was given): the same lines, at about a
third of the cost per line (11 µs against 35, timed alone), which matters at one access-log line per request. Twisted's
formatter turns the time into text anew for every line (9 µs) and parses the message format
(``"{access_line}"``) with ``string.Formatter``; ``ClassicText`` makes the time text once per
second and writes a format that is one field by taking the field.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import signal
import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.logfile import LogFile


def rfc3339(seconds: float) -> str:
    """``seconds`` since the epoch as RFC 3339 in UTC, to the millisecond."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_line(event: dict[str, Any]) -> str:
    """One log event as one JSON object and a newline."""
    level = event.get("log_level", LogLevel.info)
    fields: dict[str, Any] = {
        "time": rfc3339(event.get("log_time") or 0.0),
        "level": getattr(level, "name", str(level)),
        "namespace": event.get("log_namespace") or "-",
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            fields["traceback"] = failure.getTraceback()
        except Exception:  # a log line must never fail: keep what can be said
            fields["traceback"] = repr(failure)
    access = event.get("access")
    if isinstance(access, dict):
        fields["access"] = access
    # default=str: a value that is no JSON type becomes its text rather than losing the line
    return json.dumps(fields, default=str) + "\n"


def json_observer(out: IO[str] | None = None) -> FileLogObserver:
    """The observer twistd's ``--logger`` makes: JSON lines on ``out`` (standard output,
    as it is when twistd calls this, before it redirects standard output into the log)."""
    return FileLogObserver(out or sys.stdout, json_line)


#: Where twistd was asked to write its log: its ``--logfile`` and ``--nodaemon``, recorded by
#: ``use_text_log`` while the options are parsed, read by ``text_observer`` when twistd calls
#: it (twistd calls a ``--logger`` factory with no arguments).
_twistd_destination: dict[str, Any] = {"logfile": None, "nodaemon": True}


def use_text_log(twistd: Any) -> None:
    """Make twistd write its text log through ``text_observer``: set its ``--logger`` option
    (read after every option is parsed) unless ``--logger`` or ``--syslog`` was given, which
    then stand. ``twistd``: twistd's own options (None: parsed on their own, nothing to set)."""
    if twistd is None or twistd.get("logger") or twistd.get("syslog"):
        return
    _twistd_destination.update(logfile=twistd.get("logfile"), nodaemon=bool(twistd.get("nodaemon")))
    twistd["logger"] = "service.logs.text_observer"


def text_observer() -> FileLogObserver:
    """twistd's text log where twistd would write it (``--logfile``: a file rotated on
    SIGUSR1; ``-`` or none with ``-n``: standard output), with ``ClassicText`` lines."""
    logfile, nodaemon = _twistd_destination["logfile"], _twistd_destination["nodaemon"]
    out: Any
    if logfile == "-":
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")  # twistd's own refusal
        out = sys.stdout
    elif nodaemon and not logfile:
        out = sys.stdout
    else:
        out = LogFile.fromFullPath(logfile or "twistd.log")
        if not signal.getsignal(signal.SIGUSR1):  # as twistd: SIGUSR1 rotates the file

            def rotate(signum: int, frame: Any) -> None:
                from twisted.internet import reactor

                reactor.callFromThread(out.rotate)  # type: ignore[attr-defined]

            signal.signal(signal.SIGUSR1, rotate)
    return FileLogObserver(out, ClassicText())


_ONE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@functools.lru_cache(maxsize=512)
def _one_field(log_format: str) -> str | None:
    """The field a format is made of alone (``"{access_line}"``), or None."""
    match = _ONE_FIELD.fullmatch(log_format)
    return match.group(1) if match else None


class ClassicText:
    """Twisted's ``formatEventAsClassicLogText`` with its default time format, line for line
    (a test compares the two on many events), made cheaper: the time text is made once per
    second, and an event whose format is one field holding text is written without a
    formatter."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = "-"

    def time_text(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when // 1)
        if second != self._second:  # the text names whole seconds: same second, same text
            self._stamp, self._second = formatTime(when), second
        return self._stamp

    def __call__(self, event: dict[str, Any]) -> str | None:
        log_format = event.get("log_format")
        if (
            type(log_format) is str
            and "log_failure" not in event
            and "log_system" not in event
            and "log_flattened" not in event
        ):
            field = _one_field(log_format)
            text = event.get(field) if field is not None else None
            if type(text) is str and text:
                level = event.get("log_level")
                return (
                    f"{self.time_text(event.get('log_time'))} "
                    f"[{event.get('log_namespace', '-')}#{'-' if level is None else level.name}] "
                    f"{text.replace(chr(10), chr(10) + chr(9))}\n"
                )
        return formatEventAsClassicLogText(event, formatTime=self.time_text)
