"""``twistd inference``: command-line options and the service tree they build.

Options follow TensorFlow Serving's flag names (``--rest_api_port``,
``--model_name``, ``--model_base_path``, ``--model_config_file``,
``--enable_batching``, ``--batching_parameters_file``, the poll waits) so a TF
Serving command line moves over unchanged; ``--listen`` takes any Twisted
endpoint string instead of a port. This module imports no TensorFlow:
``twistd inference --help`` stays fast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from discovery.consul import ConsulAddress
from service.batching import BatchingParameters
from service.batching_config import (
    BatchingConfigError,
    batching_for_model,
    load_batching_parameters,
)
from service.model_config import ModelConfig, ModelConfigError, load_model_config
from service.shutdown import CUT_MARGIN

log = Logger()

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# As service.images.DEFAULT_MAX_IMAGE_PIXELS; not imported, to keep Pillow out of --help.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


@attrs.frozen
class DiscoveryConfig:
    """Where and how this server announces itself in Consul (see discovery.registration)."""

    consul: ConsulAddress
    service_name: str
    advertise_host: str
    advertise_port: int | None  # None: the port actually listened on
    check_interval: float
    ttl: float
    deregister_critical_after: float
    drain_delay: float


@attrs.frozen
class ServerConfig:
    """Everything ``makeService`` needs, validated; built from Options, testable as plain data."""

    listen: str
    models: tuple[ModelConfig, ...]  # with each model's batching parameters resolved
    batching: (
        BatchingParameters  # the server-wide ones (--enable_batching, --batching_parameters_file)
    )
    model_config_file: Path | None = None
    model_config_file_poll_wait: float = 0.0
    file_system_poll_wait: float = 1.0
    max_load_retries: int = 5
    load_retry_interval: float = 60.0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_inflight_request_bytes: int = 4 * DEFAULT_MAX_REQUEST_BYTES
    discovery: DiscoveryConfig | None = None
    overload_fraction: float = 0.8
    inference_stall_seconds: float = 60.0
    drain_delay: float = 5.0
    drain_timeout: float = 30.0
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    default_model: str | None = None  # POST / classifies with this model (None: the only one)
    image_decode_threads: int = 2
    max_enqueued_image_decodes: int = 64
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    request_header_timeout: float = 30.0


def _coerce(flag: str, kind: type, what: str):
    """A coerce function whose error names the flag (Twisted's own message does not)."""

    def coerce(value: str):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"--{flag} takes {what}, not {value!r}") from None

    coerce.coerceDoc = ""  # type: ignore[attr-defined]
    return coerce


def _integer(flag: str):
    return _coerce(flag, int, "a whole number")


def _number(flag: str):
    return _coerce(flag, float, "a number")


class Options(usage.Options):
    synopsis = (
        "(--model_base_path=DIR [--model_name=NAME] | --model_config_file=FILE) "
        "[--rest_api_port=8501 | --listen=ENDPOINT] [options]"
    )
    longdesc = (
        "Serve TensorFlow SavedModels (TF Serving's versioned layout: DIR/1/, DIR/2/, …) over "
        "TensorFlow Serving's REST API: one model (--model_base_path; the highest version is "
        "served), or the models, version policies and labels of a TF Serving model config file. "
        "New version folders are picked up while serving; SIGHUP reloads the config file at once. "
        "Flags are named as TF Serving's."
    )
    optParameters = [
        [
            "rest_api_port",
            None,
            None,
            "TCP port of the REST API (default 8501). Same as --listen=tcp:PORT.",
            _integer("rest_api_port"),
        ],
        [
            "listen",
            None,
            None,
            "Twisted endpoint string to listen on instead, e.g. tcp:8501:interface=127.0.0.1, "
            "ssl:8443:privateKey=key.pem:certKey=cert.pem, unix:/run/inference.sock",
        ],
        ["model_name", None, "default", "Name the model is served under (/v1/models/NAME)."],
        [
            "batching_parameters_file",
            None,
            None,
            "TF Serving's batching parameters text-proto (with --enable_batching). A model folder's own "
            "batching_parameters.txt overrides it for that model.",
        ],
        ["model_base_path", None, None, "Folder holding the model's numeric version folders."],
        [
            "model_config_file",
            None,
            None,
            "TF Serving's ModelServerConfig text-proto (model_config_list: names, base paths, version "
            "policies, labels), instead of --model_name/--model_base_path.",
        ],
        [
            "model_config_file_poll_wait_seconds",
            None,
            0.0,
            "Seconds between re-reads of --model_config_file (0: only at start and on SIGHUP).",
            _number("model_config_file_poll_wait_seconds"),
        ],
        [
            "file_system_poll_wait_seconds",
            None,
            1.0,
            "Seconds between scans of the model folders for new versions (0: scan once at start, "
            "negative: never scan).",
            _number("file_system_poll_wait_seconds"),
        ],
        [
            "max_num_load_retries",
            None,
            5,
            "Times a version that failed to load is tried again (with backoff) before it is given up.",
            _integer("max_num_load_retries"),
        ],
        [
            "load_retry_interval_micros",
            None,
            60_000_000,
            "Microseconds before the first retry of a failed load; doubles per retry, up to 8 times it.",
            _integer("load_retry_interval_micros"),
        ],
        [
            "max_request_bytes",
            None,
            DEFAULT_MAX_REQUEST_BYTES,
            "Largest request body accepted; larger ones get 413.",
            _integer("max_request_bytes"),
        ],
        [
            "max_inflight_request_bytes",
            None,
            None,
            "Request body bytes being received or decoded at once, over all requests; a request "
            "that would pass it gets 503 with Retry-After (default: 4 x --max_request_bytes).",
            _integer("max_inflight_request_bytes"),
        ],
        [
            "request_header_timeout",
            None,
            30.0,
            "Seconds a client has to send a request's headers, from its first byte; then 408.",
            _number("request_header_timeout"),
        ],
    ]
    optParameters += [
        [
            "consul",
            None,
            None,
            "Register in Consul through this agent (host:port or http[s]://host:port). Default: "
            "$CONSUL_HTTP_ADDR if set, else no registration. $CONSUL_HTTP_TOKEN is sent as the ACL token.",
        ],
        ["service_name", None, "inference", "Consul service name."],
        [
            "advertise",
            None,
            None,
            "HOST[:PORT] clients should call, as registered in Consul. Default: the --listen interface "
            "and port (a wildcard interface needs --advertise).",
        ],
        [
            "consul_check_interval",
            None,
            5.0,
            "Seconds between Consul's /readyz checks.",
            _number("consul_check_interval"),
        ],
        [
            "consul_ttl",
            None,
            15.0,
            "TTL of the liveness check, refreshed every TTL/3.",
            _number("consul_ttl"),
        ],
        [
            "deregister_critical_after",
            None,
            60.0,
            "Seconds after which Consul drops an instance whose checks stay critical (Consul's minimum is 60).",
            _number("deregister_critical_after"),
        ],
        [
            "drain_delay",
            None,
            5.0,
            "On stop: seconds between leaving Consul and closing the port, so clients notice first.",
            _number("drain_delay"),
        ],
        [
            "drain_timeout",
            None,
            30.0,
            "On stop: seconds, after --drain_delay, that requests in flight may take; then what is "
            "still queued is answered 503 and the process exits (within --drain_delay + this).",
            _number("drain_timeout"),
        ],
        [
            "overload_fraction",
            None,
            0.8,
            "/readyz answers 429 (Consul: warning) while a batching queue is fuller than this.",
            _number("overload_fraction"),
        ],
        [
            "inference_stall_seconds",
            None,
            60.0,
            "A batch running longer than this fails the liveness check (a wedged inference thread).",
            _number("inference_stall_seconds"),
        ],
        [
            "tensorflow_intra_op_parallelism",
            None,
            0,
            "Threads TensorFlow uses inside one op (0: TensorFlow's choice), as TF Serving's flag.",
            _integer("tensorflow_intra_op_parallelism"),
        ],
        [
            "tensorflow_inter_op_parallelism",
            None,
            0,
            "Ops TensorFlow runs at once (0: TensorFlow's choice), as TF Serving's flag.",
            _integer("tensorflow_inter_op_parallelism"),
        ],
    ]
    optParameters += [
        [
            "default_model",
            None,
            None,
            "Model that image uploads to POST / are classified with (default: the only model served).",
        ],
        [
            "image_decode_threads",
            None,
            2,
            "Threads that decode and preprocess uploaded images (off the reactor thread).",
            _integer("image_decode_threads"),
        ],
        [
            "max_enqueued_image_decodes",
            None,
            64,
            "Uploaded images waiting for or in a decode thread; beyond that a request gets 503.",
            _integer("max_enqueued_image_decodes"),
        ],
        [
            "max_image_pixels",
            None,
            DEFAULT_MAX_IMAGE_PIXELS,
            "Largest uploaded image in pixels (width x height); larger ones (and decompression "
            "bombs) get 413 before they are decoded.",
            _integer("max_image_pixels"),
        ],
    ]
    optFlags = [
        ["enable_batching", None, "Merge concurrent requests into batches (TF Serving's flag)."],
    ]

    def postOptions(self) -> None:
        self.config = config_from_options(self)


def config_from_options(opts: dict[str, Any]) -> ServerConfig:
    """Validate parsed flags into a ServerConfig; every problem is a UsageError a person can act on."""
    port, listen = opts.get("rest_api_port"), opts.get("listen")
    if port is not None and listen is not None:
        raise usage.UsageError("give --rest_api_port or --listen, not both")
    if port is not None and not 0 <= port <= 65535:
        raise usage.UsageError(f"--rest_api_port must be between 0 and 65535, not {port}")
    if listen is None:
        listen = f"tcp:{8501 if port is None else port}"
    batching = BatchingParameters(enabled=bool(opts.get("enable_batching")))
    if opts.get("batching_parameters_file"):
        if not batching.enabled:
            raise usage.UsageError("--batching_parameters_file needs --enable_batching")
        batching = _load_batching(Path(opts["batching_parameters_file"]))
    config_file = opts.get("model_config_file")
    if config_file:
        if opts.get("model_base_path"):
            raise usage.UsageError("give --model_config_file or --model_base_path, not both")
        config_path = Path(config_file).expanduser().resolve()
        try:
            models = read_models(config_path, batching)
        except ModelConfigError as e:
            raise usage.UsageError(str(e)) from None
        if not models:
            raise usage.UsageError(f"--model_config_file {config_file} configures no model")
    else:
        config_path = None
        models = [_single_model(opts, batching)]
    max_bytes = opts.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)
    if max_bytes <= 0:
        raise usage.UsageError("--max_request_bytes must be positive")
    inflight_bytes = _inflight_request_bytes(opts.get("max_inflight_request_bytes"), max_bytes)
    if opts.get("request_header_timeout", 30.0) <= 0:
        raise usage.UsageError("--request_header_timeout must be positive")
    if opts.get("model_config_file_poll_wait_seconds", 0) < 0:
        raise usage.UsageError("--model_config_file_poll_wait_seconds must be 0 or more")
    if opts.get("max_num_load_retries", 5) < 0:
        raise usage.UsageError("--max_num_load_retries must be 0 or more")
    if opts.get("load_retry_interval_micros", 1) <= 0:
        raise usage.UsageError("--load_retry_interval_micros must be positive")
    for flag in (
        "consul_check_interval",
        "consul_ttl",
        "inference_stall_seconds",
        "deregister_critical_after",
    ):
        if opts.get(flag, 1) <= 0:
            raise usage.UsageError(f"--{flag} must be positive")
    if opts.get("drain_delay", 0) < 0:
        raise usage.UsageError("--drain_delay must be 0 or more")
    if opts.get("drain_timeout", 1) <= CUT_MARGIN:
        raise usage.UsageError(f"--drain_timeout must be more than {CUT_MARGIN:g} s")
    fraction = opts.get("overload_fraction", 0.8)
    if not 0 < fraction <= 1:
        raise usage.UsageError(f"--overload_fraction must be in (0, 1], not {fraction}")
    for flag in ("tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism"):
        if opts.get(flag, 0) < 0:
            raise usage.UsageError(f"--{flag} must be 0 or more")
    for flag in ("image_decode_threads", "max_enqueued_image_decodes", "max_image_pixels"):
        if opts.get(flag, 1) <= 0:
            raise usage.UsageError(f"--{flag} must be positive")
    default_model = opts.get("default_model") or None
    names = [m.name for m in models]
    if default_model is not None and default_model not in names:
        raise usage.UsageError(
            f"--default_model {default_model!r} is not a served model; this server serves "
            + ", ".join(repr(n) for n in names)
        )
    return ServerConfig(
        listen=listen,
        models=tuple(models),
        batching=batching,
        model_config_file=config_path,
        model_config_file_poll_wait=opts.get("model_config_file_poll_wait_seconds", 0.0),
        file_system_poll_wait=opts.get("file_system_poll_wait_seconds", 1.0),
        max_load_retries=opts.get("max_num_load_retries", 5),
        load_retry_interval=opts.get("load_retry_interval_micros", 60_000_000) / 1e6,
        max_request_bytes=max_bytes,
        max_inflight_request_bytes=inflight_bytes,
        discovery=_discovery_config(opts, listen),
        overload_fraction=fraction,
        inference_stall_seconds=opts.get("inference_stall_seconds", 60.0),
        drain_delay=opts.get("drain_delay", 5.0),
        drain_timeout=opts.get("drain_timeout", 30.0),
        intra_op_threads=opts.get("tensorflow_intra_op_parallelism", 0),
        inter_op_threads=opts.get("tensorflow_inter_op_parallelism", 0),
        default_model=default_model,
        image_decode_threads=opts.get("image_decode_threads", 2),
        max_enqueued_image_decodes=opts.get("max_enqueued_image_decodes", 64),
        max_image_pixels=opts.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
        request_header_timeout=opts.get("request_header_timeout", 30.0),
    )


def _inflight_request_bytes(flag: int | None, max_request_bytes: int) -> int:
    """The request-body budget: the flag, or four of the largest bodies.

    Decoding a JSON body takes about four times its size at its peak (the bytes, the copies
    the fast path scans, the parsed numbers, the arrays), so four 64 MiB bodies at once can
    add ~1 GB to the server; more would wait their turn (503 + Retry-After) rather than risk
    the process. Smaller than one body, no body of the largest size could ever be accepted.
    """
    if flag is None:
        return 4 * max_request_bytes
    if flag < max_request_bytes:
        raise usage.UsageError(
            f"--max_inflight_request_bytes ({flag}) must be at least --max_request_bytes "
            f"({max_request_bytes}), or the largest bodies allowed could never be accepted"
        )
    return flag


def _discovery_config(opts: dict[str, Any], listen: str) -> DiscoveryConfig | None:
    address = opts.get("consul") or os.environ.get("CONSUL_HTTP_ADDR", "").strip()
    if not address:
        return None
    try:
        consul = ConsulAddress.parse(
            address, token=os.environ.get("CONSUL_HTTP_TOKEN", "").strip() or None
        )
    except ValueError as e:
        raise usage.UsageError(f"--consul: {e}") from None
    host, port = _advertised(opts.get("advertise"), listen)
    return DiscoveryConfig(
        consul=consul,
        service_name=opts.get("service_name") or "inference",
        advertise_host=host,
        advertise_port=port,
        check_interval=opts.get("consul_check_interval", 5.0),
        ttl=opts.get("consul_ttl", 15.0),
        deregister_critical_after=opts.get("deregister_critical_after", 60.0),
        drain_delay=opts.get("drain_delay", 5.0),
    )


def _advertised(advertise: str | None, listen: str) -> tuple[str, int | None]:
    """The host (and port, if given) to register: --advertise, or the listening interface.

    --advertise takes ``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT``; the interface of
    --listen is read with Twisted's ``\\:`` escapes undone.
    """
    if advertise:
        match = re.fullmatch(
            r"\[(?P<v6>[^\]]+)\](?::(?P<v6port>\d+))?|(?P<host>[^:\[\]]+)(?::(?P<port>\d+))?",
            advertise,
        )
        if match is None:
            raise usage.UsageError(
                f"--advertise {advertise!r}: expected HOST, HOST:PORT or [IPv6]:PORT"
            )
        port = match["v6port"] or match["port"]
        return match["v6"] or match["host"], int(port) if port else None
    parts = [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", listen)]
    interface = next((p.split("=", 1)[1] for p in parts if p.startswith("interface=")), "")
    if parts[0] not in ("tcp", "ssl") or interface in ("", "0.0.0.0", "::"):
        raise usage.UsageError(
            f"registering in Consul needs --advertise=HOST: --listen={listen} does not name one address"
        )
    return interface, None


def _load_batching(path: Path) -> BatchingParameters:
    try:
        return load_batching_parameters(path)
    except BatchingConfigError as e:
        raise usage.UsageError(str(e)) from None


def _single_model(opts: dict[str, Any], batching: BatchingParameters) -> ModelConfig:
    """The one model of --model_name/--model_base_path (TF Serving: latest version, no labels)."""
    base = opts.get("model_base_path")
    if not base:
        raise usage.UsageError(
            "--model_base_path (the folder holding version folders 1/, 2/, …) or "
            "--model_config_file is required"
        )
    base_path = Path(base).expanduser().resolve()
    if not base_path.is_dir():
        raise usage.UsageError(f"--model_base_path {base} is not a folder")
    name = opts.get("model_name") or "default"
    if "/" in name or ":" in name:
        raise usage.UsageError(f"--model_name {name!r} may not contain '/' or ':'")
    try:  # fail at start-up, not at load, on a bad batching_parameters.txt
        return ModelConfig(name, base_path, batching=batching_for_model(base_path, batching))
    except BatchingConfigError as e:
        raise usage.UsageError(str(e)) from None


def read_models(path: Path, batching: BatchingParameters) -> list[ModelConfig]:
    """The models of a config file, each with its batching parameters (a model folder's own
    batching_parameters.txt, else the server's); every problem is a ModelConfigError."""
    models = load_model_config(
        path, warn=lambda message: log.warn("{path}: {message}", path=path, message=message)
    )
    try:
        return [attrs.evolve(m, batching=batching_for_model(m.base_path, batching)) for m in models]
    except BatchingConfigError as e:
        raise ModelConfigError(str(e)) from None


def makeService(options: Options) -> MultiService:
    """Build the service tree, started in this order and stopped in reverse, one at a time:

    1. the model repository (scans the model folders and loads on inference threads;
       readiness says 503 until the models are AVAILABLE),
    2. the reloader (SIGHUP rescans the model folders and re-reads --model_config_file, which
       is also re-read every --model_config_file_poll_wait_seconds),
    3. the image decoder's thread pool (stops after the port has drained, so no upload is left
       waiting on it), then the body decoder's (large JSON bodies; the same),
    4. the HTTP port (on stop: close, close idle connections, wait for requests in flight,
       answer what is still queued 503 shortly before the stop deadline),
    5. the Consul registration, once models are loaded and the port listens (on stop: leave
       Consul first, then wait --drain_delay so clients notice before the port closes); its
       tags follow the set of AVAILABLE model versions,
    6. ``BeginStop``, stopped first: starts the stop deadline (--drain_delay +
       --drain_timeout; every step is waited for only until then, and a watchdog ends the
       process at it, see service.shutdown) and makes /readyz answer 503.
    """
    # The composition root is the one place that picks the global reactor.
    from twisted.internet import reactor

    from service.budget import RequestBudget
    from service.decoding import BodyDecoder
    from service.errors import Unavailable
    from service.health import Health
    from service.http import InferenceAPI, InferenceSite
    from service.images import ImageDecoder
    from service.lifecycle import AfterReady, HTTPPort, OrderedServices
    from service.metrics import Metrics
    from service.reload import ConfigReloader
    from service.repository import ModelRepository
    from service.shutdown import BeginStop, StopDeadline

    config: ServerConfig = options.config
    configure_tensorflow(config.intra_op_threads, config.inter_op_threads)
    metrics = Metrics()
    repository = ModelRepository(
        config.models,
        reactor=reactor,
        metrics=metrics,
        file_system_poll_wait=config.file_system_poll_wait,
        max_load_retries=config.max_load_retries,
        load_retry_interval=config.load_retry_interval,
    )
    images = ImageDecoder(
        reactor=reactor,
        threads=config.image_decode_threads,
        max_enqueued=config.max_enqueued_image_decodes,
        max_pixels=config.max_image_pixels,
    )
    health = Health(repository, stall_seconds=config.inference_stall_seconds)
    decoder = BodyDecoder(reactor=reactor)  # large JSON bodies; gives memory back after them
    api = InferenceAPI(
        repository,
        metrics=metrics,
        overload_fraction=config.overload_fraction,
        images=images,
        default_model=config.default_model,
        health=health,
        decoder=decoder,
    )
    site = InferenceSite(
        api,
        max_body_bytes=config.max_request_bytes,
        budget=RequestBudget(config.max_inflight_request_bytes),
        request_header_timeout=config.request_header_timeout,
        reactor=reactor,
    )
    deadline = StopDeadline(
        reactor, drain_delay=config.drain_delay, drain_timeout=config.drain_timeout
    )

    def cut_queued() -> int:
        stopping = Unavailable("the server is stopping; retry on another server", retry_after=1)
        return sum(queue.abort_waiting(stopping) for queue in repository.queues())

    port = HTTPPort(
        serverFromString(reactor, config.listen),
        site,
        site.in_flight,
        reactor=reactor,
        deadline=deadline,
        cut_queued=cut_queued,
    )
    top = OrderedServices(deadline, clock=reactor)
    repository.setServiceParent(top)
    reloader = ConfigReloader(
        config.model_config_file,  # None: SIGHUP only rescans the model folders
        lambda path: read_models(path, config.batching),
        repository.apply,
        reactor=reactor,
        poll_wait=config.model_config_file_poll_wait,
        rescan=repository.rescan,
    )
    reloader.started_with(config.models)
    reloader.setServiceParent(top)
    images.setServiceParent(top)
    decoder.setServiceParent(top)
    port.setServiceParent(top)
    if config.discovery is not None:
        discovery = config.discovery

        def registration(listening: Any) -> Any:
            registration = make_registration(
                discovery,
                repository,
                listening.getHost().port,
                health,
                reactor,
            )
            repository.subscribe(lambda: registration.update(*model_tags(repository)))
            return registration

        def ready() -> Any:
            return repository.when_ready().addCallback(lambda _: port.listening)

        AfterReady(registration, ready).setServiceParent(top)
    # Stopped first: the stop's deadline starts and /readyz fails before anything else happens.
    BeginStop(deadline, lambda: setattr(health, "draining", True)).setServiceParent(top)
    return top


def configure_tensorflow(intra: int, inter: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if intra or inter:
        import tensorflow as tf

        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)


def model_tags(repository: Any) -> tuple[list[str], dict[str, str]]:
    """Consul tags and meta naming every model with an AVAILABLE version, and those versions.

    A model still loading (or only failing) is not announced: clients choosing backends by
    ``model:NAME`` would otherwise send it requests it can only answer with 503.
    """
    tags, served = ["api:tfserving-rest"], []
    for name, versions in sorted(repository.versions.items()):
        available = sorted(n for n, v in versions.items() if v.state == "AVAILABLE")
        if available:
            tags.append(f"model:{name}")
        for number in available:
            tags.append(f"model:{name}:{number}")
            served.append(f"{name}:{number}")
    return tags, {"api": "tfserving-rest", "models": ",".join(served)}


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def make_registration(
    discovery: DiscoveryConfig,
    repository: Any,
    listening_port: int,
    health: Any,
    reactor: Any,
) -> Any:
    from discovery.consul import ConsulClient, TreqTransport
    from discovery.registration import ConsulRegistration, RegistrationSpec, default_service_id

    port = discovery.advertise_port or listening_port
    tags, meta = model_tags(repository)
    spec = RegistrationSpec(
        service_id=default_service_id(discovery.service_name, discovery.advertise_host, port),
        address=discovery.advertise_host,
        port=port,
        readiness_url=f"http://{_url_host(discovery.advertise_host)}:{port}/readyz",
        name=discovery.service_name,
        tags=tags,
        meta=meta,
        check_interval=discovery.check_interval,
        ttl=discovery.ttl,
        deregister_critical_after=discovery.deregister_critical_after,
        drain_delay=discovery.drain_delay,
    )

    client = ConsulClient(TreqTransport.create(reactor, discovery.consul))
    return ConsulRegistration(spec, client, reactor, health.alive)
