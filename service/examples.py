"""TF Serving's ``:classify`` and ``:regress``: JSON examples to tf.Examples, outputs to results.

The formats are TF Serving's (https://www.tensorflow.org/tfx/serving/api_rest, "Classify and
Regress API"; its ``util/json_tensor.cc`` for the JSON, ``servables/tensorflow/classifier.cc``
and ``regressor.cc`` for the signatures and results)::

    request   {"signature_name": "…", "context": {feature: value, …},
               "examples": [{feature: value, …}, …]}
    classify  {"results": [[[label, score], …], …]}    one list of [label, score] per example
    regress   {"results": [value, …]}                   one value per example

A feature's value is one value or a list of values of one kind, and becomes one
``tf.train.Feature``: whole numbers and booleans (as 1/0) an ``int64_list``, numbers written
with a fraction or an exponent (``1.0``, ``2e3``, ``NaN``) a ``float_list``, strings (as UTF-8)
and ``{"b64": "…"}`` objects (decoded) a ``bytes_list``; ``[]`` is a feature without values.
As in TF Serving, the first value fixes the kind and a list mixing kinds is refused: ``[1, 2.5]``
is "expecting type: int64" (send ``[1.0, 2.5]``). The context is merged into each example the
way TF Serving merges it, by serializing the context followed by the example, so a feature an
example names itself replaces the context's feature of that name.

The k examples of a request go through the batching queue as one request of k rows of the
signature's DT_STRING input ``inputs`` (a numpy object array of bytes, as
``service.signature.DTYPES`` holds strings), so concurrent calls share batches like predicts.

This runs on the reactor thread, so it stays cheap: the work is linear in the body (which the
server bounds), numbers are checked and copied by C loops (``set(map(type, …))``, ``min`` and
``max``, protobuf's ``extend``), and only a list those checks doubt is walked value by value,
to report the first bad value as TF Serving would. Every error is an ``InvalidArgument`` (400)
that names the place in the body, ``examples[2]["x"][1]``, followed by TF Serving's message.

Uses TensorFlow's Example protos (``example_pb2``): the server has TensorFlow loaded anyway,
and protobuf's C implementation builds and serializes them faster than Python could. They are
imported on first use, not with this module: the front processes of ``--http_processes``
import the HTTP routes (and so this module) but never TensorFlow.

Deliberate differences from TF Serving: the signature's input ``inputs`` must be DT_STRING
(TF Serving would fail inside the model); TF Serving's whole-body echo ("JSON Value: {…}")
is left out of the body-level messages; integers outside int64's and
uint64's range, which TF Serving's parser turns into floats, are floats here too, but one too
large for a double is refused; a string holding a lone surrogate escape (``"\\ud800"``) is
refused rather than sent as invalid UTF-8; a class label that is not UTF-8 is answered with
U+FFFD in place of the bad bytes (TF Serving writes the bytes as they are, which is not JSON).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import orjson

from service import codec
from service.errors import InvalidArgument
from service.signature import DTYPES, Signature
from wire.dtypes import DEFAULT_SIGNATURE

CLASSIFY, REGRESS = "classify", "regress"
METHOD_NAMES = {CLASSIFY: "tensorflow/serving/classify", REGRESS: "tensorflow/serving/regress"}
INPUTS = "inputs"  # the one input of a classify or regress signature: serialized tf.Examples
CLASSES, SCORES = "classes", "scores"  # a classify signature's outputs (one or both)
OUTPUTS = "outputs"  # a regress signature's output

_NOUNS = {CLASSIFY: "classification", REGRESS: "regression"}
_FLOAT_MAX = float(np.finfo(np.float32).max)
_INT64_MIN, _INT64_MAX, _UINT64_END = -(2**63), 2**63 - 1, 2**64
_TF_TYPES = {dtype: name for name, dtype in DTYPES.items()}

# The kinds of tf.train.Feature, named as TF Serving's errors name them.
_INT64, _FLOAT, _BYTES = "int64", "float", "bytes"


@attrs.frozen(eq=False)  # attrs' __eq__ would compare the arrays elementwise and raise
class ExamplesRequest:
    """A decoded ``:classify`` or ``:regress`` body."""

    signature_name: str | None  # the body's "signature_name", or None
    serialized: np.ndarray  # [k] object array: one serialized tf.Example (bytes) per example


# ---------------------------------------------------------------------------------------------
# Requests


def decode_examples(body: bytes, verb: str) -> ExamplesRequest:
    """Decode a ``:classify`` or ``:regress`` body into its serialized tf.Examples."""
    doc = codec.parse_json_body(body)
    signature_name = codec.signature_name_of(doc)
    serialized = serialize_examples(doc, verb)
    array = np.empty(len(serialized), dtype=object)
    array[:] = serialized
    return ExamplesRequest(signature_name, array)


def serialize_examples(doc: Mapping[str, Any], verb: str) -> list[bytes]:
    """The body's examples, each merged with the context and serialized, in TF Serving's order
    of checks (context first, then the examples one by one)."""
    context = serialize_example(doc["context"], "context") if "context" in doc else b""
    if "examples" not in doc:
        raise InvalidArgument(
            f"When method is {verb}, key 'examples' is expected and was not found"
        )
    examples = doc["examples"]
    if type(examples) is not list:
        raise InvalidArgument(
            f"Expecting 'examples' value to be a list/array, got JSON {_json_type(examples)}"
        )
    if not examples:
        raise InvalidArgument("'examples' value is an empty array")
    # Serialized messages concatenate into their merge: TF Serving's ExampleListWithContext.
    return [context + serialize_example(e, f"examples[{i}]") for i, e in enumerate(examples)]


def serialize_example(features: Any, where: str) -> bytes:
    """A JSON object of features as a serialized ``tf.train.Example``; ``where`` names it."""
    if type(features) is not dict:
        raise InvalidArgument(
            f"{where}: Example must be JSON object but got JSON {_json_type(features)}"
        )
    from tensorflow.core.example import example_pb2  # on first use: see the module docstring

    example = example_pb2.Example()
    feature_map = example.features.feature
    for name, value in features.items():
        kind, values = _feature_values(value, name, f"{where}[{json.dumps(name)}]")
        feature = feature_map[name]  # creates it: [] stays a feature without values
        if kind == _INT64:
            feature.int64_list.value.extend(values)
        elif kind == _FLOAT:
            feature.float_list.value.extend(values)
        elif kind == _BYTES:
            feature.bytes_list.value.extend(values)
    return example.SerializeToString()


def _feature_values(value: Any, name: str, where: str) -> tuple[str | None, Sequence[Any]]:
    """The kind and the values of one feature, checked whole where C loops can, else one by one."""
    listed = type(value) is list
    values: list[Any] = value if listed else [value]
    if not values:
        return None, values
    types = set(map(type, values))
    if types == {float}:
        if max(map(abs, values)) <= _FLOAT_MAX:  # False for NaN or infinity: walked below
            return _FLOAT, values
    elif types == {int}:
        if _INT64_MIN <= min(values) and max(values) <= _INT64_MAX:
            return _INT64, values
    elif types == {str}:
        try:
            return _BYTES, [v.encode() for v in values]
        except UnicodeEncodeError:
            pass  # a lone surrogate: the walk names it
    return _walk(values, name, where, listed)


def _walk(values: list[Any], name: str, where: str, listed: bool) -> tuple[str | None, list[Any]]:
    """Value by value, as TF Serving's ``AddValueToFeature``: the first value's kind is the
    feature's, and the first bad value raises, named by its place."""
    kind: str | None = None
    out: list[Any] = []
    for i, value in enumerate(values):
        here = f"{where}[{i}]" if listed else where
        try:
            this = _kind(value, name)
            if kind is None:
                kind = this
            elif this != kind:
                raise _BadValue(
                    f"Unexpected element type in feature: {name} expecting type: {kind}"
                )
            out.append(_value(value, this, name))
        except _BadValue as e:
            raise InvalidArgument(f"{here}: {e}") from None
    return kind, out


class _BadValue(Exception):
    """A bad feature value; the message is TF Serving's, the caller adds the place."""


def _kind(value: Any, name: str) -> str:
    """The Feature kind a JSON value makes, or TF Serving's error for a value no kind takes."""
    if type(value) is bool:
        return _INT64
    if type(value) is int:
        # TF Serving's parser reads integers beyond int64 and uint64 as doubles.
        return _INT64 if _INT64_MIN <= value < _UINT64_END else _FLOAT
    if type(value) is float:
        return _FLOAT
    if type(value) is str or _is_b64_object(value):
        return _BYTES
    raise _BadValue(f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}")


def _value(value: Any, kind: str, name: str) -> Any:
    """The value as its Feature list holds it, or TF Serving's error for one it cannot hold."""
    if kind == _INT64:
        if value > _INT64_MAX:
            raise _BadValue(f"Feature: {name} has uint64 element. Only int64 is supported.")
        return int(value)  # True -> 1: protobuf takes no booleans for int64
    if kind == _FLOAT:
        try:
            number: float | None = float(value)  # NaN and infinities are welcome, as in TF Serving
        except OverflowError:  # an integer beyond a double
            number = None
        if number is None or (math.isfinite(number) and abs(number) > _FLOAT_MAX):
            raise _BadValue(
                f"Cannot convert JSON value: {_show(value)} to float without loss of precision."
            )
        return number
    if type(value) is str:
        try:
            return value.encode()
        except UnicodeEncodeError:
            raise _BadValue(
                f"Feature: {name} has a string that is not valid Unicode text; "
                'send bytes as {"b64": "<base64>"}'
            ) from None
    text = value["b64"]
    try:
        # Padding may be left off, as TF Serving's base64 decoder allows.
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise _BadValue(f"Unable to base64 decode: {e}") from None


def _show(value: Any, limit: int = 60) -> str:
    """A number as JSON text, shortened, for quoting in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_b64_object(value: Any) -> bool:
    """TF Serving's test: an object whose one key is "b64", holding a string."""
    return type(value) is dict and len(value) == 1 and type(value.get("b64")) is str


def _json_type(value: Any) -> str:
    """A JSON value's type as TF Serving's errors name it."""
    if value is None:
        return "Null"
    if type(value) is bool:
        return "True" if value else "False"
    if type(value) in (int, float):
        return "Number"
    if type(value) is str:
        return "String"
    if type(value) is list:
        return "Array"
    return "Object"


# ---------------------------------------------------------------------------------------------
# Signatures


def serialized_examples(input_: Any) -> list[bytes]:
    """The serialized tf.Examples of an ``Input`` proto (gRPC, warm-up records): each example, or each merged over the
    context (the example's own features win), as TF Serving feeds them."""
    kind = input_.WhichOneof("kind")
    if kind == "example_list":
        found = list(input_.example_list.examples)
        context = None
    elif kind == "example_list_with_context":
        found = list(input_.example_list_with_context.examples)
        context = input_.example_list_with_context.context
    else:
        raise InvalidArgument("Input is empty")
    if not found:
        raise InvalidArgument("Input is empty")
    if context is None:
        return [example.SerializeToString() for example in found]
    merged = []
    for example in found:
        combined = type(context)()
        combined.CopyFrom(context)
        combined.MergeFrom(example)
        merged.append(combined.SerializeToString())
    return merged


def signature_for(signatures: Mapping[str, Signature], name: str | None, verb: str) -> Signature:
    """The signature a classify or regress request names, checked as TF Serving checks it."""
    key = name or DEFAULT_SIGNATURE
    signature = signatures.get(key)
    if signature is None:
        raise InvalidArgument(f"No signature was found with the name: {key}")
    noun, method = _NOUNS[verb], METHOD_NAMES[verb]
    if signature.method_name != method:
        raise InvalidArgument(
            f"Expected {noun} signature method_name to be {method}. Was: {signature.method_name}"
        )
    if len(signature.inputs) != 1:
        raise InvalidArgument("Expected one input Tensor.")
    if verb == CLASSIFY and len(signature.outputs) not in (1, 2):
        raise InvalidArgument(f"Expected one or two output Tensors, found {len(signature.outputs)}")
    if verb == REGRESS and len(signature.outputs) != 1:
        raise InvalidArgument("Expected one output Tensor.")
    if INPUTS not in signature.inputs:
        raise InvalidArgument(f"No {noun} inputs found in SignatureDef: {_describe(signature)}")
    if verb == CLASSIFY and CLASSES not in signature.outputs and SCORES not in signature.outputs:
        raise InvalidArgument(
            f'Expected classification signature outputs to contain at least one of "{CLASSES}" '
            f'or "{SCORES}". Signature was: {_describe(signature)}'
        )
    if verb == REGRESS and OUTPUTS not in signature.outputs:
        raise InvalidArgument(
            f"No regression outputs found in SignatureDef: {_describe(signature)}"
        )
    if signature.inputs[INPUTS].dtype != "DT_STRING":
        raise InvalidArgument(
            f"the {noun} input {INPUTS!r} of signature {key!r} is "
            f"{signature.inputs[INPUTS].dtype}, but it must be DT_STRING (serialized tf.Examples)"
        )
    return signature


def _describe(signature: Signature) -> str:
    def tensors(infos: Mapping[str, Any]) -> str:
        return ", ".join(f"{name!r} {info.dtype}" for name, info in infos.items())

    return (
        f"{signature.name!r} ({signature.method_name}), inputs {tensors(signature.inputs)}, "
        f"outputs {tensors(signature.outputs)}"
    )


# ---------------------------------------------------------------------------------------------
# Results


def encode_results(outputs: Mapping[str, np.ndarray], verb: str, rows: int) -> bytes:
    """The response body for the outputs of ``rows`` examples, checked as TF Serving checks them."""
    if verb == CLASSIFY:
        results: list[Any] = [
            [[label, _number(score)] for label, score in row]
            for row in classifications(outputs, rows)
        ]
    else:
        results = [_number(value) for value in regressions(outputs, rows)]
    return codec.encode_json({"results": results})


def classifications(
    outputs: Mapping[str, np.ndarray], rows: int
) -> list[list[tuple[str, np.float32]]]:
    """One list of (label, score) per example, checked as TF Serving checks a classify
    signature's outputs: "" for labels without ``classes``, 0.0 for scores without
    ``scores``, as TF Serving's ClassificationResult leaves them."""
    classes, scores = outputs.get(CLASSES), outputs.get(SCORES)
    for name, array, dtype in ((CLASSES, classes, "DT_STRING"), (SCORES, scores, "DT_FLOAT")):
        if array is None:
            continue
        if array.ndim != 2:
            raise InvalidArgument(
                f"Expected Tensor shape: [batch_size num_classes] but got {list(array.shape)}"
            )
        if _tf_type(array) != dtype:
            raise InvalidArgument(f"Expected {name} Tensor of {dtype}. Got: {_tf_type(array)}")
        if array.shape[0] != rows:
            raise InvalidArgument(
                f"Expected {name} output batch size of {rows}. Got: {array.shape[0]}"
            )
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise InvalidArgument(
            "Tensors class and score should match in dim_size(1). "
            f"Got {classes.shape[1]} vs. {scores.shape[1]}"
        )
    present = classes if classes is not None else scores
    if present is None:
        raise InvalidArgument(
            f'Expected classification outputs to contain at least one of "{CLASSES}" or '
            f'"{SCORES}". Got: {", ".join(outputs)}'
        )
    num_classes = present.shape[1]
    labels = (
        [[_label(label) for label in row] for row in classes.tolist()]
        if classes is not None
        else [[""] * num_classes] * rows
    )
    numbers: list[list[Any]] = (
        [list(row) for row in scores]
        if scores is not None
        else [[np.float32(0.0)] * num_classes] * rows
    )
    return [
        list(zip(label_row, score_row, strict=True))
        for label_row, score_row in zip(labels, numbers, strict=True)
    ]


def regressions(outputs: Mapping[str, np.ndarray], rows: int) -> list[np.float32]:
    """One value per example, from an ``outputs`` of shape [rows] or [rows, 1] (checked as
    TF Serving checks a regress signature's output)."""
    array = outputs[OUTPUTS]
    if not (array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)):
        raise InvalidArgument(
            "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
            f"{list(array.shape)}"
        )
    if array.shape[0] != rows:
        raise InvalidArgument(
            f"Input batch size did not match output batch size: {rows} vs. {array.shape[0]}"
        )
    if _tf_type(array) != "DT_FLOAT":
        raise InvalidArgument(f"Expected output Tensor of DT_FLOAT. Got: {_tf_type(array)}")
    return list(array.reshape(-1))


def _tf_type(array: np.ndarray) -> str:
    return _TF_TYPES.get(array.dtype, str(array.dtype))


def _label(label: Any) -> str:
    return label.decode("utf-8", errors="replace") if isinstance(label, bytes) else str(label)


_NON_FINITE = {
    "nan": orjson.Fragment(b"NaN"),
    "inf": orjson.Fragment(b"Infinity"),
    "-inf": orjson.Fragment(b"-Infinity"),
}


def _number(value: np.float32) -> np.float32 | orjson.Fragment:
    """A float32 as ``encode_json`` writes it exactly (shortest float32 text), with TF Serving's
    ``NaN``/``Infinity``/``-Infinity`` tokens where orjson would write null."""
    return value if math.isfinite(value) else _NON_FINITE[str(float(value))]
