"""One helper for synchronous tests: the result of a Deferred that must already have fired."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred


def result_of(d: Deferred) -> Any:
    """The Deferred's result, raising its failure; an unfired Deferred fails the test."""
    results: list = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired (the work did not complete synchronously)"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]
