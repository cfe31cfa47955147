"""One call, end to end: pick a backend, send, judge the answer, retry elsewhere or give up.

The retry rules, so that retries help with a failing server without piling onto an
overloaded fleet:

- Retried, on a different backend when there is one, after a jittered backoff: a request
  that was never sent (refused, unreachable), a 502/503/504 (overloaded, not ready,
  draining), and -- for idempotent calls, which every inference call is -- a request whose
  connection died before the answer (a server SIGKILLed mid-request) or that got no
  answer within its attempt timeout (a hung or SIGSTOPped server, below).
- Never retried: 4xx (the request is wrong; ``InvalidRequest``, and ``Unauthenticated``
  for a 401: the token is missing or wrong), 500 (the model failed on this input; it would
  fail again), a call whose deadline has passed, a server whose TLS certificate cannot be
  verified (``CertificateError``: the CA file or the certificate is wrong, which no retry
  fixes). A 4xx never ejects the server.
- Each attempt calls its backend with the scheme its registration names (``https`` for a
  TLS server, ``wire.consul_tags.scheme_of``).
- Every retry spends a token of the shared ``RetryBudget``, and a call makes at most
  ``max_attempts`` attempts.
- The deadline covers the whole call, retries and backoff included.
- Each attempt except the call's last possible one (``max_attempts``) waits at most its
  *attempt timeout*: ``attempt_timeout`` seconds when given, else the call's timeout
  divided by ``max_attempts`` (10 s of the default 30 s with 3 attempts); never past the
  call's deadline. An attempt with no answer by then -- a hung or paused server keeps the
  connection open and says nothing -- is cancelled (request and connection abandoned),
  ejects its backend and is retried elsewhere, as above. Why a share of the timeout rather
  than a fixed value: patience has to scale with what the caller allows (a 1 s call
  cannot wait 5 s on one server; a long batch call need not give up on a busy one after
  5 s), and one ``max_attempts``-th leaves room for every attempt the call may make, so a
  call that meets a hung server still has most of its time for healthy ones. The last
  attempt waits for the rest of the deadline: there is no retry left to make time for,
  and cutting it short would only turn a slow answer into a failure.
- With a ``token``, every attempt carries ``Authorization: Bearer TOKEN`` (``wire.auth``; the
  gRPC transport sends it as ``authorization`` metadata). It is added to each attempt as it
  is sent, never kept in a call's request or written in an error.
- Each attempt tells the server how long the client will wait for it in
  ``X-Request-Deadline-Ms``, so that the server does not start work nobody waits for.
- A call has one request id (``X-Request-Id``: the caller's, if its request has one, else a
  fresh one), sent on every attempt, so the servers' access logs show its retries as one
  call; every ``InferenceError`` the call raises carries it as ``request_id``.

Connection errors, timeouts and 5xx also tell the ``Balancer`` to eject the backend.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import attrs
from attrs import define, frozen
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from client.balancer import Balancer, Key, backend_key
from client.budget import RetryBudget
from client.codec import error_message
from client.errors import (
    CertificateError,
    DeadlineExceeded,
    InferenceError,
    InvalidRequest,
    NoBackendAvailable,
    ServerError,
    Unauthenticated,
)
from client.sources import Sources
from client.transport import FailureKind, HTTPRequest, HTTPResponse, HTTPTransport, describe
from client.transport import failure_kind as kind_of
from discovery.backends import Backend, Backends
from discovery.backoff import now, sleep
from discovery.watch import BackendSource
from wire.auth import AUTHORIZATION_HEADER, bearer
from wire.backoff import Backoff
from wire.consul_tags import model_tag, scheme_of
from wire.http import DEADLINE_HEADER, REQUEST_ID_HEADER, new_request_id

__all__ = ["Attempt", "Deadline", "DispatchStats", "Dispatcher", "Exchange", "within"]

T = TypeVar("T")

#: A call's request, or how to make it for the backend an attempt goes to (in
#: ``protocol="auto"`` the server's Consul tags decide how the call is written).
RequestFor = HTTPRequest | Callable[[Backend], HTTPRequest]

RETRIED_STATUSES = frozenset({502, 503, 504})


@frozen
class Deadline:
    """When a call must be done by, on the client's clock."""

    timeout: float
    expires: float

    @classmethod
    def after(cls, clock: IReactorTime, timeout: float) -> Deadline:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        return cls(timeout, now(clock) + timeout)

    def remaining(self, clock: IReactorTime) -> float:
        return self.expires - now(clock)


@frozen
class Attempt:
    """What an ``on_attempt`` observer hears after each attempt, on the reactor thread.

    ``outcome`` is ``"ok"`` (2xx), ``"status"`` (another HTTP status, see ``status``),
    ``"not sent"``, ``"connection lost"``, ``"TLS"`` (the server's certificate could not be
    verified), ``"timeout"`` (no answer within the attempt's
    limit; the request was cancelled) or ``"cancelled"`` (the caller gave up). ``probe`` is
    True when the backend was ejected or probing as the attempt began (see ``Balancer``).
    """

    model: str
    backend: Backend
    number: int  # 1 for the first attempt of a call, 2 for its first retry, …
    sent_at: float
    finished_at: float
    outcome: str
    status: int | None = None
    probe: bool = False


@frozen
class Exchange:
    """The 2xx answer of a call: the backend that gave it and the request it answered."""

    backend: Backend
    request: HTTPRequest
    response: HTTPResponse


@define
class DispatchStats:
    """Counters since the client started."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    budget_refusals: int = 0
    timeouts: int = 0  # attempts cancelled at their attempt timeout or the call's deadline


@frozen
class _Result:
    backend: Backend
    outcome: str
    detail: str
    response: HTTPResponse | None = None
    kind: FailureKind | None = None


def _cancelled(error: BaseException) -> bool:
    """Twisted reports a cancelled request as CancelledError, or wrapped in its reasons."""
    if isinstance(error, CancelledError | net_error.ConnectingCancelledError):
        return True
    reasons = getattr(error, "reasons", None) or ()
    return any(isinstance(r, Failure) and r.check(CancelledError) for r in reasons)


def _call_later(clock: IReactorTime, seconds: float, fn: Callable[[], None]) -> Any:
    """``clock.callLater`` (spelled so for mypy, which zope interfaces confuse, as ``now``)."""
    return cast(Any, clock).callLater(max(0.0, seconds), fn)


async def within(
    clock: IReactorTime,
    waiting: Deferred[T],
    deadline: Deadline,
    error: Callable[[Deadline], Exception],
) -> T:
    """``await waiting``, or cancel it and raise ``error(deadline)`` when the deadline passes."""
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        waiting.cancel()

    timer = _call_later(clock, deadline.remaining(clock), expire)
    try:
        return await waiting
    except CancelledError:
        if expired:
            raise error(deadline) from None
        raise
    finally:
        if timer.active():
            timer.cancel()


def _tally(lines: Iterable[str]) -> str:
    """Distinct lines in order, each with how often it occurred when more than once."""
    counts = Counter(lines)
    return "; ".join(line if n == 1 else f"{line} (x{n})" for line, n in counts.items())


def _where(backend: Backend) -> str:
    return f"{backend.address}:{backend.port}"


class Dispatcher:
    """Sends calls through ``transport`` to backends of ``sources``, as the module describes."""

    log = Logger()

    def __init__(
        self,
        sources: Sources,
        transport: HTTPTransport,
        clock: IReactorTime,
        rng: random.Random,
        *,
        balancer: Balancer,
        budget: RetryBudget,
        max_attempts: int = 3,
        backoff: Backoff | None = None,
        attempt_timeout: float | None = None,
        on_attempt: Callable[[Attempt], object] | None = None,
        token: str | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if attempt_timeout is not None and not attempt_timeout > 0:
            raise ValueError(f"attempt_timeout must be > 0 seconds, got {attempt_timeout!r}")
        self.sources = sources
        self.balancer = balancer
        self.budget = budget
        self.stats = DispatchStats()
        self._transport = transport
        self._clock = clock
        self._rng = rng
        self._max_attempts = max_attempts
        self._backoff = backoff or Backoff(initial=0.02, maximum=1.0, factor=2.0, jitter=0.5)
        self.attempt_timeout = attempt_timeout
        self._on_attempt = on_attempt
        self._known: dict[str, Backends] = {}
        self._credentials = {AUTHORIZATION_HEADER: bearer(token)} if token else {}

    async def backends(self, model: str, version: int | None, deadline: Deadline) -> Backends:
        """The backends serving ``model`` (and ``version``), waiting for the first snapshot.

        An empty snapshot after a non-empty one is treated like an unreachable Consul: the
        last non-empty one is kept. A Consul agent restarted empty answers exactly that
        until the servers register again, and servers that are really gone get ejected.
        """
        source = self.sources.for_model(model)
        await self.ready(source, deadline)
        current = source.current
        if current:
            self._known[model] = current
        else:
            current = self._known.get(model, ())
        if version is not None:
            tag = model_tag(model, version)
            current = tuple(b for b in current if not b.tags or tag in b.tags)
        if not current:
            what = f"model {model!r}" + (f" version {version}" if version is not None else "")
            raise NoBackendAvailable(
                f"no healthy backend serves {what} in {self.sources.describe()}; "
                "check the model name and that its servers are running and passing their checks"
            )
        return current

    async def ready(self, source: BackendSource, deadline: Deadline) -> None:
        """Wait (within the deadline) until ``source`` has its first snapshot."""
        waiting = source.ready()
        if waiting.called:
            return
        await within(self._clock, waiting, deadline, self._discovery_timeout)

    def _discovery_timeout(self, deadline: Deadline) -> Exception:
        return NoBackendAvailable(
            f"no answer from {self.sources.describe()} within {deadline.timeout:g} s; "
            "is the Consul agent running? (Or list the servers yourself: backends=[(host, port)] "
            "in Python, --backend HOST:PORT on the command line)"
        )

    async def call(
        self,
        model: str,
        version: int | None,
        request: RequestFor,
        deadline: Deadline,
        *,
        idempotent: bool = True,
    ) -> HTTPResponse:
        """The 2xx answer to ``request`` from a backend of ``model``, or a typed error
        carrying the call's request id."""
        answered = await self.exchange(model, version, request, deadline, idempotent=idempotent)
        return answered.response

    async def exchange(
        self,
        model: str,
        version: int | None,
        request: RequestFor,
        deadline: Deadline,
        *,
        idempotent: bool = True,
    ) -> Exchange:
        """As ``call``, with the backend that answered and the request it answered (which,
        for a request made per backend, says how to read the answer). Every attempt sends
        the call's one request id (the request's own ``X-Request-Id``, else a fresh one)."""
        given = (
            request.headers.get(REQUEST_ID_HEADER.lower())
            if isinstance(request, HTTPRequest)
            else None
        )
        request_id = given or new_request_id()

        def with_id(sent: HTTPRequest) -> HTTPRequest:
            return attrs.evolve(sent, headers={**sent.headers, REQUEST_ID_HEADER: request_id})

        tagged: RequestFor
        if isinstance(request, HTTPRequest):
            tagged = with_id(request)
        else:
            made = request
            tagged = lambda backend: with_id(made(backend))  # noqa: E731
        try:
            return await self._exchange(model, version, tagged, deadline, idempotent)
        except InferenceError as e:
            e.request_id = request_id
            raise

    async def _exchange(
        self,
        model: str,
        version: int | None,
        request: RequestFor,
        deadline: Deadline,
        idempotent: bool,
    ) -> Exchange:
        self.stats.calls += 1
        self.budget.deposit()
        tried: list[Key] = []
        failures: list[_Result] = []
        number = 0
        while True:
            if deadline.remaining(self._clock) <= 0:
                raise self._deadline_exceeded(model, deadline, failures)
            backends = await self.backends(model, version, deadline)
            backend = self.balancer.pick(backends, tried, model)
            tried.append(backend_key(backend))
            number += 1
            sent = request if isinstance(request, HTTPRequest) else request(backend)
            result = await self._attempt(model, backend, number, sent, deadline)
            response = result.response
            if response is not None and 200 <= response.code < 300:
                return Exchange(backend, sent, response)
            if response is not None and response.code == 401:
                message = error_message(response.body)
                raise Unauthenticated(
                    f"model {model!r}: the server refused the call's credentials (401): "
                    f"{message}; give the client a token of the server's --auth_token_file "
                    "(token=, or --token-file or $KLEINSERVE_TOKEN on the command line)",
                    status=response.code,
                    server_message=message,
                )
            if response is not None and 400 <= response.code < 500:
                message = error_message(response.body)
                raise InvalidRequest(
                    f"model {model!r}: the server refused the request ({response.code}): {message}",
                    status=response.code,
                    server_message=message,
                )
            failures.append(result)
            if result.outcome == "timeout" and deadline.remaining(self._clock) <= 0:
                raise self._deadline_exceeded(model, deadline, failures)
            delay = self._backoff.delay(number - 1, self._rng)
            note = self._why_not_retry(result, number, idempotent, deadline, delay)
            if note:
                raise self._failed(model, failures, note)
            self.stats.retries += 1
            await sleep(self._clock, delay)

    def _retryable(self, result: _Result, idempotent: bool) -> bool:
        if result.response is not None:
            return result.response.code in RETRIED_STATUSES
        if result.kind is FailureKind.NOT_SENT:
            return True
        return idempotent and result.outcome in ("connection lost", "timeout")

    def _why_not_retry(
        self, result: _Result, number: int, idempotent: bool, deadline: Deadline, delay: float
    ) -> str | None:
        """Why this failure ends the call (a note for the error), or None to retry it."""
        if not self._retryable(result, idempotent):
            return "not retried"
        if number >= self._max_attempts:
            return f"gave up after {number} attempts"
        if deadline.remaining(self._clock) <= delay:
            return f"no time left to retry within the {deadline.timeout:g} s timeout"
        if not self.budget.withdraw():
            self.stats.budget_refusals += 1
            return "not retried: the retry budget is spent (too many failures overall)"
        return None

    def attempt_limit(self, number: int, deadline: Deadline) -> float:
        """How long attempt ``number`` of a call may wait for its answer (module docstring)."""
        remaining = deadline.remaining(self._clock)
        if number >= self._max_attempts:
            return remaining
        if self.attempt_timeout is not None:
            return min(remaining, self.attempt_timeout)
        return min(remaining, deadline.timeout / self._max_attempts)

    async def _attempt(
        self, model: str, backend: Backend, number: int, request: HTTPRequest, deadline: Deadline
    ) -> _Result:
        limit = self.attempt_limit(number, deadline)
        headers = {
            **request.headers,
            DEADLINE_HEADER: str(max(1, int(limit * 1000))),
            **self._credentials,
        }
        sent = attrs.evolve(request, headers=headers, scheme=scheme_of(backend.meta))
        sending = self._transport.send(backend.address, backend.port, sent)
        self.stats.attempts += 1
        ticket = self.balancer.begin(backend, model)
        sent_at = now(self._clock)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            sending.cancel()

        timer = _call_later(self._clock, limit, expire)
        result: _Result | None = None
        try:
            response = await sending
        except Exception as e:
            if expired:
                self.stats.timeouts += 1
                result = _Result(backend, "timeout", f"no answer within {limit:.3g} s")
            elif _cancelled(e):
                raise CancelledError() from e
            else:
                kind = kind_of(e)
                if kind is FailureKind.OTHER:
                    raise
                result = _Result(backend, kind.value, describe(e), kind=kind)
        else:
            outcome = "ok" if 200 <= response.code < 300 else "status"
            result = _Result(backend, outcome, f"HTTP {response.code}", response)
        finally:
            if timer.active():
                timer.cancel()
            healthy = None if result is None else self._healthy(result)
            self.balancer.end(ticket, healthy)
            self._report(model, backend, number, sent_at, result, ticket.probe)
        assert result is not None  # every other way out of the try raised
        return result

    @staticmethod
    def _healthy(result: _Result) -> bool:
        if result.response is not None:
            return result.response.code < 500
        return False

    def _report(
        self,
        model: str,
        backend: Backend,
        number: int,
        sent_at: float,
        result: _Result | None,
        probe: bool,
    ) -> None:
        if self._on_attempt is None:
            return
        status = result.response.code if result and result.response else None
        attempt = Attempt(
            model,
            backend,
            number,
            sent_at,
            now(self._clock),
            result.outcome if result else "cancelled",
            status,
            probe,
        )
        try:
            self._on_attempt(attempt)
        except Exception:
            self.log.failure("An on_attempt observer raised")

    def _deadline_exceeded(
        self, model: str, deadline: Deadline, failures: list[_Result]
    ) -> DeadlineExceeded:
        last = f" (last: {_where(failures[-1].backend)} {failures[-1].detail})" if failures else ""
        return DeadlineExceeded(
            f"model {model!r}: no answer within the timeout of {deadline.timeout:g} s after "
            f"{len(failures)} attempt(s){last}; raise the timeout or check the servers' load",
            timeout=deadline.timeout,
            attempts=len(failures),
        )

    def _failed(self, model: str, failures: list[_Result], note: str) -> Exception:
        last = failures[-1]
        tried = _tally(f"{_where(f.backend)}: {f.detail}" for f in failures)
        if last.kind is FailureKind.TLS:
            return CertificateError(
                f"model {model!r}: the TLS handshake with https://{_where(last.backend)} "
                f"failed: its certificate could not be verified, or it does not speak TLS "
                f"({last.detail}); {note}. Give the CA that signed the servers' certificates "
                "as ca_file= (--ca-file), and check the certificate names the address called "
                "(an IP address subjectAltName for the addresses Consul reports)."
            )
        if all(f.kind is FailureKind.NOT_SENT for f in failures):
            return NoBackendAvailable(
                f"model {model!r}: could not connect to any backend ({tried}); {note}. "
                f"Are the servers running? Backends come from {self.sources.describe()}."
            )
        if last.response is not None:
            message = error_message(last.response.body)
            return ServerError(
                f"model {model!r}: {_where(last.backend)} answered {last.response.code}: "
                f"{message} ({note}; attempts: {tried})",
                status=last.response.code,
                server_message=message,
                attempts=len(failures),
            )
        return ServerError(
            f"model {model!r}: {_where(last.backend)}: {last.detail} ({note}; attempts: {tried})",
            status=None,
            server_message="",
            attempts=len(failures),
        )
