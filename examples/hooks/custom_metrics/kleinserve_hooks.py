"""Your own Prometheus metrics: declared in ``setup``, shown on ``/metrics`` while the version
is loaded (labelled with ``model`` and ``version``), gone when it unloads.

Counts the digits the model predicts, and the confidence of each prediction; the answer
itself is the server's own (no ``preprocess``: the body is TF Serving's JSON).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def setup(ctx: Any) -> None:
    ctx.state["predicted"] = ctx.metrics.counter(
        "digits_predicted", "Digits predicted, by digit", ("digit",)
    )
    ctx.state["confidence"] = ctx.metrics.histogram(
        "digits_confidence",
        "Probability of the predicted digit",
        buckets=(0.5, 0.8, 0.9, 0.95, 0.99, 1.0),
    )


def postprocess(outputs: dict[str, np.ndarray], request: Any, ctx: Any) -> dict[str, Any]:
    scores = outputs["probabilities"]
    best = np.argmax(scores, axis=1)
    for row, digit in enumerate(best):
        ctx.state["predicted"].labels(digit=str(digit)).inc()
        ctx.state["confidence"].observe(float(scores[row, digit]))
    return {"predictions": scores}
