"""TF Serving ``:predict`` bodies as tensors and back, for ``inference-client predict``.

With ``--protocol rest`` the command sends its body as is. With ``auto``, ``v2`` or ``grpc``
it sends tensors instead: ``tensors_of`` reads the body's ``inputs`` (columnar: one value or
a dict of named values) or ``instances`` (rows: values, or dicts of named values), with
``{"b64": …}`` as bytes, and ``answer_doc`` writes the outputs the way TF Serving answers that
body (``{"outputs": …}`` or ``{"predictions": …}``), so the command prints the same document
whichever protocol carried it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from client.codec import Outputs

__all__ = ["PredictBody", "answer_doc", "dumps", "tensors_of"]


class PredictBody:
    """A ``:predict`` body read as tensors: ``inputs`` (an array or a dict of them), whether
    it came in rows (``instances``), and its ``signature_name``."""

    def __init__(self, inputs: Any, rows: bool, signature_name: str | None) -> None:
        self.inputs = inputs
        self.rows = rows
        self.signature_name = signature_name


def tensors_of(body: Any) -> PredictBody:
    """ValueError (saying what is wrong) for a body that is not a ``:predict`` body."""
    if not isinstance(body, dict) or ("inputs" in body) == ("instances" in body):
        raise ValueError('the body must be a JSON object with "instances" or "inputs" (one)')
    name = body.get("signature_name")
    if name is not None and not isinstance(name, str):
        raise ValueError('"signature_name" must be a string')
    if "inputs" in body:
        value = body["inputs"]
        if isinstance(value, dict) and not _is_b64(value):
            return PredictBody({k: _array(v) for k, v in value.items()}, False, name)
        return PredictBody(_array(value), False, name)
    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
        raise ValueError('"instances" must be a non-empty list')
    if all(isinstance(row, dict) and not _is_b64(row) for row in rows):
        names = list(rows[0])
        if any(set(row) != set(names) for row in rows):
            raise ValueError("every instance must name the same inputs")
        return PredictBody({n: _array([row[n] for row in rows]) for n in names}, True, name)
    return PredictBody(_array(rows), True, name)


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _array(value: Any) -> np.ndarray:
    if _holds_b64(value):
        return np.array(_decoded(value), dtype=object)
    return np.asarray(value)


def _holds_b64(value: Any) -> bool:
    if isinstance(value, list):
        return any(_holds_b64(item) for item in value)
    return _is_b64(value)


def _decoded(value: Any) -> Any:
    if isinstance(value, list):
        return [_decoded(item) for item in value]
    if _is_b64(value):
        return base64.b64decode(value["b64"])
    return value.encode("utf-8") if isinstance(value, str) else value


def answer_doc(outputs: Outputs, rows: bool) -> dict[str, Any]:
    """TF Serving's answer to the body: ``{"predictions": …}`` for rows (one output: its rows;
    several: one object per row), ``{"outputs": …}`` for columns."""
    if not rows:
        if isinstance(outputs, Mapping):
            return {"outputs": {name: _json(array) for name, array in outputs.items()}}
        return {"outputs": _json(outputs)}
    if not isinstance(outputs, Mapping):
        return {"predictions": _json(outputs)}
    count = min((len(a) for a in outputs.values() if a.ndim), default=0)
    return {
        "predictions": [
            {name: _json(array[i]) for name, array in outputs.items()} for i in range(count)
        ]
    }


def _json(value: Any) -> Any:
    """An array as orjson writes it (float32 as its shortest text); strings as text (or
    ``{"b64": …}`` when not UTF-8); non-finite floats as TF Serving's ``NaN``/``Infinity``."""
    if isinstance(value, bytes | str):  # one element of a string output's row
        return _texts(value)
    array = np.asarray(value)
    if array.dtype.kind in "OSU":
        return _texts(array.astype(object).tolist())
    if array.dtype == np.float16:
        array = array.astype(np.float32)  # exact
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return orjson.Fragment(json.dumps(array.tolist()).encode())
    return array[()] if array.ndim == 0 else np.ascontiguousarray(array)


def _texts(value: Any) -> Any:
    if isinstance(value, list):
        return [_texts(item) for item in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}
    return value


def dumps(doc: Any) -> bytes:
    """The document as indented JSON text, arrays included."""
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2)
