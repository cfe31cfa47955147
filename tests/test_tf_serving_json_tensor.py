"""TF Serving's own JSON tensor tests, ported case by case to kleinserve's codec.

Each case names the test it ports from tensorflow/serving's
``tensorflow_serving/util/json_tensor_test.cc`` (``JsontensorTest.<name>``). TF Serving's
tests give a signature whose inputs have only a dtype (no shape): here they are inputs of
unknown rank. Where kleinserve answers differently on purpose the case says so, and the
README lists the difference; error cases check the status (400) and that the message names
what was wrong, not TF Serving's exact words.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest

from service import codec
from service.errors import InvalidArgument
from service.signature import DTYPES, Signature, TensorInfo


def signature(**dtypes: str) -> Signature:
    inputs = {name: TensorInfo(name, dtype, None) for name, dtype in dtypes.items()}
    return Signature("serving_default", inputs, {})


def decode(body: str, sig: Signature) -> codec.PredictRequest:
    return codec.decode_body(body.encode(), lambda name: sig)


def same(array: np.ndarray, shape: tuple[int, ...], values: list[Any]) -> bool:
    flat = array.reshape(-1).tolist()
    equal = all(
        (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
        or a == b
        for a, b in zip(flat, values, strict=True)
    )
    return array.shape == shape and equal


# -- requests: FillPredictRequestFromJson ---------------------------------------------------------

DECODED = [
    (  # SingleUnnamedTensor
        {"default": "DT_INT32"},
        '{"instances": [[1,2],[3,4],[5,6]]}',
        True,
        {"default": ((3, 2), [1, 2, 3, 4, 5, 6])},
    ),
    (  # MixedInputForFloatTensor
        {"default": "DT_FLOAT"},
        '{"instances": [1, 2.0, 3, 4, 5.003, 0.007, 0.0]}',
        True,
        {"default": ((7,), np.array([1, 2.0, 3, 4, 5.003, 0.007, 0.0], np.float32).tolist())},
    ),
    (  # MixedInputForDoubleTensor
        {"default": "DT_DOUBLE"},
        '{"instances": [1.0, 2, 3, 4, 0.662, 0, 0.0]}',
        True,
        {"default": ((7,), [1.0, 2, 3, 4, 0.662, 0, 0.0])},
    ),
    (  # SingleUnnamedTensorWithSignature
        {"default": "DT_INT32"},
        '{"signature_name": "predict_images", "instances": [[1,2]]}',
        True,
        {"default": ((1, 2), [1, 2])},
    ),
    (  # SingleUnnamedTensorBase64Scalars
        {"default": "DT_STRING"},
        '{"instances": [ { "b64" : "aGVsbG8=" }, { "b64": "d29ybGQ=" } ]}',
        True,
        {"default": ((2,), [b"hello", b"world"])},
    ),
    (  # SingleUnnamedTensorBase64Lists
        {"default": "DT_STRING"},
        '{"instances": [ [{ "b64" : "aGVsbG8=" }], [{ "b64": "d29ybGQ=" }] ]}',
        True,
        {"default": ((2, 1), [b"hello", b"world"])},
    ),
    (  # SingleNamedTensorBase64
        {"default": "DT_STRING"},
        '{"instances": [{"default": [ [{ "b64" : "aGVsbG8=" }], [{ "b64": "d29ybGQ=" }] ]}]}',
        True,
        {"default": ((1, 2, 1), [b"hello", b"world"])},
    ),
    (  # MultipleNamedTensor
        {
            "int_tensor": "DT_INT32",
            "str_tensor": "DT_STRING",
            "float_tensor": "DT_FLOAT",
            "dbl_tensor": "DT_DOUBLE",
        },
        """{"instances": [
            {"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"],
             "float_tensor": [1.0, NaN], "dbl_tensor": [NaN]},
            {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"],
             "float_tensor": [2.0, Infinity], "dbl_tensor": [2.0]}
        ]}""",
        True,
        {
            "int_tensor": ((2, 3, 2), [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]),
            "str_tensor": ((2, 2), [b"foo", b"bar", b"baz", b"bat"]),
            "float_tensor": ((2, 2), [1.0, math.nan, 2.0, math.inf]),
            "dbl_tensor": ((2, 1), [math.nan, 2.0]),
        },
    ),
    (  # SingleUnnamedTensorColumnarFormat, named
        {"int_tensor": "DT_INT32"},
        '{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]]}}',
        False,
        {"int_tensor": ((1, 3, 2), [1, 2, 3, 4, 5, 6])},
    ),
    (  # SingleUnnamedTensorColumnarFormat, the input's name skipped
        {"int_tensor": "DT_INT32"},
        '{"inputs": [[[1,2],[3,4],[5,6]]]}',
        False,
        {"int_tensor": ((1, 3, 2), [1, 2, 3, 4, 5, 6])},
    ),
    (  # MultipleNamedTensorColumnarFormat
        {"int_tensor": "DT_INT32", "str_tensor": "DT_STRING", "bin_tensor": "DT_STRING"},
        """{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]], "str_tensor": ["foo", "bar"],
                       "bin_tensor": { "b64" : "aGVsbG8=" }}}""",
        False,
        {
            "int_tensor": ((1, 3, 2), [1, 2, 3, 4, 5, 6]),
            "str_tensor": ((2,), [b"foo", b"bar"]),
            "bin_tensor": ((), [b"hello"]),
        },
    ),
]


@pytest.mark.parametrize(("dtypes", "body", "row_format", "expected"), DECODED)
def test_requests_decode_as_tf_serving_decodes_them(
    dtypes: dict[str, str], body: str, row_format: bool, expected: dict[str, Any]
) -> None:
    request = decode(body, signature(**dtypes))
    assert request.row_format is row_format
    assert set(request.inputs) == set(expected)
    for name, (shape, values) in expected.items():
        array = request.inputs[name]
        assert array.dtype == DTYPES[dtypes[name]]
        assert same(array, shape, values), (name, array)


def test_a_body_without_its_terminating_byte_decodes() -> None:
    """TensorFromNonNullTerminatedBuffer: the body's bytes, exactly, are the document."""
    buffer = b'{"instances": [[1,2],[3,4],[5,6]]}X'
    request = codec.decode_body(buffer[:-1], lambda name: signature(default="DT_INT32"))
    assert same(request.inputs["default"], (3, 2), [1, 2, 3, 4, 5, 6])


REFUSED = [
    # SingleUnnamedTensorErrors
    ({"default": "DT_INT32"}, "", "empty"),
    ({"default": "DT_INT32"}, '{"signature_name": 5, "instances": [[1,2]]}', "signature_name"),
    ({"default": "DT_INT32"}, '{"instances": [[1,2]], "inputs": [[1,2]]}', "instances"),
    ({"default": "DT_INT32"}, '{"instances": [[1,2],[3,4],[5,6,7]]}', "instances[2]"),
    ({"default": "DT_INT32"}, '{"instances": [[1,2],[3,4],[[5,6]]]}', "instances[2]"),
    ({"default": "DT_INT32"}, '{"instances": [1, [1]]}', "instances[1]"),
    ({"default": "DT_INT32"}, '{"instances": [[1,2],["a", "b"]]}', "instances[1]"),
    ({"default": "DT_FLOAT"}, '{"instances": [1.7976931348623157e308]}', "too large"),
    # MultipleNamedTensorErrors
    (
        {"int_tensor": "DT_INT32", "str_tensor": "DT_STRING"},
        """{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"]},
                          {"int_tensor": [[[7,8],[9,0],[1,2]]], "str_tensor": ["baz", "bat"]}]}""",
        "int_tensor",
    ),
    (
        {"int_tensor": "DT_INT32", "str_tensor": "DT_STRING"},
        """{"instances": [{"int_tensor": [[1,2],[3,4],[5,6],[7,8]], "str_tensor": ["foo", "bar"]},
                          {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"]}]}""",
        "int_tensor",
    ),
    (
        {"int_tensor": "DT_INT32", "str_tensor": "DT_STRING"},
        """{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"]},
                          [1, 20, 30]]}""",
        "instances[1]",
    ),
    (
        {"str_tensor": "DT_STRING"},
        '{"instances": [["baz", "bar"], {"str_tensor": ["baz", "bat"]}]}',
        "instances[1]",
    ),
]


@pytest.mark.parametrize(("dtypes", "body", "words"), REFUSED)
def test_bad_requests_are_refused_saying_where(
    dtypes: dict[str, str], body: str, words: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode(body, signature(**dtypes))
    assert caught.value.status == 400
    assert words in caught.value.message, caught.value.message


@pytest.mark.parametrize(
    ("dtype", "number", "value"),
    [
        ("DT_FLOAT", 16777217, 16777216.0),  # SingleUnnamedTensorErrors: TF Serving refuses
        ("DT_DOUBLE", 9007199254740993, 9007199254740992.0),  # the same, for doubles
    ],
)
def test_integers_past_a_floats_precision_are_rounded_not_refused(
    dtype: str, number: int, value: float
) -> None:
    """A deliberate difference (README): TF Serving refuses an integer its float cannot hold
    exactly ("loss of precision"); kleinserve rounds it, as a float literal would be."""
    request = decode(f'{{"instances": [{number}]}}', signature(default=dtype))
    assert request.inputs["default"].tolist() == [value]


# -- answers: MakeJsonFromTensors -----------------------------------------------------------------

INT_TENSOR = np.array([[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]], np.int32)
BYTES = np.array([[b"hello", b"world"], [b"tf", b"serving"]], object)


def answer(outputs: dict[str, np.ndarray], row_format: bool) -> Any:
    text = codec.encode_predict(outputs, row_format)
    return orjson.loads(text.replace(b"NaN", b'"NaN"').replace(b"Infinity", b'"Infinity"'))


def test_from_json_single_tensor() -> None:
    """FromJsonSingleTensor and FromJsonSingleScalarTensor."""
    nested = INT_TENSOR.tolist()
    assert answer({"int_tensor": INT_TENSOR}, True) == {"predictions": nested}
    assert answer({"int_tensor": INT_TENSOR}, False) == {"outputs": nested}
    five = np.arange(1, 6, dtype=np.int32)
    assert answer({"int_tensor": five}, True) == {"predictions": [1, 2, 3, 4, 5]}
    assert answer({"int_tensor": five}, False) == {"outputs": [1, 2, 3, 4, 5]}


def test_from_json_single_bytes_tensor() -> None:
    """FromJsonSingleBytesTensor: an output whose name ends in _bytes is written as b64."""
    assert answer({"str_tensor_bytes": BYTES}, True) == {
        "predictions": [
            [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}],
            [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}],
        ]
    }


def test_from_json_float_precision_and_non_finite() -> None:
    """FromJsonSingleFloatTensorSixDigitPrecision and ...NonFinite: each float32 reads back as
    itself (TF Serving writes 9e+06 where kleinserve writes 9000000.0: the same number)."""
    floats = np.array([[9000000, 999999, 0.5], [0.0003, 0.00003, 555557.5]], np.float32)
    written = answer({"float_tensor": floats}, True)["predictions"]
    assert np.array(written, np.float32).tolist() == floats.tolist()
    special = np.array([[math.nan, math.inf], [3, -math.inf]], np.float32)
    text = codec.encode_predict({"float_tensor": special}, True)
    assert text == b'{"predictions":[[NaN,Infinity],[3.0,-Infinity]]}'


def test_from_json_multiple_named_tensors() -> None:
    """FromJsonMultipleNamedTensors, row and columnar."""
    outputs = {
        "int_tensor": INT_TENSOR,
        "str_tensor": np.array([[b"foo", b"bar"], [b"baz", b"bat"]], object),
        "float_tensor": np.array([[1.0], [2.0]], np.float32),
        "double_scalar_tensor": np.array([8.0, 9.0]),
        "str_tensor_bytes": BYTES,
    }
    assert answer(outputs, True) == {
        "predictions": [
            {
                "double_scalar_tensor": 8.0,
                "float_tensor": [1.0],
                "int_tensor": [[1, 2], [3, 4], [5, 6]],
                "str_tensor": ["foo", "bar"],
                "str_tensor_bytes": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}],
            },
            {
                "double_scalar_tensor": 9.0,
                "float_tensor": [2.0],
                "int_tensor": [[7, 8], [9, 0], [1, 2]],
                "str_tensor": ["baz", "bat"],
                "str_tensor_bytes": [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}],
            },
        ]
    }
    assert answer(outputs, False) == {
        "outputs": {
            "double_scalar_tensor": [8.0, 9.0],
            "float_tensor": [[1.0], [2.0]],
            "int_tensor": INT_TENSOR.tolist(),
            "str_tensor": [["foo", "bar"], ["baz", "bat"]],
            "str_tensor_bytes": [
                [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}],
                [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}],
            ],
        }
    }


def test_from_json_errors() -> None:
    """FromJsonMultipleNamedTensorsErrors: row-format outputs of different batch sizes."""
    outputs = {
        "int_tensor": np.zeros((2, 3), np.int32),
        "str_tensor": np.array([[b"foo", b"bar", b"baz"]], object),
    }
    with pytest.raises(Exception, match="first dimensions differ"):
        codec.encode_predict(outputs, True)


def test_from_json_zero_batch_tensors() -> None:
    """FromJsonSingleZeroBatchTensor and FromJsonMultipleZeroBatchTensors."""
    assert answer({"int_tensor": np.zeros((0, 2), np.int32)}, True) == {"predictions": []}
    outputs = {
        "str_tensor": np.zeros((0, 1, 2), object),
        "float_tensor": np.zeros((0, 3, 4), np.float32),
    }
    assert answer(outputs, True) == {"predictions": []}
