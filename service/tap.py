"""``twistd inference``: the composition root, where the flags become the service tree.

The flags and their validation are ``service.options``; this module picks the reactor and
wires the parts. It imports no TensorFlow at module level: ``twistd inference --help``
stays fast.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString

from service.options import DiscoveryConfig, Options, ServerConfig

__all__ = ["Options", "makeService"]


def makeService(options: Options) -> MultiService:
    """Build the service tree, started in this order and stopped in reverse, one at a time:

    0. the hook threads (versions' own Python, set up as they load; stopped last),
    1. the model repository (scans the model folders and loads on inference threads;
       readiness says 503 until the models are AVAILABLE),
    2. the reloader (SIGHUP re-reads --auth_token_file, rescans the model folders and re-reads
       --model_config_file, which is also re-read every --model_config_file_poll_wait_seconds),
    3. the image decoder's thread pool (stops after the port has drained, so no upload is left
       waiting on it), then the body decoder's (large JSON bodies; the same),
    4. the ports, stopped together: HTTP (on stop: close, close idle connections, wait for
       requests in flight, answer what is still queued 503 shortly before the stop deadline)
       and gRPC (health NOT_SERVING at once; then no new calls, those in flight waited for),
    5. the Consul registration, once models are loaded and the port listens (on stop: leave
       Consul first, then wait --drain_delay so clients notice before the port closes); its
       tags follow the set of AVAILABLE model versions,
    6. ``BeginStop``, stopped first: starts the stop deadline (--drain_delay +
       --drain_timeout; every step is waited for only until then, and a watchdog ends the
       process at it, see service.shutdown) and makes /readyz answer 503.
    """
    # The composition root is the one place that picks the global reactor.
    from twisted.internet import reactor

    from service.lifecycle import OrderedServices
    from service.shutdown import BeginStop, StopDeadline, stop_signals_once

    config: ServerConfig = options.config
    stop_signals_once(reactor)
    _warn_about_open_files(config.max_connections)
    configure_tensorflow(config.intra_op_threads, config.inter_op_threads)
    parts = _Parts(config, reactor, fronts=config.http_processes > 1)
    deadline = StopDeadline(
        reactor, drain_delay=config.drain_delay, drain_timeout=config.drain_timeout
    )
    ports = MultiService()  # stopped together: each drains at once, within the one deadline
    forwarded = None  # --http_processes > 1: the port the front processes forward to
    if config.http_processes > 1:
        port, forwarded = _front_processes(parts, config, deadline, reactor)
    else:
        port = _http_port(parts, config, deadline, reactor)
    port.setServiceParent(ports)
    if config.grpc_listen is not None:
        _grpc_port(parts, config, deadline, reactor).setServiceParent(ports)
    top = OrderedServices(deadline, clock=reactor)
    for service in (
        parts.hooks.pool,  # before the loads, which set hooks up on it; stopped last
        parts.repository,
        _reloader(parts, config, reactor, port if config.http_processes > 1 else None),
        parts.images,
        parts.decoder,
        forwarded,  # stopped after the front processes, which forward to it
        ports,
    ):
        if service is not None:
            service.setServiceParent(top)
    if config.discovery is not None:
        grpc_port = int(config.grpc_listen.rpartition(":")[2]) if config.grpc_listen else None
        _registration(parts, config.discovery, port, reactor, grpc_port).setServiceParent(top)
    # Stopped first: the stop's deadline starts and /readyz fails before anything else happens.
    BeginStop(deadline, lambda: setattr(parts.health, "draining", True)).setServiceParent(top)
    return top


class _Parts:
    """The serving parts every later step wires: metrics, hooks, repository, health, decoders,
    the site."""

    def __init__(self, config: ServerConfig, reactor: Any, *, fronts: bool = False) -> None:
        """``fronts``: HTTP is served by front processes (``--http_processes`` > 1); the site
        built here then answers only what they forward, and neither counts nor logs it."""
        from service.access_log import AccessLog
        from service.auth import BearerTokens, HTTPAuth
        from service.budget import RequestBudget
        from service.dataplane import DataPlane
        from service.decoding import BodyDecoder
        from service.health import Health
        from service.hook_pool import HookPool
        from service.http import InferenceAPI, InferenceSite
        from service.images import ImageDecoder
        from service.metrics import Metrics
        from service.model_hooks import ModelHooks
        from service.repository import ModelRepository
        from service.servables.registry import load_servable

        metrics = self.metrics = Metrics()
        self.hooks = ModelHooks(
            pool=HookPool(reactor=reactor, threads=config.hook_threads),
            registry=metrics.registry,
            enabled=config.enable_model_hooks,
        )
        self.access_log = AccessLog(config.access_log)  # HTTP and gRPC write to the same one
        # The bearer tokens HTTP and gRPC ask for (None: none), re-read on SIGHUP.
        self.tokens = BearerTokens.load(config.auth_token_file) if config.auth_token_file else None
        self.repository = ModelRepository(
            config.models,
            reactor=reactor,
            load=partial(load_servable, warmup_iterations=config.warmup_iterations),
            metrics=metrics,
            file_system_poll_wait=config.file_system_poll_wait,
            max_load_retries=config.max_load_retries,
            load_retry_interval=config.load_retry_interval,
            model_hooks=self.hooks,
        )
        self.images = ImageDecoder(
            reactor=reactor,
            threads=config.image_decode_threads,
            max_enqueued=config.max_enqueued_image_decodes,
            max_pixels=config.max_image_pixels,
        )
        self.health = Health(self.repository, stall_seconds=config.inference_stall_seconds)
        self.decoder = BodyDecoder(reactor=reactor)  # large JSON bodies; gives memory back after
        # The operations every front door calls (REST here, gRPC in _grpc_port).
        self.plane = DataPlane(
            self.repository,
            images=self.images,
            default_model=config.default_model,
            hooks=self.hooks,
        )
        api = InferenceAPI(
            self.repository,
            metrics=metrics,
            overload_fraction=config.overload_fraction,
            health=self.health,
            decoder=self.decoder,
            plane=self.plane,
            prometheus_path=config.prometheus_path,
        )
        self.site = InferenceSite(
            api,
            max_body_bytes=config.max_request_bytes,
            budget=RequestBudget(config.max_inflight_request_bytes),
            request_header_timeout=config.request_header_timeout,
            request_read_timeout=config.request_read_timeout,
            max_connections=config.max_connections,
            access_log=None if fronts else self.access_log,
            # With front processes, they check tokens; this site only takes their forwards.
            auth=None
            if self.tokens is None or fronts
            else HTTPAuth(
                self.tokens,
                prometheus_path=config.prometheus_path,
                protect_metrics=config.auth_metrics,
            ),
            reactor=reactor,
            count_requests=not fronts,
        )
        self.metrics = metrics


def _cut_queued(repository: Any) -> int:
    """At the drain deadline: answer what is still queued 503 (retry elsewhere); how many."""
    from service.errors import Unavailable

    stopping = Unavailable("the server is stopping; retry on another server", retry_after=1)
    return sum(queue.abort_waiting(stopping) for queue in repository.queues())


def _http_port(parts: _Parts, config: ServerConfig, deadline: Any, reactor: Any) -> Any:
    """The listening port, which on stop drains, then answers what is still queued 503."""
    from service.lifecycle import HTTPPort

    return HTTPPort(
        serverFromString(reactor, config.listen),
        parts.site,
        parts.site.in_flight,
        reactor=reactor,
        deadline=deadline,
        cut_queued=partial(_cut_queued, parts.repository),
    )


def _front_processes(
    parts: _Parts, config: ServerConfig, deadline: Any, reactor: Any
) -> tuple[IService, IService]:
    """--http_processes > 1: the front processes on the port (``service.front_main``), and
    the unix socket where they forward what the main process answers (status, metadata,
    health, metrics, uploads, hooks, classify, regress)."""
    from twisted.internet.endpoints import UNIXServerEndpoint

    from service.front_main import FrontProcesses, FrontStats
    from service.lifecycle import HTTPPort

    # Linux's abstract socket namespace: nothing to remove from the file system afterwards.
    forward_socket = f"\0kleinserve-{os.getpid()}-forward"
    forwarded = HTTPPort(
        UNIXServerEndpoint(reactor, forward_socket),
        parts.site,
        parts.site.in_flight,
        reactor=reactor,
        deadline=deadline,
        cut_queued=partial(_cut_queued, parts.repository),
    )
    fronts = FrontProcesses(
        config.listen,
        config.http_processes,
        parts.plane,
        reactor=reactor,
        deadline=deadline,
        stats=FrontStats(parts.metrics),
        access_log=parts.access_log,
        settings={
            "forward_socket": forward_socket,
            "max_request_bytes": config.max_request_bytes,
            # The server's bound, shared out (each may still take one request of the limit).
            "max_inflight_request_bytes": max(
                config.max_inflight_request_bytes // config.http_processes,
                config.max_request_bytes,
            ),
            "request_header_timeout": config.request_header_timeout,
            "request_read_timeout": config.request_read_timeout,
            # The server's bound, shared out.
            "max_connections": max(1, -(-config.max_connections // config.http_processes)),
            "access_log": config.access_log,
            "prometheus_path": config.prometheus_path,
            "auth_token_file": None
            if config.auth_token_file is None
            else str(config.auth_token_file),
            "auth_metrics": config.auth_metrics,
        },
        cut_queued=partial(_cut_queued, parts.repository),
    )
    return fronts, forwarded


def _grpc_port(parts: _Parts, config: ServerConfig, deadline: Any, reactor: Any) -> IService:
    """TF Serving's gRPC API on --port / --grpc_listen, over the same data plane as REST."""
    from twisted.internet import task

    from service.errors import FailedPrecondition, InvalidArgument
    from service.grpc_port import GrpcPort
    from service.model_config import ModelConfigError, models_from_proto
    from service.options import with_batching

    async def reload(proto: Any) -> None:
        """HandleReloadConfigRequest: apply a ModelServerConfig as a config file reload does,
        then, as TF Serving does, answer once every model it adds serves or failed to load."""
        try:
            models = with_batching(
                models_from_proto(proto, source="ReloadConfigRequest.config"), config.batching
            )
        except ModelConfigError as e:
            raise InvalidArgument(str(e)) from None
        added = [m.name for m in models if m.name not in parts.repository.configs]
        parts.repository.apply(models)
        while (problem := _settled(parts.repository, added)) is None:
            await task.deferLater(reactor, 0.1, lambda: None)
        if problem:
            raise FailedPrecondition(problem)

    def ready() -> bool:
        return parts.repository.ready and parts.health.alive() and not parts.health.draining

    assert config.grpc_listen is not None
    return GrpcPort(
        config.grpc_listen,
        parts.plane,
        reactor=reactor,
        ready=ready,
        live=parts.health.alive,
        reload=reload,
        deadline=deadline,
        max_calls=config.grpc_max_calls,
        max_receive_bytes=config.grpc_max_receive_bytes or None,
        access_log=parts.access_log,
        model_requests=parts.metrics.model_requests,
        tokens=parts.tokens,
    )


def _settled(repository: Any, names: list[str]) -> str | None:
    """Once each model of ``names`` serves a version or failed to load one: "" when all
    serve, else why one failed; None while one is still loading or not yet scanned."""
    from service.repository import AVAILABLE

    for name in names:
        versions = repository.versions.get(name, {}).values()
        if any(v.state == AVAILABLE for v in versions):
            continue
        failed = [v for v in versions if v.error]
        if not failed:
            return None
        return f"model {name!r} version {failed[0].version} failed to load: {failed[0].error}"
    return ""


def _reloader(parts: _Parts, config: ServerConfig, reactor: Any, fronts: Any = None) -> IService:
    """SIGHUP and --model_config_file_poll_wait_seconds: re-read the config, rescan folders;
    SIGHUP also re-reads the token file (here, and in each front process)."""
    from service.options import read_models
    from service.reload import ConfigReloader

    reloader = ConfigReloader(
        config.model_config_file,  # None: SIGHUP only rescans the model folders
        lambda path: read_models(path, config.batching),
        parts.repository.apply,
        reactor=reactor,
        poll_wait=config.model_config_file_poll_wait,
        rescan=parts.repository.rescan,
        on_sighup=()
        if parts.tokens is None
        else (parts.tokens.reload, *(() if fronts is None else (fronts.reload,))),
    )
    reloader.started_with(config.models)
    return reloader


def _registration(
    parts: _Parts, discovery: DiscoveryConfig, port: Any, reactor: Any, grpc_port: int | None
) -> IService:
    """The Consul registration, started once the models are ready and the port listens."""
    from twisted.internet.defer import Deferred

    from service.lifecycle import AfterReady
    from service.registration import advertised_host, consul_client, registration_factory

    async def address() -> str:  # --advertise's, else the local agent's (wildcard --listen)
        return await advertised_host(discovery, consul_client(discovery, reactor), reactor)

    async def both_ready() -> tuple[Any, str]:
        await parts.repository.when_ready()
        listening = await port.listening
        return listening, await address()

    def ready() -> Any:
        return Deferred.fromCoroutine(both_ready())

    register = registration_factory(
        discovery, parts.repository, parts.health, reactor, grpc_port=grpc_port
    )
    return AfterReady(register, ready)


def configure_tensorflow(intra: int, inter: int) -> None:
    """TF Serving's threading flags, set before any model loads (0 leaves TensorFlow's choice)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if intra or inter:
        import tensorflow as tf

        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)


def _warn_about_open_files(max_connections: int) -> None:
    import resource

    from twisted.logger import Logger

    from service.http_site import open_files_problem

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    problem = open_files_problem(max_connections, soft)
    if problem is not None:
        Logger().warn("{problem}", problem=problem)
