"""The requests of the Open Inference Protocol conformance check, shared by its recorder and test.

``scripts/record-triton`` sends ``CALLS`` to a real Triton server (PyTriton's) serving
``MODELS`` and writes the answers to ``RECORDING``; ``tests/test_v2_conformance.py`` sends the
same calls to kleinserve and compares. Each answer is reduced by ``answer_of`` to what a client
sees: the status code, the content type, whether tensor bytes follow the JSON, the JSON, and
each binary output decoded to a list.

This module imports only the standard library, numpy and ``tests.models`` (whose TensorFlow
imports are inside its functions): the recorder runs it in PyTriton's own environment, where
the project is not installed. It encodes tensors itself (not with
``service.v2_codec``), so the calls do not depend on the code they check.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from tests import models

RECORDING = Path(__file__).resolve().parent / "data" / "triton" / "answers.json"
HEADER_LENGTH = "Inference-Header-Content-Length"

#: name -> the ``tests/models.py`` maker of the model served under it, by both servers.
MODELS = {"multi": "make_multi_io", "strings": "make_strings", "dtypes": "make_all_dtypes"}

#: ``make_all_dtypes``'s TensorFlow dtype names, as v2 datatypes (its input ``in_<dtype>``).
DTYPES = {
    "float16": "FP16", "float32": "FP32", "float64": "FP64", "int8": "INT8", "int16": "INT16",
    "int32": "INT32", "int64": "INT64", "uint8": "UINT8", "uint16": "UINT16",
    "uint32": "UINT32", "uint64": "UINT64", "bool": "BOOL", "string": "BYTES",
}  # fmt: skip
NUMPY = {
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT8": "i1", "INT16": "<i2", "INT32": "<i4",
    "INT64": "<i8", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "BOOL": "?",
}  # fmt: skip


@dataclass(frozen=True)
class Call:
    """One HTTP request of the check."""

    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = field(default=())

    def json(self) -> Any:
        """The body's JSON (before any tensor bytes), or None if it has none."""
        length = dict(self.headers).get(HEADER_LENGTH)
        head = (self.body or b"")[: int(length)] if length else self.body
        try:
            return json.loads(head) if head else None
        except ValueError:
            return None

    def digest(self) -> str:
        """Identifies the request, so a recording made for other requests is noticed."""
        text = json.dumps([self.method, self.path, list(self.headers)]).encode()
        return hashlib.sha256(text + b"\0" + (self.body or b"")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Tensors and bodies


def tensor_bytes(array: np.ndarray) -> bytes:
    """The binary extension's layout: little-endian, row-major, BYTES as length + bytes."""
    if array.dtype == object:
        return b"".join(struct.pack("<I", len(v)) + v for v in array.ravel().tolist())
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()


def json_tensor(name: str, datatype: str, array: Any, **extra: Any) -> dict[str, Any]:
    """An input with JSON ``data`` (flat; BYTES as text)."""
    array = np.asarray(array, dtype=object if datatype == "BYTES" else NUMPY[datatype])
    data = array.ravel().tolist()
    if datatype == "BYTES":
        data = [v.decode() if isinstance(v, bytes) else v for v in data]
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data, **extra}


def json_call(name: str, path: str, doc: Any) -> Call:
    return Call(
        name, "POST", path, json.dumps(doc).encode(), (("Content-Type", "application/json"),)
    )


def binary_call(
    name: str,
    path: str,
    tensors: Iterable[tuple[str, str, np.ndarray] | dict[str, Any]],
    extra: Mapping[str, Any] | None = None,
    tail: bytes = b"",
) -> Call:
    """An infer request whose ``(name, datatype, array)`` inputs go as bytes after the JSON
    (a dict is sent as it is, in JSON), then ``tail``."""
    inputs, chunks = [], []
    for tensor in tensors:
        if isinstance(tensor, dict):
            inputs.append(tensor)
            continue
        input_name, datatype, array = tensor
        chunk = tensor_bytes(array)
        inputs.append(
            {
                "name": input_name,
                "shape": list(array.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": len(chunk)},
            }
        )
        chunks.append(chunk)
    header = json.dumps({"inputs": inputs, **(extra or {})}).encode()
    headers = (("Content-Type", "application/octet-stream"), (HEADER_LENGTH, str(len(header))))
    return Call(name, "POST", path, b"".join([header, *chunks, tail]), headers)


def sample(dtype: str) -> np.ndarray:
    """A [2, 2] array of ``dtype`` with values at the edges of its range (0.5, exact in FP16,
    first: the recorded answers were made with it)."""
    return cast(np.ndarray, models.edge_sample(dtype, first_float=0.5))


def _dtypes_inputs(binary: set[str], rows: Mapping[str, int] | None = None) -> list[Any]:
    tensors: list[Any] = []
    for dtype, datatype in DTYPES.items():
        array = sample(dtype)[: (rows or {}).get(dtype, 2)]
        name = f"in_{dtype}"
        tensors.append(
            (name, datatype, array) if dtype in binary else json_tensor(name, datatype, array)
        )
    return tensors


# ---------------------------------------------------------------------------------------------
# The calls

MULTI = "/v2/models/multi/infer"
A = np.array([[1.0, 2.0], [0.0, -0.5]], np.float32)
B = np.array([3, -1], np.int64)
A_JSON, B_JSON = json_tensor("a", "FP32", A), json_tensor("b", "INT64", B)
TEXT = np.array([b"abc", b"\x00\xff", b""], dtype=object)


def _binary_a(size: int) -> dict[str, Any]:
    """Input ``a`` of shape [2, 2] saying its bytes are ``size`` long."""
    return {
        "name": "a",
        "shape": [2, 2],
        "datatype": "FP32",
        "parameters": {"binary_data_size": size},
    }


def _calls() -> list[Call]:
    get = [
        ("server_metadata", "/v2"),
        ("live", "/v2/health/live"),
        ("ready", "/v2/health/ready"),
        ("metadata_multi", "/v2/models/multi"),
        ("metadata_multi_v1", "/v2/models/multi/versions/1"),
        ("metadata_strings", "/v2/models/strings"),
        ("metadata_dtypes", "/v2/models/dtypes"),
        ("metadata_unknown_model", "/v2/models/nothing"),
        ("metadata_unknown_version", "/v2/models/multi/versions/9"),
        ("model_ready", "/v2/models/multi/ready"),
        ("model_ready_v1", "/v2/models/multi/versions/1/ready"),
        ("model_ready_unknown_model", "/v2/models/nothing/ready"),
        ("model_ready_unknown_version", "/v2/models/multi/versions/9/ready"),
        ("unknown_endpoint", "/v2/nothing"),
        ("infer_with_get", MULTI),
    ]
    calls = [Call(name, "GET", path) for name, path in get]
    both = [A_JSON, B_JSON]
    calls += [
        json_call("multi_json", MULTI, {"inputs": both}),
        json_call("multi_json_id", MULTI, {"id": "req-7", "inputs": both}),
        json_call(
            "multi_json_nested",
            MULTI,
            {"inputs": [{**A_JSON, "data": A.tolist()}, B_JSON]},
        ),
        json_call("multi_v1", "/v2/models/multi/versions/1/infer", {"inputs": both}),
        binary_call("multi_binary_in_json_out", MULTI, [("a", "FP32", A), ("b", "INT64", B)]),
        binary_call(
            "multi_binary_in_binary_out",
            MULTI,
            [("a", "FP32", A), ("b", "INT64", B)],
            {"parameters": {"binary_data_output": True}},
        ),
        json_call("multi_output_subset", MULTI, {"inputs": both, "outputs": [{"name": "count"}]}),
        json_call(
            "multi_output_subset_binary",
            MULTI,
            {"inputs": both, "outputs": [{"name": "count", "parameters": {"binary_data": True}}]},
        ),
        json_call(
            "multi_outputs_reordered",
            MULTI,
            {"inputs": both, "outputs": [{"name": "count"}, {"name": "sum"}]},
        ),
        json_call(
            "multi_binary_output_but_one",
            MULTI,
            {
                "inputs": both,
                "parameters": {"binary_data_output": True},
                "outputs": [
                    {"name": "sum", "parameters": {"binary_data": False}},
                    {"name": "count"},
                ],
            },
        ),
        json_call(
            "multi_empty_batch",
            MULTI,
            {"inputs": [json_tensor("a", "FP32", np.zeros((0, 2))), json_tensor("b", "INT64", [])]},
        ),
        json_call(
            "strings_json",
            "/v2/models/strings/infer",
            {"inputs": [json_tensor("text", "BYTES", ["abc", "", "héllo"])]},
        ),
        binary_call(
            "strings_binary",
            "/v2/models/strings/infer",
            [("text", "BYTES", TEXT)],
            {"parameters": {"binary_data_output": True}},
        ),
        binary_call(
            "strings_non_utf8_as_json", "/v2/models/strings/infer", [("text", "BYTES", TEXT)]
        ),
        binary_call(
            "dtypes_binary",
            "/v2/models/dtypes/infer",
            _dtypes_inputs(set(DTYPES)),
            {"parameters": {"binary_data_output": True}},
        ),
        json_call("dtypes_json", "/v2/models/dtypes/infer", {"inputs": _dtypes_inputs(set())}),
        binary_call(
            "dtypes_json_but_fp16",
            "/v2/models/dtypes/infer",
            _dtypes_inputs({"float16"}),
            {
                "outputs": [
                    {"name": f"out_{d}", "parameters": {"binary_data": d == "float16"}}
                    for d in DTYPES
                ]
            },  # fmt: skip
        ),
        binary_call(
            "dtypes_batch_mismatch",
            "/v2/models/dtypes/infer",
            _dtypes_inputs(set(DTYPES), rows={"int32": 1}),
        ),
    ]
    bad = [
        ("wrong_datatype", [json_tensor("a", "FP64", A), B_JSON]),
        ("wrong_rank", [json_tensor("a", "FP32", [1.0, 2.0]), B_JSON]),
        (
            "wrong_dimension",
            [json_tensor("a", "FP32", [[1.0, 2.0, 3.0]]), json_tensor("b", "INT64", [1])],
        ),
        ("data_count_mismatch", [{**A_JSON, "data": [1.0, 2.0, 3.0]}, B_JSON]),
        ("unknown_input", [A_JSON, B_JSON, json_tensor("c", "FP32", [1.0])]),
        ("missing_input", [A_JSON]),
        ("duplicate_input", [A_JSON, B_JSON, A_JSON]),
        ("unknown_datatype", [{**A_JSON, "datatype": "FP8"}, B_JSON]),
        ("negative_shape", [{**A_JSON, "shape": [-1, 2]}, B_JSON]),
        ("strings_for_fp32", [{**A_JSON, "data": ["x", "y", "z", "w"]}, B_JSON]),
        ("float_for_int64", [A_JSON, {**B_JSON, "data": [1.5, 2]}]),
        ("bool_for_int64", [A_JSON, {**B_JSON, "data": [True, False]}]),
        ("int64_out_of_range", [A_JSON, {**B_JSON, "data": [2**63, 0]}]),
        ("batch_mismatch", [A_JSON, json_tensor("b", "INT64", [1])]),
        ("no_data", [{k: v for k, v in A_JSON.items() if k != "data"}, B_JSON]),
    ]
    calls += [json_call(name, MULTI, {"inputs": inputs}) for name, inputs in bad]
    calls += [
        json_call("unknown_model", "/v2/models/nothing/infer", {"inputs": both}),
        json_call("unknown_version", "/v2/models/multi/versions/9/infer", {"inputs": both}),
        json_call("version_not_a_number", "/v2/models/multi/versions/one/infer", {"inputs": both}),
        json_call("unknown_output", MULTI, {"inputs": both, "outputs": [{"name": "nope"}]}),
        json_call("id_not_a_string", MULTI, {"id": 7, "inputs": both}),
        json_call(
            "binary_data_output_not_bool",
            MULTI,
            {"inputs": both, "parameters": {"binary_data_output": "yes"}},
        ),
        json_call("inputs_not_a_list", MULTI, {"inputs": {"a": [1.0, 2.0]}}),
        json_call("no_inputs", MULTI, {}),
        json_call("body_not_an_object", MULTI, [1, 2]),
        Call("bad_json", "POST", MULTI, b'{"inputs": [', (("Content-Type", "application/json"),)),
        Call("empty_body", "POST", MULTI, b"", (("Content-Type", "application/json"),)),
        binary_call("binary_size_past_body", MULTI, [_binary_a(16), B_JSON], tail=A[:1].tobytes()),
        binary_call(
            "binary_size_not_the_shape", MULTI, [_binary_a(8), B_JSON], tail=A[:1].tobytes()
        ),
        binary_call(
            "bytes_after_tensors", MULTI, [("a", "FP32", A), ("b", "INT64", B)], tail=b"xx"
        ),
    ]
    length_past = binary_call(
        "header_length_past_body", MULTI, [("a", "FP32", A), ("b", "INT64", B)]
    )
    calls.append(
        Call(
            length_past.name,
            "POST",
            MULTI,
            length_past.body,
            (("Content-Type", "application/octet-stream"), (HEADER_LENGTH, "99999")),
        )
    )
    return calls


CALLS: list[Call] = _calls()
assert len({c.name for c in CALLS}) == len(CALLS), "call names must be unique"


# ---------------------------------------------------------------------------------------------
# Sending and reading answers


def send(host: str, port: int, call: Call, timeout: float = 60.0) -> dict[str, Any]:
    """Send ``call`` on a new connection; its answer as ``answer_of`` reduces it."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(call.method, call.path, body=call.body, headers=dict(call.headers))
        response = connection.getresponse()
        return answer_of(response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()


def answer_of(status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """What a client reads from an answer: status, content type, whether tensor bytes follow
    the JSON, the JSON (else the text), and each binary output decoded to a flat list."""
    lower = {k.lower(): v for k, v in headers.items()}
    length = lower.get(HEADER_LENGTH.lower())
    answer: dict[str, Any] = {
        "status": status,
        "content_type": lower.get("content-type", "").split(";")[0].strip().lower() or None,
        "binary_follows": length is not None,
    }
    head, rest = (body[: int(length)], body[int(length) :]) if length is not None else (body, b"")
    try:
        answer["json"] = json.loads(head) if head else None
    except ValueError:
        answer["text"] = head.decode("utf-8", "replace")
        return answer
    if length is not None:
        answer["binary"] = decode_binary_outputs(answer["json"], rest)
    return answer


def decode_binary_outputs(doc: Mapping[str, Any], rest: bytes) -> dict[str, list[Any]]:
    """Each output given as ``binary_data_size`` bytes, in order, as a flat list (BYTES
    elements as text, each byte one character: latin-1)."""
    decoded, offset = {}, 0
    for output in doc.get("outputs", []):
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            continue
        chunk, offset = rest[offset : offset + size], offset + size
        if output["datatype"] == "BYTES":
            values, at = [], 0
            while at < len(chunk):
                (n,) = struct.unpack_from("<I", chunk, at)
                values.append(chunk[at + 4 : at + 4 + n].decode("latin-1"))
                at += 4 + n
            decoded[output["name"]] = values
        else:
            decoded[output["name"]] = np.frombuffer(chunk, NUMPY[output["datatype"]]).tolist()
    return decoded
