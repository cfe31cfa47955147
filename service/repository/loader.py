"""The loader: a version's load and warm-up on its own threads, the retry of a failed load with
backoff, its unload, and giving its memory back.

Reactor thread only; TensorFlow only ever runs on the version's threads (``Threads``). The
loader moves a ``LoadedVersion`` through its states and tells the repository through
``Events``; which versions to load or unload is the repository's (``reconcile.plan``).

* Load: LOADING; load the servable and warm it up on the version's threads; open its hooks
  file, if hooks are enabled (``service.model_hooks``, on the hook threads); then one batching
  queue per signature, AVAILABLE. A load that ends after the repository stopped is closed.
* A failed load: the error is in the status, logged at critical level, and the load is tried
  again after a jittered, doubling delay (``wire.backoff``), up to ``max_retries`` times;
  then END with its error.
* Unload: UNLOADING (no new lookups); wait for the requests that hold the version (``lease``)
  and for its queues to drain; tear its hooks down; close the servable on its threads, stop
  them, give the memory back (``service.memory``); END.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from service import memory
from service.batching import BatchingQueue
from service.metrics import Metrics
from service.model_config import ModelConfig
from service.model_folders import VersionFolder
from service.model_hooks import ModelHooks
from service.repository.versions import AVAILABLE, END, UNLOADING, LoadedVersion, Threads
from service.servables import Servable
from wire.backoff import Backoff

__all__ = ["RELEASE_MEMORY", "Events", "Loader", "PoolThreads", "next_attempt"]

log = Logger(namespace="service.repository")

# Models load after the repository froze TensorFlow's own objects: no unfreeze needed.
RELEASE_MEMORY = partial(memory.release_memory, unfreeze=False)


class PoolThreads:
    """``Threads`` on a ThreadPool of its own (blocking work runs on a pool the service owns,
    never on the reactor thread), started on creation."""

    def __init__(self, reactor: Any, size: int, name: str) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(size, size, name)
        self._pool.start()

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def stop(self) -> None:
        self._pool.stop()  # joins idle threads: the queues have drained before this is called


@attrs.frozen
class Events:
    """What the loader tells the repository, on the reactor thread."""

    running: Callable[[], bool]  # a load is put to use, and a failed one retried, only if so
    changed: Callable[[], None]  # a version's state or error changed
    settled: Callable[[str], None]  # a version of this model became AVAILABLE or END: reconcile
    attempted: Callable[[], None]  # a load attempt ended (readiness may have changed)
    retry: Callable[[LoadedVersion], None]  # a failed load's retry is due


def next_attempt(name: str, folder: VersionFolder, previous: LoadedVersion | None) -> LoadedVersion:
    """A fresh LOADING version for ``folder``, counting on from the failed attempts of
    ``previous`` unless it ended and its folder changed since (a replaced folder starts over)."""
    if previous is None or previous.state == END and previous.fingerprint != folder.fingerprint:
        attempts = 0
    else:
        attempts = previous.attempts
    return LoadedVersion(
        name, folder.number, path=folder.path, fingerprint=folder.fingerprint, attempts=attempts
    )


class Loader:
    """Loads, retries and unloads versions; ``busy`` holds the loads and unloads under way."""

    def __init__(
        self,
        *,
        reactor: Any,
        metrics: Metrics,
        load: Callable[[str, int, Path], Servable],
        make_threads: Callable[[int, str], Threads],
        max_retries: int,
        retry_interval: float,
        release_memory: Callable[[], object],
        events: Events,
        model_hooks: ModelHooks | None = None,
    ) -> None:
        self._reactor = reactor
        self._metrics = metrics
        self._load = load
        self._make_threads = make_threads
        self._max_retries = max_retries
        self._retry_backoff = Backoff(
            initial=retry_interval, maximum=retry_interval * 8, jitter=0.2
        )
        self._release_memory = release_memory
        self._events = events
        self._model_hooks = model_hooks  # None: versions' hooks files are not looked at
        self._rng = random.Random()
        self.busy: set[Deferred] = set()

    def load(self, config: ModelConfig, version: LoadedVersion) -> None:
        """Start loading ``version`` (LOADING, held by the repository) of ``config``'s model."""
        self._track(Deferred.fromCoroutine(self._load_version(config, version)))

    def unload(self, version: LoadedVersion) -> None:
        """Start unloading ``version`` if it is AVAILABLE."""
        self._track(Deferred.fromCoroutine(self.unloading(version)))

    async def settle(self) -> None:
        """Wait until no load or unload is under way (the loads see the repository stopped)."""
        while self.busy:
            await DeferredList(list(self.busy))

    def _track(self, d: Deferred) -> None:
        self.busy.add(d)

        def done(result: object) -> object:
            self.busy.discard(d)
            return result

        d.addBoth(done)
        d.addErrback(lambda f: log.failure("model lifecycle step failed", f))

    async def _load_version(self, config: ModelConfig, version: LoadedVersion) -> None:
        name, number, path = config.name, version.version, version.path
        params = config.batching
        threads = self._make_threads(params.num_batch_threads, f"inference-{name}-{number}")
        version.threads = threads
        log.info("model {name} version {v}: loading {path}", name=name, v=number, path=path)
        started = self._reactor.seconds()
        servable: Servable | None = None
        try:
            servable = await threads.run(self._load, name, number, path)
            await threads.run(servable.warm_up, params.allowed_batch_sizes)
            if self._model_hooks is not None and path is not None:  # service.model_hooks
                version.hooks = await self._model_hooks.open(name, number, path, servable)
        except Exception as e:  # any load failure goes to the status and is retried, not raised
            if servable is not None:
                await threads.run(servable.close)
            threads.stop()
            version.threads = None
            self._metrics.model_loads.labels(name, "failure").inc()
            self._load_failed(config, version, e)
            self._events.attempted()  # a failed first attempt no longer holds start-up back
            return
        self._metrics.model_loads.labels(name, "success").inc()
        self._metrics.model_load_seconds.labels(name).observe(self._reactor.seconds() - started)
        if not self._events.running():  # stopping: the server will not serve it
            await self._close_hooks(version)
            await threads.run(servable.close)
            threads.stop()
            version.state, version.threads = END, None
            return
        for key in servable.signatures:
            queue = BatchingQueue(
                partial(servable.run, key),
                params,
                clock=self._reactor,
                executor=threads.run,
                observer=self._metrics.batch_observer(name, number, key),
            )
            self._metrics.watch_queue(name, number, key, queue)
            version.queues[key] = queue
        version.servable, version.state, version.error = servable, AVAILABLE, ""
        version.attempts = 0
        self._metrics.model_requests.serving(name, number)
        log.info(
            "model {name} version {v}: AVAILABLE (loaded and warmed up in {s:.2f} s)",
            name=name,
            v=number,
            s=self._reactor.seconds() - started,
        )
        self._events.settled(name)  # unloads what this version replaces
        self._events.attempted()

    def _load_failed(self, config: ModelConfig, version: LoadedVersion, error: Exception) -> None:
        version.attempts += 1
        version.error_code = "UNKNOWN"
        reason = f"{type(error).__name__}: {error}"
        total = self._max_retries + 1
        if version.attempts < total and self._events.running():
            delay = self._retry_backoff.delay(version.attempts - 1, self._rng)
            version.error = (
                f"load attempt {version.attempts} of {total} failed: {reason}; "
                f"retrying in {delay:.3g} s"
            )
            version.retry = self._reactor.callLater(delay, self._retry_due, version)
        else:
            version.state = END
            version.error = f"failed to load after {version.attempts} attempts: {reason}"
        log.critical(
            "model {name} version {v} failed to load from {path}: {error}",
            name=config.name,
            v=version.version,
            path=version.path,
            error=version.error,
        )
        self._events.changed()

    def _retry_due(self, version: LoadedVersion) -> None:
        version.retry = None
        self._events.retry(version)

    async def unloading(self, version: LoadedVersion) -> None:
        """Unload ``version`` if it is AVAILABLE; done once it is END."""
        if version.state != AVAILABLE:
            return
        name, number = version.name, version.version
        version.state = UNLOADING
        log.info("model {name} version {v}: UNLOADING", name=name, v=number)
        self._events.changed()
        await version.holders.idle()
        for queue in version.queues.values():
            await queue.drain()
        for key in version.queues:
            self._metrics.forget(name, number, key)
        self._metrics.model_requests.forget_version(name, number)
        await self._close_hooks(version)
        servable, threads = version.servable, version.threads
        version.servable, version.queues, version.threads = None, {}, None
        if threads is not None and servable is not None:
            await threads.run(servable.close)
            threads.stop()
        del servable
        version.state = END
        self._release_memory()
        log.info("model {name} version {v}: END (unloaded)", name=name, v=number)
        self._events.settled(name)

    async def _close_hooks(self, version: LoadedVersion) -> None:
        """Tear the version's hooks down (after its last request) and drop their metrics."""
        hooks, version.hooks = version.hooks, None
        if hooks is not None and self._model_hooks is not None:
            await self._model_hooks.close(hooks)
