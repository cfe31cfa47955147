"""Batching in a real ``twistd -n inference``: concurrent requests merge, and each gets its own answer."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from harness.twistd import TwistdServer
from tests import models

pytestmark = pytest.mark.integration


def test_200_concurrent_requests_are_batched_and_answered_correctly(tmp_path) -> None:
    """200 concurrent predicts each get the in-process answer for their own input; batches > 1 ran."""
    import tensorflow as tf

    version = models.make_linear(tmp_path / "linear")
    batching = tmp_path / "batching.txt"
    batching.write_text("max_batch_size { value: 32 }\nmax_enqueued_batches { value: 64 }\n")
    rng = np.random.default_rng(7)
    inputs = rng.normal(size=(200, 1, 3)).astype(np.float32)
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]
    expected = [serve(x=tf.constant(x))["y"].numpy() for x in inputs]

    server = TwistdServer(
        [
            "--model_name=linear",
            f"--model_base_path={tmp_path / 'linear'}",
            "--enable_batching",
            f"--batching_parameters_file={batching}",
        ],
        tmp_path,
    ).start()
    try:
        server.wait_ready()
        with ThreadPoolExecutor(max_workers=64) as pool:
            answers = list(
                pool.map(
                    lambda x: server.post_json(
                        "/v1/models/linear:predict", {"instances": x.tolist()}
                    ),
                    inputs,
                )
            )
        _, metrics = server.get("/metrics")
    finally:
        server.stop()
    assert [status for status, _ in answers] == [200] * 200
    # Equal up to float32 rounding: a batched matmul sums in another order than a batch of one
    # (TF Serving's batches differ the same way); a wrong row would be off by far more.
    for (_, doc), want in zip(answers, expected, strict=True):
        np.testing.assert_allclose(
            np.array(doc["predictions"], dtype=np.float32), want, rtol=1e-6, atol=1e-6
        )
    count = _metric(metrics, "kleinserve_batch_size_count")
    single = _metric(metrics, 'kleinserve_batch_size_bucket{le="1.0"')
    assert _metric(metrics, "kleinserve_batch_size_sum") == 200
    assert single < count, "no batch had more than one row"


def _metric(text: str, prefix: str) -> float:
    match = re.search(re.escape(prefix) + r"[^\n]* ([0-9.e+]+)\n", text)
    assert match is not None, f"{prefix} not in /metrics"
    return float(match.group(1))
