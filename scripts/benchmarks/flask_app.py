"""The comparison ``scripts/bench`` measures kleinserve against: Flask behind ``gunicorn -w 4``.

    BENCH_MODEL_DIR=.cache/bench/models/digits/1 \\
        gunicorn -w 4 -b 127.0.0.1:PORT scripts.benchmarks.flask_app:app

(from the repository root).

The common way to serve a Keras model from Python: every gunicorn worker imports this
module and so loads its own copy of TensorFlow and of the SavedModel; each worker answers
one request at a time. ``POST /v1/models/NAME:predict`` takes TF Serving's row format
(``{"instances": [...]}``) and answers ``{"predictions": [...]}``; ``GET /readyz`` answers
the worker's pid, so the bench can wait until every worker has loaded.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402

_signature = tf.saved_model.load(os.environ["BENCH_MODEL_DIR"]).signatures["serving_default"]
((_INPUT, _),) = _signature.structured_input_signature[1].items()

app = Flask(__name__)


@app.post("/v1/models/<name>:predict")
def predict(name: str) -> Any:
    doc = request.get_json(force=True)
    if not isinstance(doc, dict) or "instances" not in doc:
        return jsonify(error='the body must be {"instances": [...]}'), 400
    batch = np.asarray(doc["instances"], dtype=np.float32)
    outputs = _signature(**{_INPUT: tf.constant(batch)})
    ((_, probabilities),) = outputs.items()
    return jsonify(predictions=probabilities.numpy().tolist())


@app.get("/readyz")
def readyz() -> Any:
    return jsonify(status="ready", pid=os.getpid())
