"""TF Serving's ``--monitoring_config_file``: a ``MonitoringConfig`` text-proto.

TF Serving serves Prometheus metrics only when the file says so::

    prometheus_config {
      enable: true,
      path: "/monitoring/prometheus/metrics"
    }

kleinserve always serves ``/metrics``; a monitoring config file with ``enable: true`` adds
its ``path`` (TF Serving's default when empty), so a scrape config written for TF Serving
works unchanged. The messages are TF Serving's own (``tensorflow_serving/config/
monitoring_config.proto``: the same package, names and field numbers), built here from their
descriptor, since the ``tensorflow-serving-api`` package does not ship that module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

__all__ = ["DEFAULT_PROMETHEUS_PATH", "MonitoringConfigError", "read_prometheus_path"]

DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"  # TF Serving's kPrometheusPath


class MonitoringConfigError(ValueError):
    """A monitoring config file that cannot be used, with the reason."""


def _messages() -> Any:
    """TF Serving's ``MonitoringConfig`` class, from its descriptor."""
    file = descriptor_pb2.FileDescriptorProto(
        name="kleinserve/tensorflow_serving/config/monitoring_config.proto",
        package="tensorflow.serving",
        syntax="proto3",
    )
    prometheus = file.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=8, label=1)  # bool
    prometheus.field.add(name="path", number=2, type=9, label=1)  # string
    monitoring = file.message_type.add(name="MonitoringConfig")
    monitoring.field.add(
        name="prometheus_config",
        number=1,
        type=11,  # message
        label=1,
        type_name=".tensorflow.serving.PrometheusConfig",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")
    )


MonitoringConfig = _messages()


def parse_prometheus_path(text: str, source: str = "monitoring config") -> str | None:
    """The extra path to serve metrics on, or None when Prometheus is not enabled."""
    config = MonitoringConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise MonitoringConfigError(f"{source}: {e}") from None
    prometheus = config.prometheus_config
    if not prometheus.enable:
        return None
    path = prometheus.path or DEFAULT_PROMETHEUS_PATH
    if not path.startswith("/") or any(c in path for c in "?#") or not path.isascii():
        raise MonitoringConfigError(
            f"{source}: prometheus_config.path must be an ASCII URL path starting with '/', "
            f"not {path!r}"
        )
    return path


def read_prometheus_path(path: Path) -> str | None:
    """``parse_prometheus_path`` of the file at ``path``."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MonitoringConfigError(f"cannot read --monitoring_config_file {path}: {e}") from None
    return parse_prometheus_path(text, source=str(path))
