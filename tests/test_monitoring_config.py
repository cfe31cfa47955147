"""TF Serving's --monitoring_config_file: the MonitoringConfig text-proto and the extra
metrics path it turns on."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from service.monitoring_config import (
    DEFAULT_PROMETHEUS_PATH,
    MonitoringConfigError,
    parse_prometheus_path,
)
from service.options import Options


def test_tf_servings_documented_file_enables_its_path() -> None:
    text = 'prometheus_config {\n  enable: true,\n  path: "/monitoring/prometheus/metrics"\n}\n'
    assert parse_prometheus_path(text) == "/monitoring/prometheus/metrics"


def test_an_empty_path_is_tf_servings_default() -> None:
    assert parse_prometheus_path("prometheus_config { enable: true }") == DEFAULT_PROMETHEUS_PATH


@pytest.mark.parametrize("text", ["", "prometheus_config { enable: false path: '/x' }"])
def test_without_enable_there_is_no_extra_path(text: str) -> None:
    assert parse_prometheus_path(text) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prometheus_config { enabel: true }", 'has no field named "enabel"'),
        ("prometheus_config { enable: true path: 'metrics' }", "must be an ASCII URL path"),
        ("prometheus_config { enable: true path: '/m?x=1' }", "must be an ASCII URL path"),
    ],
)
def test_a_bad_file_names_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(MonitoringConfigError, match=message):
        parse_prometheus_path(text)


def test_the_flag_reads_the_file_and_refuses_a_bad_one(tmp_path: Path) -> None:
    good = tmp_path / "monitoring.config"
    good.write_text('prometheus_config { enable: true path: "/prom" }')
    options = Options()
    options.parseOptions([f"--model_base_path={tmp_path}", f"--monitoring_config_file={good}"])
    assert options.config.prometheus_path == "/prom"
    with pytest.raises(usage.UsageError, match="cannot read --monitoring_config_file"):
        Options().parseOptions(
            [f"--model_base_path={tmp_path}", f"--monitoring_config_file={tmp_path / 'none'}"]
        )
