"""TF Serving's batching parameters file: parsed by protobuf's text_format, validated with named fields."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given
from twisted.python import usage

from service.batching import BatchingParameters
from service.batching_config import (
    BatchingConfigError,
    batching_for_model,
    parse_batching_parameters,
)
from service.tap import Options

TF_SERVING_EXAMPLE = """
max_batch_size { value: 32 }
batch_timeout_micros { value: 1000 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 2 }
thread_pool_name { value: "batch_threads" }
allowed_batch_sizes: 8
allowed_batch_sizes: 16
allowed_batch_sizes: 32
pad_variable_length_inputs: true
enable_large_batch_splitting { value: false }
"""


def test_tf_serving_file_parses_to_the_same_values() -> None:
    """A TF Serving batching file with every field parses to those values."""
    assert parse_batching_parameters(TF_SERVING_EXAMPLE) == BatchingParameters(
        enabled=True,
        max_batch_size=32,
        batch_timeout_micros=1000,
        max_enqueued_batches=100,
        num_batch_threads=2,
        allowed_batch_sizes=(8, 16, 32),
        pad_variable_length_inputs=True,
        enable_large_batch_splitting=False,
    )


def test_empty_file_gives_the_defaults() -> None:
    """Fields left out keep their defaults."""
    assert parse_batching_parameters("") == BatchingParameters(enabled=True)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("max_batch_sizes { value: 3 }", "max_batch_sizes"),
        ("max_batch_size { value: 0 }", "max_batch_size"),
        ("batch_timeout_micros { value: -5 }", "batch_timeout_micros"),
        ("num_batch_threads { value: 0 }", "num_batch_threads"),
        ("max_enqueued_batches { value: -1 }", "max_enqueued_batches"),
        (
            "max_batch_size { value: 8 } allowed_batch_sizes: 4 allowed_batch_sizes: 2",
            "allowed_batch_sizes",
        ),
        (
            "max_batch_size { value: 8 } allowed_batch_sizes: 2 allowed_batch_sizes: 4",
            "max_batch_size",
        ),
        ("max_batch_size: 8", "max_batch_size"),
    ],
)
def test_bad_files_fail_naming_the_field(text: str, named: str) -> None:
    """Unknown fields, out-of-range values and bad allowed sizes fail with the field's name."""
    with pytest.raises(BatchingConfigError, match=named):
        parse_batching_parameters(text, "b.txt")


@given(st.text(max_size=80))
def test_any_text_parses_or_fails_cleanly(text: str) -> None:
    """Random text either parses to valid parameters or raises BatchingConfigError, nothing else."""
    try:
        params = parse_batching_parameters(text)
    except BatchingConfigError:
        return
    assert params.max_batch_size >= 1 and params.num_batch_threads >= 1


def test_flag_loads_the_file_and_a_model_folder_overrides_it(tmp_path) -> None:
    """--batching_parameters_file is loaded at start-up; a model's own batching_parameters.txt wins."""
    server_file = tmp_path / "batching.txt"
    server_file.write_text("max_batch_size { value: 16 }")
    model = tmp_path / "model"
    (model / "1").mkdir(parents=True)
    options = Options()
    options.parseOptions(
        [
            f"--model_base_path={model}",
            "--enable_batching",
            f"--batching_parameters_file={server_file}",
        ]
    )
    assert options.config.batching.max_batch_size == 16
    (model / "batching_parameters.txt").write_text("max_batch_size { value: 4 }")
    assert batching_for_model(model, options.config.batching).max_batch_size == 4


def test_bad_file_fails_start_up_with_usage_error(tmp_path) -> None:
    """A bad batching file stops twistd at option parsing, naming the file and the field."""
    bad = tmp_path / "batching.txt"
    bad.write_text("max_batch_size { value: 8 }\nallowed_batch_sizes: 3\n")
    (tmp_path / "m" / "1").mkdir(parents=True)
    with pytest.raises(usage.UsageError, match="allowed_batch_sizes"):
        Options().parseOptions(
            [
                f"--model_base_path={tmp_path / 'm'}",
                "--enable_batching",
                f"--batching_parameters_file={bad}",
            ]
        )


def test_file_without_enable_batching_is_refused(tmp_path) -> None:
    """--batching_parameters_file without --enable_batching is a usage error, not silently ignored."""
    f = tmp_path / "b.txt"
    f.write_text("")
    with pytest.raises(usage.UsageError, match="--enable_batching"):
        Options().parseOptions([f"--model_base_path={tmp_path}", f"--batching_parameters_file={f}"])
