"""A budget for request bodies held at once: bytes received or being decoded, over all requests.

A body costs memory from its first byte until it is decoded: the bytes themselves, then
while decoding several times their size (copies the fast path scans, the parsed numbers,
the arrays). ``--max_request_bytes`` bounds one body; this bounds their sum, so six large
bodies at once cannot take the process to several GB. Each request takes a ``BodyHold``:
it reserves the declared ``Content-Length`` when the headers arrive (a chunked body: the
bytes received so far, as they arrive), and a reservation that would take the total past
the limit is refused, so the request is answered 503 with Retry-After and its body is
discarded as it arrives. The hold is given back once the body is decoded, or when the
request is answered or its client goes away, whichever comes first; a client that goes
away while its body is being decoded on a thread gives it back when that decode ends,
since the memory is in use until then.

Everything here runs on the reactor thread: plain counters, no locks.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class RequestBudget:
    """At most ``limit`` bytes of request bodies held at once, shared by every request."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"the request byte budget must be positive, not {limit}")
        self.limit = limit
        self.held = 0

    def hold(self) -> BodyHold:
        """A new, empty share of the budget for one request's body."""
        return BodyHold(self)


class BodyHold:
    """One request's share of a ``RequestBudget``: grown as its body arrives, released once."""

    def __init__(self, budget: RequestBudget) -> None:
        self._budget = budget
        self.bytes = 0
        self.refused = False
        self._decoding = False
        self._finished = False
        self._until_finished = False

    @property
    def limit(self) -> int:
        """The budget's limit (for error messages)."""
        return self._budget.limit

    def reserve(self, total: int) -> bool:
        """Grow this share to ``total`` bytes; False if that would pass the budget's limit.

        A refused hold lets go of what it held (the body is discarded) and refuses from then on.
        """
        if self.refused:
            return False
        extra = total - self.bytes
        if extra <= 0:
            return True
        if self._budget.held + extra > self._budget.limit:
            self.release()
            self.refused = True
            return False
        self._budget.held += extra
        self.bytes = total
        return True

    def release(self) -> None:
        """Give the bytes back; later calls do nothing."""
        self._budget.held -= self.bytes
        self.bytes = 0

    def finished(self, _: object = None) -> None:
        """The request was answered or its client left (a ``notifyFinish`` callback and errback).

        A decode still running keeps the bytes until it ends (``decoding`` releases them then).
        """
        self._finished = True
        if not self._decoding:
            self.release()

    def decoding(self, decode: Deferred, *, until_finished: bool = False) -> Deferred:
        """Hold the bytes until ``decode`` (the body's decode) fires, then release them; with
        ``until_finished``, until the request is also answered or its client gone
        (``finished``): for a decode whose tensors are views of the body, which then lives as
        long as they do.

        Returns a Deferred with ``decode``'s result to await instead of ``decode`` itself:
        cancelling it (Klein cancels the route of a client that left) leaves the decode
        running on its thread and its bytes counted until it ends, since they are in use.
        """
        self._decoding = True
        self._until_finished = self._until_finished or until_finished

        def ended(result: object) -> object:
            self._decoding = False
            if self._finished or not self._until_finished or isinstance(result, Failure):
                self.release()
            return result

        decode.addBoth(ended)
        result: Deferred = Deferred()
        decode.chainDeferred(
            result
        )  # once ``result`` is cancelled, what ``decode`` fires is dropped
        return result
