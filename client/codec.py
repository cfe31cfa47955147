"""numpy arrays to TF Serving's columnar JSON and back, with the signature's dtypes.

Requests: ``{"inputs": array}`` for one array, ``{"inputs": {name: array}}`` for a dict of
them, written by orjson straight from the arrays (``OPT_SERIALIZE_NUMPY``), which is many
times faster than ``tolist()`` and ``json``. Numeric inputs are cast to the dtype the
signature declares first (float64 → float32 also halves the text). Answers: ``outputs``
back to arrays of the declared output dtypes, so a float32 output stays float32.

Non-finite floats use TF Serving's ``NaN``/``Infinity``/``-Infinity`` tokens both ways
(orjson writes and reads neither, so those rare bodies take the standard library's path).
Strings go out as JSON text (``str``) or ``{"b64": …}`` (``bytes``) and come back as
numpy object arrays of ``bytes``, as TensorFlow holds them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import orjson

from client.signature import SignatureSpec, TensorSpec
from wire.http import error_text

__all__ = [
    "Classification",
    "Outputs",
    "decode_classifications",
    "decode_outputs",
    "encode_inputs",
    "encode_json",
    "error_message",
    "loads",
]

Outputs = np.ndarray | dict[str, np.ndarray]


class Classification(NamedTuple):
    label: str
    score: float


def loads(body: bytes) -> Any:
    """Parse JSON, accepting TF Serving's non-finite number tokens."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)  # NaN/Infinity; raises ValueError if really malformed


def encode_json(doc: Any) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def error_message(body: bytes) -> str:
    """The ``error`` of a TF Serving error body, else the body's text, shortened."""
    try:
        doc = loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    message = error_text(doc)
    if message is not None:
        return message
    text = body.decode("utf-8", "replace").strip()
    return text if len(text) <= 300 else text[:297] + "..."


# --- requests ---------------------------------------------------------------------------------


def encode_inputs(
    inputs: Any, signature: SignatureSpec | None, signature_name: str | None = None
) -> bytes:
    """The ``:predict`` body for one array (or nested list) or a dict of named arrays."""
    specs = signature.inputs if signature is not None else {}
    payload: Any
    if isinstance(inputs, Mapping):
        payload = {
            str(name): _json_tensor(value, specs.get(name)) for name, value in inputs.items()
        }
    else:
        only = next(iter(specs.values())) if len(specs) == 1 else None
        payload = _json_tensor(inputs, only)
    doc: dict[str, Any] = {"inputs": payload}
    if signature_name:
        doc["signature_name"] = signature_name
    return encode_json(doc)


def _json_tensor(value: Any, spec: TensorSpec | None) -> Any:
    array = np.asarray(value)
    declared = spec.dtype if spec is not None else None
    if array.dtype.kind in "USO" or (declared is not None and declared.kind == "O"):
        return _string_json(array.tolist())
    if array.dtype.kind not in "biuf":
        raise TypeError(f"cannot send an array of dtype {array.dtype} as a tensor")
    if declared is not None and np.can_cast(array.dtype, declared, "same_kind"):
        array = array.astype(declared, copy=False)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # orjson would write null; the standard library writes the tokens TF Serving reads.
        return orjson.Fragment(json.dumps(array.tolist()).encode())
    array = np.require(array, dtype=array.dtype.newbyteorder("="), requirements="C")
    return array[()] if array.ndim == 0 else array


def _string_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_string_json(item) for item in value]
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, str):
        return value
    raise TypeError(f"a string tensor holds a {type(value).__name__}, not str or bytes")


# --- answers ----------------------------------------------------------------------------------


def decode_outputs(body: bytes, signature: SignatureSpec | None) -> Outputs:
    """A columnar ``:predict`` answer as one array (one output) or a dict of arrays."""
    doc = loads(body)
    if not isinstance(doc, dict) or "outputs" not in doc:
        raise ValueError("the answer has no 'outputs'")
    outputs = doc["outputs"]
    specs = signature.outputs if signature is not None else {}
    if len(specs) == 1:
        ((name, spec),) = specs.items()
        if isinstance(outputs, dict) and set(outputs) == {name}:
            outputs = outputs[name]
        return _array(outputs, spec)
    if isinstance(outputs, dict) and not _is_b64(outputs):
        return {name: _array(value, specs.get(name)) for name, value in outputs.items()}
    return _array(outputs, None)


def _array(value: Any, spec: TensorSpec | None) -> np.ndarray:
    dtype = spec.dtype if spec is not None else None
    if dtype is not None and dtype.kind == "O":
        return np.array(_string_value(value), dtype=object)
    return np.asarray(value, dtype=dtype)


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _string_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_string_value(item) for item in value]
    if _is_b64(value):
        return base64.b64decode(value["b64"])
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ValueError(f"expected a string in a string output, got {type(value).__name__}")


def decode_classifications(body: bytes) -> list[list[Classification]]:
    """A ``:classify_image`` answer: one ranked list per image sent.

    One image: ``{"predictions": [{"label", "score"}, …]}``; several: ``{"results": [...]}``
    whose items are such objects (or bare prediction lists).
    """
    doc = loads(body)
    if not isinstance(doc, dict):
        raise ValueError("the answer is not a JSON object")
    if "results" in doc:
        items = doc["results"]
        if not isinstance(items, list):
            raise ValueError("'results' is not a list")
        return [_ranked(item) for item in items]
    if "predictions" in doc:
        return [_ranked(doc)]
    raise ValueError("the answer has neither 'predictions' nor 'results'")


def _ranked(predictions: Any) -> list[Classification]:
    if isinstance(predictions, dict):
        if "predictions" not in predictions:
            raise ValueError(
                f"a result has no 'predictions': {predictions.get('error', predictions)}"
            )
        predictions = predictions["predictions"]
    if not isinstance(predictions, list):
        raise ValueError("'predictions' is not a list")
    try:
        return [Classification(str(p["label"]), float(p["score"])) for p in predictions]
    except (KeyError, TypeError) as e:
        raise ValueError(f"a prediction lacks a label or score: {e!r}") from None
