"""Bearer tokens (RFC 6750) as both sides write and read them: the header, the token rule,
and the token file's format.

A server started with ``--auth_token_file`` takes ``Authorization: Bearer TOKEN`` on HTTP and
``authorization: Bearer TOKEN`` metadata on gRPC; the client library sends its token the same
way on every call. A token file holds one token per line; blank lines and lines starting
with ``#`` are left out. The server's file may hold several (each of them is accepted), a
client's holds one.

Nothing here ever puts a token into a message: errors name the line, never its text.
"""

from __future__ import annotations

from wire.http import visible_ascii_problem

#: The request header (and, lower-cased, the gRPC metadata key) that carries the token.
AUTHORIZATION_HEADER = "Authorization"

#: The authentication scheme (RFC 6750 section 2.1), matched without regard to case.
BEARER = "Bearer"

#: The realm a server names in its ``WWW-Authenticate`` challenge.
REALM = "kleinserve"

#: The longest token accepted: well within one 16 KiB header line of the server.
MAX_TOKEN_LENGTH = 4096


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be a bearer token, or None if it can (the token is not named).

    A token is visible ASCII without spaces: what a header value carries unchanged (no CR or
    LF can ride along), and what RFC 6750's b64token (letters, digits, ``-._~+/`` and a
    trailing ``=``) fits in.
    """
    return visible_ascii_problem(token, MAX_TOKEN_LENGTH)


def parse_tokens(text: str) -> list[str]:
    """The tokens of a token file's text, in order; ValueError naming the first bad line."""
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        problem = token_problem(token)
        if problem is not None:
            raise ValueError(f"line {number}: the token is {problem}")
        tokens.append(token)
    return tokens


def bearer(token: str) -> str:
    """The ``Authorization`` value that sends ``token``."""
    return f"{BEARER} {token}"
