"""TF Serving's warm-up files (service.warmup), written with TensorFlow's own TFRecordWriter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2
from tensorflow_serving.apis import prediction_log_pb2

from harness.twistd import TwistdServer
from service.errors import InvalidArgument
from service.servables.registry import load_servable
from service.warmup import (
    MAX_RECORDS,
    REQUESTS_FILE,
    DataLoss,
    Unimplemented,
    replay_warmup_requests,
)
from tests import models


def write_records(version: Path, records: list[bytes]) -> None:
    file = version / REQUESTS_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(file)) as writer:
        for record in records:
            writer.write(record)


def predict_log(inputs: dict[str, np.ndarray], signature: str = "") -> bytes:
    log = prediction_log_pb2.PredictionLog()
    request = log.predict_log.request
    request.model_spec.name = "m"
    request.model_spec.signature_name = signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return log.SerializeToString()


def examples_log(kind: str, signature: str) -> bytes:
    log = prediction_log_pb2.PredictionLog()
    request = getattr(log, f"{kind}_log").request
    request.model_spec.signature_name = signature
    example = example_pb2.Example()
    example.features.feature["x"].float_list.value.extend([1.0, 2.0])
    request.input.example_list.examples.append(example)
    return log.SerializeToString()


class Counting:
    """A servable that counts the calls of the one it wraps."""

    def __init__(self, servable: Any) -> None:
        self._servable = servable
        self.runs = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._servable, name)

    def run(self, key: str, inputs: Any) -> Any:
        self.runs += 1
        return self._servable.run(key, inputs)


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.make_linear(tmp_path_factory.mktemp("linear"))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.make_example_classifier(tmp_path_factory.mktemp("examples"))


def test_each_record_runs_as_many_times_as_asked(linear: Path) -> None:
    """Two predict records, three iterations: six runs; the count of records is returned."""
    x = np.ones((2, 3), np.float32)
    write_records(linear, [predict_log({"x": x}), predict_log({"x": x[:1]}, "serving_default")])
    servable = Counting(load_servable("m", 1, linear, warmup_iterations=0))
    try:
        assert replay_warmup_requests(servable, linear, iterations=3) == 2  # type: ignore[arg-type]
        assert servable.runs == 6
    finally:
        servable.close()
        (linear / REQUESTS_FILE).unlink()


def test_no_file_is_nothing_to_replay(linear: Path) -> None:
    servable = Counting(load_servable("m", 1, linear, warmup_iterations=0))
    try:
        assert replay_warmup_requests(servable, linear) == 0  # type: ignore[arg-type]
        assert servable.runs == 0
    finally:
        servable.close()


def test_classify_regress_and_multi_inference_records_run(classifier: Path) -> None:
    multi = prediction_log_pb2.PredictionLog()
    for signature, method in (
        ("classify", "tensorflow/serving/classify"),
        ("regress", "tensorflow/serving/regress"),
    ):
        task = multi.multi_inference_log.request.tasks.add(method_name=method)
        task.model_spec.signature_name = signature
    multi.multi_inference_log.request.input.example_list.examples.add().features.feature[
        "x"
    ].float_list.value.extend([0.5, 0.5])
    write_records(
        classifier,
        [
            examples_log("classify", "classify"),
            examples_log("regress", "regress"),
            multi.SerializeToString(),
        ],
    )
    servable = Counting(load_servable("m", 1, classifier, warmup_iterations=0))
    try:
        assert replay_warmup_requests(servable, classifier) == 3  # type: ignore[arg-type]
        assert servable.runs == 4  # the multi-inference record runs two signatures
    finally:
        servable.close()
        (classifier / REQUESTS_FILE).unlink()


@pytest.mark.parametrize(
    ("records", "raw", "error", "words"),
    [
        ([b"\xff\xff\xff"], None, InvalidArgument, "Failed to parse warmup record"),
        (None, b"not a tfrecord file at all", DataLoss, "verify your warmup data is in TFRecord"),
        (
            [prediction_log_pb2.PredictionLog(session_run_log={}).SerializeToString()],
            None,
            Unimplemented,
            "Unsupported log_type for warmup: 5",
        ),
        (
            [predict_log({"nope": np.ones((1, 3), np.float32)})],
            None,
            InvalidArgument,
            "missing input(s) 'x'",
        ),
        (
            [predict_log({"x": np.ones((1, 3), np.float32)})] * (MAX_RECORDS + 1),
            None,
            InvalidArgument,
            "Number of warmup records exceeds the maximum (1000)",
        ),
    ],
)
def test_a_bad_file_fails_the_load_with_tf_servings_words(
    tmp_path: Path, records: list[bytes] | None, raw: bytes | None, error: type, words: str
) -> None:
    version = models.make_linear(tmp_path / "m")
    if records is not None:
        write_records(version, records)
    else:
        (version / REQUESTS_FILE).parent.mkdir(parents=True)
        (version / REQUESTS_FILE).write_bytes(raw or b"")
    with pytest.raises(error) as caught:
        load_servable("m", 1, version)
    assert words in caught.value.message


@pytest.mark.integration
def test_a_server_replays_the_file_before_serving_and_reports_a_corrupt_one(
    tmp_path: Path,
) -> None:
    """Version 1 warms up from its file and serves; version 2's corrupt file fails its load,
    with TF Serving's words in the status, and version 1 keeps serving."""
    base = tmp_path / "m"
    good = models.make_linear(base, 1)
    write_records(good, [predict_log({"x": np.ones((4, 3), np.float32)})])
    bad = models.make_linear(base, 2)
    (bad / REQUESTS_FILE).parent.mkdir(parents=True)
    (bad / REQUESTS_FILE).write_bytes(b"this is not a TFRecord file, " * 4)
    config = tmp_path / "models.config"
    config.write_text(
        f"model_config_list {{ config {{ name: 'm' base_path: '{base}' "
        "model_platform: 'tensorflow' model_version_policy { all {} } } }\n"
    )
    server = TwistdServer(
        [f"--model_config_file={config}", "--max_num_load_retries=0"],
        tmp_path,
        expected_errors=[r"model m version 2 failed to load"],
    ).start()
    try:
        server.wait_ready()  # once each version the policy names has loaded or failed once
        statuses = {s["version"]: s for s in server.get("/v1/models/m")[1]["model_version_status"]}
        assert statuses["1"]["state"] == "AVAILABLE"
        assert (
            "Please verify your warmup data is in TFRecord format"
            in (statuses["2"]["status"]["error_message"])
        )
        code, doc = server.post_json("/v1/models/m/versions/1:predict", {"instances": [[1, 2, 3]]})
        assert code == 200, doc
        assert "model m version 1: AVAILABLE" in server.log()
    finally:
        server.stop()
