"""The server's log as JSON lines, for log shippers.

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
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, LogLevel, formatEvent


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
