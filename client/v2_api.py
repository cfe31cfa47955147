"""The client's Open Inference Protocol (KServe v2): binary tensors both ways.

``AsyncInferenceClient(protocol="v2")`` sends ``predict`` (and its signature lookup,
``GET /v2/models/NAME``) as v2 calls; ``protocol="auto"`` does so for each server whose
Consul registration carries the tag ``api:v2`` and sends TF Serving's REST JSON to the
others (``speaks_v2``). Both go through the same dispatcher, HTTP transport and port as
REST: balancing, ejection, retry budget and deadlines (``X-Request-Deadline-Ms`` on every
attempt) are the same, and a v2 error body is the same ``{"error": …}``.

Requests carry every input as binary data (``Inference-Header-Content-Length`` and each
input's ``binary_data_size``; the layout is ``wire.v2_tensors``, which the server reads with
the same code) and ask for every output as binary data, so no number is ever written as text
and each dtype comes back exactly as the model made it: BOOL, UINT8…UINT64, INT8…INT64,
FP16, FP32, FP64, and BYTES as numpy object arrays of ``bytes``. An answer that carries
JSON ``data`` instead (a server that ignores the request for binary outputs) is read too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from client.codec import Outputs, encode_json, loads
from client.signature import (
    DEFAULT_SIGNATURE,
    ModelMetadata,
    SignatureSpec,
    TensorSpec,
    named_inputs,
)
from client.transport import USER_AGENT, HTTPRequest, HTTPResponse
from discovery.backends import Backend
from wire.consul_tags import V2_API_TAG
from wire.paths import V2_PREFIX, v2_model_path
from wire.v2_tensors import (
    BINARY_DATA_SIZE,
    HEADER_LENGTH,
    NUMPY_DTYPES,
    array_from_bytes,
    datatype_of,
    tensor_bytes,
)

__all__ = [
    "decode_infer",
    "decode_metadata",
    "infer_request",
    "is_v2",
    "metadata_request",
    "speaks_v2",
    "tensor_of",
]

_INFER_HEADERS = {"User-Agent": USER_AGENT, "Content-Type": "application/octet-stream"}
_GET_HEADERS = {"User-Agent": USER_AGENT, "Accept": "application/json"}


def speaks_v2(backend: Backend) -> bool:
    """Whether a backend announces the Open Inference Protocol (Consul tag ``api:v2``).
    A backend without tags (a static list) is not assumed to."""
    return V2_API_TAG in backend.tags


def is_v2(request: HTTPRequest) -> bool:
    """Whether ``request`` is a v2 call (so its answer is read by this module)."""
    return request.path.startswith(V2_PREFIX)


# --- requests ---------------------------------------------------------------------------------


def tensor_of(value: Any, spec: TensorSpec | None) -> np.ndarray:
    """An input as the array to send: numbers cast to the signature's dtype where numpy can
    do so without changing their kind (float64 to float32, int64 to int32, not float to
    int); text (``str`` or ``bytes``) as an object array for BYTES."""
    declared = spec.dtype if spec is not None else None
    if not isinstance(value, np.ndarray) and declared is not None and declared.kind == "O":
        array = np.array(value, dtype=object)
    else:
        try:
            array = np.asarray(value)
        except UnicodeDecodeError:  # str and non-ASCII bytes mixed: numpy finds no one kind
            array = np.array(value, dtype=object)
        if array.dtype.kind in "US" and not isinstance(value, np.ndarray):
            array = np.array(value, dtype=object)  # each element as given: str stays str
    if array.dtype.kind in "USO" or (declared is not None and declared.kind == "O"):
        texts = array.astype(object)
        for item in texts.ravel().tolist():
            if not isinstance(item, str | bytes):
                raise TypeError(
                    f"a BYTES (string) tensor holds a {type(item).__name__}, not str or bytes"
                )
        return texts
    if declared is not None and np.can_cast(array.dtype, declared, "same_kind"):
        array = array.astype(declared, copy=False)
    if datatype_of(array.dtype) is None:
        raise TypeError(f"cannot send an array of dtype {array.dtype} as a v2 tensor")
    return array


def infer_request(
    model: str, version: int | None, inputs: Any, signature: SignatureSpec | None
) -> HTTPRequest:
    """``POST /v2/models/NAME[/versions/N]/infer`` with every input as binary data, asking for
    every output as binary data. ``inputs``: one array (the signature's only input) or a dict
    of named arrays."""
    specs = signature.inputs if signature is not None else {}
    inputs = named_inputs(inputs, signature)
    tensors, chunks = [], []
    for name, value in inputs.items():
        array = tensor_of(value, specs.get(name))
        chunk = tensor_bytes(array)
        tensors.append(
            {
                "name": str(name),
                "datatype": datatype_of(array.dtype),
                "shape": list(array.shape),
                "parameters": {BINARY_DATA_SIZE: len(chunk)},
            }
        )
        chunks.append(chunk)
    header = encode_json({"inputs": tensors, "parameters": {"binary_data_output": True}})
    headers = {**_INFER_HEADERS, HEADER_LENGTH: str(len(header))}
    path = v2_model_path(model, version, "/infer")
    return HTTPRequest("POST", path, b"".join([header, *chunks]), headers)


def metadata_request(model: str, version: int | None) -> HTTPRequest:
    """``GET /v2/models/NAME[/versions/N]``: the model's inputs and outputs with datatypes."""
    return HTTPRequest("GET", v2_model_path(model, version), None, _GET_HEADERS)


# --- answers ----------------------------------------------------------------------------------


def decode_infer(response: HTTPResponse, signature: SignatureSpec | None) -> Outputs:
    """An infer answer's outputs: one array for a signature with one output, else a dict.

    ValueError (or KeyError, TypeError) for an answer that is not a v2 infer answer.
    """
    body = response.body
    length = response.headers.get(HEADER_LENGTH.lower())
    if length is None:
        header, binary = body, memoryview(b"")
    else:
        if not length.strip().isdigit() or int(length) > len(body):
            raise ValueError(f"{HEADER_LENGTH} {length!r} does not fit a body of {len(body)} bytes")
        header, binary = body[: int(length)], memoryview(body)[int(length) :]
    doc = loads(header)
    tensors = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(tensors, list):
        raise ValueError("the answer has no 'outputs' list")
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in tensors:
        name, datatype = str(tensor["name"]), tensor["datatype"]
        if datatype not in NUMPY_DTYPES:
            raise ValueError(f"output {name!r} has an unknown datatype {datatype!r}")
        shape = tuple(int(size) for size in tensor["shape"])
        size = (tensor.get("parameters") or {}).get(BINARY_DATA_SIZE)
        if size is None:
            outputs[name] = _from_json(tensor.get("data"), datatype, shape, name)
            continue
        if offset + int(size) > len(binary):
            raise ValueError(f"output {name!r}: its binary data passes the end of the body")
        array = array_from_bytes(binary, offset, int(size), datatype, shape, f"output {name!r}")
        offset += int(size)
        outputs[name] = array if array.flags.writeable else array.copy()  # a view of bytes
    if offset != len(binary):
        raise ValueError(f"{len(binary) - offset} bytes after the outputs' binary data")
    if signature is not None and len(signature.outputs) == 1 and len(outputs) == 1:
        return next(iter(outputs.values()))
    return outputs


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    dtype = NUMPY_DTYPES[datatype]
    if not isinstance(data, list):
        raise ValueError(f"output {name!r} has neither 'data' nor binary_data_size")
    if dtype.kind == "O":
        flat = np.asarray(data, dtype=object).ravel()
        array = np.empty(flat.size, dtype=object)
        array[:] = [v.encode("utf-8") if isinstance(v, str) else v for v in flat.tolist()]
    else:
        array = np.asarray(data, dtype=dtype).ravel()
    if array.size != math.prod(shape):
        raise ValueError(f"output {name!r}: {array.size} elements for shape {list(shape)}")
    return array.reshape(shape)


def decode_metadata(body: bytes, version: int | None) -> ModelMetadata:
    """A v2 model metadata answer as the one signature the v2 API serves (under the default
    signature's name, which is how a v2 call names no signature)."""
    doc = loads(body)
    try:
        signature = SignatureSpec(
            DEFAULT_SIGNATURE,
            inputs={t["name"]: _tensor_spec(t) for t in doc.get("inputs") or []},
            outputs={t["name"]: _tensor_spec(t) for t in doc.get("outputs") or []},
        )
        return ModelMetadata(str(doc["name"]), version, {DEFAULT_SIGNATURE: signature})
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not a v2 model metadata document: {e!r}") from None


def _tensor_spec(tensor: Mapping[str, Any]) -> TensorSpec:
    shape = tuple(None if int(size) < 0 else int(size) for size in tensor.get("shape") or [])
    return TensorSpec(str(tensor["name"]), NUMPY_DTYPES.get(tensor.get("datatype", "")), shape)
