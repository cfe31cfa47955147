"""ModelRepository: the Service that keeps the configured models' aspired versions loaded.

A model is a base path in TF Serving's layout (numeric version folders) with a version
policy and labels (``service.model_config``). Each version held is a ``LoadedVersion``
(``versions``): its servable, its own inference threads and one batching queue per
signature. This module runs on the reactor thread; files are scanned on the repository's
scan thread and TensorFlow only ever runs on a version's own threads.

How the set of versions changes (TF Serving's availability-preserving policy):

* A scan (every ``file_system_poll_wait`` seconds) finds the ready version folders
  (``service.model_folders``: complete and no longer being copied) and its faults
  (``store``); a config reload (``apply``) changes models, policies and labels.
* After each scan, load or unload, ``_reconcile`` asks the pure policy
  (``reconcile.plan``) for the loads and unloads that bring what is held to what the
  config wants, and carries them out through the ``loader``: a version takes traffic only
  once loaded *and warmed up*, an old one unloads only once its replacement is AVAILABLE,
  a failed load is retried with backoff.
* Lookups and status (``routing``) read the same state; the Consul tags and ``/readyz``
  follow ``served()`` and ``ready``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from service import memory
from service.batching import BatchingQueue
from service.errors import ServingError
from service.metrics import Metrics
from service.model_config import ModelConfig
from service.model_folders import ModelScan, VersionFolder, os_fault, scan_model
from service.model_hooks import ModelHooks
from service.repository.loader import RELEASE_MEMORY, Events, Loader, PoolThreads, next_attempt
from service.repository.reconcile import CancelRetry, Forget, Held, Load, Unload, plan
from service.repository.routing import Routes
from service.repository.store import ModelStore
from service.repository.versions import (
    AVAILABLE,
    END,
    LOADING,
    LoadedVersion,
    Threads,
)
from service.servables import Servable
from service.servables.registry import load_servable

__all__ = ["ModelRepository"]

log = Logger(namespace="service.repository")


class ModelRepository(Service):
    """Keeps the configured models' aspired versions loaded; serves lookups; drains on stop.

    ``file_system_poll_wait``: seconds between scans of the base paths (TF Serving's
    ``--file_system_poll_wait_seconds``): 0 scans once at start (and once per model a
    reload adds), a negative value never scans. ``apply(models)`` changes the
    configuration while serving (a config file reload).
    """

    def __init__(
        self,
        models: Sequence[ModelConfig],
        *,
        reactor: Any,
        metrics: Metrics | None = None,
        load: Callable[[str, int, Path], Servable] = load_servable,
        file_system_poll_wait: float = 1.0,
        max_load_retries: int = 5,
        load_retry_interval: float = 60.0,
        make_threads: Callable[[int, str], Threads] | None = None,
        scan: Callable[..., Deferred] | None = None,
        scan_folders: Callable[[Path], ModelScan] = scan_model,
        release_memory: Callable[[], object] = RELEASE_MEMORY,
        freeze: Callable[[], object] = memory.freeze_startup_objects,
        model_hooks: ModelHooks | None = None,
    ) -> None:
        self.configs: dict[str, ModelConfig] = {m.name: m for m in models}
        self.versions: dict[str, dict[int, LoadedVersion]] = {m.name: {} for m in models}
        self.clock: IReactorTime = reactor
        self._reactor = reactor
        self._metrics = metrics or Metrics()
        self._poll_wait = file_system_poll_wait
        self._loader = Loader(
            reactor=reactor,
            metrics=self._metrics,
            load=load,
            make_threads=make_threads or partial(PoolThreads, reactor),
            max_retries=max_load_retries,
            retry_interval=load_retry_interval,
            release_memory=release_memory,
            events=Events(
                running=lambda: bool(self.running),
                changed=self._changed,
                settled=self._reconcile,
                attempted=self._check_ready,
                retry=self._retry,
            ),
            model_hooks=model_hooks,
        )
        self._scan_pool: ThreadPool | None = None
        self._own_scan_pool = scan is None  # else injected (tests scan inline)
        self._scan = scan or self._scan_in_pool  # (f, *args) -> Deferred, off the reactor
        self._scan_folders = scan_folders
        self._freeze = freeze
        self._store = ModelStore()  # what the scans found, and the faults they showed
        self._label_targets: dict[str, dict[str, int]] = {}  # label -> version last served
        self._routes = Routes(self.configs, self.versions, self._store, self._label_targets)
        self._required = set(self.configs)  # models /readyz waits for (see ready)
        self._started = False  # ready once: later loads (hot swaps) never make it unready
        self._waiting_ready: list[Deferred] = []
        self._listeners: list[Callable[[], object]] = []
        self._served: frozenset[tuple[str, int]] = frozenset()
        self._route_listeners: list[Callable[[], object]] = []
        self._routes_seen: object = None
        self._poller: LoopingCall | None = None
        self._metrics.model_requests.watch_models(self.configs)
        self._metrics.watch_versions(
            lambda: [
                (name, number, str(v.state))
                for name, versions in list(self.versions.items())
                for number, v in list(versions.items())
            ]
        )

    # -- lookups (reactor thread) ---------------------------------------------------------------

    def lookup(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> LoadedVersion:
        """The version a request names: a number, a label, or (neither) the highest AVAILABLE
        (``service.repository.routing``). Take ``lease()`` on it before any await."""
        return self._routes.lookup(name, version, label)

    def status(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> list[dict[str, Any]]:
        """TF Serving's model_version_status, highest version first, with the model store's
        faults (``service.repository.routing``)."""
        return self._routes.status(name, version, label)

    @property
    def ready(self) -> bool:
        """Every model of the start-up config (and each added later, once it has served) has an
        AVAILABLE version: a model a reload adds does not take the instance out while it loads,
        its Consul tag announces it once it serves. At start-up, also every version the
        policies asked for has had its first load attempt, so the first clients see the
        versions the config names (not version 1 of two that happened to load first)."""
        for name in self._required:
            versions = self.versions.get(name, {}).values()
            if not any(v.state == AVAILABLE for v in versions):
                return False
            if not self._started and any(v.state == LOADING and v.retry is None for v in versions):
                return False
        return True

    def when_ready(self) -> Deferred:
        d: Deferred = Deferred()
        if self.ready:
            d.callback(None)
        else:
            self._waiting_ready.append(d)
        return d

    def subscribe(self, listener: Callable[[], object]) -> None:
        """Call ``listener()`` whenever the set of AVAILABLE model versions changes."""
        self._listeners.append(listener)

    def watch_routes(self, listener: Callable[[], object]) -> None:
        """Call ``listener()`` whenever what a request's target resolves to may have changed:
        a version became AVAILABLE or stopped being so, a label moved, a model was added or
        removed (``subscribe`` fires only for the first of these)."""
        self._route_listeners.append(listener)

    def served(self) -> frozenset[tuple[str, int]]:
        """(model, version) of every AVAILABLE version."""
        return frozenset(
            (name, number)
            for name, versions in self.versions.items()
            for number, v in versions.items()
            if v.state == AVAILABLE
        )

    def queues(self) -> list[BatchingQueue]:
        return [
            q
            for versions in self.versions.values()
            for v in versions.values()
            for q in v.queues.values()
        ]

    def add_version(self, version: LoadedVersion) -> None:
        """Hold ``version`` as it is, in whatever state (a seam: tests, or a tool, serve a
        version they made without the loader). Its model must be configured and not hold that
        version number already; labels, listeners and readiness follow as after a load."""
        versions = self.versions.get(version.name)
        if versions is None or version.name not in self.configs:
            raise ValueError(f"model {version.name!r} is not configured")
        if version.version in versions:
            raise ValueError(f"model {version.name!r} holds version {version.version} already")
        versions[version.version] = version
        if version.state == AVAILABLE:
            self._metrics.model_requests.serving(version.name, version.version)
        self._changed()
        self._check_ready()

    # -- configuration --------------------------------------------------------------------------

    def apply(self, models: Sequence[ModelConfig]) -> None:
        """Serve ``models`` from now on: load added ones, unload removed ones, re-apply policies.

        A model whose base path changed is unloaded and loaded again from the new path.
        """
        wanted = {m.name: m for m in models}
        changed = []
        for name in list(self.configs):
            if name not in wanted:
                log.info("model {name}: removed from the config; unloading", name=name)
                del self.configs[name]
                self._metrics.model_requests.forget_model(name)
                self._required.discard(name)
                changed.append(name)
        for name, config in wanted.items():
            old = self.configs.get(name)
            if old == config:
                continue
            if old is None:
                log.info("model {name}: added ({path})", name=name, path=config.base_path)
                self.versions.setdefault(name, {})
            elif old.base_path != config.base_path:
                self._store.forget(name)
            self.configs[name] = config
            changed.append(name)
        for name in changed:
            self._reconcile(name)
        added = [n for n in changed if n in self.configs]
        if added and self.running and self._poll_wait >= 0:
            self._start_scan(added)

    def rescan(self) -> None:
        """Scan every model's folders now (SIGHUP), whatever the poll interval."""
        if self.running and self._poll_wait >= 0:
            self._poll()

    # -- lifecycle ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._freeze()  # before any model loads: see service.memory
        if self._own_scan_pool:
            self._scan_pool = ThreadPool(1, 1, "model-scan")
            self._scan_pool.start()
        if self._poll_wait > 0:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self._reactor
            self._poller.start(self._poll_wait, now=True)
        elif self._poll_wait == 0:
            self._poll()
        else:
            log.warn("--file_system_poll_wait_seconds < 0: model folders are never scanned")

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        for versions in self.versions.values():
            for version in versions.values():
                if version.retry is not None and version.retry.active():
                    version.retry.cancel()
                version.retry = None
        await self._loader.settle()  # loads finish (and see the service stopped); unloads finish
        unloads = [
            Deferred.fromCoroutine(self._loader.unloading(version))
            for versions in self.versions.values()
            for version in list(versions.values())
            if version.state == AVAILABLE
        ]
        await DeferredList(unloads)
        if self._scan_pool is not None:
            self._scan_pool.stop()
            self._scan_pool = None

    # -- scanning -------------------------------------------------------------------------------

    def _poll(self) -> None:
        self._start_scan(list(self.configs))

    def _start_scan(self, names: list[str]) -> None:
        for name in names:
            config = self.configs.get(name)
            if config is None:
                continue
            d = self._scan(self._scan_folders, config.base_path)
            d.addCallbacks(
                partial(self._scanned, name, config.base_path),
                partial(self._scan_failed, name, config.base_path),
            )
            d.addErrback(lambda f: log.failure("scanning models failed", f))

    def _scan_in_pool(self, f: Callable[..., Any], *args: Any) -> Deferred:
        assert self._scan_pool is not None
        return deferToThreadPool(self._reactor, self._scan_pool, f, *args)

    def _scan_failed(self, name: str, base_path: Path, failure: Any) -> None:
        failure.trap(ServingError, OSError)
        config = self.configs.get(name)
        if config is None or config.base_path != base_path:
            return  # removed or moved while we scanned
        error = failure.value
        if not isinstance(error, ServingError):
            error = os_fault(error, f"model base path {base_path}")
        self._store.scan_failed(name, error)
        # The folders that were there stay aspired: an unreadable base path (a network file
        # system hiccup) must not unload what serves.

    def _scanned(self, name: str, base_path: Path, scan: ModelScan) -> None:
        config = self.configs.get(name)
        if config is None or config.base_path != base_path or not self.running:
            return  # removed or moved while we scanned
        self._store.scanned(name, base_path, scan, self.versions.get(name, {}))
        self._reconcile(name)

    def _note_gone(self, version: LoadedVersion, doing: str) -> None:
        self._store.note_gone(self.configs.get(version.name), version, doing)

    # -- reconciling what is loaded with what is aspired ----------------------------------------

    def _reconcile(self, name: str) -> None:
        """Carry out the reconcile plan of model ``name`` (``service.repository.reconcile``)."""
        if not self.running:
            return
        config = self.configs.get(name)
        versions = self.versions.get(name, {})
        folders = self._store.ready.get(name, {}) if config is not None else {}
        held = {number: Held.of(version) for number, version in versions.items()}
        for action in plan(config, folders, held, self._label_targets.get(name, {})):
            match action:
                case Load(folder):
                    self._start_load(name, folder)
                case Unload(number, moved=True):
                    self._start_unload(versions[number])  # reloaded from the new path once END
                case Unload(number):
                    self._retire(config, versions[number])
                case CancelRetry(number):
                    version = versions[number]
                    if version.retry is not None:
                        version.retry.cancel()
                    version.retry, version.state = None, END
                    self._note_gone(version, "its load is not retried")
                case Forget():
                    self.versions.pop(name, None)
                    self._label_targets.pop(name, None)
                    self._store.forget(name)
        self._changed()

    def _retire(self, config: ModelConfig | None, version: LoadedVersion) -> None:
        """Unload a version that is no longer wanted, saying why."""
        for label, target in (config.labels if config is not None else {}).items():
            if target == version.version:
                log.warn(
                    "model {name}: label {label!r} points at version {v}, which the "
                    "version policy ({policy}) no longer serves; /labels/{label} fails "
                    "until the label moves",
                    name=version.name,
                    label=label,
                    v=version.version,
                    policy=config.policy.describe() if config is not None else "",
                )
        self._note_gone(version, "unloading it")
        self._start_unload(version)

    def _start_load(self, name: str, folder: VersionFolder) -> None:
        version = next_attempt(name, folder, self.versions[name].get(folder.number))
        self.versions[name][folder.number] = version
        self._loader.load(self.configs[name], version)

    def _start_unload(self, version: LoadedVersion) -> None:
        self._loader.unload(version)

    def _retry(self, version: LoadedVersion) -> None:
        """A failed load's retry is due: load its folder again, if it is still wanted there."""
        folder = self._store.ready.get(version.name, {}).get(version.version)
        if folder is None or version.name not in self.configs:
            version.state = END
            self._note_gone(version, "its load is not retried")
            self._reconcile(version.name)
            return
        self._start_load(version.name, folder)

    # -- notifications --------------------------------------------------------------------------

    def _changed(self) -> None:
        for name, config in self.configs.items():
            versions = self.versions.get(name, {})
            targets = self._label_targets.setdefault(name, {})
            for label, number in config.labels.items():
                if number in versions and versions[number].state == AVAILABLE:
                    targets[label] = number
            if any(v.state == AVAILABLE for v in versions.values()):
                self._required.add(name)
        served = self.served()
        routes = (
            served,
            {name: dict(config.labels) for name, config in self.configs.items()},
            {name: dict(targets) for name, targets in self._label_targets.items()},
        )
        notify = []
        if routes != self._routes_seen:
            self._routes_seen = routes
            notify += self._route_listeners
        if served != self._served:
            self._served = served
            notify += self._listeners
        for listener in notify:
            try:
                listener()
            except Exception:  # a listener's bug must not stop the lifecycle
                log.failure("model set listener failed")

    def _check_ready(self) -> None:
        if self.ready:
            self._started = True
            waiters, self._waiting_ready = self._waiting_ready, []
            for d in waiters:
                d.callback(None)
