"""TensorFlow Serving's JSON codec for ``:predict``: request bodies to arrays, arrays to bodies.

Pure functions on bytes, dicts and numpy arrays, with no TensorFlow and no web framework,
because the HTTP layer runs them on the reactor thread and tests call them directly. The
formats are TF Serving's (https://www.tensorflow.org/tfx/serving/api_rest and its
``json_tensor.cc``): row format ``{"instances": [...]}`` answered by ``{"predictions": ...}``,
columnar format ``{"inputs": ...}`` answered by ``{"outputs": ...}``, ``{"b64": ...}`` for
bytes, and the non-JSON tokens ``NaN``, ``Infinity`` and ``-Infinity`` both ways.

Every bad input raises ``InvalidArgument`` naming the input and the element at fault as a
path into the body (``instances[3]["image"][0]``), so a client can find it.

``decode_body`` is the entry point. It tries ``fast_decode_numeric`` first, for the common
big body (one rectangular array of numbers), then the general path.

Deliberate differences from TF Serving: a request may not name inputs the signature lacks
(TF Serving ignores them in ``inputs``); a JSON ``true``/``false`` mixed in among numbers for
a numeric input is read as 1/0 (a value made only of booleans is refused), because finding a
lone boolean among numbers would cost a Python-level walk of every element; integers sent
for float inputs are rounded to the float's precision, where TF Serving refuses those it
cannot hold exactly (above 2**24 for float32); and a number with a fraction or exponent
beyond a double's range, such as 1e400, reads as infinity (as in JavaScript), where TF
Serving refuses it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import orjson

from service.errors import Internal, InvalidArgument
from service.signature import Signature, TensorInfo, check_names, check_shape, quoted

#: Deeper nesting than this is refused before numpy (which stops at 64 dimensions) sees it.
_MAX_RANK = 32


@attrs.frozen(eq=False)  # attrs' __eq__ would compare the arrays elementwise and raise
class PredictRequest:
    """A decoded ``:predict`` body: one array per signature input, plus how to answer."""

    inputs: dict[str, np.ndarray]  # one array per signature input, dtype = that input's np_dtype
    row_format: bool  # True if the body used "instances": answer with "predictions"
    signature_name: str | None  # the body's "signature_name", or None


# ---------------------------------------------------------------------------------------------
# Requests: the general path


def parse_json_body(body: bytes) -> dict[str, Any]:
    """Parse a request body, which must be a JSON object.

    orjson is fast but refuses the tokens ``NaN``, ``Infinity`` and ``-Infinity`` that TF
    Serving accepts, so a body it refuses is parsed again by the standard library, which reads
    them; a body both refuse is malformed, reported with the standard parser's position.
    (orjson also refuses numbers beyond a double, such as 1e400, which the standard parser
    reads as infinity; a hook to refuse them would make it three times slower.)
    """
    if not body.strip():
        raise InvalidArgument(
            'malformed JSON: the request body is empty; send an object such as {"instances": [...]}'
        )
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            doc = json.loads(body)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"malformed JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"malformed JSON: the body is not valid UTF-8 ({e})") from None
        except RecursionError:
            raise InvalidArgument("malformed JSON: nested too deeply") from None
        except ValueError as e:  # an integer beyond Python's 4300-digit conversion limit
            raise InvalidArgument(f"malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"the request body must be a JSON object, got {_json_type(doc)}")
    return doc


def signature_name_of(doc: Mapping[str, Any]) -> str | None:
    """The body's ``signature_name``, or None when absent (meaning the default signature)."""
    if "signature_name" not in doc:
        return None
    name = doc["signature_name"]
    if not isinstance(name, str):
        raise InvalidArgument(
            f"'signature_name' must be a string, got {_json_type(name)} {_show(name)}"
        )
    return name


def decode_predict(doc: Mapping[str, Any], signature: Signature) -> PredictRequest:
    """Turn a parsed ``:predict`` body into one checked array per input of ``signature``."""
    signature_name = signature_name_of(doc)
    if "instances" in doc and "inputs" in doc:
        raise InvalidArgument(
            "the body has both 'instances' (row format) and 'inputs' (columnar format); "
            "send exactly one of them"
        )
    if "instances" in doc:
        return PredictRequest(_decode_rows(doc["instances"], signature), True, signature_name)
    if "inputs" in doc:
        return PredictRequest(_decode_columns(doc["inputs"], signature), False, signature_name)
    raise InvalidArgument(
        "the body has neither 'instances' (row format) nor 'inputs' (columnar format)"
    )


def decode_body(body: bytes, signature_for: Callable[[str | None], Signature]) -> PredictRequest:
    """Decode a ``:predict`` body: the one entry point, trying the fast path first.

    ``signature_for`` maps the body's ``signature_name`` (None when absent) to a Signature,
    raising NotFound or InvalidArgument itself. It is called once, and only for a body that
    is valid JSON with a well-formed ``signature_name``, the order TF Serving checks them in:
    the fast path's scan proves the body valid before asking, and otherwise the body is parsed
    first. Bodies the fast path declines take the general path, which words every error.
    """
    scanned = _scan_numeric_body(body)
    signature = None
    if scanned is not None:
        signature = signature_for(scanned.signature_name)
        request = _decode_scanned(scanned, signature)
        if request is not None:
            return request
    doc = parse_json_body(body)
    if signature is None:
        signature = signature_for(signature_name_of(doc))
    return decode_predict(doc, signature)


@attrs.frozen
class _Place:
    """Where one input's value sits in the body, to name elements as JSON paths in errors."""

    root: str  # "instances" or "inputs"
    key: str | None = None  # the input's name, when the body names it
    key_after_first: bool = False  # row format names inputs inside each instance

    def at(self, index: Sequence[int]) -> str:
        parts = [f"[{i}]" for i in index]
        if self.key is not None:
            parts.insert(1 if self.key_after_first else 0, f"[{json.dumps(self.key)}]")
        return self.root + "".join(parts)


def _decode_rows(instances: Any, signature: Signature) -> dict[str, np.ndarray]:
    """Row format: the instances are stacked, so every input's batch size is len(instances)."""
    if not isinstance(instances, list):
        raise InvalidArgument(
            f"'instances' must be a list with one element per instance, got {_json_type(instances)}"
        )
    if not instances:
        raise InvalidArgument("'instances' is empty: send at least one instance")
    names = list(signature.inputs)
    if len(names) == 1 and not _is_named_object(instances[0]):
        (name,) = names
        return {name: _tensor(instances, signature.inputs[name], _Place("instances"))}
    for i, instance in enumerate(instances):
        if not _is_named_object(instance):
            raise InvalidArgument(
                f"instances[{i}] is {_json_type(instance)} {_show(instance)}, but each instance "
                f"must be an object with a value for every input ({quoted(names)})"
            )
        check_names(instance, names, f"instances[{i}]")
    return {
        name: _tensor(
            [instance[name] for instance in instances],
            signature.inputs[name],
            _Place("instances", name, key_after_first=True),
        )
        for name in names
    }


def _decode_columns(inputs: Any, signature: Signature) -> dict[str, np.ndarray]:
    """Columnar format: each input's value is its whole tensor; no shared batch size."""
    names = list(signature.inputs)
    if _is_named_object(inputs):
        check_names(inputs, names, "'inputs'")
        return {
            name: _tensor(inputs[name], signature.inputs[name], _Place("inputs", name))
            for name in names
        }
    if len(names) != 1:
        raise InvalidArgument(
            f"'inputs' is {_json_type(inputs)}, but the signature has {len(names)} inputs "
            f"({quoted(names)}): 'inputs' must be an object mapping each input name to its value"
        )
    (name,) = names
    return {name: _tensor(inputs, signature.inputs[name], _Place("inputs"))}


def _tensor(value: Any, info: TensorInfo, place: _Place) -> np.ndarray:
    array = _to_array(value, info, place)
    check_shape(array, info)
    return array


def _to_array(value: Any, info: TensorInfo, place: _Place) -> np.ndarray:
    """The array for one input's JSON value, of any shape, with the input's dtype.

    Numbers take a vectorised path; whatever it cannot vouch for (strings, objects, ragged
    lists, out-of-range values, the wrong kind of number) goes to the careful path, which
    walks every element and either raises naming the first bad one or builds the array.
    """
    if info.np_dtype.kind != "O":
        array = _numbers_quickly(value, info.np_dtype)
        if array is not None:
            return array
    return _to_array_carefully(value, info, place)


def _numbers_quickly(value: Any, dtype: np.dtype) -> np.ndarray | None:
    """Vectorised conversion of numbers, or None when the careful path must look.

    ``np.asarray`` without a dtype reveals what JSON sent: its result is bool, int or float
    for booleans, integers or numbers, and str or object when strings, objects or nulls are
    mixed in, all of which ``np.asarray(value, dtype)`` would coerce silently.
    """
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):  # ragged, too deep, or mixed huge integers
        return None
    kind = array.dtype.kind
    if dtype.kind == "b":
        return array if kind == "b" else None
    if dtype.kind in "iu":
        # Integers only: TF Serving refuses 1.5 and also 1.0 for an integer input.
        if kind not in "iu":
            return None
        limits = np.iinfo(dtype)
        if array.size and (int(array.min()) < limits.min or int(array.max()) > limits.max):
            return None
        return array.astype(dtype)
    if kind not in "iuf":
        return None
    # Through double, as TF Serving converts JSON numbers: so int and float bodies round alike.
    wide = array.astype(np.float64, copy=False)
    with np.errstate(over="ignore"):
        narrow = wide.astype(dtype, copy=False)
    if (
        dtype != np.float64
        and np.isinf(narrow).any()
        and (np.isinf(narrow) & ~np.isinf(wide)).any()
    ):
        return None  # a finite number too large for float32 or float16
    return narrow


def _to_array_carefully(value: Any, info: TensorInfo, place: _Place) -> np.ndarray:
    shape = _first_element_shape(value)
    if len(shape) > _MAX_RANK:
        raise InvalidArgument(
            f"input {info.name!r}: {place.at(())} is nested more than {_MAX_RANK} lists deep"
        )
    leaves = []
    for index, leaf in _leaves(value, shape, (), info, place):
        try:
            leaves.append(_leaf(leaf, info))
        except _BadLeaf as e:
            raise InvalidArgument(
                f"input {info.name!r} ({info.dtype}): {place.at(index)} {e}"
            ) from None
    dtype = info.np_dtype
    if dtype.kind == "O":
        array = np.empty(len(leaves), dtype=object)
        array[:] = leaves
    elif dtype.kind == "f":
        array = np.array(leaves, dtype=np.float64).astype(dtype)  # through double, as above
    else:
        array = np.array(leaves, dtype=dtype)
    return array.reshape(shape)


def _first_element_shape(value: Any) -> tuple[int, ...]:
    """The shape the value has if it is rectangular, read along its first elements."""
    shape: list[int] = []
    while isinstance(value, list) and len(shape) <= _MAX_RANK:
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def _leaves(
    value: Any, shape: tuple[int, ...], index: tuple[int, ...], info: TensorInfo, place: _Place
) -> Iterator[tuple[tuple[int, ...], Any]]:
    """Every leaf with its index, in row-major order; raises where the lists are ragged."""
    depth = len(index)
    if isinstance(value, list) and depth < len(shape) and len(value) == shape[depth]:
        for i, item in enumerate(value):
            yield from _leaves(item, shape, (*index, i), info, place)
    elif not isinstance(value, list) and depth == len(shape):
        yield index, value
    else:
        here, first = place.at(index), place.at((0,) * depth)
        if not isinstance(value, list):
            problem = f"{here} is {_json_type(value)} {_show(value)} but {first} is a list"
        elif depth == len(shape):
            problem = f"{here} is a list but {first} is not"
        else:
            problem = f"{here} has length {len(value)} but {first} has length {shape[depth]}"
        raise InvalidArgument(
            f"input {info.name!r} is ragged: {problem}; a tensor's lists must all have the same "
            "length at each depth"
        )


class _BadLeaf(Exception):
    """What is wrong with one element; the caller says where it is."""


def _leaf(value: Any, info: TensorInfo) -> Any:
    """One element checked against the input's dtype, as the Python value numpy will store."""
    kind = info.np_dtype.kind
    if kind == "O":
        return _string_leaf(value)
    if _is_b64_object(value):
        raise _BadLeaf(
            'is a {"b64": ...} object, but base64 data is only accepted for DT_STRING inputs'
        )
    if kind == "b":
        if type(value) is bool:
            return value
        expected = "true or false"
    elif kind in "iu":
        if type(value) is int:
            limits = np.iinfo(info.np_dtype)
            if limits.min <= value <= limits.max:
                return value
            raise _BadLeaf(f"is {value}, out of range [{limits.min}, {limits.max}]")
        expected = "an integer (1.0 is a float in JSON, as TF Serving reads it)"
    else:
        if type(value) is float and math.isinf(value):
            return value  # the Infinity and -Infinity tokens
        if type(value) in (int, float):
            try:
                with np.errstate(over="ignore"):
                    too_large = bool(np.isinf(np.float64(value).astype(info.np_dtype)))
            except OverflowError:  # an integer beyond the range of a double
                too_large = True
            if not too_large:
                return value
            raise _BadLeaf(f"is {value}, too large for {info.dtype}")
        expected = "a number"
    raise _BadLeaf(f"is {_json_type(value)} {_show(value)}, expected {expected}")


def _string_leaf(value: Any) -> bytes:
    """A DT_STRING element: a JSON string as UTF-8, or ``{"b64": ...}`` decoded."""
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise _BadLeaf('is not valid Unicode text; send bytes as {"b64": "<base64>"}') from None
    if _is_b64_object(value):
        text = value["b64"]
        try:
            # Padding may be left off, as TF Serving's base64 decoder allows.
            return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            raise _BadLeaf(f'has invalid base64 in its "b64" value {_show(text)}: {e}') from None
    expected = 'a string or {"b64": "<base64>"}'
    if isinstance(value, dict) and "b64" in value:
        expected = 'an object with exactly one key, "b64", whose value is a string'
    raise _BadLeaf(f"is {_json_type(value)} {_show(value)}, expected {expected}")


def _is_b64_object(value: Any) -> bool:
    """TF Serving's test: an object whose one key is "b64", holding a string."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _is_named_object(value: Any) -> bool:
    """An object naming inputs, as opposed to a value (which may be a b64 object)."""
    return isinstance(value, dict) and not _is_b64_object(value)


# ---------------------------------------------------------------------------------------------
# Requests: the fast path for one big rectangular array of numbers
#
# A body such as {"instances": [[[[0.1, 0.2, ...]]]]} is mostly number text. Instead of
# building nested Python lists, the fast path checks the bracket structure with a few bytes
# operations, parses the numbers as one flat JSON list (orjson, so the values are exactly
# those the general path sees) and reshapes. It answers only when it can prove the body is
# that simple case, and then its answer is the general path's; otherwise it returns None.

_JSON_SPACE = b" \t\n\r"
_NUMBER_CHARS = b"0123456789+-.eE"
_SPACE = rb"[ \t\n\r]*"
_SIGNATURE_MEMBER = _SPACE.join(
    [rb'"signature_name"', b":", rb'"(?P<name>[^"\\\x00-\x1f]*)"']  # a string without escapes
)
_HEAD = re.compile(
    _SPACE.join(
        [
            b"",
            rb"\{",
            rb"(?:" + _SIGNATURE_MEMBER + _SPACE + b",)?",
            rb'"(?P<key>instances|inputs)"',
            b":",
            b"",
        ]
    )
)
_TAIL = re.compile(_SPACE.join([b"", b"(?:," + _SPACE + _SIGNATURE_MEMBER + b")?", rb"\}", b""]))
_BRACKETS_TO_SPACES = bytes.maketrans(b"[]", b"  ")
_NUMBER_CHARS_TO_ZEROS = bytes.maketrans(_NUMBER_CHARS, b"0" * len(_NUMBER_CHARS))


@attrs.frozen
class _ScannedBody:
    """A body proved to be one rectangular nested list of JSON numbers, plus signature_name."""

    signature_name: str | None
    row_format: bool
    values: list[int | float]  # the numbers in row-major order, as orjson parses them
    shape: tuple[int, ...]


def fast_decode_numeric(body: bytes, signature: Signature) -> PredictRequest | None:
    """The fast path alone: the request if the body is the simple case, else None.

    The simple case is ``{"instances": T}`` or ``{"inputs": T}``, optionally with a
    ``"signature_name"`` string (no escapes) before or after, where T is a rectangular nested
    list of JSON numbers and the signature has one input, of a numeric dtype, that T fits.
    Anything else, errors included, is None so the general path decides. The caller must pass
    the signature the body's signature_name selects; ``decode_body`` does.
    """
    scanned = _scan_numeric_body(body)
    return None if scanned is None else _decode_scanned(scanned, signature)


def _scan_numeric_body(body: bytes) -> _ScannedBody | None:
    """Prove ``body`` is the simple case and read its numbers, without the signature.

    The array text R runs from the first "[" to the last "]". It is one valid JSON nested
    list of numbers with shape S (every dimension at least 1) when:

    1. R with number characters and whitespace deleted (its skeleton) is exactly the skeleton
       of a rectangular list of shape S; so R holds nothing but brackets, commas, number
       characters and whitespace, in the right structure;
    2. no number character directly follows a "]" or precedes a "[" (ignoring whitespace), so
       numbers sit only in leaf positions, between "[" or "," and "," or "]";
    3. R with brackets turned to spaces parses (orjson) as a flat list of prod(S) numbers, so
       every leaf position holds exactly one valid JSON number.
    """
    start, end = body.find(b"["), body.rfind(b"]") + 1
    if start < 0 or end <= start:
        return None
    head, tail = _HEAD.fullmatch(body, 0, start), _TAIL.fullmatch(body, end)
    if head is None or tail is None or (head["name"] is not None and tail["name"] is not None):
        return None
    name = head["name"] if head["name"] is not None else tail["name"]
    array_text = body[start:end]
    if b'"' in array_text:  # strings or objects: not this case, and a one-byte search is cheap
        return None
    skeleton = array_text.translate(None, _NUMBER_CHARS + _JSON_SPACE)
    shape = _skeleton_shape(skeleton)
    if shape is None or _skeleton(shape) != skeleton:
        return None
    if _number_beside_bracket(array_text.translate(_NUMBER_CHARS_TO_ZEROS, _JSON_SPACE)):
        return None
    try:
        values = _parse_numbers(array_text.translate(_BRACKETS_TO_SPACES))
        signature_name = None if name is None else name.decode("utf-8")
    except (orjson.JSONDecodeError, UnicodeDecodeError):
        return None
    if len(values) != math.prod(shape):
        return None  # e.g. "[]", whose skeleton is also that of "[1]"
    return _ScannedBody(signature_name, head["key"] == b"instances", values, shape)


#: The fast path parses its numbers in pieces of about this many bytes (see _parse_numbers).
NUMBERS_PIECE_BYTES = 1 << 20


def _parse_numbers(text: bytes) -> list[Any]:
    """``orjson.loads(b"[" + text + b"]")`` for comma-separated numbers, in ~1 MiB pieces.

    One orjson call holds the GIL for its whole length (~1 s for 60 MB), so a body decoded on
    a thread would still stall the reactor that long; pieces hold it ~10 ms each. Pieces are
    cut at commas, which no number contains; the whole is a valid list exactly when every
    piece parses as a non-empty list (an empty one is a stray comma), else JSONDecodeError.
    """
    if len(text) <= NUMBERS_PIECE_BYTES:
        return orjson.loads(b"".join((b"[", text, b"]")))
    values: list[Any] = []
    start = 0
    while start <= len(text):
        cut = text.find(b",", start + NUMBERS_PIECE_BYTES)
        if cut < 0:
            cut = len(text)
        piece = orjson.loads(b"".join((b"[", text[start:cut], b"]")))
        if not piece:
            raise orjson.JSONDecodeError("an empty element", "", 0)
        values += piece
        start = cut + 1
    return values


def _skeleton(shape: tuple[int, ...]) -> bytes:
    """The brackets and commas of a rectangular nested list of this shape: (2, 1) -> [[],[]]."""
    text = b""
    for size in reversed(shape):
        text = b"[" + b",".join([text] * size) + b"]"
    return text


def _skeleton_shape(skeleton: bytes) -> tuple[int, ...] | None:
    """The shape whose skeleton this is, if it is one; the caller compares to make sure.

    The first list at depth d starts at offset d and ends with the first run of (rank - d)
    closing brackets; in a rectangular skeleton it is n elements of equal length L joined by
    commas, so its length is n * (L + 1) + 1.
    """
    rank = len(skeleton) - len(skeleton.lstrip(b"["))
    if not 0 < rank <= _MAX_RANK:
        return None
    shape: list[int] = []
    element_length = 0  # a number leaves nothing in the skeleton
    for depth in reversed(range(rank)):
        closing = skeleton.find(b"]" * (rank - depth))
        if closing < 0:
            return None
        length = closing + (rank - depth) - depth
        size, remainder = divmod(length - 1, element_length + 1)
        if remainder or size < 1:
            return None
        shape.append(size)
        element_length = length
    return tuple(reversed(shape))


def _number_beside_bracket(zeroed: bytes) -> bool:
    """Whether a number character directly follows "]" or precedes "[" in ``zeroed``.

    ``zeroed`` is the array text without whitespace and with number characters turned to "0".
    numpy compares neighbouring bytes in one pass, where ``b"]0" in zeroed`` is several times
    slower, "0" being so common.
    """
    chars = np.frombuffer(zeroed, dtype=np.uint8)
    numbers = chars == ord("0")
    after_close = (chars[:-1] == ord("]")) & numbers[1:]
    before_open = numbers[:-1] & (chars[1:] == ord("["))
    return bool(after_close.any() or before_open.any())


def _decode_scanned(scanned: _ScannedBody, signature: Signature) -> PredictRequest | None:
    """Check the scanned numbers against the signature as the general path would, or None.

    The general path converts the same numbers with the same function (numpy infers the same
    dtype from a flat list as from the nested one), so the arrays are identical; on any error
    it returns None and lets the general path find and word it.
    """
    if len(signature.inputs) != 1:
        return None
    ((name, info),) = signature.inputs.items()
    if info.np_dtype.kind == "O":
        return None
    try:
        array = _to_array(scanned.values, info, _Place("inputs")).reshape(scanned.shape)
        check_shape(array, info)
    except InvalidArgument:
        return None
    return PredictRequest({name: array}, scanned.row_format, scanned.signature_name)


# ---------------------------------------------------------------------------------------------
# Responses


def encode_predict(outputs: Mapping[str, np.ndarray], row_format: bool) -> bytes:
    """The ``:predict`` response body for these outputs, in the request's format.

    Row format: ``{"predictions": [...]}``, one element per instance, each the value of the
    one output or an object of all outputs (which must then share their first dimension).
    Columnar: ``{"outputs": value}`` for one output, ``{"outputs": {name: value}}`` for more.

    Numbers keep their dtype's precision: float32 (and float16, written as its exact value in
    float32's shortest text, as TF Serving does) prints the shortest text that reads back as
    the same float32, so 0.1f is ``0.1``; non-finite values print as ``NaN``, ``Infinity`` and
    ``-Infinity``. Strings print as text when valid UTF-8, else, and always for outputs whose
    name ends in ``_bytes``, as ``{"b64": ...}``.
    """
    if not outputs:
        raise Internal("the model returned no outputs to encode")
    body: dict[str, Any]
    if row_format:
        body = {"predictions": _predictions(outputs)}
    elif len(outputs) == 1:
        ((name, array),) = outputs.items()
        body = {"outputs": _json_value(array, name)}
    else:
        body = {"outputs": {name: _json_value(array, name) for name, array in outputs.items()}}
    return encode_json(body)


def encode_json(obj: Any) -> bytes:
    """Any response body as JSON; numpy arrays and scalars are written natively (non-finite
    floats become null here: ``encode_predict`` is the writer that keeps them)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError as e:
        raise Internal(f"could not encode the response as JSON: {e}") from None


def _predictions(outputs: Mapping[str, np.ndarray]) -> Any:
    arrays = {name: _native(array, name) for name, array in outputs.items()}
    for name, array in arrays.items():
        if array.ndim == 0:
            raise Internal(
                f"output {name!r} is a scalar, but the row format ('instances') needs a batch "
                "dimension on every output; send the request in the columnar format ('inputs')"
            )
    if len(arrays) == 1:
        ((name, array),) = arrays.items()
        return _json_value(array, name)
    sizes = {name: len(array) for name, array in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise Internal(
            "the row format ('instances') needs every output to have one row per instance, but "
            f"the outputs' first dimensions differ: {sizes}; send the request in the columnar "
            "format ('inputs')"
        )
    rows = {name: _json_rows(array, name) for name, array in arrays.items()}
    return [{name: rows[name][i] for name in rows} for i in range(next(iter(sizes.values())))]


def _native(array: np.ndarray, name: str) -> np.ndarray:
    """The array as orjson can write it: C-contiguous, native byte order, JSON-able dtype."""
    array = np.asarray(array)
    if array.dtype.kind not in "biufO":
        raise Internal(f"output {name!r} has dtype {array.dtype}, which has no JSON form")
    if array.dtype.kind == "O":
        return array
    return np.require(array, dtype=array.dtype.newbyteorder("="), requirements="C")


def _json_value(array: np.ndarray, name: str) -> Any:
    """A whole tensor as something ``encode_json`` writes exactly."""
    array = _native(array, name)
    if array.dtype.kind == "O":
        return _string_json(array.tolist(), name)
    value = array[()] if array.ndim == 0 else array  # orjson writes numpy scalars, not 0-d arrays
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return json_with_non_finite(value)
    return value


def _json_rows(array: np.ndarray, name: str) -> list[Any]:
    """The per-instance values of a tensor with a batch dimension."""
    if array.dtype.kind == "O":
        return list(_string_json(array.tolist(), name))
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return [json_with_non_finite(row) for row in array]
    return list(array)


def json_with_non_finite(value: np.ndarray | np.floating) -> orjson.Fragment:
    """Float JSON with TF Serving's ``NaN``/``Infinity``/``-Infinity`` tokens.

    orjson writes non-finite floats as ``null``, and nothing else in an array of numbers
    writes ``null``, so each ``null`` in order is the next non-finite element in row-major
    order; splice the tokens in and hand orjson the finished text.
    """
    flat = np.asarray(value).ravel()
    tokens = [
        b"NaN" if math.isnan(x) else b"Infinity" if x > 0 else b"-Infinity"
        for x in flat[~np.isfinite(flat)].tolist()
    ]
    pieces = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).split(b"null")
    assert len(pieces) == len(tokens) + 1
    spliced = [piece for pair in zip(pieces, tokens, strict=False) for piece in pair]
    return orjson.Fragment(b"".join(spliced) + pieces[-1])


def _string_json(value: Any, name: str) -> Any:
    """Strings of a DT_STRING output (nested lists of bytes) as JSON strings or b64 objects."""
    if isinstance(value, list):
        return [_string_json(item, name) for item in value]
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, bytes):
        raise Internal(f"string output {name!r} holds a {type(value).__name__}, not bytes")
    if not name.endswith("_bytes"):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass  # not text: base64 is the only faithful JSON form
    return {"b64": base64.b64encode(value).decode("ascii")}


# ---------------------------------------------------------------------------------------------
# Wording of errors


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _show(value: Any, limit: int = 60) -> str:
    """A value as JSON text, shortened, for quoting in a message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
