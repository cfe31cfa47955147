"""The client library without a network: balancer, ejection, retries, budget, codec, CLI pieces.

Everything runs on ``task.Clock``; HTTP goes to a fake transport (``FakeTransport``) or,
for the treq path, to ``StubTreq`` over a small twisted.web resource standing in for a
server.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from OpenSSL import SSL
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Request

from client import cli
from client.async_client import AsyncInferenceClient
from client.balancer import Balancer, EjectionPolicy, Strategy
from client.blocking import read_image
from client.budget import RetryBudget
from client.codec import Classification, decode_classifications, decode_outputs, encode_inputs
from client.dispatch import Attempt, Deadline, Dispatcher
from client.errors import (
    CertificateError,
    DeadlineExceeded,
    InvalidRequest,
    NoBackendAvailable,
    ServerError,
)
from client.multipart import Part, encode_multipart
from client.progress import Progress, render
from client.report import FileResult, collect_images, metric_sum, summary, write_results
from client.signature import ModelMetadata, SignatureSpec, TensorSpec
from client.sources import ConsulSources, StaticSources
from client.transport import HTTPRequest, HTTPResponse, TreqTransport
from discovery.backends import Backend, Backends, snapshot
from discovery.consul import ConsulAddress
from tests.certificates import make_ca
from wire.consul_tags import scheme_of
from wire.http import DEADLINE_HEADER, REQUEST_ID_HEADER, request_id_problem

A, B, C = (Backend(f"inference-{n}", "127.0.0.1", 8500 + n) for n in (1, 2, 3))
ABC = (A, B, C)
KEY = {b: (b.address, b.port) for b in ABC}


# --- helpers ------------------------------------------------------------------------------------


def json_response(code: int, doc: Any) -> HTTPResponse:
    return HTTPResponse(code, {"content-type": "application/json"}, orjson.dumps(doc))


OK = json_response(200, {"outputs": [[1.5, 2.5]]})


class FakeTransport:
    """Answers each send with ``answer((host, port), request)``: a response, an exception,
    or a Deferred; records what was sent and how many pending sends were cancelled."""

    def __init__(self, answer: Callable[[tuple[str, int], HTTPRequest], Any]) -> None:
        self.answer = answer
        self.sent: list[tuple[tuple[str, int], HTTPRequest]] = []
        self.cancelled = 0

    def send(self, host: str, port: int, request: HTTPRequest) -> Deferred[HTTPResponse]:
        self.sent.append(((host, port), request))
        result = self.answer((host, port), request)
        if isinstance(result, Deferred):
            return result
        if isinstance(result, BaseException):
            return defer.fail(result)
        return defer.succeed(result)

    def hang(self) -> Deferred[HTTPResponse]:
        def cancelled(_: Deferred[HTTPResponse]) -> None:
            self.cancelled += 1

        return Deferred(cancelled)

    def close(self) -> Deferred[None]:
        return defer.succeed(None)


class FakeSource:
    """A BackendSource whose snapshots the test publishes."""

    def __init__(self, backends: Backends | None = None) -> None:
        self.current: Backends = ()
        self._ready: list[Deferred[Backends]] = []
        self.has = False
        if backends is not None:
            self.publish(backends)

    def publish(self, backends: Iterable[Backend]) -> None:
        self.current, self.has = snapshot(backends), True
        waiting, self._ready = self._ready, []
        for d in waiting:
            d.callback(self.current)

    def subscribe(self, callback: Any) -> Callable[[], None]:
        return lambda: None

    def ready(self) -> Deferred[Backends]:
        if self.has:
            return defer.succeed(self.current)
        d: Deferred[Backends] = Deferred()
        self._ready.append(d)
        return d

    startService = stopService = lambda self: None  # noqa: E731  (as a watch Service)


class FakeSources:
    def __init__(self, source: FakeSource) -> None:
        self.source = source

    def for_model(self, model: str) -> FakeSource:
        return self.source

    for_service = for_model

    def describe(self) -> str:
        return "service 'inference' in Consul at http://127.0.0.1:1"

    def close(self) -> Deferred[None]:
        return defer.succeed(None)


def dispatcher(
    clock: task.Clock,
    transport: FakeTransport,
    backends: Backends = ABC,
    *,
    source: FakeSource | None = None,
    budget: RetryBudget | None = None,
    strategy: Strategy = Strategy.P2C,
    attempts: list[Attempt] | None = None,
    **options: Any,
) -> Dispatcher:
    rng = random.Random(7)
    return Dispatcher(
        FakeSources(source or FakeSource(backends)),
        transport,
        clock,
        rng,
        balancer=Balancer(clock, rng, strategy=strategy),
        budget=budget or RetryBudget(clock),
        on_attempt=attempts.append if attempts is not None else None,
        **options,
    )


def drive(clock: task.Clock, d: Deferred[Any], step: float = 0.005, limit: int = 100_000) -> None:
    """Advance the clock until ``d`` has fired (backoff sleeps need time to pass)."""
    for _ in range(limit):
        if d.called:
            return
        clock.advance(step)
    raise AssertionError("the call never finished")


def call(d: Dispatcher, clock: task.Clock, timeout: float = 10.0) -> Deferred[HTTPResponse]:
    request = HTTPRequest("POST", "/v1/models/linear:predict", b"{}")
    return Deferred.fromCoroutine(d.call("linear", None, request, Deadline.after(clock, timeout)))


def result_of(clock: task.Clock, d: Deferred[Any]) -> Any:
    drive(clock, d)
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


# --- balancer ------------------------------------------------------------------------------------


def test_p2c_prefers_the_backend_with_fewer_in_flight() -> None:
    """Power of two choices never picks the most loaded backend and favours the idlest."""
    balancer = Balancer(task.Clock(), random.Random(1))
    for _ in range(3):
        balancer.begin(A)
    balancer.begin(B)
    picks = Counter(balancer.pick(ABC) for _ in range(300))
    assert picks[A] == 0
    assert picks[C] > picks[B] > 0


def test_round_robin_rotates_through_every_backend() -> None:
    """Round-robin visits each backend once per turn, whatever their load."""
    balancer = Balancer(task.Clock(), random.Random(1), strategy="round_robin")
    balancer.begin(A)
    picks = [balancer.pick(ABC) for _ in range(6)]
    assert set(picks[:3]) == set(ABC)
    assert picks[3:] == picks[:3]


def test_pick_prefers_backends_not_yet_tried() -> None:
    """A retry goes to a backend the call has not tried, when there is one."""
    balancer = Balancer(task.Clock(), random.Random(1))
    assert {balancer.pick(ABC, exclude={KEY[A], KEY[B]}) for _ in range(20)} == {C}


def test_ejection_period_grows_to_the_cap_and_resets_after_success() -> None:
    """Each ejection in a row doubles (1, 2, 4, … capped at 30 s); a success starts over."""
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(1))
    periods = []
    for _ in range(7):
        balancer.end(balancer.begin(A), healthy=False)
        periods.append(balancer.load(A).ejected_for)
        clock.advance(periods[-1])
        assert not balancer.is_ejected(A)
    assert periods == [1, 2, 4, 8, 16, 30, 30]
    balancer.end(balancer.begin(A), healthy=True)
    balancer.end(balancer.begin(A), healthy=False)
    assert balancer.load(A).ejected_for == 1


def test_ejected_backend_is_skipped_then_probed_one_attempt_at_a_time() -> None:
    """An ejected backend gets no attempts; after its period, one probe at a time."""
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(1))
    balancer.end(balancer.begin(A), healthy=False)
    assert A not in {balancer.pick((A, B)) for _ in range(20)}
    clock.advance(1.0)
    for _ in range(5):
        balancer.begin(B)  # B busy: P2C would pick A every time, but A is probing
    assert balancer.pick((A, B)) == A
    probe = balancer.begin(A)
    assert {balancer.pick((A, B)) for _ in range(20)} == {B}
    balancer.end(probe, healthy=True)
    assert balancer.pick((A, B)) == A


def test_an_ejected_backend_is_probed_only_once_nothing_is_in_flight_to_it() -> None:
    """A backend still holding attempts begun before its ejection (a hung server) gets no
    probe when its period ends, until they end; then one probe, marked as such."""
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(1))
    old = [balancer.begin(A) for _ in range(3)]
    balancer.end(old[0], healthy=False)
    clock.advance(1.0)
    assert not balancer.is_ejected(A)
    for _ in range(5):
        balancer.begin(B)  # B busy: P2C would pick A every time it could
    assert {balancer.pick((A, B)) for _ in range(20)} == {B}
    balancer.end(old[1], healthy=False)
    assert {balancer.pick((A, B)) for _ in range(20)} == {B}
    balancer.end(old[2], healthy=None)
    assert balancer.pick((A, B)) == A
    probe = balancer.begin(A)
    assert probe.probe and {balancer.pick((A, B)) for _ in range(20)} == {B}


D = Backend("inference-4", "127.0.0.1", 8504)
probing_ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0, 5)),
        st.tuples(st.just("begin"), st.none()),
        st.tuples(
            st.just("end"), st.tuples(st.integers(0, 100), st.sampled_from([True, False, None]))
        ),
    ),
    max_size=100,
)


@given(probing_ops, st.sampled_from(Strategy))
@example(  # A ejected with an attempt still in flight; its period over, a probe must wait
    [("begin", None)] * 4 + [("end", (0, False)), ("advance", 1.0)] + [("begin", None)] * 3,
    Strategy.ROUND_ROBIN,
)
def test_a_probing_backend_never_has_two_attempts_in_flight(
    operations: list[tuple[str, Any]], strategy: Strategy
) -> None:
    """Whatever the outcomes, while another backend is usable (D never fails), an attempt
    begun on an ejected or probing backend is the only attempt in flight to it."""
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(5), strategy=strategy)
    fleet = (A, B, D)
    open_tickets: list[tuple[Backend, Any]] = []
    for op, value in operations:
        if op == "advance":
            clock.advance(value)
        elif op == "begin":
            backend = balancer.pick(fleet)
            open_tickets.append((backend, balancer.begin(backend)))
        elif open_tickets:
            index, healthy = value
            backend, ticket = open_tickets.pop(index % len(open_tickets))
            balancer.end(ticket, True if backend == D else healthy)
        for b in (A, B):
            mine = [t for x, t in open_tickets if x == b]
            assert len(mine) == 1 or not any(t.probe for t in mine), mine


def test_outcomes_of_attempts_begun_before_an_ejection_change_nothing() -> None:
    """A burst of failures from one outage ejects once; an old success does not end it."""
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(1))
    tickets = [balancer.begin(A) for _ in range(4)]
    balancer.end(tickets[0], healthy=False)
    balancer.end(tickets[1], healthy=False)
    balancer.end(tickets[2], healthy=True)
    assert balancer.load(A).ejected_for == 1 and balancer.load(A).ejections == 1
    clock.advance(1.0)
    balancer.end(tickets[3], healthy=False)
    assert not balancer.is_ejected(A)


def test_never_ejects_every_backend() -> None:
    """With every backend ejected, the least recently ejected one is still used."""
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(1))
    for backend in (B, A, C):
        balancer.end(balancer.begin(backend), healthy=False)
        clock.advance(0.1)
    assert all(balancer.is_ejected(b) for b in ABC)
    assert {balancer.pick(ABC) for _ in range(10)} == {B}


ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0, 5)),
        st.tuples(st.just("begin"), st.none()),
        st.tuples(st.just("end"), st.booleans()),
    ),
    max_size=80,
)


@given(ops)
def test_no_backend_is_ejected_forever(operations: list[tuple[str, Any]]) -> None:
    """Whatever the outcomes, an ejection never reaches past the cap, and pick always answers."""
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(3), ejection=EjectionPolicy(maximum=30.0))
    open_tickets = []
    for op, value in operations:
        if op == "advance":
            clock.advance(value)
        elif op == "begin":
            open_tickets.append(balancer.begin(balancer.pick(ABC)))
        elif open_tickets:
            balancer.end(open_tickets.pop(0), healthy=value)
        assert all(balancer.load(b).ejected_for <= 30.0 for b in ABC)
        assert balancer.pick(ABC) in ABC
    clock.advance(30.0)
    assert not any(balancer.is_ejected(b) for b in ABC)


# --- retry budget and retries ---------------------------------------------------------------------


def test_retry_budget_refills_by_ratio_and_time_up_to_its_cap() -> None:
    """Requests add ``ratio`` tokens and time ``min_per_second``; never above the cap."""
    clock = task.Clock()
    budget = RetryBudget(clock, ratio=0.5, cap=3, min_per_second=1, initial=0)
    assert not budget.withdraw()
    budget.deposit()
    budget.deposit()
    assert budget.withdraw() and not budget.withdraw()
    clock.advance(100)
    assert budget.tokens == 3


def test_total_failure_retries_stay_within_the_budget() -> None:
    """Under total failure retries are bounded by the budget, far below max_attempts allows."""
    clock = task.Clock()
    transport = FakeTransport(lambda where, r: json_response(503, {"error": "overloaded"}))
    budget = RetryBudget(clock, ratio=0.2, cap=5, min_per_second=0)
    d = dispatcher(clock, transport, budget=budget, max_attempts=3)
    for _ in range(200):
        with pytest.raises(ServerError):
            result_of(clock, call(d, clock))
    assert d.stats.retries <= 5 + 0.2 * 200
    assert len(transport.sent) == 200 + d.stats.retries < 400


@given(
    outcomes=st.lists(st.booleans(), min_size=1, max_size=60),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=10),
)
def test_retries_never_exceed_the_budget(outcomes: list[bool], gaps: list[float]) -> None:
    """Over any run of successes and 503s, retries <= initial + ratio*calls + rate*elapsed,
    and after the longest ejection no backend is still ejected."""
    clock = task.Clock()
    answers = iter(outcomes * 10)

    def answer(where: tuple[str, int], request: HTTPRequest) -> HTTPResponse:
        return OK if next(answers, True) else json_response(503, {"error": "busy"})

    budget = RetryBudget(clock, ratio=0.2, cap=2, min_per_second=0.5)
    d = dispatcher(clock, FakeTransport(answer), budget=budget)
    calls = 0
    for gap in gaps * 3:
        clock.advance(gap)
        calls += 1
        try:
            result_of(clock, call(d, clock))
        except ServerError:
            pass
    assert d.stats.retries <= 2 + 0.2 * calls + 0.5 * clock.seconds()
    clock.advance(30.0)
    assert not any(d.balancer.is_ejected(b) for b in ABC)


def test_refused_connection_is_retried_on_another_backend() -> None:
    """A connection refused by one backend is retried, after a backoff, on another."""
    clock = task.Clock()
    attempts: list[Attempt] = []
    transport = FakeTransport(lambda where, r: ConnectionRefusedError() if where == KEY[A] else OK)
    d = dispatcher(clock, transport, (A, B), strategy=Strategy.ROUND_ROBIN, attempts=attempts)
    assert result_of(clock, call(d, clock)) == OK
    assert [a.backend for a in attempts] == [A, B]
    assert [a.outcome for a in attempts] == ["not sent", "ok"]
    assert attempts[1].sent_at > attempts[0].finished_at  # a jittered backoff in between
    assert d.balancer.is_ejected(A)


def test_a_backend_registered_with_https_is_called_with_https() -> None:
    """Each attempt's request carries its backend's scheme: https for a registration whose
    meta says scheme: https, http for one without; the URL is built with it."""
    clock = task.Clock()
    tls = attrs.evolve(A, meta={"scheme": "https"})
    transport = FakeTransport(lambda where, r: OK)
    d = dispatcher(clock, transport, (tls, B), strategy=Strategy.ROUND_ROBIN)
    result_of(clock, call(d, clock))
    result_of(clock, call(d, clock))
    schemes = {where: r.scheme for where, r in transport.sent}
    assert schemes == {KEY[A]: "https", KEY[B]: "http"}
    assert transport.sent[0][1].url("10.0.0.1", 8501).startswith("https://10.0.0.1:8501/")


def test_a_certificate_not_verified_is_a_certificate_error_at_once() -> None:
    """A TLS handshake that fails verification ends the call with CertificateError after
    one attempt (no retry on the other backends), naming the server and what to give."""
    clock = task.Clock()
    attempts: list[Attempt] = []
    refused = SSL.Error([("SSL routines", "", "certificate verify failed")])
    transport = FakeTransport(lambda where, r: ResponseNeverReceived([Failure(refused)]))
    tls = tuple(attrs.evolve(b, meta={"scheme": "https"}) for b in ABC)
    d = dispatcher(clock, transport, tls, attempts=attempts)
    with pytest.raises(CertificateError) as raised:
        result_of(clock, call(d, clock))
    error = str(raised.value)
    assert "certificate verify failed" in error and "ca_file" in error and "https://" in error
    assert [a.outcome for a in attempts] == ["TLS"]
    assert d.stats.retries == 0


def test_connection_lost_mid_request_is_retried() -> None:
    """A predict whose connection died before the answer (a SIGKILLed server) is retried."""
    clock = task.Clock()
    transport = FakeTransport(
        lambda where, r: (
            ResponseNeverReceived([Failure(ConnectionRefusedError())]) if where == KEY[A] else OK
        )
    )
    d = dispatcher(clock, transport, (A, B), strategy=Strategy.ROUND_ROBIN)
    assert result_of(clock, call(d, clock)) == OK
    assert [where for where, _ in transport.sent] == [KEY[A], KEY[B]]


def test_503_is_retried_and_5xx_after_retries_is_a_server_error() -> None:
    """503 everywhere: max_attempts attempts on distinct backends, then ServerError(503)."""
    clock = task.Clock()
    transport = FakeTransport(lambda where, r: json_response(503, {"error": "queue full"}))
    d = dispatcher(clock, transport, max_attempts=3)
    with pytest.raises(ServerError) as raised:
        result_of(clock, call(d, clock))
    assert raised.value.status == 503 and raised.value.attempts == 3
    assert "queue full" in str(raised.value)
    assert len({where for where, _ in transport.sent}) == 3


def test_500_is_not_retried_but_ejects() -> None:
    """A 500 (the model failed on this input) is reported at once and ejects the backend."""
    clock = task.Clock()
    transport = FakeTransport(lambda where, r: json_response(500, {"error": "boom"}))
    d = dispatcher(clock, transport)
    with pytest.raises(ServerError) as raised:
        result_of(clock, call(d, clock))
    assert (raised.value.status, raised.value.server_message, len(transport.sent)) == (
        500,
        "boom",
        1,
    )
    assert sum(d.balancer.is_ejected(b) for b in ABC) == 1


@pytest.mark.parametrize("status", [400, 404, 413])
def test_4xx_is_never_retried_and_carries_the_servers_message(status: int) -> None:
    """A 4xx becomes InvalidRequest with the status and the server's error, after one attempt."""
    clock = task.Clock()
    transport = FakeTransport(lambda where, r: json_response(status, {"error": "bad x"}))
    d = dispatcher(clock, transport)
    with pytest.raises(InvalidRequest) as raised:
        result_of(clock, call(d, clock))
    assert (raised.value.status, raised.value.server_message) == (status, "bad x")
    assert "bad x" in str(raised.value) and len(transport.sent) == 1
    assert not any(d.balancer.is_ejected(b) for b in ABC)


def test_every_backend_refusing_is_no_backend_available() -> None:
    """When no backend accepts a connection the error says so, naming them."""
    clock = task.Clock()
    d = dispatcher(clock, FakeTransport(lambda where, r: ConnectionRefusedError()))
    with pytest.raises(NoBackendAvailable) as raised:
        result_of(clock, call(d, clock))
    assert "could not connect" in str(raised.value) and "127.0.0.1:850" in str(raised.value)


def test_deadline_covers_the_whole_call_and_cancels_the_attempt() -> None:
    """A backend that never answers: DeadlineExceeded at the timeout, the request abandoned."""
    clock = task.Clock()
    transport = FakeTransport(lambda where, r: transport.hang())
    d = dispatcher(clock, transport)
    pending = call(d, clock, timeout=2.0)
    clock.advance(1.9)
    assert not pending.called
    clock.advance(0.2)
    with pytest.raises(DeadlineExceeded) as raised:
        result_of(clock, pending)
    assert raised.value.timeout == 2.0 and transport.cancelled == 1


def test_a_hung_attempt_is_cancelled_at_the_attempt_timeout_and_retried_elsewhere() -> None:
    """A backend that never answers: its attempt is cancelled at the attempt timeout, the
    backend ejected, and the call succeeds on another backend."""
    clock = task.Clock()
    attempts: list[Attempt] = []
    transport = FakeTransport(lambda where, r: transport.hang() if where == KEY[A] else OK)
    d = dispatcher(
        clock,
        transport,
        (A, B),
        strategy=Strategy.ROUND_ROBIN,
        attempts=attempts,
        attempt_timeout=0.5,
    )
    pending = call(d, clock, timeout=10.0)
    clock.advance(0.49)
    assert transport.cancelled == 0 and not pending.called
    clock.advance(0.01)
    assert transport.cancelled == 1 and d.balancer.is_ejected(A)
    assert result_of(clock, pending) == OK
    assert [(a.backend, a.outcome) for a in attempts] == [(A, "timeout"), (B, "ok")]
    assert (d.stats.timeouts, d.stats.retries) == (1, 1)


def test_the_attempt_timeout_never_extends_the_calls_deadline() -> None:
    """An attempt timeout longer than the call's: the attempt ends at the call's deadline."""
    clock = task.Clock()
    transport = FakeTransport(lambda where, r: transport.hang())
    d = dispatcher(clock, transport, attempt_timeout=5.0)
    pending = call(d, clock, timeout=2.0)
    clock.advance(1.99)
    assert not pending.called and transport.cancelled == 0
    clock.advance(0.02)
    with pytest.raises(DeadlineExceeded) as raised:
        result_of(clock, pending)
    assert (raised.value.attempts, transport.cancelled) == (1, 1)
    assert transport.sent[0][1].headers[DEADLINE_HEADER.lower()] == "2000"


def test_by_default_attempts_share_the_timeout_and_the_last_gets_the_rest() -> None:
    """Without attempt_timeout each attempt waits timeout / max_attempts, except the last,
    which waits until the call's deadline: then DeadlineExceeded, every request cancelled."""
    clock = task.Clock()
    attempts: list[Attempt] = []
    transport = FakeTransport(lambda where, r: transport.hang())
    d = dispatcher(clock, transport, attempts=attempts, max_attempts=3)
    with pytest.raises(DeadlineExceeded) as raised:
        result_of(clock, call(d, clock, timeout=3.0))
    waited = [a.finished_at - a.sent_at for a in attempts]
    assert waited[:2] == [pytest.approx(1.0, abs=0.01)] * 2
    assert attempts[2].finished_at == pytest.approx(3.0, abs=0.01) and waited[2] < 1.0
    assert [a.outcome for a in attempts] == ["timeout"] * 3
    assert raised.value.attempts == 3 and transport.cancelled == 3
    assert len({a.backend for a in attempts}) == 3


def test_retries_after_timeouts_spend_the_retry_budget() -> None:
    """Each retry of a timed-out attempt takes a token; with none left the call fails."""
    clock = task.Clock()
    answers = iter([None, OK, None, OK])  # None: hang

    def answer(where: tuple[str, int], request: HTTPRequest) -> Any:
        return next(answers) or transport.hang()

    transport = FakeTransport(answer)
    budget = RetryBudget(clock, ratio=0, cap=1, min_per_second=0, initial=1)
    d = dispatcher(clock, transport, budget=budget, attempt_timeout=0.5)
    assert result_of(clock, call(d, clock)) == OK
    assert (d.stats.retries, budget.tokens) == (1, 0)
    with pytest.raises(ServerError, match="retry budget is spent") as raised:
        result_of(clock, call(d, clock))
    assert raised.value.attempts == 1 and "no answer within 0.5 s" in str(raised.value)
    assert (d.stats.timeouts, d.stats.retries, d.stats.budget_refusals) == (2, 1, 1)
    assert len(transport.sent) == 3


def test_a_hung_backend_is_ejected_then_probed_by_one_call_at_a_time() -> None:
    """A call every 0.1 s while A hangs: every call succeeds; after A's first timeout only
    probes reach it, one at a time (the first once the attempts still hanging there have
    timed out too), each failed one ejecting it for twice as long; once A answers, a probe
    succeeds and A takes ordinary calls again."""
    clock = task.Clock()
    attempts: list[Attempt] = []
    hung = {KEY[A]}

    def answer(where: tuple[str, int], request: HTTPRequest) -> Any:
        if where in hung:
            return transport.hang()
        return task.deferLater(clock, 1.0, lambda: OK)  # slow: P2C keeps choosing A

    transport = FakeTransport(answer)
    # 1.5 s: attempts sent to A just before its first timeout outlast the 1 s ejection
    d = dispatcher(clock, transport, (A, B), attempts=attempts, attempt_timeout=1.5)
    calls = []
    for n in range(450):
        if n == 200:
            hung.clear()  # A answers again from 20 s on
        calls.append(call(d, clock, timeout=10.0))
        clock.advance(0.1)
    clock.advance(10.0)
    assert all(result_of(clock, c) == OK for c in calls)

    to_a = [a for a in attempts if a.backend == A]
    first_failure = min(a.finished_at for a in to_a if a.outcome == "timeout")
    probes = [a for a in to_a if a.probe]
    assert [p.outcome for p in probes] == ["timeout"] * 3 + ["ok"]
    assert len([a for a in to_a if not a.probe and a.finished_at > first_failure]) > 1
    for p in probes:  # nothing else in flight to A while a probe is
        others = [a for a in to_a if a is not p]
        assert all(a.finished_at <= p.sent_at or a.sent_at >= p.finished_at for a in others)
    for n, (p, q) in enumerate(zip(probes, probes[1:], strict=False)):
        assert q.sent_at - p.finished_at >= 2**n * 2 - 1e-6  # ejected 2, 4, 8, 16 s
    ordinary = [a for a in to_a if not a.probe and a.sent_at > first_failure]
    assert ordinary and all(a.sent_at >= probes[-1].finished_at for a in ordinary)
    assert all(a.outcome == "ok" for a in ordinary)


def test_each_attempts_limit_is_sent_in_a_header() -> None:
    """X-Request-Deadline-Ms says how long the client waits for that attempt: its share of
    the timeout, and for the last attempt what is left of the call's timeout."""
    clock = task.Clock()
    answers = iter([json_response(503, {"error": "busy"}), OK])
    transport = FakeTransport(lambda where, r: next(answers))
    d = dispatcher(clock, transport, max_attempts=2)
    result_of(clock, call(d, clock, timeout=2.0))
    first, second = (int(r.headers[DEADLINE_HEADER.lower()]) for _, r in transport.sent)
    assert first == 1000 and 1000 < second < 2000


def test_a_call_sends_one_request_id_on_every_attempt_and_raises_with_it() -> None:
    """Every attempt of a call carries the same X-Request-Id, another call another one, and
    the error of a failed call carries it (attribute and message)."""
    clock = task.Clock()
    transport = FakeTransport(lambda where, r: json_response(503, {"error": "busy"}))
    d = dispatcher(clock, transport, max_attempts=3)
    with pytest.raises(ServerError) as raised:
        result_of(clock, call(d, clock))
    ids = {r.headers[REQUEST_ID_HEADER.lower()] for _, r in transport.sent}
    assert len(transport.sent) == 3 and len(ids) == 1
    (request_id,) = ids
    assert request_id_problem(request_id) is None
    assert raised.value.request_id == request_id and request_id in str(raised.value)
    with pytest.raises(ServerError) as again:
        result_of(clock, call(d, clock))
    assert again.value.request_id not in (None, request_id)


def test_a_refused_call_names_its_request_id() -> None:
    """InvalidRequest (4xx) carries the call's request id, as sent to the server."""
    clock = task.Clock()
    transport = FakeTransport(lambda where, r: json_response(400, {"error": "bad x"}))
    with pytest.raises(InvalidRequest) as raised:
        result_of(clock, call(dispatcher(clock, transport), clock))
    ((_, sent),) = transport.sent
    assert raised.value.request_id == sent.headers[REQUEST_ID_HEADER.lower()]


def test_cancelling_a_call_cancels_its_attempt_without_ejecting() -> None:
    """A caller who gives up cancels the request; the backend is not blamed."""
    clock = task.Clock()
    transport = FakeTransport(lambda where, r: transport.hang())
    d = dispatcher(clock, transport)
    pending = call(d, clock)
    pending.cancel()
    assert transport.cancelled == 1
    assert not any(d.balancer.is_ejected(b) or d.balancer.load(b).in_flight for b in ABC)
    pending.addErrback(lambda f: f.trap(defer.CancelledError))


def test_no_backends_for_a_model_is_no_backend_available() -> None:
    """An empty first snapshot: NoBackendAvailable at once, naming the model and Consul."""
    clock = task.Clock()
    d = dispatcher(clock, FakeTransport(lambda where, r: OK), source=FakeSource(()))
    with pytest.raises(NoBackendAvailable) as raised:
        result_of(clock, call(d, clock))
    assert "'linear'" in str(raised.value) and "Consul" in str(raised.value)


def test_silent_consul_fails_the_call_at_its_deadline() -> None:
    """No first snapshot from Consul within the timeout: NoBackendAvailable, saying why."""
    clock = task.Clock()
    d = dispatcher(clock, FakeTransport(lambda where, r: OK), source=FakeSource())
    pending = call(d, clock, timeout=3.0)
    clock.advance(2.9)
    assert not pending.called
    with pytest.raises(NoBackendAvailable, match="no answer from .* within 3 s"):
        result_of(clock, pending)


def test_an_empty_snapshot_keeps_the_last_known_backends() -> None:
    """Consul restarted empty (no backends for a while): calls go to the ones known before."""
    clock = task.Clock()
    source = FakeSource((A,))
    transport = FakeTransport(lambda where, r: OK)
    d = dispatcher(clock, transport, source=source)
    result_of(clock, call(d, clock))
    source.publish(())
    assert result_of(clock, call(d, clock)) == OK
    assert [where for where, _ in transport.sent] == [KEY[A], KEY[A]]


def test_a_version_goes_only_to_backends_tagged_with_it() -> None:
    """predict(version=2) picks among backends carrying the model:<name>:2 tag."""
    clock = task.Clock()
    one = Backend("one", "127.0.0.1", 1, tags=("model:linear", "model:linear:1"))
    two = Backend("two", "127.0.0.1", 2, tags=("model:linear", "model:linear:2"))
    transport = FakeTransport(lambda where, r: OK)
    d = dispatcher(clock, transport, (one, two))
    request = HTTPRequest("POST", "/v1/models/linear/versions/2:predict", b"{}")
    for _ in range(5):
        done = Deferred.fromCoroutine(d.call("linear", 2, request, Deadline.after(clock, 5)))
        result_of(clock, done)
    assert {where for where, _ in transport.sent} == {("127.0.0.1", 2)}


def test_consul_sources_share_one_watch_per_model() -> None:
    """One health watch per model name, tagged model:<name>, made on first use and reused."""
    made: list[tuple[str, ...]] = []

    def make_watch(tags: tuple[str, ...]) -> Any:
        made.append(tags)
        return FakeSource(())

    sources = ConsulSources(None, ConsulAddress(), make_watch=make_watch)
    assert sources.for_model("linear") is sources.for_model("linear")
    sources.for_model("digits")
    sources.for_service()
    assert made == [("model:linear",), ("model:digits",), ()]


# --- codec ----------------------------------------------------------------------------------------

LINEAR = SignatureSpec(
    "serving_default",
    {"x": TensorSpec("x", np.dtype(np.float32), (None, 3))},
    {"y": TensorSpec("y", np.dtype(np.float32), (None, 2))},
)
MULTI = SignatureSpec(
    "serving_default",
    {
        "a": TensorSpec("a", np.dtype(np.float32), (None, 2)),
        "b": TensorSpec("b", np.dtype(np.int64), (None,)),
    },
    {
        "sum": TensorSpec("sum", np.dtype(np.float32), (None, 2)),
        "count": TensorSpec("count", np.dtype(np.int64), (None,)),
        "name": TensorSpec("name", np.dtype(object), (None,)),
    },
)


def test_one_array_goes_out_columnar_as_the_signatures_dtype() -> None:
    """A float64 array for a float32 input is sent as float32 in {"inputs": …}."""
    body = encode_inputs(np.array([[0.1, 2, 3]]), LINEAR)
    assert body == b'{"inputs":[[0.1,2.0,3.0]]}'


def test_a_dict_of_arrays_goes_out_by_name() -> None:
    """A dict of arrays becomes {"inputs": {name: …}}, each cast to its declared dtype."""
    doc = json.loads(encode_inputs({"a": [[1, 2]], "b": np.array([3], np.int32)}, MULTI, "x"))
    assert doc == {"inputs": {"a": [[1.0, 2.0]], "b": [3]}, "signature_name": "x"}


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    )
)
def test_float32_survives_the_trip_both_ways(array: np.ndarray) -> None:
    """float32 in and out keeps every value exactly, NaN and infinities included."""
    sent = json.loads(encode_inputs(array, LINEAR))["inputs"]
    np.testing.assert_array_equal(np.asarray(sent, dtype=np.float32), array)
    answer = (
        json.dumps({"outputs": array.tolist()}).encode()
        if not np.isfinite(array).all()
        else orjson.dumps({"outputs": array}, option=orjson.OPT_SERIALIZE_NUMPY)
    )
    out = decode_outputs(answer, LINEAR)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, array)


def test_outputs_come_back_with_their_declared_dtypes() -> None:
    """Several outputs: a dict of arrays, float32 stays float32, int64 int64, strings bytes."""
    body = b'{"outputs": {"sum": [[1.5, 2]], "count": [4], "name": ["ok", {"b64": "/w=="}]}}'
    out = decode_outputs(body, MULTI)
    assert isinstance(out, dict)
    assert out["sum"].dtype == np.float32 and out["count"].dtype == np.int64
    assert out["name"].tolist() == [b"ok", b"\xff"]


def test_string_inputs_go_out_as_text_or_b64() -> None:
    """str stays text; bytes go as {"b64": …}, which any binary survives."""
    spec = SignatureSpec("s", {"t": TensorSpec("t", np.dtype(object), (None,))}, {})
    body = encode_inputs(np.array(["a", "b"]), spec)
    assert json.loads(body) == {"inputs": ["a", "b"]}
    assert json.loads(encode_inputs([b"\xff"], spec)) == {"inputs": [{"b64": "/w=="}]}


def test_metadata_document_parses_into_dtypes_and_shapes() -> None:
    """TF Serving's metadata JSON gives each tensor its numpy dtype and static shape."""
    meta = ModelMetadata.parse(METADATA)
    sig = meta.signature(None)
    assert meta.version == 1 and sig is not None
    assert sig.inputs["x"] == TensorSpec("x", np.dtype(np.float32), (None, 3))
    assert sig.outputs["y"].dtype == np.float32
    with pytest.raises(ValueError):
        ModelMetadata.parse({"model_spec": {}})


def test_classification_answers_parse_for_one_and_several_images() -> None:
    """{"predictions": …} for one image, {"results": […]} for several."""
    one = b'{"model": "m", "version": 1, "predictions": [{"label": "rose", "score": 0.9}]}'
    assert decode_classifications(one) == [[Classification("rose", 0.9)]]
    many = b'{"results": [{"predictions": [{"label": "a", "score": 1}]}, [{"label": "b", "score": 0.5}]]}'
    assert decode_classifications(many) == [[("a", 1.0)], [("b", 0.5)]]
    with pytest.raises(ValueError):
        decode_classifications(b'{"results": [{"error": "not an image"}]}')


def test_multipart_body_parses_back_into_its_parts() -> None:
    """The multipart body is RFC 7578: a standard parser finds each field and file intact."""
    image = bytes(range(256))
    body, content_type = encode_multipart(
        [Part("data", image, filename='a "b".png'), Part("top_k", b"3")], "XyZ"
    )
    parts = parse_multipart(content_type, body)
    assert parts == [("data", "a %22b%22.png", "image/png", image), ("top_k", None, None, b"3")]
    with pytest.raises(ValueError):
        encode_multipart([Part("data", b"--XyZ")], "XyZ")


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, Any, Any, bytes]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    parsed = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        kind = part.get_content_type() if "content-type" in part else None
        parsed.append((name, filename, kind, part.get_payload(decode=True)))
    return parsed


# --- the async client through treq, against a stand-in server --------------------------------------

METADATA = {
    "model_spec": {"name": "linear", "signature_name": "", "version": "1"},
    "metadata": {
        "signature_def": {
            "signature_def": {
                "serving_default": {
                    "inputs": {
                        "x": {
                            "dtype": "DT_FLOAT",
                            "tensor_shape": {"dim": [{"size": "-1"}, {"size": "3"}]},
                            "name": "serving_default_x:0",
                        }
                    },
                    "outputs": {
                        "y": {
                            "dtype": "DT_FLOAT",
                            "tensor_shape": {"dim": [{"size": "-1"}, {"size": "2"}]},
                            "name": "StatefulPartitionedCall:0",
                        }
                    },
                    "method_name": "tensorflow/serving/predict",
                }
            }
        }
    },
}
W = np.array([[1, 2], [3, 4], [5, 6]], np.float32)


class StandInServer(Resource):
    """Answers /metadata, :predict (y = x @ W + 0.5) and :classify_image like kleinserve."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    def render(self, request: Request) -> bytes:
        path = request.path.decode()
        body = request.content.read()
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append((request.method.decode(), path, headers, body))
        if path == "/v1/models/linear/metadata":
            return orjson.dumps(METADATA)
        if path == "/v1/models/linear:predict":
            x = np.asarray(json.loads(body)["inputs"], np.float32)
            return orjson.dumps({"outputs": x @ W + 0.5}, option=orjson.OPT_SERIALIZE_NUMPY)
        if path == "/v1/models/linear:classify_image":
            files = [p for p in parse_multipart(headers["content-type"], body) if p[0] == "data"]
            ranked = [{"label": "rose", "score": 0.7}, {"label": "tulip", "score": 0.2}]
            ranked += [{"label": "daisy", "score": 0.1}]
            if len(files) == 1:
                return orjson.dumps({"model": "linear", "version": 1, "predictions": ranked})
            return orjson.dumps({"results": [{"predictions": ranked} for _ in files]})
        request.setResponseCode(404)
        return b'{"error": "Servable not found for request: Latest(nosuch)"}'


def stub_client() -> tuple[AsyncInferenceClient, StandInServer, StubTreq]:
    server = StandInServer()
    stub = StubTreq(server)
    client = AsyncInferenceClient(
        backends=[("127.0.0.1", 8501)], reactor=task.Clock(), transport=TreqTransport(stub)
    )
    return client, server, stub


def settle(stub: StubTreq, d: Deferred[Any]) -> Any:
    for _ in range(20):
        if d.called:
            break
        stub.flush()
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the call never finished"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def test_predict_over_treq_returns_float32_and_reads_metadata_once() -> None:
    """predict sends columnar float32 JSON with the attempt's deadline header (a third of the
    call's timeout); the answer is float32."""
    client, server, stub = stub_client()
    x = np.array([[1, 1, 1], [0, 0, 0]], np.float64)
    for _ in range(2):
        y = settle(stub, client.predict("linear", x, timeout=5))
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, np.array([[9.5, 12.5], [0.5, 0.5]], np.float32))
    paths = [path for _, path, _, _ in server.requests]
    assert (
        paths.count("/v1/models/linear/metadata") == 1
        and paths.count("/v1/models/linear:predict") == 2
    )
    method, _, headers, body = server.requests[-1]
    assert method == "POST" and headers["content-type"] == "application/json"
    assert headers["x-request-deadline-ms"] == "1666"
    assert body == b'{"inputs":[[1.0,1.0,1.0],[0.0,0.0,0.0]]}'


def test_classify_image_sends_multipart_data_and_returns_ranked_labels() -> None:
    """classify_image posts the bytes as the multipart 'data' field; top_k trims the answer."""
    client, server, stub = stub_client()
    top = settle(stub, client.classify_image("linear", ("rose.jpg", b"\xff\xd8jpeg"), top_k=2))
    assert top == [Classification("rose", 0.7), Classification("tulip", 0.2)]
    _, path, headers, body = server.requests[-1]
    parts = parse_multipart(headers["content-type"], body)
    assert path == "/v1/models/linear:classify_image"
    assert parts == [
        ("data", "rose.jpg", "image/jpeg", b"\xff\xd8jpeg"),
        ("top_k", None, None, b"2"),
    ]
    several = settle(stub, client.classify_images("linear", [b"a", b"b"]))
    assert len(several) == 2 and several[1][0].label == "rose"


def test_unknown_model_over_treq_is_invalid_request() -> None:
    """A 404 from the server is InvalidRequest with its status and message."""
    client, _, stub = stub_client()
    with pytest.raises(InvalidRequest) as raised:
        settle(stub, client.status("nosuch"))
    assert raised.value.status == 404 and "Servable not found" in raised.value.server_message


def test_static_backends_and_their_listing() -> None:
    """backends=[…] lists those servers, with this client's load on each."""
    client, _, stub = stub_client()
    infos = settle(stub, client.backends())
    assert [(i.backend.address, i.backend.port, i.load.in_flight) for i in infos] == [
        ("127.0.0.1", 8501, 0)
    ]
    assert StaticSources([("h", 1)]).describe() == "the static backends h:1"
    with pytest.raises(ValueError):
        AsyncInferenceClient("127.0.0.1:8500", backends=[("h", 1)], reactor=task.Clock())


def test_static_backends_with_a_ca_file_are_called_with_https(tmp_path: Path) -> None:
    """backends=[…] with ca_file are TLS servers (scheme https), without it plain http; the
    CA file may hold several certificates, and one holding none is refused naming it."""
    first, _, _ = make_ca(tmp_path, "first CA")
    second, _, _ = make_ca(tmp_path, "second CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(first.read_bytes() + second.read_bytes())
    client = AsyncInferenceClient(backends=[("h", 1)], reactor=task.Clock(), ca_file=str(bundle))
    (info,) = result_of(task.Clock(), client.backends())
    assert scheme_of(info.backend.meta) == "https"
    (plain,) = StaticSources([("h", 1)]).for_model("m").current
    assert scheme_of(plain.meta) == "http"
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificate here")
    with pytest.raises(ValueError, match="empty.pem holds no PEM certificate"):
        AsyncInferenceClient(backends=[("h", 1)], reactor=task.Clock(), ca_file=str(empty))


# --- the blocking face and the command line's pure parts --------------------------------------------


def test_read_image_takes_paths_files_and_bytes(tmp_path: Path) -> None:
    """A path or an open file becomes (filename, bytes); bytes pass through."""
    path = tmp_path / "rose.jpg"
    path.write_bytes(b"jpeg")
    assert read_image(path) == read_image(str(path)) == ("rose.jpg", b"jpeg")
    with open(path, "rb") as f:
        assert read_image(f) == ("rose.jpg", b"jpeg")
    assert read_image(b"raw") == b"raw" and read_image(io.BytesIO(b"x")) == b"x"


def test_cli_parses_global_options_before_or_after_the_command() -> None:
    """--timeout and --backend work on either side of the command; bad HOST:PORT is refused."""
    parser = cli.build_parser()
    args = parser.parse_args(["status", "linear", "--timeout", "2", "--backend", "h:1"])
    assert (args.timeout, args.backend, args.service) == (2.0, [("h", 1)], "inference")
    args = parser.parse_args(["--timeout", "3", "classify", "--model", "m", "x.png"])
    assert (args.timeout, args.backend, args.concurrency, args.top_k) == (3.0, None, 8, 1)
    assert cli.parse_backend("[::1]:8501") == ("::1", 8501)
    with pytest.raises(SystemExit):
        parser.parse_args(["--backend", "nohost", "status", "m"])


def test_cli_attempt_timeout_reaches_the_client() -> None:
    """--attempt-timeout (either side of the command) is the client's; left out, None (a
    share of each call's timeout); zero is refused by the parser and by the client."""
    parser = cli.build_parser()
    args = parser.parse_args(["status", "linear", "--backend", "h:1", "--attempt-timeout", "2.5"])
    assert cli.make_client(task.Clock(), args).attempt_timeout == 2.5
    args = parser.parse_args(["--attempt-timeout", "4", "--backend", "h:1", "status", "linear"])
    assert cli.make_client(task.Clock(), args).attempt_timeout == 4.0
    args = parser.parse_args(["--backend", "h:1", "status", "linear"])
    assert cli.make_client(task.Clock(), args).attempt_timeout is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--attempt-timeout", "0", "status", "linear"])
    with pytest.raises(ValueError, match="attempt_timeout"):
        AsyncInferenceClient(backends=[("h", 1)], reactor=task.Clock(), attempt_timeout=0)


def test_collect_images_expands_folders_and_reports_missing_paths(tmp_path: Path) -> None:
    """Files as given, folders searched for images in sorted order, no duplicates."""
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    for name in ("photos/b.png", "photos/sub/a.JPG", "photos/notes.txt", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    found, problems = collect_images(
        [str(tmp_path / "c.png"), str(tmp_path / "photos"), str(tmp_path / "c.png"), "nope.png"]
    )
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "c.png",
        "photos/b.png",
        "photos/sub/a.JPG",
    ]
    assert problems == ["nope.png: no such file or folder"]


def test_results_write_as_csv_and_json_with_failures() -> None:
    """CSV has a row per (file, rank) and one with the error; JSON keeps the same facts."""
    results = [
        FileResult("a.png", (Classification("7", 0.9), Classification("1", 0.05))),
        FileResult("b.png", error="model 'digits': bad image", error_type="InvalidRequest"),
    ]
    out = io.StringIO()
    write_results(results, out, "csv")
    assert out.getvalue().splitlines() == [
        "path,rank,label,score,error",
        "a.png,1,7,0.9,",
        "a.png,2,1,0.05,",
        "b.png,,,,model 'digits': bad image",
    ]
    out = io.StringIO()
    write_results(results, out, "json")
    assert json.loads(out.getvalue())[1] == {
        "path": "b.png",
        "error": "model 'digits': bad image",
        "error_type": "InvalidRequest",
    }
    text = summary(results, 2.0)
    assert (
        text.startswith("classified 1 of 2 files in 2.0 s") and "InvalidRequest: 1 file(s)" in text
    )


def test_progress_draws_only_when_enabled() -> None:
    """The bar is drawn in place on a terminal and not at all otherwise."""
    clock, shown, hidden = task.Clock(), io.StringIO(), io.StringIO()
    for stream, enabled in ((shown, True), (hidden, False)):
        progress = Progress(4, stream, clock, enabled=enabled)
        for n in range(4):
            clock.advance(0.5)
            progress.advance(failed=n == 0)
        progress.finish()
    assert hidden.getvalue() == ""
    assert shown.getvalue().startswith("\r") and shown.getvalue().endswith("\n")
    assert render(4, 4, 1, 2.0, width=4) == "4/4 [####] 100%  1 failed  2.0/s"


def test_metric_sum_adds_every_sample_of_one_metric() -> None:
    """Samples of the metric are summed; a metric whose name only starts the same is not."""
    text = (
        "# TYPE kleinserve_queued_rows gauge\n"
        'kleinserve_queued_rows{model="a"} 3.0\n'
        'kleinserve_queued_rows{model="b"} 2.0\n'
        "kleinserve_queued_rows_other 100\n"
    )
    assert metric_sum(text, "kleinserve_queued_rows") == 5.0
    assert metric_sum(text, "kleinserve_missing") is None


# --- Peak-EWMA ---------------------------------------------------------------------------------


def answered(
    balancer: Balancer, clock: task.Clock, backend: Backend, seconds: float, model: str = "m"
) -> None:
    """One attempt at ``model`` on ``backend`` that answers after ``seconds``."""
    ticket = balancer.begin(backend, model)
    clock.advance(seconds)
    balancer.end(ticket, healthy=True)


def ewma_picks(
    balancer: Balancer, fleet: tuple[Backend, ...], n: int, model: str = "m"
) -> dict[Backend, int]:
    counts = {b: 0 for b in fleet}
    for _ in range(n):
        counts[balancer.pick(fleet, model=model)] += 1
    return counts


def test_peak_ewma_sends_idle_calls_to_the_faster_backend() -> None:
    """At concurrency 1 P2C splits evenly; Peak-EWMA picks the backend that answers faster."""
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(3), strategy=Strategy.PEAK_EWMA)
    answered(balancer, clock, A, 0.020)
    answered(balancer, clock, B, 0.002)
    assert ewma_picks(balancer, (A, B), 50) == {A: 0, B: 50}
    p2c = Balancer(clock, random.Random(3), strategy=Strategy.P2C)
    answered(p2c, clock, A, 0.020)
    answered(p2c, clock, B, 0.002)
    assert 0 < ewma_picks(p2c, (A, B), 50)[A] < 50


def test_peak_ewma_weighs_latency_by_requests_in_flight() -> None:
    """A backend twice as fast takes calls until it has about twice as many in flight."""
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(3), strategy=Strategy.PEAK_EWMA)
    answered(balancer, clock, A, 0.010)
    answered(balancer, clock, B, 0.020)
    in_flight = {A: 0, B: 0}
    for _ in range(30):
        backend = balancer.pick((A, B), model="m")
        balancer.begin(backend, "m")
        in_flight[backend] += 1
    # cost = latency * (in flight + 1): A's 10 ms * 21 is about B's 20 ms * 11 at the balance
    assert in_flight[A] + in_flight[B] == 30 and 19 <= in_flight[A] <= 20


def test_a_slow_answer_raises_the_average_at_once_and_it_comes_back_gradually() -> None:
    """The peak: one slow answer is the new average; faster ones then pull it down over
    ``decay`` seconds, not at once."""
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(3), strategy=Strategy.PEAK_EWMA)
    answered(balancer, clock, A, 0.010)
    answered(balancer, clock, A, 0.500)
    assert balancer.latency(A, "m") == pytest.approx(0.500)
    answered(balancer, clock, A, 0.010)  # 10 ms after the last answer: weight exp(-0.001)
    assert 0.49 < balancer.latency(A, "m") < 0.5
    for _ in range(100):  # 1 s of 10 ms answers: a tenth of the time constant
        answered(balancer, clock, A, 0.010)
    assert 0.010 < balancer.latency(A, "m") < 0.500 * 0.95


def test_an_idle_backends_average_decays_so_a_once_slow_server_is_tried_again() -> None:
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(3), strategy=Strategy.PEAK_EWMA)
    answered(balancer, clock, A, 0.200)
    answered(balancer, clock, B, 0.010)
    assert ewma_picks(balancer, (A, B), 10)[A] == 0
    clock.advance(10.0 * math.log(0.200 / 0.004))  # A's average decays to 4 ms; B's too
    answered(balancer, clock, B, 0.010)  # B answers again: its average is 10 ms
    assert ewma_picks(balancer, (A, B), 10)[A] == 10


def test_a_new_backend_gets_one_attempt_until_it_answers() -> None:
    """No average yet: free while idle, a penalty while its first attempt is in flight."""
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(3), strategy=Strategy.PEAK_EWMA)
    answered(balancer, clock, A, 0.050)
    assert balancer.pick((A, C), model="m") == C
    first = balancer.begin(C, "m")
    assert ewma_picks(balancer, (A, C), 10)[C] == 0
    clock.advance(0.001)
    balancer.end(first, healthy=True)
    assert balancer.pick((A, C), model="m") == C


def test_answer_times_are_kept_per_model() -> None:
    """A's big model is slow; that does not keep A's small model's calls away from it."""
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(3), strategy=Strategy.PEAK_EWMA)
    answered(balancer, clock, A, 0.500, model="big")
    answered(balancer, clock, B, 0.050, model="big")
    answered(balancer, clock, A, 0.001, model="small")
    answered(balancer, clock, B, 0.005, model="small")
    assert ewma_picks(balancer, (A, B), 10, model="big") == {A: 0, B: 10}
    assert ewma_picks(balancer, (A, B), 10, model="small") == {A: 10, B: 0}


def test_a_quick_failure_never_makes_a_backend_look_faster() -> None:
    clock = task.Clock()
    balancer = Balancer(clock, random.Random(3), strategy=Strategy.PEAK_EWMA)
    answered(balancer, clock, A, 0.100)
    ticket = balancer.begin(A, "m")
    clock.advance(0.001)  # connection refused at once
    balancer.end(ticket, healthy=False)
    assert balancer.latency(A, "m") == pytest.approx(0.100, rel=1e-3)
    ticket = balancer.begin(B, "m")
    clock.advance(2.0)  # a timeout: as slow as it gets
    balancer.end(ticket, healthy=False)
    assert balancer.latency(B, "m") == pytest.approx(2.0)
