"""The batching queue: requests that arrive one at a time become mini-batches.

Two halves, split by thread:

* **Scheduling** runs on the reactor thread and is pure bookkeeping: a FIFO of
  waiting requests, a row count, one timer on the injected clock. It decides
  *when* a batch leaves and *which rows* go in it.
* **Work** runs on the servable's dedicated inference thread(s), reached
  through an injected ``executor``: concatenating the rows, padding to an
  allowed batch size, running the model once, slicing the padding off and
  splitting the outputs per request. Results come back to the reactor thread
  through the executor's Deferred (``deferToThreadPool`` uses
  ``callFromThread``), where each request's Deferred fires.

The reactor thread never waits on an inference thread: it only appends to the
FIFO and hands finished batch lists to the executor.

Policy, as TF Serving's batch scheduler: a batch leaves for a free inference
thread when it is full (``max_batch_size`` rows) or when its oldest row has
waited ``batch_timeout_micros``. With the default timeout of 0, a lone request
on an idle server runs at once, and under load rows pile up while the thread
is busy, so batches grow by themselves. With batching disabled every request
is a batch of its own (still on the inference thread, still bounded).

The FIFO holds at most ``max_enqueued_batches * max_batch_size`` rows; a
request that does not fit is refused at once with 503 + Retry-After.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import attrs
import numpy as np
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from service.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    ServingError,
    Unavailable,
)

log = Logger()

Tensors = Mapping[str, np.ndarray]
ModelFn = Callable[[Tensors], Tensors]
Executor = Callable[..., Deferred]
"""``executor(f, *args)`` runs ``f(*args)`` on an inference thread; the Deferred fires on the reactor."""


@attrs.frozen
class BatchingParameters:
    """TF Serving's batching parameters, same names and meaning (see ``service.config``)."""

    enabled: bool = True
    max_batch_size: int = 32
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 64
    num_batch_threads: int = 1
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    enable_large_batch_splitting: bool = True

    @property
    def max_enqueued_rows(self) -> int:
        return self.max_enqueued_batches * self.max_batch_size

    def padded_size(self, rows: int) -> int:
        """The allowed batch size a batch of ``rows`` runs as (``rows`` itself if none is set)."""
        for size in self.allowed_batch_sizes:
            if size >= rows:
                return size
        return rows


@attrs.frozen
class BatchRecord:
    """What the observer is told about one finished batch (on the reactor thread)."""

    rows: int  # real rows
    padded_rows: int  # rows the model ran (rows + padding)
    requests: int
    queue_seconds: Sequence[float]  # per request part: enqueue → batch start
    run_seconds: float  # the model call alone, measured on the inference thread
    failed: bool


@attrs.define
class Queued:
    """What the queue tells one request about its wait, for its access-log line.

    The front door passes one to ``submit`` (or none: nothing is recorded); the queue fills
    it on the reactor thread as the request's rows start running. A request split over
    several batches (or an upload submitted as several requests with the same record)
    keeps the longest wait and the largest batch.
    """

    wait_seconds: float | None = None  # enqueue -> start of the batch, None: never ran
    batch_size: int | None = None  # real rows of the batch it ran in (padding not counted)

    def batched(self, wait_seconds: float, batch_size: int) -> None:
        if self.wait_seconds is None or wait_seconds > self.wait_seconds:
            self.wait_seconds = wait_seconds
        if self.batch_size is None or batch_size > self.batch_size:
            self.batch_size = batch_size


class BatchObserver(Protocol):
    def batch_finished(self, record: BatchRecord) -> None: ...


class _NullObserver:
    def batch_finished(self, record: BatchRecord) -> None:
        pass


@attrs.define(eq=False)
class _Request:
    inputs: Tensors
    rows: int  # rows this request contributes; 1 for a request that cannot be split
    splittable: bool  # its tensors share a batch dimension the model accepts
    shape_key: tuple  # requests merge only with the same key: inner shapes (or ranks, when padding)
    deferred: Deferred
    enqueued_at: float
    deadline: float | None = None  # clock time after which it is not worth starting
    queued: Queued | None = None  # told its wait and batch size when its rows start
    taken: int = 0  # rows already handed to batches
    answered: int = 0  # rows whose outputs are back
    parts: dict[int, Tensors] = attrs.Factory(dict)  # start row → outputs
    done: bool = False  # answered, failed or cancelled: its remaining rows are skipped


@attrs.frozen
class _Part:
    """Rows ``start:stop`` of one request, as they sit in one batch."""

    request: _Request
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


class BatchingQueue:
    """Merges requests for one signature of one servable into batches.

    ``submit`` is called on the reactor thread and returns a Deferred of the
    request's own outputs. Cancelling that Deferred (the client went away) is
    safe at any moment: waiting rows leave the queue, rows already running
    finish and their outputs are dropped.
    """

    def __init__(
        self,
        model: ModelFn,
        params: BatchingParameters,
        *,
        clock: IReactorTime,
        executor: Executor,
        observer: BatchObserver | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._model = model
        self.params = params
        self._clock = clock
        self._executor = executor
        self._observer = observer or _NullObserver()
        self._timer = timer
        self._waiting: deque[_Request] = deque()
        self._waiting_rows = 0
        self._idle_threads = params.num_batch_threads
        self._wakeup: IDelayedCall | None = None
        self._closing = False
        self._drained: list[Deferred] = []
        self._running: dict[int, float] = {}  # id of a running batch → when it started

    # -- reactor side ---------------------------------------------------------------------------

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch (the queue depth the metrics report)."""
        return self._waiting_rows

    @property
    def busy_threads(self) -> int:
        return self.params.num_batch_threads - self._idle_threads

    def longest_running(self) -> float:
        """Seconds the oldest running batch has been running (0 when idle): a wedged thread shows here."""
        if not self._running:
            return 0.0
        return self._clock.seconds() - min(self._running.values())

    def idle_wait_seconds(self) -> float:
        """How long rows have waited past the batch timeout while a thread sat idle: 0 unless
        scheduling broke (the liveness check turns red past its bound)."""
        if self._idle_threads == 0:
            return 0.0
        head = next((r for r in self._waiting if not r.done), None)
        if head is None:
            return 0.0
        timeout = self.params.batch_timeout_micros / 1e6 if self.params.enabled else 0.0
        return max(0.0, self._clock.seconds() - head.enqueued_at - timeout)

    @property
    def load(self) -> float:
        """Fill of the queue, 0..1: how close it is to refusing requests."""
        return self._waiting_rows / self.params.max_enqueued_rows

    def submit(
        self,
        inputs: Tensors,
        rows: int | None,
        deadline: float | None = None,
        queued: Queued | None = None,
    ) -> Deferred:
        """Queue one request; ``rows`` is its batch dimension, or None if it must run alone.

        A request still waiting at ``deadline`` (clock seconds) fails with 504 instead of
        taking a batch slot: its client has given up on it. ``queued``, if given, is told
        the request's wait and batch size when its rows start running.
        """
        p = self.params
        if self._closing:
            raise Unavailable("the model is being unloaded; retry", retry_after=1)
        splittable = rows is not None and p.enabled
        size = rows if splittable and rows is not None else 1
        if splittable and size > p.max_batch_size and not p.enable_large_batch_splitting:
            raise InvalidArgument(
                f"the request has {size} instances, more than max_batch_size "
                f"{p.max_batch_size}; send smaller requests"
            )
        if self._waiting_rows + size > p.max_enqueued_rows and self._waiting_rows > 0:
            raise ResourceExhausted(
                f"the server is overloaded ({self._waiting_rows} rows queued for this model); "
                "retry later",
                retry_after=1,
            )
        request = _Request(
            inputs=inputs,
            rows=size,
            splittable=splittable,
            shape_key=self._shape_key(inputs),
            deferred=Deferred(lambda d: self._cancel(request)),
            enqueued_at=self._clock.seconds(),
            deadline=deadline,
            queued=queued,
        )
        self._waiting.append(request)
        self._waiting_rows += size
        self._schedule()
        return request.deferred

    def _shape_key(self, inputs: Tensors) -> tuple:
        if self.params.pad_variable_length_inputs:
            return tuple((name, np.ndim(value)) for name, value in sorted(inputs.items()))
        return tuple((name, np.shape(value)[1:]) for name, value in sorted(inputs.items()))

    def drain(self) -> Deferred:
        """Refuse new requests; fire once every queued and running request is answered."""
        self._closing = True
        d: Deferred = Deferred()
        self._drained.append(d)
        self._check_drained()
        return d

    def abort_waiting(self, error: ServingError) -> int:
        """Fail every request that has rows still waiting (not those only running) with
        ``error``; the number failed. At the shutdown deadline, queued clients get an answer
        (503, retry elsewhere) rather than a dropped connection."""
        failed = 0
        for request in list(self._waiting):
            if not request.done:
                self._fail(request, error)
                failed += 1
        self._schedule()
        return failed

    def _cancel(self, request: _Request) -> None:
        """The client gave up: the request is done, whatever state it is in.

        Its rows still waiting leave the queue; rows already running finish (a batch cannot
        be taken back from the model) and their outputs are dropped in ``_deliver``. Twisted
        fires the Deferred with CancelledError once this returns, so nothing here may fire it.
        """
        if request.done:
            return
        request.done = True
        self._waiting_rows -= request.rows - request.taken
        request.parts.clear()
        self._schedule()  # a cancelled head may have been holding a timer

    def _head(self) -> _Request | None:
        """The oldest request still waiting, after dropping answered and expired ones."""
        while self._waiting:
            head = self._waiting[0]
            if head.done:
                self._waiting.popleft()
            elif (
                head.deadline is not None
                and head.taken == 0
                and self._clock.seconds() >= head.deadline
            ):
                self._fail(
                    head, DeadlineExceeded("the request's deadline passed while it was queued")
                )
            else:
                return head
        return None

    def _schedule(self) -> None:
        """Start batches on idle threads while there is a batch ready to leave."""
        while self._idle_threads > 0:
            head = self._head()
            if head is None:
                break
            deadline = head.enqueued_at + self.params.batch_timeout_micros / 1e6
            full = self._waiting_rows >= self.params.max_batch_size
            if self.params.enabled and not full and self._clock.seconds() < deadline:
                self._wake_at(deadline)
                return
            self._start(self._take_batch())
        self._wake_at(None)
        self._check_drained()

    def _wake_at(self, deadline: float | None) -> None:
        if self._wakeup is not None and self._wakeup.active():
            if deadline is not None and self._wakeup.getTime() <= deadline:
                return
            self._wakeup.cancel()
        self._wakeup = None
        if deadline is not None:
            delay = max(0.0, deadline - self._clock.seconds())
            self._wakeup = self._clock.callLater(delay, self._schedule)

    def _take_batch(self) -> list[_Part]:
        """Pop up to max_batch_size rows from the FIFO head, splitting a large request if allowed."""
        p = self.params
        room = p.max_batch_size if p.enabled else 1
        parts: list[_Part] = []
        while room > 0 and (request := self._head()) is not None:
            remaining = request.rows - request.taken
            if parts and request.shape_key != parts[0].request.shape_key:
                break  # rows of other inner shapes cannot share this batch; they lead the next
            if not request.splittable:
                if parts:  # runs alone, in a batch of its own
                    break
                take = remaining
            elif remaining <= room:
                take = remaining
            elif p.enable_large_batch_splitting:
                take = room
            elif parts:
                break
            else:  # cannot happen: submit refuses requests larger than a batch
                take = remaining
            parts.append(_Part(request, request.taken, request.taken + take))
            request.taken += take
            self._waiting_rows -= take
            room -= take
            if request.taken == request.rows:
                self._waiting.popleft()
            if not request.splittable:
                break
        return parts

    def _start(self, parts: list[_Part]) -> None:
        self._idle_threads -= 1
        now = self._clock.seconds()
        queue_seconds = [now - part.request.enqueued_at for part in parts]
        rows = sum(part.rows for part in parts)
        for part, waited in zip(parts, queue_seconds, strict=True):
            if part.request.queued is not None:
                part.request.queued.batched(waited, rows)
        self._running[id(parts)] = now
        d = self._executor(self._run_batch, parts)
        d.addBoth(self._finished, parts, queue_seconds)

    def _finished(
        self,
        result: tuple[list[Tensors | ServingError], float, int] | Failure,
        parts: list[_Part],
        queue_seconds: list[float],
    ) -> None:
        # Answer first, free the thread after: requests submitted from the answers' callbacks
        # (a client sending its next request) then join the next batch instead of grabbing
        # the idle thread one by one. Whatever answering does, the thread is freed.
        try:
            self._answer(result, parts, queue_seconds)
        finally:
            del self._running[id(parts)]
            self._idle_threads += 1
            self._schedule()

    def _answer(
        self,
        result: tuple[list[Tensors | ServingError], float, int] | Failure,
        parts: list[_Part],
        queue_seconds: list[float],
    ) -> None:
        rows = sum(part.rows for part in parts)
        if isinstance(result, Failure):
            error = _as_serving_error(result)
            outcomes: list[Tensors | ServingError] = [error] * len(parts)
            record = BatchRecord(rows, rows, len(parts), queue_seconds, 0.0, failed=True)
        else:
            outcomes, run_seconds, padded = result
            record = BatchRecord(rows, padded, len(parts), queue_seconds, run_seconds, failed=False)
        for part, outcome in zip(parts, outcomes, strict=True):
            try:
                if isinstance(outcome, ServingError):  # failed, or refused alone (see _run_batch)
                    self._fail(part.request, outcome)
                else:
                    self._deliver(part, outcome)
            except Exception:  # one answer going wrong must not stop the others or the queue
                log.failure("answering a request failed")
                self._fail(
                    part.request, Internal("answering the request failed; see the server log")
                )
        try:
            self._observer.batch_finished(record)
        except Exception:
            log.failure("batch observer failed")

    def _deliver(self, part: _Part, outputs: Tensors) -> None:
        request = part.request
        if request.done:
            return
        request.parts[part.start] = outputs
        request.answered += part.rows
        if request.answered < request.rows:
            return
        pieces = [request.parts[k] for k in sorted(request.parts)]
        whole = (
            pieces[0]
            if len(pieces) == 1
            else {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}
        )
        request.done = True
        request.parts.clear()
        request.deferred.callback(whole)

    def _fail(self, request: _Request, error: ServingError) -> None:
        if request.done:
            return
        request.done = True
        self._waiting_rows -= request.rows - request.taken
        request.parts.clear()
        request.deferred.errback(Failure(error))

    def _check_drained(self) -> None:
        if self._drained and self._head() is None and self.busy_threads == 0:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    # -- inference thread side ------------------------------------------------------------------

    def _run_batch(self, parts: list[_Part]) -> tuple[list[Tensors | ServingError], float, int]:
        """Concatenate, pad, run once, split. Runs on an inference thread.

        If the model refuses a merged batch as invalid input (what validation before queueing
        cannot see: a serialized tf.Example the model parses differently, say), each request's
        rows run again on their own, so only the request at fault gets the error.
        """
        started = self._timer()
        try:
            outputs, padded, run_seconds = self._run_merged(parts)
        except InvalidArgument:
            if len({id(part.request) for part in parts}) < 2:
                raise
            return self._run_each(parts), self._timer() - started, sum(p.rows for p in parts)
        return list(outputs), run_seconds, padded

    def _run_each(self, parts: list[_Part]) -> list[Tensors | ServingError]:
        results: list[Tensors | ServingError] = []
        for part in parts:
            try:
                (outputs,), _, _ = self._run_merged([part])
                results.append(outputs)
            except InvalidArgument as e:
                results.append(e)
        return results

    def _run_merged(self, parts: list[_Part]) -> tuple[list[Tensors], int, float]:
        """Concatenate, pad, run once, split: (outputs per part, padded rows, model seconds)."""
        rows = sum(part.rows for part in parts)
        if len(parts) == 1 and not parts[0].request.splittable:
            inputs = parts[0].request.inputs  # runs as sent: nothing to merge or pad
            padded = rows
        else:
            padded = self.params.padded_size(rows)
            inputs = {
                name: _merge(
                    [part.request.inputs[name][part.start : part.stop] for part in parts], padded
                )
                for name in parts[0].request.inputs
            }
        started = self._timer()
        outputs = self._model(inputs)
        run_seconds = self._timer() - started
        if len(parts) == 1 and not parts[0].request.splittable:
            return [dict(outputs)], padded, run_seconds
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != padded:
                raise Internal(
                    f"output {name!r} has shape {list(value.shape)}, but the batch had {padded} "
                    "rows; the model does not keep the batch dimension"
                )
        split: list[Tensors] = []
        offset = 0
        for part in parts:
            split.append(
                {name: value[offset : offset + part.rows] for name, value in outputs.items()}
            )
            offset += part.rows
        return split, padded, run_seconds


def _merge(pieces: list[np.ndarray], padded: int) -> np.ndarray:
    """Concatenate row blocks and pad to ``padded`` rows by repeating the first row.

    Blocks whose inner dimensions differ (only merged with pad_variable_length_inputs)
    are first zero-padded at the end of each dimension to the largest.
    """
    inner = np.max([piece.shape[1:] for piece in pieces], axis=0) if pieces[0].ndim > 1 else ()
    pieces = [
        piece
        if piece.shape[1:] == tuple(inner)
        else np.pad(
            piece,
            [(0, 0), *((0, int(m - d)) for d, m in zip(piece.shape[1:], inner, strict=True))],
            constant_values=b"" if piece.dtype == object else 0,
        )
        for piece in pieces
    ]
    rows = sum(len(piece) for piece in pieces)
    if padded > rows:
        pieces = [*pieces, np.repeat(pieces[0][:1], padded - rows, axis=0)]
    if len(pieces) == 1:
        return pieces[0]
    return np.concatenate(pieces)


def _as_serving_error(failure: Failure) -> ServingError:
    if isinstance(failure.value, ServingError):
        return failure.value
    if isinstance(failure.value, CancelledError):
        return Unavailable("inference was cancelled (the server is stopping); retry", retry_after=1)
    log.failure("inference failed", failure)
    return Internal(f"inference failed: {type(failure.value).__name__}: {failure.value}")
