"""TF Serving's ``--model_config_file``: a ``ModelServerConfig`` text-proto, as plain data.

The file is parsed into TF Serving's own ``ModelServerConfig`` message (from the
``tensorflow-serving-api`` package, whose config protos need only protobuf), so any
file TF Serving accepts is read the same way, and protobuf's ``text_format`` names an
unknown or mistyped field with its line and column::

    model_config_list {
      config {
        name: 'digits'
        base_path: '/models/digits'
        model_platform: 'tensorflow'
        model_version_policy { specific { versions: 1 versions: 2 } }
        version_labels { key: 'stable' value: 1 }
        version_labels { key: 'canary' value: 2 }
      }
      config { name: 'flowers' base_path: '/models/flowers' }
    }

Supported, per ``config``: ``name``, ``base_path``, ``model_platform`` (``tensorflow``),
the deprecated ``model_type`` (``TENSORFLOW``), ``model_version_policy`` (``latest``,
``all``, ``specific``) and ``version_labels``. ``logging_config`` is accepted and
ignored, with a warning. ``custom_model_config`` is refused.

Two places where this is more lenient than TF Serving, on purpose: ``model_platform``
may be left out (TF Serving refuses a model with neither ``model_platform`` nor
``model_type``), and a relative ``base_path`` is kept as given, to be resolved against
the working directory (TF Serving wants absolute paths unless it is given
``--model_config_list_root_dir``).

This module imports no TensorFlow: ``service.options`` reads the file at option time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import attrs
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2
from tensorflow_serving.config.file_system_storage_path_source_pb2 import (
    FileSystemStoragePathSourceConfig,
)

from service.batching import BatchingParameters
from wire.paths import is_name

POLICY_KINDS = ("latest", "all", "specific")

# Every field of TF Serving's ModelConfig message, and what happens to it here.
# tests/test_model_config.py checks this against the installed descriptor, so a new
# field in a newer tensorflow-serving-api gets a decision rather than slipping through.
SUPPORTED_FIELDS = frozenset(
    {"name", "base_path", "model_type", "model_platform", "model_version_policy", "version_labels"}
)
IGNORED_FIELDS = ("logging_config",)

_ModelType = model_server_config_pb2.ModelType


class ModelConfigError(ValueError):
    """A config file that is not a valid ModelServerConfig; the message names the field."""


def _versions(versions: Iterable[int]) -> frozenset[int]:
    return frozenset(versions)


@attrs.frozen
class VersionPolicy:
    """Which of a model's versions on disk to serve: TF Serving's ``model_version_policy``."""

    kind: str = attrs.field(validator=attrs.validators.in_(POLICY_KINDS))
    num_versions: int = attrs.field(default=1, validator=attrs.validators.ge(1))  # for "latest"
    versions: frozenset[int] = attrs.field(default=frozenset(), converter=_versions)  # "specific"

    def select(self, on_disk: Iterable[int]) -> set[int]:
        """The versions this policy wants served, out of those found on disk.

        TF Serving's semantics (file_system_storage_path_source.cc): latest N is the N
        highest, all is all, specific is the listed ones that are on disk.
        """
        found = set(on_disk)
        if self.kind == "all":
            return found
        if self.kind == "specific":
            return found & self.versions
        return set(heapq.nlargest(self.num_versions, found))

    def describe(self) -> str:
        """For logs: ``latest 2``, ``all``, ``specific 1, 2``."""
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "specific":
            return "specific " + ", ".join(map(str, sorted(self.versions)))
        return self.kind


class Labels(Mapping[str, int]):
    """Version labels (label → version): immutable, equal and hashable by value.

    Not a ``MappingProxyType``, which compares by identity, so two parses of one file
    give equal ``ModelConfig`` objects.
    """

    __slots__ = ("_labels",)

    def __init__(self, labels: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> None:
        self._labels = dict(sorted(dict(labels).items()))

    def __getitem__(self, label: str) -> int:
        return self._labels[label]

    def __iter__(self) -> Iterator[str]:
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def __hash__(self) -> int:
        return hash(frozenset(self._labels.items()))

    def __repr__(self) -> str:
        return f"Labels({self._labels!r})"


def _labels(labels: Mapping[str, int] | Iterable[tuple[str, int]]) -> Labels:
    return labels if isinstance(labels, Labels) else Labels(labels)


@attrs.frozen
class ModelConfig:
    """One model to serve: TF Serving's ``config { … }`` in ``model_config_list``."""

    name: str
    base_path: Path
    policy: VersionPolicy = VersionPolicy("latest")
    labels: Mapping[str, int] = attrs.field(factory=Labels, converter=_labels)
    batching: BatchingParameters = BatchingParameters(enabled=False)


def _ignore(message: str) -> None:
    pass


def parse_model_config(
    text: str, *, source: str = "model config", warn: Callable[[str], None] = _ignore
) -> list[ModelConfig]:
    """Parse and validate a ModelServerConfig text-proto; raise ModelConfigError naming the field.

    ``warn`` is called once per accepted-but-ignored setting (``logging_config``, the
    deprecated ``model_type``), for the caller to log.
    """
    proto = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as e:
        raise ModelConfigError(f"{source}: {e}") from None
    except RecursionError:
        # text_format recurses once per nested message; google.protobuf.Any lets a file nest
        # without limit (custom_model_config, logging_config.custom_logging_config).
        raise ModelConfigError(f"{source}: messages are nested too deeply") from None
    return models_from_proto(proto, source=source, warn=warn)


def models_from_proto(
    proto: model_server_config_pb2.ModelServerConfig,
    *,
    source: str = "model config",
    warn: Callable[[str], None] = _ignore,
) -> list[ModelConfig]:
    """The models of a ModelServerConfig (parsed from a file, or sent by gRPC's
    HandleReloadConfigRequest), validated; ModelConfigError naming the field."""
    if proto.HasField("custom_model_config"):
        raise ModelConfigError(
            f"{source}: custom_model_config is not supported; use model_config_list"
        )
    configs: list[ModelConfig] = []
    seen: dict[str, int] = {}
    for i, model in enumerate(proto.model_config_list.config):
        where = f"{source}: model_config_list.config[{i}]" + (
            f" (name {model.name!r})" if model.name else ""
        )
        config = _model_config(model, where, warn)
        if config.name in seen:
            raise ModelConfigError(
                f"{where}: name {config.name!r} is already used by "
                f"model_config_list.config[{seen[config.name]}]"
            )
        seen[config.name] = i
        configs.append(config)
    return configs


def load_model_config(path: Path, *, warn: Callable[[str], None] = _ignore) -> list[ModelConfig]:
    """Read (UTF-8) and parse a model config file; errors name the path."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelConfigError(f"cannot read model config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ModelConfigError(f"model config file {path} is not UTF-8: {e.reason}") from None
    return parse_model_config(text, source=str(path), warn=warn)


def _model_config(
    model: model_server_config_pb2.ModelConfig, where: str, warn: Callable[[str], None]
) -> ModelConfig:
    if not model.name:
        raise ModelConfigError(f"{where}: name is required")
    if not is_name(model.name):
        raise ModelConfigError(f"{where}: name {model.name!r} must not contain '/' or ':'")
    if not model.base_path:
        raise ModelConfigError(f"{where}: base_path is required")
    if "\0" in model.base_path:
        raise ModelConfigError(f"{where}: base_path contains a NUL character")
    _check_platform(model, where, warn)
    for field in IGNORED_FIELDS:
        if model.HasField(field):
            warn(f"{where}: {field} is not supported and is ignored")
    policy = _version_policy(model.model_version_policy, where)
    labels = dict(model.version_labels)
    for label, version in sorted(labels.items()):
        if not is_name(label):
            raise ModelConfigError(
                f"{where}: version_labels: label {label!r} must be non-empty, without '/' or ':'"
            )
        if version < 0:
            raise ModelConfigError(
                f"{where}: version_labels: label {label!r} points at version {version}; "
                "versions are 0 or more"
            )
        if policy.kind == "specific" and version not in policy.versions:
            raise ModelConfigError(
                f"{where}: version_labels: label {label!r} points at version {version}, "
                "which model_version_policy.specific does not serve"
            )
    return ModelConfig(
        name=model.name, base_path=Path(model.base_path), policy=policy, labels=labels
    )


def _check_platform(
    model: model_server_config_pb2.ModelConfig, where: str, warn: Callable[[str], None]
) -> None:
    """As TF Serving's GetPlatform (server_core.cc), except that no platform at all is fine."""
    if model.model_type != _ModelType.MODEL_TYPE_UNSPECIFIED:
        if model.model_platform:
            raise ModelConfigError(
                f"{where}: set model_platform or the deprecated model_type, not both"
            )
        if model.model_type != _ModelType.TENSORFLOW:
            kind = (
                _ModelType.Name(model.model_type)
                if model.model_type in _ModelType.values()
                else str(model.model_type)
            )
            raise ModelConfigError(
                f"{where}: model_type {kind} is not supported; only TENSORFLOW models are served"
            )
        warn(f"{where}: model_type is deprecated; use model_platform: 'tensorflow'")
    elif model.model_platform not in ("", "tensorflow"):
        raise ModelConfigError(
            f"{where}: model_platform {model.model_platform!r} is not supported; "
            "only 'tensorflow' models are served"
        )


def _version_policy(
    proto: FileSystemStoragePathSourceConfig.ServableVersionPolicy, where: str
) -> VersionPolicy:
    field = "model_version_policy"
    kind = proto.WhichOneof("policy_choice")
    if kind is None:  # unset, or an empty model_version_policy {}: TF Serving serves latest 1
        return VersionPolicy("latest")
    if kind == "latest":
        # num_versions is a uint32 (protobuf refuses negatives); 0 means TF Serving's default 1.
        return VersionPolicy("latest", num_versions=max(proto.latest.num_versions, 1))
    if kind == "all":
        return VersionPolicy("all")
    versions = list(proto.specific.versions)
    if not versions:
        raise ModelConfigError(f"{where}: {field}.specific.versions lists no version")
    negative = [v for v in versions if v < 0]
    if negative:
        raise ModelConfigError(
            f"{where}: {field}.specific.versions must be 0 or more, not {negative[0]}"
        )
    return VersionPolicy("specific", versions=versions)
