"""``handle``: full control, calling the model twice for one request, batching kept.

Test-time augmentation: the digit is scored as sent and shifted one pixel right, and the two
score vectors are averaged. Each ``predict`` goes through the server's batching queue, so the
two calls of this request, and those of every other request, share batches.

The request is TF Serving's JSON (``{"instances": [...]}``); ``ctx.decode_json`` decodes it
as the server's ``:predict`` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def handle(request: Any, ctx: Any, predict: Any) -> dict[str, Any]:
    images = ctx.decode_json(request)["image"]
    shifted = np.roll(images, 1, axis=2)  # one pixel to the right
    first = predict({"image": images})["probabilities"]
    second = predict({"image": shifted})["probabilities"]
    scores = (first + second) / 2
    return {
        "predictions": scores,
        "classes": [int(i) for i in np.argmax(scores, axis=1)],
        "passes": 2,
    }
