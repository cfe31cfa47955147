"""Bearer tokens (``--auth_token_file``): which calls need one, and the check.

``BearerTokens`` holds the tokens of the file (one per line, ``#`` comments; the format is
``wire.auth``'s) and checks a request's ``Authorization`` values against them:

- none sent: 401, ``WWW-Authenticate: Bearer realm="kleinserve"`` (RFC 6750 section 3: no
  error code when the client sent no credentials, or credentials of another scheme);
- a token that is not in the file: 401 with ``error="invalid_token"`` added;
- more than one ``Authorization`` value, or ``Bearer`` without exactly one token after it:
  400 with ``error="invalid_request"`` (RFC 6750 section 3.1 names 400 for a malformed
  request).

The comparison takes the same time whichever token matches, or none: the token sent is
hashed (SHA-256), and its digest is compared with ``hmac.compare_digest`` against the digest
of every token of the file, all of them, never stopping at the first match. The tokens are
kept only as those digests, and no message, log line or error body ever holds one.

``reload()`` reads the file again (on SIGHUP, ``service.reload``): a file that cannot be read,
holds no token or a bad line leaves the tokens as they were and logs an error, so a botched
edit never locks every client out or stops the server.

``HTTPAuth`` says which HTTP requests need a token: every one except ``GET``/``HEAD`` of the
health endpoints, and of ``/metrics`` (and the ``--monitoring_config_file`` path) unless
``--auth_metrics``. The channel asks it once a request's headers are in, before any of its
body is read (``service.http_limits``); gRPC asks ``BearerTokens`` from an interceptor
(``service.grpc_port``).
"""

from __future__ import annotations

import hashlib
import hmac
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from twisted.logger import Logger

from service.errors import Unauthenticated
from wire.auth import BEARER, REALM, parse_tokens

log = Logger()

#: Compares two digests: ``hmac.compare_digest`` (tests count its calls).
Compare = Callable[[bytes, bytes], bool]

CHALLENGE = f'{BEARER} realm="{REALM}"'
INVALID_TOKEN = f'{CHALLENGE}, error="invalid_token"'
INVALID_REQUEST = f'{CHALLENGE}, error="invalid_request"'

#: The health endpoints, open to every ``GET`` (Kubernetes probes, Consul checks, load balancers).
HEALTH_PATHS = frozenset({b"/healthz", b"/readyz", b"/v2/health/live", b"/v2/health/ready"})
METRICS_PATH = b"/metrics"
OPEN_METHODS = frozenset({b"GET", b"HEAD"})

_HOW = (
    f"send the header Authorization: {BEARER} <token>, with a token of the server's "
    "--auth_token_file"
)


class TokenFileError(ValueError):
    """The token file cannot be used: unreadable, not UTF-8, a bad line, or no token at all."""


class BadAuthorization(Unauthenticated):
    """An ``Authorization`` that is malformed rather than wrong: 400 (RFC 6750 section 3.1)."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message, challenge=INVALID_REQUEST)


def read_tokens(path: Path) -> list[str]:
    """The tokens of the file at ``path``; ``TokenFileError`` saying why there are none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TokenFileError(f"cannot read the token file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TokenFileError(f"the token file {path} is not UTF-8 text") from None
    try:
        tokens = parse_tokens(text)
    except ValueError as e:
        raise TokenFileError(f"the token file {path}, {e}") from None
    if not tokens:
        raise TokenFileError(
            f"the token file {path} holds no token (only blank lines and # comments); "
            "write one token per line"
        )
    return tokens


class BearerTokens:
    """The tokens a server takes, as SHA-256 digests; ``check`` raises ``Unauthenticated``."""

    def __init__(
        self, tokens: Sequence[str], *, path: Path | None = None, compare: Compare | None = None
    ) -> None:
        self.path = path
        self._compare = compare or hmac.compare_digest
        self._digests = _digests(tokens)

    @classmethod
    def load(cls, path: Path, *, compare: Compare | None = None) -> BearerTokens:
        """The tokens of the file at ``path`` (``TokenFileError`` if it holds none)."""
        tokens = cls(read_tokens(path), path=path, compare=compare)
        _warn_if_world_readable(path)
        return tokens

    @property
    def count(self) -> int:
        return len(self._digests)

    def reload(self) -> bool:
        """Read the file again; on any problem keep the tokens held and log an error."""
        if self.path is None:
            return False
        try:
            tokens = read_tokens(self.path)
        except TokenFileError as e:
            log.error(
                "token file not re-read: {error}; the {count} token(s) read before stay valid",
                error=str(e),
                count=self.count,
            )
            return False
        self._digests = _digests(tokens)
        log.info("token file {path} re-read: {count} token(s)", path=self.path, count=self.count)
        _warn_if_world_readable(self.path)
        return True

    def check(self, values: Sequence[bytes | str]) -> None:
        """Return if ``values`` (the request's ``Authorization`` headers or metadata entries)
        are one ``Bearer`` token the server takes; raise ``Unauthenticated`` if not."""
        if not values:
            raise Unauthenticated(
                f"this endpoint needs a bearer token: {_HOW}", challenge=CHALLENGE
            )
        if len(values) > 1:
            raise BadAuthorization(
                f"the request carries {len(values)} Authorization headers; send one"
            )
        value = values[0]
        raw = value.encode("utf-8", "replace") if isinstance(value, str) else value
        parts = raw.split()
        if not parts or parts[0].lower() != BEARER.lower().encode():
            raise Unauthenticated(
                f"the Authorization header is not a {BEARER} token: {_HOW}", challenge=CHALLENGE
            )
        if len(parts) != 2:
            raise BadAuthorization(
                f"the Authorization header must be '{BEARER} <token>': one token, no spaces in it"
            )
        if not self._matches(parts[1]):
            raise Unauthenticated(
                "the bearer token is not valid for this server (not in its --auth_token_file)",
                challenge=INVALID_TOKEN,
            )

    def _matches(self, token: bytes) -> bool:
        """Whether ``token`` is one of ours, comparing its digest with every one held."""
        given = hashlib.sha256(token).digest()
        found = False
        for digest in self._digests:
            found |= self._compare(given, digest)  # no short cut: every digest, every time
        return found


class HTTPAuth:
    """Which HTTP requests need a token (module docstring), and the tokens they need."""

    def __init__(
        self,
        tokens: BearerTokens,
        *,
        prometheus_path: str | None = None,
        protect_metrics: bool = False,
    ) -> None:
        self.tokens = tokens
        self._open = HEALTH_PATHS | ({METRICS_PATH} if not protect_metrics else set())
        self._alias: bytes | None = None  # matched as service.http.MetricsAlias matches it
        if prometheus_path is not None and not protect_metrics:
            self._alias = prometheus_path.encode().rstrip(b"/") or b"/"

    def is_open(self, method: bytes, path: bytes) -> bool:
        """Whether a request (its method, its path without the query) needs no token."""
        if method not in OPEN_METHODS:
            return False
        return path in self._open or path.rstrip(b"/") == self._alias

    def check(self, method: bytes, path: bytes, values: Sequence[bytes]) -> None:
        """Raise ``Unauthenticated`` unless the request is open or its ``Authorization``
        values carry a good token."""
        if not self.is_open(method, path):
            self.tokens.check(values)


def _digests(tokens: Sequence[str]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(token.encode("ascii")).digest() for token in tokens)


def _warn_if_world_readable(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        log.warn(
            "the token file {path} is readable by every user of this machine; "
            "make it readable by the server's user only (chmod 600)",
            path=path,
        )
