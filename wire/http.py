"""HTTP header names, request ids and the error body shape, as both sides read and write them."""

from __future__ import annotations

import re
import uuid
from typing import Any

#: Milliseconds the client will still wait for an answer; the server does not start work
#: that would finish after it.
DEADLINE_HEADER = "X-Request-Deadline-Ms"

#: One id per call, sent by the client (or made by the server when it is missing or
#: unusable), echoed on every response and written in the server's access log.
REQUEST_ID_HEADER = "X-Request-Id"

#: The longest request id the server takes from a client; a longer one is replaced.
MAX_REQUEST_ID_LENGTH = 128

# Visible ASCII only: no space, no control character (a CR or LF would let a client write
# its own headers into the answer, or lines into the log), nothing outside ASCII.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")

#: The key of every error body: ``{"error": "what was wrong"}``.
ERROR_KEY = "error"

#: The key of the request id in an error body (the same id as the ``X-Request-Id`` header).
REQUEST_ID_KEY = "request_id"


def new_request_id() -> str:
    """A fresh request id: 32 hex digits (a random UUID)."""
    return uuid.uuid4().hex


def request_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be used as a request id, or None if it can."""
    return visible_ascii_problem(value, MAX_REQUEST_ID_LENGTH)


def visible_ascii_problem(value: str, max_length: int) -> str | None:
    """Why ``value`` is not 1 to ``max_length`` characters of visible ASCII (what a header
    value carries unchanged), or None if it is; the value itself is never named."""
    if not value:
        return "empty"
    if len(value) > max_length:
        return f"longer than {max_length} characters"
    if _VISIBLE_ASCII.fullmatch(value) is None:
        return "not visible ASCII (letters, digits, punctuation; no spaces)"
    return None


def error_body(message: str, request_id: str | None = None) -> dict[str, str]:
    """The JSON document of an error answer (with the request's id, when it has one)."""
    if request_id is None:
        return {ERROR_KEY: message}
    return {ERROR_KEY: message, REQUEST_ID_KEY: request_id}


def error_text(doc: Any) -> str | None:
    """The message of an error document, or None if ``doc`` is not one."""
    if isinstance(doc, dict) and isinstance(doc.get(ERROR_KEY), str):
        return doc[ERROR_KEY]
    return None
