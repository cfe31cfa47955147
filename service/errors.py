"""The one error type of the server, carrying its HTTP status.

Raised anywhere (codec, batching, repository, routes) and turned into a
``{"error": "…"}`` body (``wire.http``) by the routes (``service.http``), or by the HTTP
channel (``service.http_limits``) for what it refuses before a route runs. The codes and their
statuses follow TensorFlow Serving's REST mapping; 401, 408, 413, 414, 415 and 431 are
additions for what TF Serving leaves to its HTTP layer. No web framework is imported here.
"""

from __future__ import annotations


class ServingError(Exception):
    """A failure a client should see, with TF Serving's error code and our HTTP status."""

    code = "UNKNOWN"
    status = 500

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers the HTTP answer carries besides the JSON body (``Retry-After`` …)."""
        if self.retry_after is None:
            return []
        return [(b"Retry-After", b"%d" % self.retry_after)]


class InvalidArgument(ServingError):
    code, status = "INVALID_ARGUMENT", 400


class NotFound(ServingError):
    code, status = "NOT_FOUND", 404


class PayloadTooLarge(ServingError):
    code, status = "INVALID_ARGUMENT", 413


class UnsupportedMediaType(ServingError):
    code, status = "INVALID_ARGUMENT", 415


class RequestTimeout(ServingError):
    """The client did not finish sending its request headers in time."""

    code, status = "DEADLINE_EXCEEDED", 408


class URITooLong(ServingError):
    code, status = "INVALID_ARGUMENT", 414


class HeaderFieldsTooLarge(ServingError):
    """A header line too long, too many headers, or all of them together too large."""

    code, status = "INVALID_ARGUMENT", 431


class FailedPrecondition(ServingError):
    code, status = "FAILED_PRECONDITION", 400


class Cancelled(ServingError):
    code, status = "CANCELLED", 499


class DeadlineExceeded(ServingError):
    """The client's deadline passed before its request could run."""

    code, status = "DEADLINE_EXCEEDED", 504


class Unavailable(ServingError):
    """Not ready, or overloaded: the client may retry, later or elsewhere."""

    code, status = "UNAVAILABLE", 503


class ResourceExhausted(Unavailable):
    """A queue is full: retry later or elsewhere (503 over HTTP, RESOURCE_EXHAUSTED over gRPC)."""

    code = "RESOURCE_EXHAUSTED"


class Internal(ServingError):
    code, status = "INTERNAL", 500


class PermissionDenied(ServingError):
    code, status = "PERMISSION_DENIED", 403


class Unauthenticated(ServingError):
    """No usable bearer token (``service.auth``): 401 with a ``WWW-Authenticate`` challenge
    (RFC 6750 section 3), UNAUTHENTICATED over gRPC.

    ``challenge`` is the header's value: ``Bearer realm="…"``, with ``error="invalid_token"``
    when a token was sent but is not one the server takes. The message never holds the token.
    """

    code, status = "UNAUTHENTICATED", 401

    def __init__(self, message: str, *, challenge: str) -> None:
        super().__init__(message)
        self.challenge = challenge

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"WWW-Authenticate", self.challenge.encode("ascii"))]
