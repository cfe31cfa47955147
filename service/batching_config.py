"""TF Serving's ``--batching_parameters_file``: the same text-proto, parsed by protobuf itself.

A TF Serving deployment's file works unchanged::

    max_batch_size { value: 32 }
    batch_timeout_micros { value: 1000 }
    max_enqueued_batches { value: 100 }
    num_batch_threads { value: 2 }
    allowed_batch_sizes: 8
    allowed_batch_sizes: 16
    allowed_batch_sizes: 32
    pad_variable_length_inputs: true
    enable_large_batch_splitting { value: true }

The message is TF Serving's ``BatchingParameters`` (session_bundle_config.proto),
declared here field for field with the same names, numbers and wrapper types, so
protobuf's ``text_format`` does the parsing and names any unknown field.
``thread_pool_name`` is accepted and ignored (every model version has its own
threads here). A model folder may carry its own ``batching_parameters.txt``,
which then applies to that model instead of the server-wide file.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,  # noqa: F401  (registers google/protobuf/wrappers.proto)
)

from service.batching import BatchingParameters

MODEL_BATCHING_FILE = "batching_parameters.txt"


class BatchingConfigError(ValueError):
    """A batching parameters file that cannot be used; the message names the file and field."""


def _message_class() -> type:
    proto = descriptor_pb2.FileDescriptorProto(
        name="kleinserve/batching_parameters.proto",
        package="kleinserve",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    message = proto.message_type.add(name="BatchingParameters")
    F = descriptor_pb2.FieldDescriptorProto
    for name, number, kind, type_name, label in [
        ("max_batch_size", 1, F.TYPE_MESSAGE, ".google.protobuf.Int64Value", F.LABEL_OPTIONAL),
        (
            "batch_timeout_micros",
            2,
            F.TYPE_MESSAGE,
            ".google.protobuf.Int64Value",
            F.LABEL_OPTIONAL,
        ),
        (
            "max_enqueued_batches",
            3,
            F.TYPE_MESSAGE,
            ".google.protobuf.Int64Value",
            F.LABEL_OPTIONAL,
        ),
        ("num_batch_threads", 4, F.TYPE_MESSAGE, ".google.protobuf.Int64Value", F.LABEL_OPTIONAL),
        ("thread_pool_name", 5, F.TYPE_MESSAGE, ".google.protobuf.StringValue", F.LABEL_OPTIONAL),
        ("allowed_batch_sizes", 6, F.TYPE_INT64, None, F.LABEL_REPEATED),
        ("pad_variable_length_inputs", 7, F.TYPE_BOOL, None, F.LABEL_OPTIONAL),
        (
            "enable_large_batch_splitting",
            8,
            F.TYPE_MESSAGE,
            ".google.protobuf.BoolValue",
            F.LABEL_OPTIONAL,
        ),
    ]:
        field = message.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name
    pool = descriptor_pool.Default()
    try:
        descriptor = pool.FindMessageTypeByName("kleinserve.BatchingParameters")
    except KeyError:
        pool.Add(proto)
        descriptor = pool.FindMessageTypeByName("kleinserve.BatchingParameters")
    return message_factory.GetMessageClass(descriptor)


BatchingParametersProto = _message_class()


def parse_batching_parameters(text: str, source: str = "batching parameters") -> BatchingParameters:
    """Parse and validate TF Serving's text-proto; raise BatchingConfigError naming the field."""
    proto = BatchingParametersProto()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as e:
        raise BatchingConfigError(f"{source}: {e}") from None
    defaults = BatchingParameters()

    def value(name: str, default: int) -> int:
        return getattr(proto, name).value if proto.HasField(name) else default

    params = BatchingParameters(
        enabled=True,
        max_batch_size=value("max_batch_size", defaults.max_batch_size),
        batch_timeout_micros=value("batch_timeout_micros", defaults.batch_timeout_micros),
        max_enqueued_batches=value("max_enqueued_batches", defaults.max_enqueued_batches),
        num_batch_threads=value("num_batch_threads", defaults.num_batch_threads),
        allowed_batch_sizes=tuple(proto.allowed_batch_sizes),
        pad_variable_length_inputs=proto.pad_variable_length_inputs,
        enable_large_batch_splitting=(
            proto.enable_large_batch_splitting.value
            if proto.HasField("enable_large_batch_splitting")
            else defaults.enable_large_batch_splitting
        ),
    )
    validate(params, source)
    return params


def validate(params: BatchingParameters, source: str) -> None:
    for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
        if getattr(params, name) < 1:
            raise BatchingConfigError(
                f"{source}: {name} must be at least 1, not {getattr(params, name)}"
            )
    if params.num_batch_threads > 64:
        raise BatchingConfigError(
            f"{source}: num_batch_threads {params.num_batch_threads} is more than 64"
        )
    if params.batch_timeout_micros < 0:
        raise BatchingConfigError(
            f"{source}: batch_timeout_micros must be 0 or more, not {params.batch_timeout_micros}"
        )
    sizes = params.allowed_batch_sizes
    if sizes:
        if sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
            raise BatchingConfigError(
                f"{source}: allowed_batch_sizes must be positive and strictly increasing, not {list(sizes)}"
            )
        if sizes[-1] != params.max_batch_size:
            raise BatchingConfigError(
                f"{source}: the last of allowed_batch_sizes ({sizes[-1]}) must equal "
                f"max_batch_size ({params.max_batch_size})"
            )


def load_batching_parameters(path: Path) -> BatchingParameters:
    try:
        text = path.read_text()
    except OSError as e:
        raise BatchingConfigError(
            f"cannot read batching parameters file {path}: {e.strerror}"
        ) from None
    return parse_batching_parameters(text, str(path))


def batching_for_model(base_path: Path, server_wide: BatchingParameters) -> BatchingParameters:
    """The model folder's own batching_parameters.txt if it has one (and batching is on)."""
    own = base_path / MODEL_BATCHING_FILE
    if server_wide.enabled and own.is_file():
        return load_batching_parameters(own)
    return server_wide
