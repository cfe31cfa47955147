"""A served version: one version of a model, its state, and while it serves its servable,
threads and batching queues.

Reactor thread only. A request finds a version through ``service.repository.routing``,
holds it with ``lease()`` (taken before its first await) and queues its inputs with
``predict``; ``service.repository.loader`` moves it through its states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import attrs
import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from service.batching import BatchingQueue
from service.errors import ServingError, Unavailable
from service.lifecycle import InFlight
from service.model_hooks import VersionHooks
from service.servables import Servable
from service.signature import Signature

__all__ = [
    "AVAILABLE",
    "END",
    "LOADING",
    "UNLOADING",
    "LoadedVersion",
    "State",
    "Threads",
    "batch_rows",
    "version_status",
]


class State(StrEnum):
    """TF Serving's ModelVersionStatus states. Each member is its name as a ``str``, so it
    compares equal to ``"AVAILABLE"`` and is written as such in JSON status and metric labels."""

    LOADING = "LOADING"  # loading and warming up on its threads; lookups never return it
    AVAILABLE = "AVAILABLE"  # serving
    UNLOADING = "UNLOADING"  # no new lookups; the requests holding it finish, then it closes
    END = "END"  # unloaded, or given up after its last failed load (with its error)


LOADING, AVAILABLE, UNLOADING, END = State.LOADING, State.AVAILABLE, State.UNLOADING, State.END


class Threads(Protocol):
    """Where one version's blocking work runs: its loading, warm-up and batches."""

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred: ...

    def stop(self) -> None: ...


@attrs.define(eq=False)
class LoadedVersion:
    """One version of a model: its state, and while it serves its servable, threads and queues."""

    name: str
    version: int
    state: State = attrs.field(default=State.LOADING, converter=State)
    error: str = ""
    error_code: str = "UNKNOWN"  # TF Serving's code for ``error``, when there is one
    servable: Servable | None = None
    queues: dict[str, BatchingQueue] = attrs.Factory(dict)
    threads: Threads | None = None
    path: Path | None = None
    fingerprint: int | None = None  # of the folder this version was (last) loaded from
    attempts: int = 0  # failed loads of this folder so far
    retry: IDelayedCall | None = None  # a pending retry of a failed load
    holders: InFlight = attrs.Factory(InFlight)  # requests that hold this version (lease())
    hooks: VersionHooks | None = None  # its hooks file's functions (service.model_hooks)

    def signature(self, name: str | None) -> Signature:
        return self.require().signature(name)

    def predict(
        self,
        signature_name: str | None,
        inputs: Mapping[str, np.ndarray],
        deadline: float | None = None,
    ) -> Deferred:
        """Queue one request; the Deferred fires on the reactor with the request's own outputs.

        ``deadline`` (clock seconds): past it, a request still queued fails with 504 unrun.
        """
        servable = self.require()
        signature = servable.signature(signature_name)
        return self.queues[signature.name].submit(inputs, batch_rows(signature, inputs), deadline)

    def require(self) -> Servable:
        """The servable; a request holding a lease may still use it while it is UNLOADING."""
        if self.servable is None or self.state not in (AVAILABLE, UNLOADING):
            raise Unavailable(
                f"model {self.name!r} version {self.version} is {self.state}, not AVAILABLE",
                retry_after=1,
            )
        return self.servable

    @contextlib.contextmanager
    def lease(self) -> Iterator[LoadedVersion]:
        """Hold this version for one request: it is not unloaded before the request is done.

        Taken right after the lookup (no await in between), so a request that found the
        version AVAILABLE can always finish on it, however long its body takes to decode.
        """
        self.holders.started()
        try:
            yield self
        finally:
            self.holders.finished()

    def status(self, fault: ServingError | None = None) -> dict[str, Any]:
        """TF Serving's ModelVersionStatus; ``fault``: a model store fault to show instead of
        this version's own error (or its OK)."""
        if fault is not None:
            return version_status(self.version, self.state, fault.code, fault.message)
        return version_status(
            self.version, self.state, self.error_code if self.error else "OK", self.error
        )


def version_status(version: int, state: str, error_code: str, message: str) -> dict[str, Any]:
    """One entry of TF Serving's ``model_version_status`` (the state as a plain ``str``)."""
    return {
        "version": str(version),
        "state": str(state),
        "status": {"error_code": error_code, "error_message": message},
    }


def batch_rows(signature: Signature, inputs: Mapping[str, np.ndarray]) -> int | None:
    """The request's batch size if it can be merged with others along axis 0, else None."""
    if not signature.batchable:
        return None
    sizes = {value.shape[0] if value.ndim else None for value in inputs.values()}
    if len(sizes) != 1 or None in sizes:
        return None
    (rows,) = sizes
    return rows if rows else None  # an empty request runs alone rather than as a 0-row slice
