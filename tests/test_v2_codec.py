"""The v2 infer codec on its own: bytes and dicts <-> numpy, exactly, and every refusal worded."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service import v2_codec
from service.errors import InvalidArgument
from wire.dtypes import NUMPY_NAMES, V2_DATATYPES, V2_NAMES

NUMERIC = [d for d in v2_codec.NUMPY_DTYPES if d != "BYTES"]
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    """Any array of a v2 datatype: numbers with NaN and infinities, BYTES any bytes."""
    datatype = draw(st.sampled_from(list(v2_codec.NUMPY_DTYPES)))
    shape = draw(shapes)
    if datatype == "BYTES":
        values = draw(st.lists(st.binary(max_size=8), min_size=int(np.prod(shape)),
                               max_size=int(np.prod(shape))))  # fmt: skip
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return datatype, array.reshape(shape)
    return datatype, draw(hnp.arrays(v2_codec.NUMPY_DTYPES[datatype], shape))


def text_tensors() -> st.SearchStrategy[tuple[str, np.ndarray]]:
    """As ``tensors``, with BYTES elements that are UTF-8 text (what JSON carries)."""

    def utf8(pair: tuple[str, np.ndarray]) -> bool:
        datatype, array = pair
        if datatype != "BYTES":
            return True
        try:
            [b.decode("utf-8") for b in array.ravel()]
        except UnicodeDecodeError:
            return False
        return True

    return tensors().filter(utf8)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and elements (NaN equal to NaN, the same bits for floats)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        return a.tobytes() == b.tobytes() or bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def response_as_request(body: bytes, header_length: int | None) -> bytes:
    """A response's outputs turned into a request's inputs, with the same data or bytes."""
    header = body if header_length is None else body[:header_length]
    doc = json.loads(header)  # the standard parser reads NaN and Infinity
    return json.dumps({"inputs": doc["outputs"]}).encode(), body[len(header) :]


@given(text_tensors())
def test_any_tensor_round_trips_through_json(pair) -> None:
    """An output written as JSON data reads back as the same array (float32 shortest text,
    float16 through float32, NaN and infinities as tokens, BYTES as strings)."""
    datatype, array = pair
    body, header_length = v2_codec.encode_infer("m", 1, None, [("t", array, False)])
    assert header_length is None
    request, rest = response_as_request(body, None)
    assert rest == b""
    decoded = v2_codec.decode_infer(request, None)
    assert json.loads(request)["inputs"][0]["datatype"] == datatype
    assert same(decoded.inputs["t"], array)


@given(st.lists(tensors(), min_size=1, max_size=4))
def test_any_tensors_round_trip_through_binary(pairs) -> None:
    """Outputs written as binary data read back as inputs: the same arrays, bit for bit."""
    outputs = [(f"t{i}", array, True) for i, (_, array) in enumerate(pairs)]
    body, header_length = v2_codec.encode_infer("m", 1, "id", outputs)
    assert header_length is not None
    doc = json.loads(body[:header_length])
    assert [o["parameters"]["binary_data_size"] for o in doc["outputs"]] == [
        len(v2_codec.tensor_bytes(a)) for _, a, _ in outputs
    ]
    header, tensor_data = response_as_request(body, header_length)
    decoded = v2_codec.decode_infer(header + tensor_data, len(header))
    for name, array, _ in outputs:
        assert same(decoded.inputs[name], array), name


def test_binary_inputs_are_views_of_the_body() -> None:
    """Aligned numeric inputs are np.frombuffer views (no copy); unaligned ones are copied."""
    a = np.arange(4, dtype=np.float32)
    for pad in (b"", b" "):  # a space after the JSON moves the data off alignment, maybe
        header = (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "a",
                            "shape": [4],
                            "datatype": "FP32",
                            "parameters": {"binary_data_size": 16},
                        }
                    ]
                }  # fmt: skip
            ).encode()
            + pad
        )
        decoded = v2_codec.decode_infer(header + a.tobytes(), len(header)).inputs["a"]
        assert decoded.flags.aligned and np.array_equal(decoded, a)
        if not decoded.flags.owndata:
            assert decoded.base is not None  # a view of the body


def test_nested_and_flat_data_give_the_same_tensor() -> None:
    """'data' may be flat or nested, row-major."""
    for data in ([1, 2, 3, 4, 5, 6], [[1, 2, 3], [4, 5, 6]], [[[1], [2], [3]], [[4], [5], [6]]]):
        body = json.dumps(
            {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "INT16", "data": data}]}
        ).encode()
        x = v2_codec.decode_infer(body, None).inputs["x"]
        assert x.dtype == np.int16 and x.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_request_fields_are_read() -> None:
    """id, requested outputs with binary_data, binary_data_output and timeout are kept."""
    body = json.dumps(
        {
            "id": "42",
            "parameters": {"binary_data_output": True, "timeout": 5000, "custom": 1},
            "inputs": [
                {"name": "b", "shape": [3], "datatype": "BOOL", "data": [True, False, True]}
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
        }
    ).encode()
    decoded = v2_codec.decode_infer(body, None)
    assert decoded.id == "42" and decoded.binary_output and decoded.timeout_us == 5000
    assert decoded.outputs == (
        v2_codec.RequestedOutput("y", False),
        v2_codec.RequestedOutput("z", None),
    )
    assert decoded.inputs["b"].tolist() == [True, False, True]


def test_the_datatype_table_covers_every_tf_dtype() -> None:
    """Every DT_* name has one v2 name and back, with the numpy dtype of the DT_* table."""
    assert set(V2_DATATYPES.values()) == set(NUMPY_NAMES)
    assert {V2_NAMES[dt] for dt in NUMPY_NAMES} == set(V2_DATATYPES)
    for v2, dt in V2_DATATYPES.items():
        assert v2_codec.NUMPY_DTYPES[v2] == np.dtype(NUMPY_NAMES[dt])


def tensor(**fields) -> dict:
    return {"name": "x", "shape": [2], "datatype": "FP32", **fields}


def binary_body(inputs: list[dict], data: bytes) -> tuple[bytes, int]:
    header = json.dumps({"inputs": inputs}).encode()
    return header + data, len(header)


MALFORMED = [
    # (body, header length, words the message must hold)
    (b"[1, 2]", None, "must be a JSON object"),
    (b'{"inputs": [', None, "malformed JSON"),
    (b'{"inputs": []}', None, "'inputs' must be a non-empty list"),
    (b'{"inputs": [{"shape": [1]}]}', None, "needs a 'name'"),
    (b'{"id": 5, "inputs": []}', None, "'id' must be a string"),
    (json.dumps({"inputs": [tensor(datatype="BF16", data=[1, 2])]}).encode(), None,
     "unknown datatype 'BF16'"),
    (json.dumps({"inputs": [tensor(datatype=["FP32"], data=[1, 2])]}).encode(), None,
     "unknown datatype ['FP32']"),
    (json.dumps({"inputs": [tensor(datatype={"a": 1}, data=[1, 2])]}).encode(), None,
     "unknown datatype {'a': 1}"),
    (json.dumps({"inputs": [tensor(shape=[-1], data=[1])]}).encode(), None,
     "non-negative integers"),
    (json.dumps({"inputs": [tensor(shape=[2.0], data=[1, 2])]}).encode(), None,
     "non-negative integers"),
    (json.dumps({"inputs": [tensor(shape=[2**64], data=[1])]}).encode(), None,
     "non-negative integers"),
    (json.dumps({"inputs": [tensor(shape="2", data=[1])]}).encode(), None,
     "'shape' must be a list"),
    (json.dumps({"inputs": [tensor(shape=[1] * 33, data=[1])]}).encode(), None,
     "more than 32"),
    (json.dumps({"inputs": [tensor(data=[1, 2, 3])]}).encode(), None,
     "'data' holds 3 elements, but shape [2] holds 2"),
    (json.dumps({"inputs": [tensor(shape=[2**40, 2**40], data=[1])]}).encode(), None,
     "holds 1 elements"),
    (json.dumps({"inputs": [tensor(data=[[1], [2, 3]])]}).encode(), None, "equal length"),
    (json.dumps({"inputs": [tensor(data=["a", "b"])]}).encode(), None, "only numbers"),
    (json.dumps({"inputs": [tensor(datatype="INT32", data=[1.5, 2])]}).encode(), None,
     "only integers"),
    (json.dumps({"inputs": [tensor(datatype="UINT8", data=[1, -1])]}).encode(), None,
     "-1 is out of range [0, 255]"),
    (json.dumps({"inputs": [tensor(datatype="FP16", data=[1, 1e6])]}).encode(), None,
     "too large for FP16"),
    (json.dumps({"inputs": [tensor(datatype="BOOL", data=[1, 0])]}).encode(), None,
     "only true and false"),
    (json.dumps({"inputs": [tensor(datatype="BYTES", data=["a", 1])]}).encode(), None,
     "must hold strings"),
    (json.dumps({"inputs": [tensor(), tensor(data=[1, 2])]}).encode(), None, "neither 'data'"),
    (json.dumps({"inputs": [tensor(data=[1, 2]), tensor(data=[1, 2])]}).encode(), None,
     "given twice"),
    (json.dumps({"inputs": [tensor(data=[1, 2], parameters={"binary_data_size": 8})]}).encode(),
     None, "both 'data' and parameters.binary_data_size"),
    (json.dumps({"inputs": [tensor(parameters={"binary_data_size": 8})]}).encode(), None,
     "no Inference-Header-Content-Length"),
    (json.dumps({"inputs": [tensor(data=[1, 2])], "parameters": {"sequence_id": 3}}).encode(),
     None, "sequence batching is not supported"),
    (json.dumps({"inputs": [tensor(data=[1, 2])], "parameters": {"timeout": -1}}).encode(),
     None, "'timeout' must be a non-negative integer"),
    (json.dumps({"inputs": [tensor(data=[1, 2])], "parameters": [1]}).encode(), None,
     "'parameters' must be an object"),
    (json.dumps({"inputs": [tensor(data=[1, 2])], "outputs": [{"name": "y"}, {"name": "y"}]})
     .encode(), None, "requested twice"),
    (json.dumps({"inputs": [tensor(data=[1, 2])],
                 "outputs": [{"name": "y", "parameters": {"classification": 2}}]}).encode(),
     None, "classification extension is not supported"),
    (json.dumps({"inputs": [tensor(data=[1, 2])],
                 "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}).encode(),
     None, "'binary_data' must be true or false"),
    (*binary_body([tensor(parameters={"binary_data_size": 8})], b"\0" * 7),
     "passes its end: the body has 7 bytes after the JSON"),
    (*binary_body([tensor(parameters={"binary_data_size": 8})], b"\0" * 9),
     "9 bytes after the JSON, but the inputs' binary_data_size add up to 8"),
    (*binary_body([tensor(parameters={"binary_data_size": 4})], b"\0" * 4),
     "binary_data_size is 4, but shape [2] of FP32 takes 2 x 4 = 8 bytes"),
    (*binary_body([tensor(parameters={"binary_data_size": -8})], b""),
     "binary_data_size must be a non-negative integer"),
    (*binary_body([tensor(datatype="BOOL", parameters={"binary_data_size": 2})], b"\x01\x02"),
     "each element must be a byte 0 or 1"),
    (*binary_body([tensor(datatype="BYTES", parameters={"binary_data_size": 6})],
                  struct.pack("<I", 1) + b"a" + b"\0"), "end before element 1 of 2"),
    (*binary_body([tensor(datatype="BYTES", parameters={"binary_data_size": 5})],
                  struct.pack("<I", 9) + b"a"), "element 0 says 9 bytes, but only 1"),
    (*binary_body([tensor(shape=[1], datatype="BYTES", parameters={"binary_data_size": 6})],
                  struct.pack("<I", 1) + b"ab"), "holds 1 elements, which take 5 bytes"),
    (b'{"inputs": []}', 99, "Inference-Header-Content-Length is 99, but the body has 14 bytes"),
    (b'{"inputs": []}xyz', 15, "malformed JSON"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "header_length", "words"), MALFORMED)
def test_malformed_bodies_are_400s_saying_what_is_wrong(body, header_length, words) -> None:
    with pytest.raises(InvalidArgument) as raised:
        v2_codec.decode_infer(body, header_length)
    assert raised.value.status == 400
    assert words in raised.value.message


@given(st.binary(max_size=200), st.one_of(st.none(), st.integers(-5, 250)))
def test_any_bytes_are_decoded_or_refused_with_400(body: bytes, header_length) -> None:
    """Whatever the body, decoding gives a request or InvalidArgument, never another error."""
    try:
        v2_codec.decode_infer(body, header_length)
    except InvalidArgument:
        pass


def test_a_non_utf8_bytes_output_in_json_says_to_ask_for_binary() -> None:
    array = np.array([b"\xff"], dtype=object)
    with pytest.raises(InvalidArgument, match="binary_data"):
        v2_codec.encode_infer("m", 1, None, [("out", array, False)])
    body, header_length = v2_codec.encode_infer("m", 1, None, [("out", array, True)])
    assert body[header_length:] == struct.pack("<I", 1) + b"\xff"


def test_integers_past_int64_are_read_exactly() -> None:
    """numpy reads Python integers past int64 as float64; UINT64 data keeps every bit."""
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [2], "datatype": "UINT64", "data": [2**64 - 1, 1]}]}
    ).encode()
    assert v2_codec.decode_infer(body, None).inputs["x"].tolist() == [2**64 - 1, 1]
