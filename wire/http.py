"""HTTP header names and the error body shape, as both sides read and write them."""

from __future__ import annotations

from typing import Any

#: Milliseconds the client will still wait for an answer; the server does not start work
#: that would finish after it.
DEADLINE_HEADER = "X-Request-Deadline-Ms"

#: The key of every error body: ``{"error": "what was wrong"}``.
ERROR_KEY = "error"


def error_body(message: str) -> dict[str, str]:
    """The JSON document of an error answer."""
    return {ERROR_KEY: message}


def error_text(doc: Any) -> str | None:
    """The message of an error document, or None if ``doc`` is not one."""
    if isinstance(doc, dict) and isinstance(doc.get(ERROR_KEY), str):
        return doc[ERROR_KEY]
    return None
