"""``multipart/form-data`` bodies (RFC 7578) for image uploads, built in memory.

treq can send files itself, but only through its own request path; building the body here
keeps one transport seam (``client.transport``) for every call, and keeps the body a pure
function of its parts, so tests compare bytes.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Sequence

from attrs import frozen

__all__ = ["Part", "encode_multipart"]


@frozen
class Part:
    """One form field: a name, its bytes, and for a file its name and type."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


def _quoted(value: str) -> str:
    # RFC 7578 4.2: percent-encode the quote; CR and LF have no place in a header.
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", " ").replace("\n", " ")


def encode_multipart(parts: Sequence[Part], boundary: str) -> tuple[bytes, str]:
    """The body and its ``Content-Type`` header. ``boundary`` must not occur in any part."""
    delimiter = f"--{boundary}".encode("ascii")
    chunks: list[bytes] = []
    for part in parts:
        if delimiter in part.data:
            raise ValueError("the multipart boundary occurs in a part; pick another")
        disposition = f'form-data; name="{_quoted(part.name)}"'
        content_type = part.content_type
        if part.filename is not None:
            disposition += f'; filename="{_quoted(part.filename)}"'
            content_type = content_type or (
                mimetypes.guess_type(part.filename)[0] or "application/octet-stream"
            )
        head = f"Content-Disposition: {disposition}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        chunks += [delimiter, b"\r\n", head.encode("utf-8"), b"\r\n", part.data, b"\r\n"]
    chunks += [delimiter, b"--\r\n"]
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"
