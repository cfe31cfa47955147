"""The access log: one line per answered HTTP request, filed under the request's id.

Each request gets a ``RequestRecord`` when its request line arrives (``service.http_site``):
its id (the client's ``X-Request-Id`` when it is usable, else a fresh one; the rules are
``wire.http``'s), when it began, and what the route and the batching queue learn on the way
(model, version, the client's deadline, queue wait and batch size). Once the answer is
written, the Site turns the record and the request into an entry (``entry``) and
``AccessLog`` writes it to the twistd log under the namespace ``kleinserve.access``: one
readable line (``text``), one JSON object (``json``), or nothing (``off``), as
``--access_log`` says.

The JSON keys, their types and units are documented in the README ("Access log") and are a
stable interface: keys may be added, never renamed or removed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger

from service.batching import Queued
from service.logs import rfc3339
from wire.http import new_request_id, request_id_problem

NAMESPACE = "kleinserve.access"
FORMATS = ("off", "text", "json")

#: The keys of every entry, in the order they are written.
KEYS = (
    "time",
    "request_id",
    "request_id_replaced",
    "protocol",
    "peer",
    "method",
    "path",
    "route",
    "model",
    "version",
    "status",
    "grpc_status",
    "bytes_in",
    "bytes_out",
    "latency_ms",
    "queue_wait_ms",
    "batch_size",
    "deadline_ms",
)


def request_id_from(sent: Sequence[bytes] | None) -> tuple[str, str | None]:
    """The id a request is filed under, and why the client's was replaced (None if it was
    used, or none was sent). An unusable id is never echoed: it could carry a CR LF into
    the answer's headers or the log."""
    if not sent:
        return new_request_id(), None
    if len(sent) > 1:
        return new_request_id(), "X-Request-Id was sent more than once"
    try:
        text = sent[0].decode("ascii")
    except UnicodeDecodeError:
        text = "\x00"  # not ASCII: refused below as not visible ASCII
    problem = request_id_problem(text)
    if problem is not None:
        return new_request_id(), f"X-Request-Id was {problem}"
    return text, None


@attrs.define(eq=False)
class RequestRecord:
    """What one request's access-log line says, gathered while it is served (reactor only)."""

    request_id: str
    request_id_replaced: str | None  # why the client's X-Request-Id was not used
    started: float  # clock seconds when the request line arrived
    model: str | None = None
    version: int | None = None  # the version that served it, or the one its URL named
    deadline_ms: float | None = None  # the time the client gave the server, in ms
    queued: Queued = attrs.Factory(Queued)  # filled by the batching queue

    @classmethod
    def begin(
        cls, sent_ids: Sequence[bytes] | None, now: float, deadline: bytes | None = None
    ) -> RequestRecord:
        """The record of a request that arrived at ``now``, with the ``X-Request-Id`` values
        and the ``X-Request-Deadline-Ms`` value it sent (one that is no finite number is
        left out here; the route answers it with a 400)."""
        request_id, replaced = request_id_from(sent_ids)
        record = cls(request_id, replaced, now)
        if deadline is not None:
            try:
                milliseconds = float(deadline)
            except ValueError:
                return record
            if math.isfinite(milliseconds):
                record.deadline_ms = milliseconds
        return record


def peer_of(address: object) -> str:
    """``host:port`` (``[v6]:port``) of a client address; a UNIX socket's path, or ``unix``."""
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        return (name.decode(errors="replace") if isinstance(name, bytes) else name) or "unix"
    return "-"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def entry(
    record: RequestRecord,
    *,
    finished: float,
    peer: str,
    method: bytes,
    path: bytes,
    route: str,
    status: int,
    bytes_in: int,
    bytes_out: int,
    protocol: str = "http",
    grpc_status: str | None = None,
) -> dict[str, Any]:
    """The access-log entry of a request answered at ``finished`` (clock seconds).

    A gRPC call (``protocol="grpc"``) is a POST to ``/package.Service/Method`` whose
    ``status`` is the HTTP status of its outcome (as the REST API would answer it) and
    ``grpc_status`` its gRPC code's name; ``grpc_status`` is None over HTTP.
    """
    return {
        "time": rfc3339(finished),
        "request_id": record.request_id,
        "request_id_replaced": record.request_id_replaced,
        "protocol": protocol,
        "peer": peer,
        "method": method.decode("latin-1"),
        "path": path.decode("latin-1"),
        "route": route,
        "model": record.model,
        "version": record.version,
        "status": status,
        "grpc_status": grpc_status,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "latency_ms": _ms(max(0.0, finished - record.started)),
        "queue_wait_ms": _ms(record.queued.wait_seconds),
        "batch_size": record.queued.batch_size,
        "deadline_ms": record.deadline_ms,
    }


def _word(value: Any) -> str:
    """A value as one word of a text line: ``-`` for none, quoted JSON when it has spaces,
    quotes or anything not printable ASCII (so a line never splits or lies)."""
    if value is None:
        return "-"
    text = str(value)
    if text and text.isascii() and text.isprintable() and not any(c in text for c in ' "\\'):
        return text
    return json.dumps(text)


def _grpc(code: str | None) -> str:
    return "" if code is None else f" grpc={code}"


def text_line(fields: dict[str, Any]) -> str:
    """One readable line, e.g. ``127.0.0.1:50312 "POST /v1/models/m:predict" 200 predict
    model=m version=1 in=52B out=38B 2.315ms queue=0.412ms batch=4 deadline=9000ms
    id=3f2a…``; the time is the log line's own."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:g}ms"

    line = (
        f"{_word(fields['peer'])} {json.dumps(fields['method'] + ' ' + fields['path'])} "
        f"{fields['status']}{_grpc(fields['grpc_status'])} {_word(fields['route'])} "
        f"model={_word(fields['model'])} "
        f"version={_word(fields['version'])} in={fields['bytes_in']}B "
        f"out={fields['bytes_out']}B {ms(fields['latency_ms'])} "
        f"queue={ms(fields['queue_wait_ms'])} batch={_word(fields['batch_size'])} "
        f"deadline={ms(fields['deadline_ms'])} id={fields['request_id']}"
    )
    if fields["request_id_replaced"]:
        line += f" (replaced the client's id: {fields['request_id_replaced']})"
    return line


class AccessLog:
    """Writes access-log entries to the twistd log (``kleinserve.access``) as ``format``
    says: ``text``, ``json`` or ``off``.

    Every event also carries the entry itself under ``access``, so a JSON log observer
    (``service.logs``) writes its fields as an object.
    """

    def __init__(self, format: str = "text", logger: Logger | None = None) -> None:
        if format not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}")
        self.format = format
        self.enabled = format != "off"
        self._log = logger or Logger(namespace=NAMESPACE)

    def write(self, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.format == "json":
            line = json.dumps(fields, separators=(",", ":"))
        else:
            line = text_line(fields)
        self._log.info("{access_line}", access_line=line, access=fields)
