"""The plain types of the data plane (``service.dataplane``) that front doors name.

Kept apart from the data plane itself, which imports the model repository and through it
TensorFlow: the HTTP front doors import these in the front processes of
``--http_processes`` (``service.front``), which must not load TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import numpy as np

Tensors = dict[str, np.ndarray]
Answer = TypeVar("Answer")  # what a front door makes of an answer (``through_hooks``)
# A front door's decoding for ``through_hooks``: signature name, inputs, how to answer.
Decoded = tuple[str | None, Tensors, Any]


@attrs.frozen
class Encoded:
    """An answer's body, ready to send, and its content type."""

    body: bytes
    content_type: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()  # any other headers the answer needs


@attrs.frozen
class ModelTarget:
    """The model a request names: a version number, a label, or neither (the latest)."""

    name: str
    version: int | None = None
    label: str | None = None


class Cancellation:
    """Set once when the caller gives up; what was registered with ``on_cancel`` then runs.

    A front door makes one per request and wires it to its own "caller went away" signal
    (for HTTP, ``request.notifyFinish()``'s errback).
    """

    def __init__(self) -> None:
        self.cancelled = False
        self._callbacks: list[Callable[[], object]] = []

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` when cancelled (at once if already cancelled)."""
        if self.cancelled:
            callback()
        else:
            self._callbacks.append(callback)

    def cancel(self, _: object = None) -> None:
        """The caller went away (any argument is ignored: it may be an errback's failure)."""
        if self.cancelled:
            return
        self.cancelled = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()
