"""``twistd inference`` flags, validated into a frozen ``ServerConfig``.

Flags follow TensorFlow Serving's names (``--rest_api_port``, ``--model_name``,
``--model_base_path``, ``--model_config_file``, ``--enable_batching``,
``--batching_parameters_file``, the poll waits) so a TF Serving command line moves over
unchanged; ``--listen`` takes any Twisted endpoint string instead of a port.

Each default is stated once, as a field default of ``ServerConfig`` (or ``DiscoveryConfig``);
the flag table reads it from there, and ``config_from_options`` reads every flag's parsed
value, which Twisted fills with that default. Imports no TensorFlow, so
``twistd inference --help`` stays fast.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.logger import Logger
from twisted.python import usage

from discovery.consul import ConsulAddress
from service.access_log import FORMATS as ACCESS_LOG_FORMATS
from service.auth import TokenFileError, read_tokens
from service.batching import BatchingParameters
from service.batching_config import (
    BatchingConfigError,
    batching_for_model,
    load_batching_parameters,
)
from service.logs import use_text_log
from service.model_config import ModelConfig, ModelConfigError, load_model_config
from service.monitoring_config import MonitoringConfigError, read_prometheus_path
from service.shutdown import CUT_MARGIN
from wire.paths import is_name

log = Logger()

DEFAULT_PORT = 8501
DEFAULT_GRPC_PORT = 8500  # TF Serving's --port
DEFAULT_MODEL_NAME = "default"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# Decoding a JSON body takes about four times its size at its peak (the bytes, the copies
# the fast path scans, the parsed numbers, the arrays), so four 64 MiB bodies at once can
# add ~1 GB to the server; more wait their turn (503 + Retry-After) rather than risk it.
INFLIGHT_BODIES = 4
# As service.images.DEFAULT_MAX_IMAGE_PIXELS; not imported, to keep Pillow out of --help.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


@attrs.frozen
class DiscoveryConfig:
    """Where and how this server announces itself in Consul (see service.registration)."""

    consul: ConsulAddress
    advertise_host: str | None  # None: the address the local Consul agent advertises
    advertise_port: int | None  # None: the port actually listened on
    service_name: str = "inference"
    check_interval: float = 5.0
    ttl: float = 15.0
    deregister_critical_after: float = 60.0
    drain_delay: float = 5.0  # ServerConfig.drain_delay, which it is always given
    # The REST port's scheme, https for an ssl: --listen: its readiness check's URL, and the
    # registration's "scheme" meta that tells clients to call it with https.
    check_scheme: str = "http"
    check_tls_skip_verify: bool = False  # the agent does not verify the server's certificate


@attrs.frozen
class ServerConfig:
    """Everything ``makeService`` needs, validated; built from Options, testable as plain data."""

    listen: str
    models: tuple[ModelConfig, ...]  # with each model's batching parameters resolved
    # The server-wide batching parameters (--enable_batching, --batching_parameters_file).
    batching: BatchingParameters
    model_config_file: Path | None = None
    model_config_file_poll_wait: float = 0.0
    file_system_poll_wait: float = 1.0
    max_load_retries: int = 5
    load_retry_interval: float = 60.0  # seconds; the flag is in microseconds, as TF Serving's
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_inflight_request_bytes: int = INFLIGHT_BODIES * DEFAULT_MAX_REQUEST_BYTES
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
    # Seconds a request has, from its first byte, to arrive whole (headers and body). It bounds
    # how long a slow sender holds a connection and its share of --max_inflight_request_bytes:
    # 60 s carries the largest default body (64 MiB) at about 9 Mbit/s.
    request_read_timeout: float = 60.0
    # Connections open at once; past it a new connection is answered 503 and closed. Each costs a
    # file descriptor and its buffers, and at the ~1,900 requests/s one server answers
    # (docs/scaling.md) a thousand clients with a request each already wait ~0.5 s in its queue:
    # the next one is served sooner by another server, where the client library retries a 503.
    max_connections: int = 1024
    # gRPC (TF Serving's API): host:port to listen on, None for no gRPC.
    grpc_listen: str | None = f"0.0.0.0:{DEFAULT_GRPC_PORT}"
    grpc_max_calls: int = 256
    # Front processes answering HTTP (service.front_main); 1: this process alone, as always.
    http_processes: int = 1
    grpc_max_receive_bytes: int = 0  # 0: unbounded, as TF Serving
    # Times each record of a version's assets.extra/tf_serving_warmup_requests is replayed.
    warmup_iterations: int = 1
    # Versions' own Python (assets.extra/kleinserve_hooks.py, service.model_hooks): off unless
    # asked for, as a hooks file is code the model store then runs with the server's rights.
    enable_model_hooks: bool = False
    hook_threads: int = 4
    # --monitoring_config_file's Prometheus path, served as /metrics; None for none.
    prometheus_path: str | None = None
    # One line per answered request in the twistd log: "text", "json" or "off".
    access_log: str = "text"
    # The whole log: twistd's "text", or "json" lines on standard output (service.logs).
    log_format: str = "text"
    # Bearer tokens every call needs but health checks (service.auth); None: no auth.
    auth_token_file: Path | None = None
    # With auth_token_file: /metrics (and the monitoring config's path) need a token too.
    auth_metrics: bool = False


def _default(field: str, of: type = ServerConfig) -> Any:
    """The default of a config field: where every flag's default is stated."""
    return attrs.fields_dict(of)[field].default


def _coerce(flag: str, kind: type, what: str) -> Callable[[str], Any]:
    """A coerce function whose error names the flag (Twisted's own message does not)."""

    def coerce(value: str) -> Any:
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"--{flag} takes {what}, not {value!r}") from None

    coerce.coerceDoc = ""  # type: ignore[attr-defined]
    return coerce


def _flag(name: str, default: Any, doc: str, kind: type | None = None) -> list[Any]:
    """One row of optParameters; ``kind`` int or float checks the value and names the flag."""
    if kind is None:
        return [name, None, default, doc]
    what = "a whole number" if kind is int else "a number"
    return [name, None, default, doc, _coerce(name, kind, what)]


class Options(usage.Options):
    synopsis = (
        "(--model_base_path=DIR [--model_name=NAME] | --model_config_file=FILE) "
        f"[--rest_api_port={DEFAULT_PORT} | --listen=ENDPOINT] [options]"
    )
    longdesc = (
        "Serve TensorFlow SavedModels (TF Serving's versioned layout: DIR/1/, DIR/2/, …) over "
        "TensorFlow Serving's REST API: one model (--model_base_path; the highest version is "
        "served), or the models, version policies and labels of a TF Serving model config file. "
        "New version folders are picked up while serving; SIGHUP reloads the config file at once. "
        "Flags are named as TF Serving's."
    )
    optParameters = [
        # The models, the port and the HTTP limits.
        _flag(
            "rest_api_port",
            None,
            f"TCP port of the REST API (default {DEFAULT_PORT}). Same as --listen=tcp:PORT.",
            int,
        ),
        _flag(
            "port",
            DEFAULT_GRPC_PORT,
            "TCP port of TF Serving's gRPC API (PredictionService, ModelService, grpc.health.v1) "
            "on all interfaces; 0 turns gRPC off.",
            int,
        ),
        _flag(
            "grpc_listen",
            None,
            "host:port for the gRPC API instead of --port, e.g. 127.0.0.1:8500 or [::]:8500.",
        ),
        _flag(
            "http_processes",
            _default("http_processes"),
            "Processes answering HTTP on the port (1: this one). More than 1: that many front "
            "processes without TensorFlow parse and encode HTTP and hand tensors to this "
            "process, which runs the models (docs/scaling.md). TCP --listen only.",
            int,
        ),
        _flag(
            "grpc_max_calls",
            _default("grpc_max_calls"),
            "The most gRPC calls in progress at once; one past them is refused "
            "RESOURCE_EXHAUSTED at once, without running a handler.",
            int,
        ),
        _flag(
            "grpc_threads",
            None,
            "Gone: gRPC calls run on one asyncio loop; --grpc_max_calls bounds them.",
        ),
        _flag(
            "grpc_max_receive_bytes",
            _default("grpc_max_receive_bytes"),
            "Largest gRPC request message in bytes; 0 (the default, as TF Serving) is unbounded.",
            int,
        ),
        _flag(
            "num_request_iterations_for_warmup",
            _default("warmup_iterations"),
            "Times each record of a version's assets.extra/tf_serving_warmup_requests is run "
            "before the version serves (TF Serving's flag; 0 skips the file).",
            int,
        ),
        _flag(
            "listen",
            None,
            "Twisted endpoint string to listen on instead, e.g. tcp:8501:interface=127.0.0.1, "
            "ssl:8443:privateKey=key.pem:certKey=cert.pem, unix:/run/inference.sock",
        ),
        _flag(
            "model_name",
            DEFAULT_MODEL_NAME,
            "Name the model is served under (/v1/models/NAME).",
        ),
        _flag(
            "batching_parameters_file",
            None,
            "TF Serving's batching parameters text-proto (with --enable_batching). A model folder's own "
            "batching_parameters.txt overrides it for that model.",
        ),
        _flag("model_base_path", None, "Folder holding the model's numeric version folders."),
        _flag(
            "model_config_file",
            None,
            "TF Serving's ModelServerConfig text-proto (model_config_list: names, base paths, version "
            "policies, labels), instead of --model_name/--model_base_path.",
        ),
        _flag(
            "monitoring_config_file",
            None,
            "TF Serving's MonitoringConfig text-proto: with prometheus_config { enable: true "
            'path: "…" } metrics are served on that path too (/metrics always).',
        ),
        _flag(
            "model_config_file_poll_wait_seconds",
            _default("model_config_file_poll_wait"),
            "Seconds between re-reads of --model_config_file (0: only at start and on SIGHUP).",
            float,
        ),
        _flag(
            "file_system_poll_wait_seconds",
            _default("file_system_poll_wait"),
            "Seconds between scans of the model folders for new versions (0: scan once at start, "
            "negative: never scan).",
            float,
        ),
        _flag(
            "max_num_load_retries",
            _default("max_load_retries"),
            "Times a version that failed to load is tried again (with backoff) before it is given up.",
            int,
        ),
        _flag(
            "load_retry_interval_micros",
            int(_default("load_retry_interval") * 1_000_000),
            "Microseconds before the first retry of a failed load; doubles per retry, up to 8 times it.",
            int,
        ),
        _flag(
            "max_request_bytes",
            _default("max_request_bytes"),
            "Largest request body accepted; larger ones get 413.",
            int,
        ),
        _flag(
            "max_inflight_request_bytes",
            None,
            "Request body bytes being received or decoded at once, over all requests; a request "
            f"that would pass it gets 503 with Retry-After (default: {INFLIGHT_BODIES} x "
            "--max_request_bytes).",
            int,
        ),
        _flag(
            "access_log",
            _default("access_log"),
            "One line per answered HTTP request in the twistd log (namespace kleinserve.access): "
            "text, json (one JSON object, keys in the README) or off.",
        ),
        _flag(
            "log_format",
            _default("log_format"),
            "The whole log: text (twistd's), or json: one JSON object per line on standard "
            "output, for log shippers (needs twistd -n and no twistd --logfile).",
        ),
        _flag(
            "request_header_timeout",
            _default("request_header_timeout"),
            "Seconds a client has to send a request's headers, from its first byte; then 408.",
            float,
        ),
        _flag(
            "auth_token_file",
            None,
            "File of bearer tokens, one per line (# comments): every call but the health "
            "checks (and /metrics, unless --auth_metrics) needs Authorization: Bearer TOKEN "
            "(gRPC: authorization metadata), else 401. Re-read on SIGHUP.",
        ),
        _flag(
            "request_read_timeout",
            _default("request_read_timeout"),
            "Seconds a client has to send a whole request, headers and body, from its first "
            "byte; then 408 and the connection is closed.",
            float,
        ),
        _flag(
            "max_connections",
            _default("max_connections"),
            "HTTP connections open at once; past it a new connection is answered 503 with "
            "Retry-After and closed.",
            int,
        ),
        # Consul, health and the stop.
        _flag(
            "consul",
            None,
            "Register in Consul through this agent (host:port or http[s]://host:port). Default: "
            "$CONSUL_HTTP_ADDR if set, else no registration. $CONSUL_HTTP_TOKEN is sent as the ACL token.",
        ),
        _flag("service_name", _default("service_name", DiscoveryConfig), "Consul service name."),
        _flag(
            "advertise",
            None,
            "HOST[:PORT] clients should call, as registered in Consul. Default: the --listen "
            "interface and port; listening on all interfaces, the address the local Consul agent "
            "advertises (its /v1/agent/self), as Consul's own services do.",
        ),
        _flag(
            "consul_check_interval",
            _default("check_interval", DiscoveryConfig),
            "Seconds between Consul's /readyz checks.",
            float,
        ),
        _flag(
            "consul_ttl",
            _default("ttl", DiscoveryConfig),
            "TTL of the liveness check, refreshed every TTL/3.",
            float,
        ),
        _flag(
            "deregister_critical_after",
            _default("deregister_critical_after", DiscoveryConfig),
            "Seconds after which Consul drops an instance whose checks stay critical (Consul's minimum is 60).",
            float,
        ),
        _flag(
            "drain_delay",
            _default("drain_delay"),
            "On stop: seconds between leaving Consul and closing the port, so clients notice first.",
            float,
        ),
        _flag(
            "drain_timeout",
            _default("drain_timeout"),
            "On stop: seconds, after --drain_delay, that requests in flight may take; then what is "
            "still queued is answered 503 and the process exits (within --drain_delay + this).",
            float,
        ),
        _flag(
            "overload_fraction",
            _default("overload_fraction"),
            "/readyz answers 429 (Consul: warning) while a batching queue is fuller than this.",
            float,
        ),
        _flag(
            "inference_stall_seconds",
            _default("inference_stall_seconds"),
            "A batch running longer than this fails the liveness check (a wedged inference thread).",
            float,
        ),
        _flag(
            "tensorflow_intra_op_parallelism",
            _default("intra_op_threads"),
            "Threads TensorFlow uses inside one op (0: TensorFlow's choice), as TF Serving's flag.",
            int,
        ),
        _flag(
            "tensorflow_inter_op_parallelism",
            _default("inter_op_threads"),
            "Ops TensorFlow runs at once (0: TensorFlow's choice), as TF Serving's flag.",
            int,
        ),
        # Image uploads.
        _flag(
            "default_model",
            None,
            "Model that image uploads to POST / are classified with (default: the only model served).",
        ),
        _flag(
            "image_decode_threads",
            _default("image_decode_threads"),
            "Threads that decode and preprocess uploaded images (off the reactor thread).",
            int,
        ),
        _flag(
            "max_enqueued_image_decodes",
            _default("max_enqueued_image_decodes"),
            "Uploaded images waiting for or in a decode thread; beyond that a request gets 503.",
            int,
        ),
        _flag(
            "hook_threads",
            _default("hook_threads"),
            "Threads that run the versions' hooks (--enable_model_hooks), off the reactor and "
            "inference threads; 64 calls per thread may wait, then a request gets 503.",
            int,
        ),
        _flag(
            "max_image_pixels",
            _default("max_image_pixels"),
            "Largest uploaded image in pixels (width x height); larger ones (and decompression "
            "bombs) get 413 before they are decoded.",
            int,
        ),
    ]
    optFlags = [
        ["enable_batching", None, "Merge concurrent requests into batches (TF Serving's flag)."],
        [
            "consul_check_tls_skip_verify",
            None,
            "With an ssl: --listen, Consul's https readiness check does not verify the server's "
            "certificate (for a certificate the agent has no CA for).",
        ],
        [
            "enable_model_hooks",
            None,
            "Run each version's own Python, VERSION/assets.extra/kleinserve_hooks.py (setup, "
            "preprocess, postprocess, handle, teardown). A hooks file is code: only with a model "
            "store you trust as you trust the server's code.",
        ],
        [
            "auth_metrics",
            None,
            "With --auth_token_file, /metrics (and --monitoring_config_file's path) need a "
            "token too (default: open, like the health checks).",
        ],
    ]

    def postOptions(self) -> None:
        self.config = config_from_options(self)
        if self.config.log_format == "json":
            use_json_log(getattr(self, "parent", None))
        else:
            use_text_log(getattr(self, "parent", None))


def use_json_log(twistd: Any) -> None:
    """Make twistd log JSON lines (``service.logs``): set its ``--logger`` option, which it
    reads only after every option, this one included, has been parsed. ``twistd``: twistd's
    own options (None when these options are parsed on their own: nothing to set)."""
    if twistd is None:
        return
    if twistd.get("logger"):
        raise usage.UsageError("give --log_format=json or twistd's --logger, not both")
    if twistd.get("logfile") not in (None, "", "-"):
        raise usage.UsageError(
            "--log_format=json writes JSON lines to standard output: drop twistd's --logfile"
        )
    if not twistd.get("nodaemon"):
        raise usage.UsageError(
            "--log_format=json writes to standard output, which a daemon does not have: "
            "run twistd -n"
        )
    twistd["logger"] = "service.logs.json_observer"


def config_from_options(opts: Any) -> ServerConfig:
    """Validate parsed flags into a ServerConfig; every problem is a UsageError a person can act on."""
    listen = _listen(opts["rest_api_port"], opts["listen"])
    batching = _batching(opts)
    config_path, models = _models(opts, batching)
    max_bytes = opts["max_request_bytes"]
    if max_bytes <= 0:
        raise usage.UsageError("--max_request_bytes must be positive")
    inflight_bytes = _inflight_request_bytes(opts["max_inflight_request_bytes"], max_bytes)
    _check_numbers(opts)
    default_model = _default_model(opts["default_model"] or None, models)
    return ServerConfig(
        listen=listen,
        models=tuple(models),
        batching=batching,
        model_config_file=config_path,
        model_config_file_poll_wait=opts["model_config_file_poll_wait_seconds"],
        file_system_poll_wait=opts["file_system_poll_wait_seconds"],
        max_load_retries=opts["max_num_load_retries"],
        load_retry_interval=opts["load_retry_interval_micros"] / 1e6,
        max_request_bytes=max_bytes,
        max_inflight_request_bytes=inflight_bytes,
        discovery=_discovery_config(opts, listen),
        overload_fraction=opts["overload_fraction"],
        inference_stall_seconds=opts["inference_stall_seconds"],
        drain_delay=opts["drain_delay"],
        drain_timeout=opts["drain_timeout"],
        intra_op_threads=opts["tensorflow_intra_op_parallelism"],
        inter_op_threads=opts["tensorflow_inter_op_parallelism"],
        default_model=default_model,
        image_decode_threads=opts["image_decode_threads"],
        max_enqueued_image_decodes=opts["max_enqueued_image_decodes"],
        max_image_pixels=opts["max_image_pixels"],
        request_header_timeout=opts["request_header_timeout"],
        request_read_timeout=opts["request_read_timeout"],
        max_connections=opts["max_connections"],
        grpc_listen=_grpc_listen(opts["port"], opts["grpc_listen"]),
        grpc_max_calls=opts["grpc_max_calls"],
        http_processes=opts["http_processes"],
        grpc_max_receive_bytes=opts["grpc_max_receive_bytes"],
        warmup_iterations=opts["num_request_iterations_for_warmup"],
        enable_model_hooks=bool(opts["enable_model_hooks"]),
        hook_threads=opts["hook_threads"],
        prometheus_path=_prometheus_path(opts["monitoring_config_file"]),
        access_log=_access_log(opts["access_log"]),
        log_format=_log_format(opts["log_format"]),
        auth_token_file=_auth_token_file(opts["auth_token_file"]),
        auth_metrics=_auth_metrics(opts),
    )


def _auth_token_file(file: str | None) -> Path | None:
    """The token file, checked now: one that cannot be used stops start-up."""
    if not file:
        return None
    path = Path(file).expanduser().resolve()
    try:
        read_tokens(path)
    except TokenFileError as e:
        raise usage.UsageError(f"--auth_token_file: {e}") from None
    return path


def _auth_metrics(opts: Any) -> bool:
    if opts["auth_metrics"] and not opts["auth_token_file"]:
        raise usage.UsageError("--auth_metrics needs --auth_token_file (the tokens to ask for)")
    return bool(opts["auth_metrics"])


def _prometheus_path(file: str | None) -> str | None:
    if not file:
        return None
    try:
        return read_prometheus_path(Path(file))
    except MonitoringConfigError as e:
        raise usage.UsageError(str(e)) from None


def _access_log(value: str) -> str:
    if value not in ACCESS_LOG_FORMATS:
        raise usage.UsageError(f"--access_log takes {', '.join(ACCESS_LOG_FORMATS)}, not {value!r}")
    return value


def _log_format(value: str) -> str:
    if value not in ("text", "json"):
        raise usage.UsageError(f"--log_format takes text or json, not {value!r}")
    return value


def _grpc_listen(port: int, listen: str | None) -> str | None:
    """The gRPC address: --grpc_listen, else all interfaces on --port (0: no gRPC)."""
    if listen is not None:
        host, _, number = listen.rpartition(":")
        if not host or not number.isdigit() or not 0 < int(number) <= 65535:
            raise usage.UsageError(
                f"--grpc_listen takes host:port, e.g. 127.0.0.1:8500 or [::]:8500, not {listen!r}"
            )
        return listen
    if not 0 <= port <= 65535:
        raise usage.UsageError(f"--port must be between 0 and 65535, not {port}")
    return f"0.0.0.0:{port}" if port else None


def _listen(port: int | None, listen: str | None) -> str:
    if port is not None and listen is not None:
        raise usage.UsageError("give --rest_api_port or --listen, not both")
    if port is not None and not 0 <= port <= 65535:
        raise usage.UsageError(f"--rest_api_port must be between 0 and 65535, not {port}")
    if listen is None:
        listen = f"tcp:{DEFAULT_PORT if port is None else port}"
    if not listen.strip():  # e.g. --listen=${LISTEN} with LISTEN unset (deploy/systemd)
        raise usage.UsageError("--listen is empty: give an endpoint, e.g. tcp:8501")
    return listen


def _batching(opts: Any) -> BatchingParameters:
    batching = BatchingParameters(enabled=bool(opts["enable_batching"]))
    if opts["batching_parameters_file"]:
        if not batching.enabled:
            raise usage.UsageError("--batching_parameters_file needs --enable_batching")
        try:
            return load_batching_parameters(Path(opts["batching_parameters_file"]))
        except BatchingConfigError as e:
            raise usage.UsageError(str(e)) from None
    return batching


def _models(opts: Any, batching: BatchingParameters) -> tuple[Path | None, list[ModelConfig]]:
    """The config file's path (None without one) and the models to serve."""
    config_file = opts["model_config_file"]
    if not config_file:
        return None, [_single_model(opts, batching)]
    if opts["model_base_path"]:
        raise usage.UsageError("give --model_config_file or --model_base_path, not both")
    config_path = Path(config_file).expanduser().resolve()
    try:
        models = read_models(config_path, batching)
    except ModelConfigError as e:
        raise usage.UsageError(str(e)) from None
    if not models:
        raise usage.UsageError(f"--model_config_file {config_file} configures no model")
    return config_path, models


def _check_numbers(opts: Any) -> None:
    """Refuse the numeric flags outside the range where they mean something."""
    for flag in ("request_header_timeout", "request_read_timeout", "max_connections"):
        if opts[flag] <= 0:
            raise usage.UsageError(f"--{flag} must be positive")
    for flag in ("model_config_file_poll_wait_seconds", "max_num_load_retries"):
        if opts[flag] < 0:
            raise usage.UsageError(f"--{flag} must be 0 or more")
    if opts["load_retry_interval_micros"] <= 0:
        raise usage.UsageError("--load_retry_interval_micros must be positive")
    for flag in (
        "consul_check_interval",
        "consul_ttl",
        "inference_stall_seconds",
        "deregister_critical_after",
    ):
        if opts[flag] <= 0:
            raise usage.UsageError(f"--{flag} must be positive")
    if opts["drain_delay"] < 0:
        raise usage.UsageError("--drain_delay must be 0 or more")
    if opts["num_request_iterations_for_warmup"] < 0:
        raise usage.UsageError("--num_request_iterations_for_warmup must be 0 or more")
    if opts["grpc_threads"] is not None:
        raise usage.UsageError(
            "--grpc_threads is gone: gRPC calls now run as coroutines on one asyncio loop, not "
            f"a thread each; --grpc_max_calls (default {_default('grpc_max_calls')}) bounds the "
            "calls in progress"
        )
    if opts["grpc_max_calls"] <= 0:
        raise usage.UsageError("--grpc_max_calls must be positive")
    if not 1 <= opts["http_processes"] <= 64:
        raise usage.UsageError("--http_processes must be between 1 and 64")
    if opts["http_processes"] > 1 and not (opts["listen"] or "tcp:").startswith("tcp"):
        raise usage.UsageError("--http_processes above 1 needs a TCP --listen (tcp:PORT…)")
    if opts["grpc_max_receive_bytes"] < 0:
        raise usage.UsageError("--grpc_max_receive_bytes must be 0 (unbounded) or more")
    if opts["drain_timeout"] <= CUT_MARGIN:
        raise usage.UsageError(f"--drain_timeout must be more than {CUT_MARGIN:g} s")
    fraction = opts["overload_fraction"]
    if not 0 < fraction <= 1:
        raise usage.UsageError(f"--overload_fraction must be in (0, 1], not {fraction}")
    for flag in ("tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism"):
        if opts[flag] < 0:
            raise usage.UsageError(f"--{flag} must be 0 or more")
    for flag in (
        "image_decode_threads",
        "max_enqueued_image_decodes",
        "max_image_pixels",
        "hook_threads",
    ):
        if opts[flag] <= 0:
            raise usage.UsageError(f"--{flag} must be positive")


def _default_model(name: str | None, models: list[ModelConfig]) -> str | None:
    names = [m.name for m in models]
    if name is not None and name not in names:
        raise usage.UsageError(
            f"--default_model {name!r} is not a served model; this server serves "
            + ", ".join(repr(n) for n in names)
        )
    return name


def _inflight_request_bytes(flag: int | None, max_request_bytes: int) -> int:
    """The request-body budget: the flag, or INFLIGHT_BODIES of the largest bodies.

    Smaller than one body, no body of the largest size could ever be accepted.
    """
    if flag is None:
        return INFLIGHT_BODIES * max_request_bytes
    if flag < max_request_bytes:
        raise usage.UsageError(
            f"--max_inflight_request_bytes ({flag}) must be at least --max_request_bytes "
            f"({max_request_bytes}), or the largest bodies allowed could never be accepted"
        )
    return flag


def _single_model(opts: Any, batching: BatchingParameters) -> ModelConfig:
    """The one model of --model_name/--model_base_path (TF Serving: latest version, no labels)."""
    base = opts["model_base_path"]
    if not base:
        raise usage.UsageError(
            "--model_base_path (the folder holding version folders 1/, 2/, …) or "
            "--model_config_file is required"
        )
    base_path = Path(base).expanduser().resolve()
    if not base_path.is_dir():
        raise usage.UsageError(f"--model_base_path {base} is not a folder")
    name = opts["model_name"] or DEFAULT_MODEL_NAME
    if not is_name(name):
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
    return with_batching(models, batching)


def with_batching(models: list[ModelConfig], batching: BatchingParameters) -> list[ModelConfig]:
    """Each model with its batching parameters: its folder's batching_parameters.txt, else
    the server's ``batching``; ModelConfigError for a bad file."""
    try:
        return [attrs.evolve(m, batching=batching_for_model(m.base_path, batching)) for m in models]
    except BatchingConfigError as e:
        raise ModelConfigError(str(e)) from None


def _discovery_config(opts: Any, listen: str) -> DiscoveryConfig | None:
    """The registration the flags ask for (--consul, else $CONSUL_HTTP_ADDR), or None."""
    address = opts["consul"] or os.environ.get("CONSUL_HTTP_ADDR", "").strip()
    if not address:
        return None
    try:
        consul = ConsulAddress.parse(
            address, token=os.environ.get("CONSUL_HTTP_TOKEN", "").strip() or None
        )
    except ValueError as e:
        raise usage.UsageError(f"--consul: {e}") from None
    host, port = _advertised(opts["advertise"], listen)
    return DiscoveryConfig(
        consul=consul,
        advertise_host=host,
        advertise_port=port,
        service_name=opts["service_name"] or _default("service_name", DiscoveryConfig),
        check_interval=opts["consul_check_interval"],
        ttl=opts["consul_ttl"],
        deregister_critical_after=opts["deregister_critical_after"],
        drain_delay=opts["drain_delay"],
        check_scheme="https" if listen.split(":", 1)[0] == "ssl" else "http",
        check_tls_skip_verify=bool(opts["consul_check_tls_skip_verify"]),
    )


def _advertised(advertise: str | None, listen: str) -> tuple[str | None, int | None]:
    """The host (and port, if given) to register: --advertise, or the listening interface, or
    None for a server on all interfaces (it registers the local agent's address then).

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
    if parts[0] not in ("tcp", "ssl"):
        raise usage.UsageError(
            f"registering in Consul needs --advertise=HOST: --listen={listen} is not a TCP port"
        )
    if interface in ("", "0.0.0.0", "::"):
        return None, None
    return interface, None
