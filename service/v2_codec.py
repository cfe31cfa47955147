"""The Open Inference Protocol's (KServe v2) infer bodies, with Triton's binary tensor extension.

Pure functions on bytes, dicts and numpy arrays (no TensorFlow, no web framework), so tests
call them directly and a large body can be decoded on the body decoder's thread.

A request body is a JSON object, optionally followed by raw tensor bytes: then its
``Inference-Header-Content-Length`` header gives the JSON's length, and every input sent as
bytes carries ``parameters.binary_data_size``; the bytes follow the JSON in input order,
little-endian, row-major, BOOL one byte (0 or 1) per element, BYTES a 4-byte little-endian
length then the bytes, per element. Numeric inputs become ``np.frombuffer`` views of the
body (no copy; a copy only when an input's bytes do not start at a multiple of its item
size in memory, so the array is aligned). The binary layout is read and written by
``wire.v2_tensors``, which the client shares. JSON ``data`` may be flat or nested, row-major;
its element count must be the shape's; BYTES elements are strings (UTF-8).

Outputs are answered as JSON (flat, row-major ``data``; float32 and float16 as the shortest
text that reads back as the same float32, non-finite floats as ``NaN``, ``Infinity``,
``-Infinity``, BYTES as strings) or, when asked (``parameters.binary_data`` per requested
output, or the request's ``parameters.binary_data_output``), as bytes after the JSON.

Every bad body raises ``InvalidArgument`` (400) saying what is wrong: an unknown datatype, a
shape that is not a list of non-negative integers, an element count that does not match the
shape, sizes that do not add up to the body, a header length past the body.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import orjson

from service.codec import encode_json, json_with_non_finite, parse_json_body
from service.errors import Internal, InvalidArgument
from wire import v2_tensors
from wire.v2_tensors import HEADER_LENGTH, NUMPY_DTYPES, TensorDataError, tensor_bytes

__all__ = [
    "HEADER_LENGTH",
    "NUMPY_DTYPES",
    "InferRequest",
    "RequestedOutput",
    "datatype_of",
    "decode_infer",
    "encode_infer",
    "tensor_bytes",
]

#: A tensor has at most this many dimensions (numpy's own limit is 64).
MAX_RANK = 32
_INT64_MAX = 2**63 - 1


@attrs.frozen
class RequestedOutput:
    name: str
    binary: bool | None  # parameters.binary_data, None when not given


@attrs.frozen(eq=False)  # the arrays would compare elementwise
class InferRequest:
    """A decoded infer body."""

    id: str | None
    inputs: dict[str, np.ndarray]  # in the body's order, each of its declared datatype
    outputs: tuple[RequestedOutput, ...] | None  # None: every output of the model
    binary_output: bool  # parameters.binary_data_output
    timeout_us: int | None  # parameters.timeout (microseconds), if given


# ---------------------------------------------------------------------------------------------
# Requests


def decode_infer(body: bytes, header_length: int | None) -> InferRequest:
    """Decode an infer body: JSON, or (``header_length`` given) JSON and tensor bytes."""
    if header_length is None:
        doc, binary = parse_json_body(body), memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} bytes: "
                "it must be the length of the JSON object at the start of the body"
            )
        view = memoryview(body)
        doc, binary = parse_json_body(bytes(view[:header_length])), view[header_length:]
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidArgument(f"'id' must be a string, got {_json_type(request_id)}")
    parameters = _parameters(doc, "the request")
    if "sequence_id" in parameters:
        raise InvalidArgument(
            "parameter 'sequence_id': sequence batching is not supported by this server"
        )
    timeout = parameters.get("timeout")
    if timeout is not None and (not _is_int(timeout) or timeout < 0):
        raise InvalidArgument(
            f"parameter 'timeout' must be a non-negative integer of microseconds, not {timeout!r}"
        )
    binary_output = _bool_parameter(parameters, "binary_data_output", "the request")
    inputs = _decode_inputs(doc.get("inputs"), binary, header_length is not None)
    return InferRequest(request_id, inputs, _requested_outputs(doc), bool(binary_output), timeout)


def _decode_inputs(value: Any, binary: memoryview, has_binary: bool) -> dict[str, np.ndarray]:
    if not isinstance(value, list) or not value:
        raise InvalidArgument("'inputs' must be a non-empty list of input tensors")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(value):
        if not isinstance(tensor, dict):
            raise InvalidArgument(f"inputs[{i}] must be an object, got {_json_type(tensor)}")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise InvalidArgument(f"inputs[{i}] needs a 'name' (a string)")
        where = f"input {name!r}"
        if name in inputs:
            raise InvalidArgument(f"{where} is given twice")
        datatype = _datatype(tensor.get("datatype"), where)
        shape = _shape(tensor.get("shape"), where)
        parameters = _parameters(tensor, where)
        if "shared_memory_region" in parameters:
            raise InvalidArgument(f"{where}: shared memory is not supported by this server")
        size = parameters.get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise InvalidArgument(f"{where} has neither 'data' nor parameters.binary_data_size")
            inputs[name] = _from_json(tensor["data"], datatype, shape, where)
            continue
        if "data" in tensor:
            raise InvalidArgument(f"{where} has both 'data' and parameters.binary_data_size")
        if not has_binary:
            raise InvalidArgument(
                f"{where} has parameters.binary_data_size, but the request has no "
                f"{HEADER_LENGTH} header to say where its JSON ends"
            )
        if not _is_int(size) or size < 0:
            raise InvalidArgument(
                f"{where}: binary_data_size must be a non-negative integer, not {size!r}"
            )
        if offset + size > len(binary):
            raise InvalidArgument(
                f"{where}: binary_data_size {size} at byte {offset} of the tensor data passes "
                f"its end: the body has {len(binary)} bytes after the JSON"
            )
        inputs[name] = _from_bytes(binary, offset, size, datatype, shape, where)
        offset += size
    if offset != len(binary):
        raise InvalidArgument(
            f"the body has {len(binary)} bytes after the JSON, but the inputs' "
            f"binary_data_size add up to {offset}"
        )
    return inputs


def _requested_outputs(doc: Mapping[str, Any]) -> tuple[RequestedOutput, ...] | None:
    value = doc.get("outputs")
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidArgument(f"'outputs' must be a list, got {_json_type(value)}")
    outputs: list[RequestedOutput] = []
    for i, tensor in enumerate(value):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidArgument(f"outputs[{i}] must be an object with a 'name' (a string)")
        name = tensor["name"]
        where = f"requested output {name!r}"
        if any(o.name == name for o in outputs):
            raise InvalidArgument(f"{where} is requested twice")
        parameters = _parameters(tensor, where)
        if "classification" in parameters:
            raise InvalidArgument(
                f"{where}: the classification extension is not supported by this server"
            )
        if "shared_memory_region" in parameters:
            raise InvalidArgument(f"{where}: shared memory is not supported by this server")
        outputs.append(RequestedOutput(name, _bool_parameter(parameters, "binary_data", where)))
    return tuple(outputs)


def _datatype(value: Any, where: str) -> str:
    if not isinstance(value, str) or value not in NUMPY_DTYPES:  # a list is not hashable
        known = ", ".join(NUMPY_DTYPES)
        raise InvalidArgument(f"{where}: unknown datatype {value!r}; this server takes {known}")
    datatype: str = value
    return datatype


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{where}: 'shape' must be a list of integers, got {value!r}")
    if len(value) > MAX_RANK:
        raise InvalidArgument(f"{where}: shape has {len(value)} dimensions, more than {MAX_RANK}")
    for size in value:
        if not _is_int(size) or not 0 <= size <= _INT64_MAX:
            raise InvalidArgument(
                f"{where}: shape {value} must hold non-negative integers (64-bit), not {size!r}"
            )
    return tuple(value)


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A tensor from JSON ``data``, flat or nested, of ``datatype`` and ``shape``."""
    count = math.prod(shape)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind == "O":
        leaves = list(_string_leaves(data, where))
        _check_count(len(leaves), count, shape, where)
        array = np.empty(len(leaves), dtype=object)
        array[:] = leaves
        return array.reshape(shape)
    try:
        given = np.asarray(data)
    except (ValueError, OverflowError):  # ragged lists, or nested too deep
        raise InvalidArgument(
            f"{where}: 'data' must be a list of numbers, flat or nested with lists of equal "
            "length at each depth"
        ) from None
    _check_count(given.size, count, shape, where)
    kind = given.dtype.kind
    if given.size == 0:
        return np.zeros(shape, dtype)
    if dtype.kind == "b":
        if kind != "b":
            raise InvalidArgument(f"{where} (BOOL): 'data' must hold only true and false")
        return given.reshape(shape)
    if dtype.kind in "iu":
        limits = np.iinfo(dtype)
        if kind not in "iu":  # numpy reads integers past int64 as float64: look at each
            ints = _python_ints(data, given.shape)
            if ints is None:
                raise InvalidArgument(
                    f"{where} ({datatype}): 'data' must hold only integers in "
                    f"[{limits.min}, {limits.max}] (1.0 is not an integer)"
                )
            given = ints
        low, high = int(given.min()), int(given.max())
        if low < limits.min or high > limits.max:
            bad = low if low < limits.min else high
            raise InvalidArgument(
                f"{where} ({datatype}): {bad} is out of range [{limits.min}, {limits.max}]"
            )
        return given.astype(dtype).reshape(shape)
    if kind not in "iuf" and not (kind == "O" and _all_numbers(given)):
        raise InvalidArgument(f"{where} ({datatype}): 'data' must hold only numbers")
    try:
        wide = given.astype(np.float64)
    except OverflowError:  # an integer beyond a double's range
        raise InvalidArgument(f"{where} ({datatype}): a number is too large") from None
    with np.errstate(over="ignore"):
        narrow = wide.astype(dtype)
    if (np.isinf(narrow) & ~np.isinf(wide)).any():
        raise InvalidArgument(f"{where} ({datatype}): a number is too large for {datatype}")
    return narrow.reshape(shape)


def _python_ints(data: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """The integers of ``data`` (already known rectangular) as an object array, or None if an
    element is not an integer."""
    flat = np.asarray(data, dtype=object).ravel()
    if flat.shape != (math.prod(shape),) or not all(type(v) is int for v in flat.tolist()):
        return None
    return flat


def _all_numbers(array: np.ndarray) -> bool:
    return all(type(v) in (int, float) for v in array.ravel().tolist())


def _string_leaves(data: Any, where: str) -> Iterator[bytes]:
    """Every element of BYTES ``data`` (strings, in lists nested any way), as UTF-8 bytes."""
    stack: list[Iterator[Any]] = [iter([data])]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) > MAX_RANK:
                    raise InvalidArgument(f"{where}: 'data' is nested too deeply")
                stack.append(iter(value))
                break
            if not isinstance(value, str):
                raise InvalidArgument(
                    f"{where} (BYTES): 'data' must hold strings, not {_json_type(value)}; "
                    "send other bytes as binary data"
                )
            try:
                yield value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(
                    f"{where} (BYTES): a string is not valid Unicode; send it as binary data"
                ) from None
        else:
            stack.pop()


def _from_bytes(
    binary: memoryview, offset: int, size: int, datatype: str, shape: tuple[int, ...], where: str
) -> np.ndarray:
    """A tensor read from ``size`` bytes at ``offset``: a view where alignment allows."""
    try:
        return v2_tensors.array_from_bytes(binary, offset, size, datatype, shape, where)
    except TensorDataError as e:
        raise InvalidArgument(str(e)) from None


def _check_count(given: int, count: int, shape: tuple[int, ...], where: str) -> None:
    if given != count:
        raise InvalidArgument(
            f"{where}: 'data' holds {given} elements, but shape {list(shape)} holds {count}"
        )


def _parameters(doc: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{where}: 'parameters' must be an object")
    return parameters


def _bool_parameter(parameters: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(f"{where}: parameter {key!r} must be true or false, not {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


# ---------------------------------------------------------------------------------------------
# Responses


def datatype_of(array: np.ndarray, name: str) -> str:
    """The v2 datatype of an output array."""
    datatype = v2_tensors.datatype_of(array.dtype)
    if datatype is None:
        raise Internal(f"output {name!r} has dtype {array.dtype}, which has no v2 datatype")
    return datatype


def encode_infer(
    model_name: str,
    model_version: int,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray, bool]],
) -> tuple[bytes, int | None]:
    """The response body for ``(name, array, binary)`` outputs, and the length of its JSON
    when binary data follows it (the ``Inference-Header-Content-Length``), else None."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version)}
    if request_id is not None:
        doc["id"] = request_id
    tensors, chunks = [], []
    for name, array, binary in outputs:
        datatype = datatype_of(array, name)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            chunk = tensor_bytes(array)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = _json_data(array, name)
        tensors.append(tensor)
    doc["outputs"] = tensors
    header = encode_json(doc)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _json_data(array: np.ndarray, name: str) -> Any:
    """An output's ``data``: its elements, flat, row-major."""
    flat = np.ascontiguousarray(array).ravel()
    if flat.dtype.kind == "O":
        texts = []
        for value in flat.tolist():
            try:
                texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"output {name!r} holds bytes that are not UTF-8 text, which JSON cannot "
                    'carry: request it as binary data (parameters {"binary_data": true})'
                ) from None
        return texts
    flat = flat.astype(flat.dtype.newbyteorder("="), copy=False)
    if flat.dtype == np.float16:
        flat = flat.astype(np.float32)  # exact; orjson writes float32 shortest
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return json_with_non_finite(flat)
    return orjson.Fragment(orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY))
