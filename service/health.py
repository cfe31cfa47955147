"""Is this server serving? Liveness and readiness from what its queues are doing.

A process can be up, answer ``/healthz`` and keep its Consul TTL passing while no
request will ever be answered again (an inference thread stuck in the model, a
queue that stopped dispatching). So liveness looks at the work itself:

* a batch that has run longer than ``stall_seconds`` (``--inference_stall_seconds``)
  means an inference thread is stuck in the model;
* rows that have waited past their batch timeout for longer than
  ``queue_stall_seconds`` while a thread sat idle mean scheduling broke.

Either makes liveness fail (``/healthz`` 503, the Consul TTL check critical) so
that Kubernetes restarts the process and Consul takes it out, and readiness fail
too (``/readyz`` 503). While the server drains on stop, readiness fails and
liveness holds: it is going away on its own.

Everything here runs on the reactor thread and only reads counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from service.batching import BatchingQueue

if TYPE_CHECKING:
    from service.repository import ModelRepository

QUEUE_STALL_SECONDS = 5.0
"""Rows may wait this long past their batch timeout with a thread idle before liveness fails.
Scheduling is synchronous on the reactor, so any such wait is a bug, not load."""


class Health:
    """Liveness (``problem()``) and the draining flag of one server."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        stall_seconds: float,
        queue_stall_seconds: float = QUEUE_STALL_SECONDS,
    ) -> None:
        self._repository = repository
        self.stall_seconds = stall_seconds
        self.queue_stall_seconds = queue_stall_seconds
        self.draining = False

    def _queues(self) -> Iterator[tuple[str, int, str, BatchingQueue]]:
        for name, versions in self._repository.versions.items():
            for number, version in versions.items():
                for signature, queue in version.queues.items():
                    yield name, number, signature, queue

    def problem(self) -> str | None:
        """Why this server is not serving, or None while it is (cheap: every check calls it)."""
        for name, number, signature, queue in self._queues():
            running = queue.longest_running()
            where = f"model {name} version {number} signature {signature}"
            if running > self.stall_seconds:
                return (
                    f"{where}: a batch has been running for {running:.0f} s "
                    f"(--inference_stall_seconds={self.stall_seconds:g}): an inference thread is stuck"
                )
            waiting = queue.idle_wait_seconds()
            if waiting > self.queue_stall_seconds:
                return (
                    f"{where}: {queue.queued_rows} rows have waited {waiting:.0f} s with an "
                    "inference thread idle: the batching queue is stuck"
                )
        return None

    def alive(self) -> bool:
        return self.problem() is None
