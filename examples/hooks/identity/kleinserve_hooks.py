"""Identity hooks: the inputs and outputs the server would make without hooks, through the
hook threads (what ``scripts/bench`` measures the cost of hooks with)."""

from __future__ import annotations

from typing import Any

import numpy as np


def preprocess(request: Any, ctx: Any) -> dict[str, np.ndarray]:
    return ctx.decode_json(request)


def postprocess(outputs: dict[str, np.ndarray], request: Any, ctx: Any) -> dict[str, Any]:
    return {"predictions": outputs["probabilities"]}
