"""``twistd inference``: command-line options and the service tree they build.

Options follow TensorFlow Serving's flag names (``--rest_api_port``,
``--model_name``, ``--model_base_path``, ``--enable_batching``,
``--batching_parameters_file``) so a TF Serving command line moves over
unchanged; ``--listen`` takes any Twisted endpoint string instead of a port.
This module imports no TensorFlow: ``twistd inference --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from service.batching import BatchingParameters
from service.batching_config import (
    BatchingConfigError,
    batching_for_model,
    load_batching_parameters,
)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


@attrs.frozen
class ServerConfig:
    """Everything ``makeService`` needs, validated; built from Options, testable as plain data."""

    listen: str
    model_name: str
    model_base_path: Path
    batching: BatchingParameters
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


def _integer(flag: str):
    """A coerce function whose error names the flag (Twisted's own message does not)."""

    def coerce(value: str) -> int:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"--{flag} takes a whole number, not {value!r}") from None

    coerce.coerceDoc = ""  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    synopsis = "--model_base_path=DIR [--model_name=NAME] [--rest_api_port=8501 | --listen=ENDPOINT] [options]"
    longdesc = (
        "Serve a TensorFlow SavedModel (TF Serving's versioned layout: DIR/1/, DIR/2/, …; the highest "
        "version is served) over TensorFlow Serving's REST API. Flags are named as TF Serving's."
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
            "max_request_bytes",
            None,
            DEFAULT_MAX_REQUEST_BYTES,
            "Largest request body accepted; larger ones get 413.",
            _integer("max_request_bytes"),
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
    base = opts.get("model_base_path")
    if not base:
        raise usage.UsageError(
            "--model_base_path is required: the folder holding version folders 1/, 2/, …"
        )
    base_path = Path(base).expanduser().resolve()
    if not base_path.is_dir():
        raise usage.UsageError(f"--model_base_path {base} is not a folder")
    name = opts.get("model_name") or "default"
    if "/" in name or ":" in name:
        raise usage.UsageError(f"--model_name {name!r} may not contain '/' or ':'")
    max_bytes = opts.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)
    if max_bytes <= 0:
        raise usage.UsageError("--max_request_bytes must be positive")
    batching = BatchingParameters(enabled=bool(opts.get("enable_batching")))
    if opts.get("batching_parameters_file"):
        if not batching.enabled:
            raise usage.UsageError("--batching_parameters_file needs --enable_batching")
        batching = _load_batching(Path(opts["batching_parameters_file"]))
    _load_batching_for_model(
        base_path, batching
    )  # fail at start-up, not at load, on a bad model file
    return ServerConfig(
        listen=listen,
        model_name=name,
        model_base_path=base_path,
        batching=batching,
        max_request_bytes=max_bytes,
    )


def _load_batching(path: Path) -> BatchingParameters:
    try:
        return load_batching_parameters(path)
    except BatchingConfigError as e:
        raise usage.UsageError(str(e)) from None


def _load_batching_for_model(base_path: Path, batching: BatchingParameters) -> BatchingParameters:
    try:
        return batching_for_model(base_path, batching)
    except BatchingConfigError as e:
        raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> MultiService:
    """Build the service tree: models load first; the port opens while they load (readiness says 503)."""
    # The composition root is the one place that picks the global reactor.
    from twisted.internet import reactor

    from service.http import InferenceAPI, InferenceSite
    from service.metrics import Metrics
    from service.repository import ModelConfig, ModelRepository

    config: ServerConfig = options.config
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    metrics = Metrics()
    repository = ModelRepository(
        [
            ModelConfig(
                config.model_name,
                config.model_base_path,
                batching_for_model(config.model_base_path, config.batching),
            )
        ],
        reactor=reactor,
        metrics=metrics,
    )
    api = InferenceAPI(repository, metrics=metrics)
    site = InferenceSite(api, max_body_bytes=config.max_request_bytes)
    top = MultiService()
    repository.setServiceParent(top)
    StreamServerEndpointService(serverFromString(reactor, config.listen), site).setServiceParent(
        top
    )
    return top
