"""The model repository: which models and versions this server holds, and in what state.

A model is a base path in TF Serving's layout (numeric version folders). Each
loaded version is a ``LoadedVersion``: the servable, its own inference
thread pool, and one batching queue per signature. TensorFlow only ever runs
on that pool; this module itself runs on the reactor thread.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from service.batching import BatchingParameters, BatchingQueue
from service.errors import NotFound, ServingError, Unavailable
from service.metrics import Metrics
from service.servable import Servable, find_versions
from service.signature import Signature

log = Logger()

# TF Serving's ModelVersionStatus states.
LOADING, AVAILABLE, UNLOADING, END = "LOADING", "AVAILABLE", "UNLOADING", "END"


@attrs.frozen
class ModelConfig:
    """One model to serve: TF Serving's ``config { name base_path }``."""

    name: str
    base_path: Path
    batching: BatchingParameters = BatchingParameters(enabled=False)


@attrs.define(eq=False)
class LoadedVersion:
    """One version of a model: its state, and once AVAILABLE its servable, threads and queues."""

    name: str
    version: int
    state: str = LOADING
    error: str = ""
    servable: Servable | None = None
    queues: dict[str, BatchingQueue] = attrs.Factory(dict)
    pool: ThreadPool | None = None

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
        if self.state != AVAILABLE or self.servable is None:
            raise Unavailable(
                f"model {self.name!r} version {self.version} is {self.state}, not AVAILABLE",
                retry_after=1,
            )
        return self.servable

    def status(self) -> dict[str, Any]:
        error_code = "UNKNOWN" if self.error else "OK"
        return {
            "version": str(self.version),
            "state": self.state,
            "status": {"error_code": error_code, "error_message": self.error},
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


class ModelRepository(Service):
    """Loads the configured models on start, serves lookups, drains and unloads on stop."""

    def __init__(
        self,
        models: Sequence[ModelConfig],
        *,
        reactor: Any,
        metrics: Metrics | None = None,
        load: Callable[[str, int, Path], Servable] = Servable.load,
    ) -> None:
        self.configs = {m.name: m for m in models}
        self.versions: dict[str, dict[int, LoadedVersion]] = {m.name: {} for m in models}
        self._reactor: IReactorTime & IReactorThreads = reactor  # type: ignore[valid-type]
        self.clock: IReactorTime = reactor
        self._metrics = metrics or Metrics()
        self._load = load
        self._ready: list[Deferred] = []

    # -- lookups (reactor thread) ---------------------------------------------------------------

    def lookup(self, name: str, version: int | None = None) -> LoadedVersion:
        """The version to serve a request: a given one, or the highest AVAILABLE one."""
        versions = self.versions.get(name)
        if versions is None:
            raise NotFound(
                f"Servable not found for request: Latest({name}): no model named {name!r}"
            )
        if version is not None:
            found = versions.get(version)
            if found is None:
                raise NotFound(
                    f"Servable not found for request: Specific({name}, {version}): "
                    f"model {name!r} has no version {version}"
                )
            return found
        available = [v for v in versions.values() if v.state == AVAILABLE]
        if not available:
            states = (
                ", ".join(f"{v.version}: {v.state}" for v in versions.values()) or "none found yet"
            )
            raise Unavailable(f"model {name!r} has no AVAILABLE version ({states})", retry_after=1)
        return max(available, key=lambda v: v.version)

    def status(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
        if version is not None:
            return [self.lookup(name, version).status()]
        if name not in self.versions:
            raise NotFound(f"Could not find any versions of model {name}")
        return [v.status() for _, v in sorted(self.versions[name].items(), reverse=True)]

    @property
    def ready(self) -> bool:
        """Every configured model has an AVAILABLE version."""
        return all(
            any(v.state == AVAILABLE for v in versions.values())
            for versions in self.versions.values()
        )

    def when_ready(self) -> Deferred:
        d: Deferred = Deferred()
        if self.ready:
            d.callback(None)
        else:
            self._ready.append(d)
        return d

    def queues(self) -> list[BatchingQueue]:
        return [
            q
            for versions in self.versions.values()
            for v in versions.values()
            for q in v.queues.values()
        ]

    # -- lifecycle ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        loads = [
            Deferred.fromCoroutine(self._load_model(config)) for config in self.configs.values()
        ]
        DeferredList(loads).addCallback(lambda _: self._loaded_all())

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._unload_all())

    async def _load_model(self, config: ModelConfig) -> None:
        try:
            versions = find_versions(config.base_path)
        except ServingError as e:
            log.error("model {name}: {error}", name=config.name, error=e)
            return
        if not versions:
            log.error(
                "model {name}: no numeric version folder in {path}",
                name=config.name,
                path=config.base_path,
            )
            return
        await self._load_version(config, versions[-1])

    async def _load_version(self, config: ModelConfig, number: int) -> None:
        version = LoadedVersion(config.name, number)
        self.versions[config.name][number] = version
        params = config.batching
        pool = ThreadPool(
            params.num_batch_threads, params.num_batch_threads, f"inference-{config.name}-{number}"
        )
        pool.start()
        version.pool = pool
        path = config.base_path / str(number)
        log.info("model {name} version {v}: loading {path}", name=config.name, v=number, path=path)
        try:
            servable = await deferToThreadPool(
                self._reactor, pool, self._load, config.name, number, path
            )
            await deferToThreadPool(
                self._reactor, pool, servable.warm_up, params.allowed_batch_sizes
            )
        except Exception as e:  # any load failure is reported in the status, not raised
            log.failure("model {name} version {v} failed to load", name=config.name, v=number)
            version.state, version.error = END, f"{type(e).__name__}: {e}"
            pool.stop()
            version.pool = None
            return
        for key in servable.signatures:
            queue = BatchingQueue(
                partial(servable.run, key),
                params,
                clock=self._reactor,
                executor=lambda f, *args: deferToThreadPool(self._reactor, pool, f, *args),
                observer=self._metrics.batch_observer(config.name, number, key),
            )
            self._metrics.watch_queue(config.name, number, key, queue)
            version.queues[key] = queue
        version.servable, version.state = servable, AVAILABLE
        log.info("model {name} version {v}: AVAILABLE", name=config.name, v=number)
        self._check_ready()

    def _loaded_all(self) -> None:
        # TensorFlow leaves ~300k long-lived objects behind; freezing them keeps every later
        # garbage collection (triggered by parsing large request bodies) from rescanning them.
        gc.collect()
        gc.freeze()

    def _check_ready(self) -> None:
        if self.ready:
            waiters, self._ready = self._ready, []
            for d in waiters:
                d.callback(None)

    async def _unload_all(self) -> None:
        for versions in self.versions.values():
            for version in versions.values():
                if version.state != AVAILABLE:
                    continue
                version.state = UNLOADING
                for queue in version.queues.values():
                    await queue.drain()
                if version.pool is not None:
                    version.pool.stop()
                version.state, version.servable, version.queues = END, None, {}
