"""A picture in, a business answer out: the digits model behind its own pre- and post-processing.

Clients send a picture of a handwritten digit, as the body (``curl -H 'Content-Type:
image/png' --data-binary @seven.png …:invoke``) or as a form field ``data`` (``curl -F
data=@seven.png …:invoke``); ``preprocess`` decodes it here, in Python, the way the model was
trained (8-bit grayscale, 28x28, scaled to [0, 1]); the server batches it with every other
request; ``postprocess`` answers with the digit as a word, its confidence, and a routing
decision (under ``REVIEW_BELOW`` confidence a person looks at it).

Copy this file to ``VERSION/assets.extra/kleinserve_hooks.py`` of the digits model and serve it
with ``--enable_model_hooks``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from service.errors import InvalidArgument

SIZE = 28
REVIEW_BELOW = 0.9
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def setup(ctx: Any) -> None:
    # labels.txt names the classes "0".."9" in output order: map each to its word once.
    labels = ctx.labels or tuple(str(n) for n in range(10))
    ctx.state["words"] = [WORDS[int(label)] for label in labels]
    ctx.log.info("digit_labels hooks ready for version {version}", version=ctx.version)


def preprocess(request: Any, ctx: Any) -> dict[str, np.ndarray]:
    if request.content_type == "multipart/form-data":
        fields = request.form()
        if "data" not in fields:
            raise InvalidArgument("send the picture in a form field named 'data'")
        picture = fields["data"][0]
    else:
        picture = request.body
    try:
        image = Image.open(io.BytesIO(picture))
        image.load()
    except Exception as e:  # Pillow raises many types for a file that is not an image
        raise InvalidArgument(
            f"the body is not a picture Pillow can read ({type(e).__name__})"
        ) from None
    pixels = np.asarray(image.convert("L").resize((SIZE, SIZE)), dtype=np.float32) / 255
    return {"image": pixels[None, :, :, None]}  # one row: [1, 28, 28, 1]


def postprocess(outputs: dict[str, np.ndarray], request: Any, ctx: Any) -> dict[str, Any]:
    scores = outputs["probabilities"][0]
    best = int(np.argmax(scores))
    confidence = float(scores[best])
    return {
        "digit": ctx.state["words"][best],
        "confidence": round(confidence, 4),
        "route_to": "automatic" if confidence >= REVIEW_BELOW else "manual_review",
    }
