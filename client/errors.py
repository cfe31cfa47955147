"""What can go wrong with an inference call, one exception type per kind of failure.

Each carries a message a user can act on (which model, which backends, what to change),
and what a program needs to decide (``status``, ``attempts``). No web framework and no
Twisted here: the blocking client raises exactly these.
"""

from __future__ import annotations

__all__ = [
    "CertificateError",
    "DeadlineExceeded",
    "InferenceError",
    "InvalidRequest",
    "NoBackendAvailable",
    "ServerError",
    "Unauthenticated",
]


class InferenceError(Exception):
    """Base of every failure an inference call reports.

    ``request_id`` is the id the call was sent under (``X-Request-Id``, the same on every
    attempt): the servers' access logs and error bodies carry it. None for a failure
    before the call had one.
    """

    request_id: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        if self.request_id is None:
            return self.message
        return f"{self.message} (request id {self.request_id})"


class NoBackendAvailable(InferenceError):
    """No server to send the call to: none healthy in Consul, or none would accept a connection."""


class CertificateError(NoBackendAvailable):
    """A server's TLS certificate could not be verified (not signed by a CA the client
    trusts, or not naming the address called), or it does not speak TLS: a configuration
    problem, so the call is not retried. Give the CA that signed the servers' certificates
    as ``ca_file`` (``--ca-file``)."""


class DeadlineExceeded(InferenceError):
    """The call (with all its retries) did not finish within its ``timeout``."""

    def __init__(self, message: str, *, timeout: float, attempts: int) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.attempts = attempts


class InvalidRequest(InferenceError):
    """The server refused the request (4xx): fix the request, retrying will not help.

    ``status`` is the HTTP status (400 bad input, 404 unknown model or version, 413 too
    large, 415 wrong content type); ``server_message`` the server's ``error`` text.
    """

    def __init__(self, message: str, *, status: int, server_message: str) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class Unauthenticated(InvalidRequest):
    """The server refused the call's credentials (401; gRPC UNAUTHENTICATED): no bearer token,
    or one its ``--auth_token_file`` does not hold. Retrying will not help, and the server is
    not at fault (it is not ejected): give the client a token the server takes (``token=``;
    on the command line ``--token-file`` or ``$KLEINSERVE_TOKEN``).
    """


class ServerError(InferenceError):
    """The servers failed the call (5xx, or the connection broke) on every attempt made.

    ``status`` is the last HTTP status, or ``None`` when the last attempt got no answer.
    """

    def __init__(
        self, message: str, *, status: int | None, server_message: str, attempts: int
    ) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message
        self.attempts = attempts
