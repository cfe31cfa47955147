"""service.codec: TF Serving's JSON formats for :predict, both ways, and the fast path."""

from __future__ import annotations

import json
import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service import codec
from service.codec import (
    PredictRequest,
    decode_body,
    decode_predict,
    encode_json,
    encode_predict,
    fast_decode_numeric,
    parse_json_body,
    signature_name_of,
)
from service.errors import Internal, InvalidArgument, NotFound
from service.signature import DTYPES, Shape, Signature, TensorInfo

# tests/conftest.py belongs to others; these settings make this module's runs reproducible.
reproducible = settings(deadline=None, derandomize=True)

DTYPE_NAME = {dtype: name for name, dtype in DTYPES.items()}
ROUND_TRIP_DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_]


def signature(**inputs: tuple[str, Shape]) -> Signature:
    """A signature with these inputs (name=(dtype name, shape)) and one float output."""
    return Signature(
        "serving_default",
        {name: TensorInfo(name, dtype, shape) for name, (dtype, shape) in inputs.items()},
        {"y": TensorInfo("y", "DT_FLOAT", (None,))},
    )


def decode(body: bytes, sig: Signature) -> PredictRequest:
    """The server's way in: decode_body, fast path first."""
    return decode_body(body, lambda name: sig)


def decode_general(body: bytes, sig: Signature) -> PredictRequest:
    """The general path alone."""
    return decode_predict(parse_json_body(body), sig)


def assert_same_array(got: np.ndarray, want: np.ndarray) -> None:
    """Same dtype, shape and bits, except that any NaN matches any NaN."""
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    if want.dtype.kind == "f":
        assert np.array_equal(np.isnan(got), np.isnan(want))
        bits = np.dtype(f"u{want.dtype.itemsize}")
        numbers = ~np.isnan(want)
        assert np.array_equal(got.view(bits)[numbers], want.view(bits)[numbers])
    elif want.dtype.kind == "O":
        assert got.tolist() == want.tolist()
    else:
        assert np.array_equal(got, want)


def assert_same_request(got: PredictRequest, want: PredictRequest) -> None:
    assert (got.row_format, got.signature_name) == (want.row_format, want.signature_name)
    assert list(got.inputs) == list(want.inputs)
    for name in want.inputs:
        assert_same_array(got.inputs[name], want.inputs[name])


def request_body(array: np.ndarray, row_format: bool) -> bytes:
    """A request carrying ``array``, written by the codec's own response writer.

    So float32 values are their shortest float32 text and non-finite values are NaN and
    Infinity tokens; only the top-level key changes.
    """
    response = encode_predict({"y": array}, row_format)
    old, new = (
        (b'{"predictions":', b'{"instances":') if row_format else (b'{"outputs":', b'{"inputs":')
    )
    assert response.startswith(old)
    return new + response[len(old) :]


arrays = st.sampled_from(ROUND_TRIP_DTYPES).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=4, max_side=4))
)


# -- round trips ------------------------------------------------------------------------------


@reproducible
@given(arrays)
def test_row_format_request_round_trips(array: np.ndarray) -> None:
    """Any numeric array sent as "instances" decodes to the same dtype, shape and bits."""
    sig = signature(x=(DTYPE_NAME[array.dtype], (None, *array.shape[1:])))
    body = request_body(array, row_format=True)
    for request in (decode(body, sig), decode_general(body, sig)):
        assert request.row_format is True
        assert request.signature_name is None
        assert_same_array(request.inputs["x"], array)


@reproducible
@given(arrays)
def test_columnar_request_round_trips(array: np.ndarray) -> None:
    """Any numeric array sent as "inputs" decodes to the same dtype, shape and bits."""
    sig = signature(x=(DTYPE_NAME[array.dtype], array.shape))
    body = request_body(array, row_format=False)
    for request in (decode(body, sig), decode_general(body, sig)):
        assert request.row_format is False
        assert_same_array(request.inputs["x"], array)


@reproducible
@given(arrays)
def test_fast_path_answers_for_finite_numbers(array: np.ndarray) -> None:
    """A rectangular array of finite numbers is the fast path's case: it answers, exactly."""
    if array.dtype == np.bool_ or not np.isfinite(array.astype(np.float64)).all():
        return  # true/false and NaN tokens are not numbers to the fast path
    sig = signature(x=(DTYPE_NAME[array.dtype], (None, *array.shape[1:])))
    body = request_body(array, row_format=True)
    fast = fast_decode_numeric(body, sig)
    assert fast is not None
    assert_same_request(fast, decode_general(body, sig))


@reproducible
@given(arrays, st.booleans())
def test_encoded_outputs_read_back_exactly(array: np.ndarray, row_format: bool) -> None:
    """encode_predict writes values that a JSON reader turns back into the same bits."""
    doc = json.loads(encode_predict({"y": array}, row_format))
    value = doc["predictions" if row_format else "outputs"]
    read_back = np.asarray(value, dtype=np.float64 if array.dtype.kind == "f" else None)
    assert_same_array(read_back.astype(array.dtype), array)
    if array.dtype.kind in "iub":  # integers stay integers, booleans stay booleans
        assert np.asarray(value).dtype.kind == ("b" if array.dtype.kind == "b" else "i")


@reproducible
@given(
    st.integers(1, 4).flatmap(
        lambda batch: st.tuples(
            hnp.arrays(
                np.float32,
                hnp.array_shapes(min_dims=1, max_dims=3, max_side=3).map(lambda s: (batch, *s)),
            ),
            hnp.arrays(np.int64, (batch,)),
        )
    )
)
def test_row_format_splits_several_outputs_per_instance(
    pair: tuple[np.ndarray, np.ndarray],
) -> None:
    """With several outputs, each prediction is an object holding every output's row."""
    scores, classes = pair
    doc = json.loads(encode_predict({"scores": scores, "classes": classes}, row_format=True))
    predictions = doc["predictions"]
    assert [sorted(p) for p in predictions] == [["classes", "scores"]] * len(classes)
    assert_same_array(np.asarray([p["classes"] for p in predictions]), classes)
    read_back = np.asarray([p["scores"] for p in predictions], dtype=np.float64).astype(np.float32)
    assert_same_array(read_back, scores)


def test_float32_is_written_as_its_shortest_text() -> None:
    """float32 0.1 is written 0.1, not the float64 expansion 0.10000000149011612."""
    outputs = {"y": np.array([0.1, 1 / 3, 3.0, 1e-7], dtype=np.float32)}
    assert encode_predict(outputs, row_format=False) == b'{"outputs":[0.1,0.33333334,3.0,1e-7]}'


def test_non_finite_outputs_are_written_as_tf_serving_tokens() -> None:
    """NaN and infinities come out as NaN, Infinity and -Infinity, in place, in both formats."""
    y = np.array([[1.5, np.nan], [np.inf, -np.inf]], dtype=np.float32)
    assert encode_predict({"y": y}, row_format=False) == (
        b'{"outputs":[[1.5,NaN],[Infinity,-Infinity]]}'
    )
    z = np.array([np.nan, 2.0])
    assert encode_predict({"y": y, "z": z}, row_format=True) == (
        b'{"predictions":[{"y":[1.5,NaN],"z":NaN},{"y":[Infinity,-Infinity],"z":2.0}]}'
    )
    assert encode_predict({"z": np.array(-np.inf)}, row_format=False) == b'{"outputs":-Infinity}'


def test_float16_is_written_as_its_value_in_float32_text() -> None:
    """float16 0.1 is written as its exact value in float32's shortest text, as TF Serving does."""
    outputs = {"y": np.array([0.1, 65504], dtype=np.float16)}
    assert encode_predict(outputs, row_format=False) == b'{"outputs":[0.099975586,65504.0]}'


def test_string_outputs_are_text_or_base64() -> None:
    """Strings are written as text, as {"b64"} if not UTF-8, and always as b64 for *_bytes."""
    outputs = {
        "label": np.array([b"cat", "\u00e9t\u00e9".encode(), b"\xff\x00"], dtype=object),
        "image_bytes": np.array([b"cat", b"", b"\xff\x00"], dtype=object),
    }
    assert json.loads(encode_predict(outputs, row_format=False)) == {
        "outputs": {
            "label": ["cat", "\u00e9t\u00e9", {"b64": "/wA="}],
            "image_bytes": [{"b64": "Y2F0"}, {"b64": ""}, {"b64": "/wA="}],
        }
    }


def test_outputs_that_are_not_contiguous_encode() -> None:
    """A transposed (Fortran-ordered) output is written in its logical order."""
    y = np.arange(6, dtype=np.int32).reshape(2, 3).T
    assert encode_predict({"y": y}, row_format=False) == b'{"outputs":[[0,3],[1,4],[2,5]]}'


def test_row_format_needs_outputs_with_one_batch_size() -> None:
    """Row format with outputs of different first dimensions is a server error naming them."""
    outputs = {"a": np.zeros((2, 3)), "b": np.zeros((3,))}
    with pytest.raises(Internal, match="first dimensions differ") as caught:
        encode_predict(outputs, row_format=True)
    assert "'a': 2" in caught.value.message and "'b': 3" in caught.value.message


def test_row_format_needs_a_batch_dimension() -> None:
    """Row format with a scalar output is a server error pointing at the columnar format."""
    with pytest.raises(Internal, match="'y' is a scalar"):
        encode_predict({"y": np.array(1.0, dtype=np.float32)}, row_format=True)


def test_outputs_without_a_json_form_are_a_server_error() -> None:
    """A complex output cannot be written: Internal, naming the output and its dtype."""
    with pytest.raises(Internal, match="'y' has dtype complex128"):
        encode_predict({"y": np.array([1j])}, row_format=False)


def test_encode_json_writes_numpy_values() -> None:
    """encode_json writes plain data and numpy arrays alike."""
    assert encode_json({"a": [1, "b"], "c": np.array([0.5], dtype=np.float32)}) == (
        b'{"a":[1,"b"],"c":[0.5]}'
    )


# -- TF Serving's documented examples -----------------------------------------------------------
# From https://www.tensorflow.org/tfx/serving/api_rest. The row example there has a stray "]"
# after the second "signal"; it is left out here.

DOC_SIGNATURE = signature(
    tag=("DT_STRING", (None,)), signal=("DT_INT32", (None, 5)), sensor=("DT_FLOAT", (None, 2, 2))
)
DOC_TENSORS = {
    "tag": np.array([b"foo", b"bar"], dtype=object),
    "signal": np.array([[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]], dtype=np.int32),
    "sensor": np.array([[[1, 2], [3, 4]], [[4, 5], [6, 8]]], dtype=np.float32),
}


def test_documented_row_format_with_named_inputs() -> None:
    """The docs' row example: a list of objects, one value per named input per instance."""
    body = b"""{
     "instances": [
       {
         "tag": "foo",
         "signal": [1, 2, 3, 4, 5],
         "sensor": [[1, 2], [3, 4]]
       },
       {
         "tag": "bar",
         "signal": [3, 4, 1, 2, 5],
         "sensor": [[4, 5], [6, 8]]
       }
     ]
    }"""
    request = decode(body, DOC_SIGNATURE)
    assert request.row_format is True
    assert_same_request(request, PredictRequest(DOC_TENSORS, True, None))


def test_documented_columnar_format_with_named_inputs() -> None:
    """The docs' columnar example decodes to the same tensors as the row example."""
    body = b"""{
     "inputs": {
       "tag": ["foo", "bar"],
       "signal": [[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]],
       "sensor": [[[1, 2], [3, 4]], [[4, 5], [6, 8]]]
     }
    }"""
    assert_same_request(decode(body, DOC_SIGNATURE), PredictRequest(DOC_TENSORS, False, None))


def test_documented_row_format_with_one_input() -> None:
    """The docs' single-input rows: scalars ("foo", ...) and [1, 2]-shaped tensors."""
    strings = decode(b'{"instances": [ "foo", "bar", "baz" ]}', signature(x=("DT_STRING", (None,))))
    assert strings.inputs["x"].tolist() == [b"foo", b"bar", b"baz"]
    pairs = decode(
        b'{"instances": [ [[1, 2]], [[3, 4]] ]}', signature(x=("DT_FLOAT", (None, 1, 2)))
    )
    assert_same_array(pairs.inputs["x"], np.array([[[1, 2]], [[3, 4]]], dtype=np.float32))


def test_documented_half_plus_three_predict() -> None:
    """The docs' end-to-end example: [1.0, 2.0, 5.0] in, {"predictions": [3.5, 4.0, 5.5]} out."""
    request = decode(b'{"instances": [1.0,2.0,5.0]}', signature(x=("DT_FLOAT", (None,))))
    outputs = {"y": request.inputs["x"] / 2 + 3}
    assert encode_predict(outputs, request.row_format) == b'{"predictions":[3.5,4.0,5.5]}'


def test_documented_response_shapes_for_several_outputs() -> None:
    """Several outputs: row format gives a list of objects, columnar one object of tensors."""
    outputs = {
        "label": np.array([b"cat", b"dog"], dtype=object),
        "score": np.array([0.5, 0.25], dtype=np.float32),
    }
    assert json.loads(encode_predict(outputs, row_format=True)) == {
        "predictions": [{"label": "cat", "score": 0.5}, {"label": "dog", "score": 0.25}]
    }
    assert json.loads(encode_predict(outputs, row_format=False)) == {
        "outputs": {"label": ["cat", "dog"], "score": [0.5, 0.25]}
    }


def test_documented_base64_values() -> None:
    """The docs' {"b64": ...} values decode to bytes; padding may be left off."""
    body = b'{"instances": [{ "b64": "aW1hZ2UgYnl0ZXM=" }, {"b64": "YXdlc29tZSBpbWFnZSBieXRlcw"}]}'
    request = decode(body, signature(image=("DT_STRING", (None,))))
    assert request.inputs["image"].tolist() == [b"image bytes", b"awesome image bytes"]


def test_documented_non_finite_tokens() -> None:
    """The docs' JSON conformance example: NaN and Infinity are accepted in requests."""
    request = decode(
        b'{"instances": [ 1.0, -3.14, NaN, Infinity, -Infinity ]}',
        signature(x=("DT_FLOAT", (None,))),
    )
    want = np.array([1.0, -3.14, np.nan, np.inf, -np.inf], dtype=np.float32)
    assert_same_array(request.inputs["x"], want)


# -- other good requests ---------------------------------------------------------------------------


def test_signature_name_is_read_and_passed_to_signature_for() -> None:
    """signature_for gets the body's signature_name (None if absent), on both paths."""
    seen = []
    sig = signature(x=("DT_FLOAT", (None,)))

    def signature_for(name: str | None) -> Signature:
        seen.append(name)
        return sig

    numeric = decode_body(b'{"instances": [1.5], "signature_name": "other"}', signature_for)
    strings = decode_body(b'{"signature_name": "other", "instances": [NaN]}', signature_for)
    unnamed = decode_body(b'{"inputs": [1.5]}', signature_for)
    assert seen == ["other", "other", None]
    assert [numeric.signature_name, strings.signature_name, unnamed.signature_name] == [
        "other",
        "other",
        None,
    ]


def test_signature_for_errors_reach_the_caller() -> None:
    """NotFound from signature_for propagates, whichever path read the body."""

    def signature_for(name: str | None) -> Signature:
        raise NotFound(f"no signature {name}")

    for body in (
        b'{"signature_name": "nope", "instances": [1]}',
        b'{"signature_name": "nope", "instances": ["a"]}',
    ):
        with pytest.raises(NotFound, match="no signature nope"):
            decode_body(body, signature_for)


def test_malformed_json_is_reported_before_the_signature_is_looked_up() -> None:
    """A body that is not JSON is a 400 even when its signature_name is unknown."""

    def signature_for(name: str | None) -> Signature:
        raise NotFound(name or "")

    with pytest.raises(InvalidArgument, match="malformed JSON"):
        decode_body(b'{"signature_name": "nope", "instances": [1,,2]}', signature_for)


def test_an_integer_too_long_to_convert_is_malformed_json() -> None:
    """An integer past Python's 4300-digit conversion limit is a 400, not a ValueError (500)."""
    with pytest.raises(InvalidArgument, match="malformed JSON: Exceeds the limit"):
        parse_json_body(b'{"instances": [' + b"1" * 5000 + b"]}")


def test_unknown_rank_and_dimensions_accept_any_shape() -> None:
    """An input of unknown rank (shape None) or unknown dimensions takes what it is sent."""
    sig = signature(x=("DT_INT64", None))
    assert decode(b'{"inputs": 7}', sig).inputs["x"].shape == ()
    assert decode(b'{"inputs": [[[1], [2]]]}', sig).inputs["x"].shape == (1, 2, 1)
    free = signature(x=("DT_INT64", (None, None)))
    assert decode(b'{"instances": [[1, 2, 3]]}', free).inputs["x"].shape == (1, 3)


def test_one_input_row_format_accepts_named_instances() -> None:
    """With one input, each instance may also be an object naming it."""
    request = decode(
        b'{"instances": [{"x": [1, 2]}, {"x": [3, 4]}]}', signature(x=("DT_UINT8", (None, 2)))
    )
    assert_same_array(request.inputs["x"], np.array([[1, 2], [3, 4]], dtype=np.uint8))


def test_string_inputs_take_text_and_base64() -> None:
    """DT_STRING inputs hold bytes: text as UTF-8, {"b64"} decoded, as an object array."""
    body = '{"inputs": [["h\u00e9", {"b64": "/wA="}], ["", "x"]]}'.encode()
    x = decode(body, signature(x=("DT_STRING", (None, 2)))).inputs["x"]
    assert x.dtype == object and x.shape == (2, 2)
    assert x.tolist() == [["h\u00e9".encode(), b"\xff\x00"], [b"", b"x"]]


def test_integer_extremes_are_accepted() -> None:
    """The ends of each integer type's range are accepted exactly."""
    body = b'{"inputs": {"i": [-9223372036854775808, 9223372036854775807], "u": [0, 255]}}'
    request = decode(body, signature(i=("DT_INT64", (2,)), u=("DT_UINT8", (2,))))
    assert request.inputs["i"].tolist() == [-(2**63), 2**63 - 1]
    assert request.inputs["u"].tolist() == [0, 255]


def test_numbers_beyond_a_double_read_as_infinity() -> None:
    """The documented leniency: 1e400 reads as Infinity (TF Serving refuses it)."""
    request = decode(b'{"instances": [1e400, -1e400]}', signature(x=("DT_DOUBLE", (None,))))
    assert request.inputs["x"].tolist() == [math.inf, -math.inf]


def test_booleans_mixed_into_numbers_are_read_as_numbers() -> None:
    """The documented leniency: true among integers reads as 1 (true alone is refused)."""
    assert decode(b'{"instances": [2, true]}', signature(x=("DT_INT32", (None,)))).inputs[
        "x"
    ].tolist() == [2, 1]


# -- bad requests ------------------------------------------------------------------------------

FLOAT_ROWS = signature(x=("DT_FLOAT", (None, 3)))
INT32 = signature(x=("DT_INT32", (None,)))
STRINGS = signature(x=("DT_STRING", (None,)))
TWO_INPUTS = signature(a=("DT_FLOAT", (None,)), b=("DT_FLOAT", (None,)))

BAD_REQUESTS = {
    "malformed JSON": (b'{"instances": [1, 2,]}', FLOAT_ROWS, ["malformed JSON", "char 20"]),
    "truncated JSON": (b'{"instances": [[1, 2, 3]]', FLOAT_ROWS, ["malformed JSON"]),
    "not UTF-8": (b'{"instances": ["\xff"]}', STRINGS, ["not valid UTF-8"]),
    "too deep": (b"[" * 5000 + b"]" * 5000, FLOAT_ROWS, ["nested too deeply"]),
    "not an object": (b"[[1, 2, 3]]", FLOAT_ROWS, ["must be a JSON object", "a list"]),
    "both formats": (
        b'{"instances": [[1, 2, 3]], "inputs": [[1, 2, 3]]}',
        FLOAT_ROWS,
        ["both 'instances'", "'inputs'"],
    ),
    "neither format": (
        b'{"examples": [[1, 2, 3]]}',
        FLOAT_ROWS,
        ["neither 'instances'", "nor 'inputs'"],
    ),
    "signature_name not a string": (
        b'{"signature_name": 3, "instances": [[1, 2, 3]]}',
        FLOAT_ROWS,
        ["'signature_name' must be a string", "a number 3"],
    ),
    "instances not a list": (
        b'{"instances": 3}',
        FLOAT_ROWS,
        ["'instances' must be a list", "a number"],
    ),
    "instances empty": (b'{"instances": []}', FLOAT_ROWS, ["'instances' is empty"]),
    "ragged instances": (
        b'{"instances": [[1, 2, 3], [4, 5]]}',
        FLOAT_ROWS,
        ["'x' is ragged", "instances[1] has length 2", "instances[0] has length 3"],
    ),
    "ragged inside": (
        b'{"inputs": [[1, 2, 3], [4, [5], 6]]}',
        FLOAT_ROWS,
        ["'x' is ragged", "inputs[1][1] is a list"],
    ),
    "scalar among lists": (
        b'{"instances": [[1, 2, 3], 4]}',
        FLOAT_ROWS,
        ["'x' is ragged", "instances[1] is a number 4", "instances[0] is a list"],
    ),
    "wrong rank": (
        b'{"instances": [1, 2, 3]}',
        FLOAT_ROWS,
        ["input 'x'", "got shape [3] (rank 1)", "expects [?, 3]", "(rank 2)"],
    ),
    "wrong inner dimension": (
        b'{"instances": [[1, 2, 3, 4]]}',
        FLOAT_ROWS,
        ["input 'x'", "got shape [1, 4]", "dimension 1 is 4, expected 3"],
    ),
    "wrong fixed batch": (
        b'{"inputs": [1, 2]}',
        signature(x=("DT_FLOAT", (3,))),
        ["got shape [2]", "dimension 0 is 2, expected 3"],
    ),
    "string for float": (
        b'{"instances": [[1, "2", 3]]}',
        FLOAT_ROWS,
        ["'x' (DT_FLOAT)", "instances[0][1]", 'a string "2"', "expected a number"],
    ),
    "null for float": (
        b'{"instances": [[1, null, 3]]}',
        FLOAT_ROWS,
        ["instances[0][1] is null", "expected a number"],
    ),
    "boolean for float": (
        b'{"instances": [[true, false, true]]}',
        FLOAT_ROWS,
        ["instances[0][0] is a boolean true"],
    ),
    "too large for float32": (
        b'{"instances": [[1, 2, 1e39]]}',
        FLOAT_ROWS,
        ["instances[0][2] is 1e+39", "too large for DT_FLOAT"],
    ),
    "1.5 for int": (
        b'{"instances": [1, 1.5]}',
        INT32,
        ["'x' (DT_INT32)", "instances[1] is a number 1.5", "expected an integer"],
    ),
    "1.0 for int": (
        b'{"instances": [1.0]}',
        INT32,
        ["instances[0] is a number 1.0", "expected an integer"],
    ),
    "int32 overflow": (
        b'{"instances": [1, 2147483648]}',
        INT32,
        ["instances[1] is 2147483648", "out of range [-2147483648, 2147483647]"],
    ),
    "uint8 negative": (
        b'{"inputs": [-1]}',
        signature(x=("DT_UINT8", None)),
        ["inputs[0] is -1", "out of range [0, 255]"],
    ),
    "boolean for int": (
        b'{"instances": [true]}',
        INT32,
        ["instances[0] is a boolean true", "expected an integer"],
    ),
    "number for bool": (
        b'{"instances": [true, 1]}',
        signature(x=("DT_BOOL", (None,))),
        ["instances[1] is a number 1", "expected true or false"],
    ),
    "number for string": (
        b'{"instances": ["a", 1]}',
        STRINGS,
        ["'x' (DT_STRING)", "instances[1] is a number 1", "expected a string"],
    ),
    "bad base64": (
        b'{"instances": [{"b64": "not base64!"}]}',
        STRINGS,
        ["instances[0]", "invalid base64", '"not base64!"'],
    ),
    "b64 with extra keys": (
        b'{"inputs": [{"b64": "YQ==", "x": 1}]}',
        STRINGS,
        ["inputs[0]", 'exactly one key, "b64"'],
    ),
    "b64 for float": (
        b'{"inputs": {"x": [[{"b64": "YQ=="}, 2, 3]]}}',
        FLOAT_ROWS,
        ['inputs["x"][0][0] is a {"b64": ...} object', "only accepted for DT_STRING"],
    ),
    "unknown input": (
        b'{"inputs": {"x": [[1, 2, 3]], "z": [1]}}',
        FLOAT_ROWS,
        ["'inputs'", "unknown input(s) 'z'", "inputs are 'x'"],
    ),
    "missing input": (b'{"inputs": {"a": [1]}}', TWO_INPUTS, ["'inputs'", "missing input(s) 'b'"]),
    "missing input in a row": (
        b'{"instances": [{"a": 1, "b": 2}, {"a": 3}]}',
        TWO_INPUTS,
        ["instances[1]", "missing input(s) 'b'"],
    ),
    "unknown input in a row": (
        b'{"instances": [{"a": 1, "b": 2, "c": 3}]}',
        TWO_INPUTS,
        ["instances[0]", "unknown input(s) 'c'"],
    ),
    "plain rows for two inputs": (
        b'{"instances": [1, 2]}',
        TWO_INPUTS,
        ["instances[0] is a number 1", "must be an object", "'a', 'b'"],
    ),
    "plain columns for two inputs": (
        b'{"inputs": [1, 2]}',
        TWO_INPUTS,
        ["'inputs' is a list", "2 inputs ('a', 'b')"],
    ),
    "wrong type in a named row": (
        b'{"instances": [{"a": 1, "b": "x"}]}',
        TWO_INPUTS,
        ["input 'b' (DT_FLOAT)", 'instances[0]["b"] is a string "x"'],
    ),
}


@pytest.mark.parametrize(
    ("body", "sig", "fragments"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys()
)
def test_bad_requests_say_what_is_wrong(body: bytes, sig: Signature, fragments: list[str]) -> None:
    """Each bad request is an InvalidArgument whose message names the fault."""
    with pytest.raises(InvalidArgument) as caught:
        decode(body, sig)
    for fragment in fragments:
        assert fragment in caught.value.message
    assert caught.value.status == 400


def test_signature_name_of_reads_only_strings() -> None:
    """signature_name_of gives the name, None when absent, and refuses null."""
    assert signature_name_of({"signature_name": "s"}) == "s"
    assert signature_name_of({}) is None
    with pytest.raises(InvalidArgument, match="must be a string, got null"):
        signature_name_of({"signature_name": None})


# -- the fast path -----------------------------------------------------------------------------

number_texts = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(
        lambda x: encode_json(np.float32(x)).decode()
    ),
    st.sampled_from(["0", "-0", "-0.0", "1e-05", "1E+3", "-2.5e-3", "123.456e7", "1e39", "5e-324"]),
)
separators = st.sampled_from([",", ", ", " ,", ",\n  ", "\t,\r\n"])
paddings = st.sampled_from(["", " ", "\n", "\n    "])


@st.composite
def numeric_bodies(draw: st.DrawFn) -> tuple[bytes, tuple[int, ...]]:
    """A well-formed body holding a rectangular nested list of JSON numbers, variously spaced."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=3))
    leaves = iter(
        draw(st.lists(number_texts, min_size=math.prod(shape), max_size=math.prod(shape)))
    )
    separator, padding = draw(separators), draw(paddings)

    def nest(dims: tuple[int, ...]) -> str:
        if not dims:
            return next(leaves)
        items = separator.join(nest(dims[1:]) for _ in range(dims[0]))
        return f"[{padding}{items}{padding}]"

    member = f'"{draw(st.sampled_from(["instances", "inputs"]))}":{padding}{nest(shape)}'
    name = draw(st.sampled_from([None, "serving_default", "caf\u00e9"]))
    if name is not None:
        named = f'"signature_name": "{name}"'
        member = draw(st.sampled_from([f"{named},{padding}{member}", f"{member}, {named}"]))
    return f"{padding}{{{padding}{member}{padding}}}{padding}".encode(), shape


numeric_dtypes = st.sampled_from(
    ["DT_FLOAT", "DT_DOUBLE", "DT_HALF", "DT_INT32", "DT_INT64", "DT_UINT8"]
)


def general_or_none(body: bytes, sig: Signature) -> PredictRequest | None:
    try:
        return decode_general(body, sig)
    except InvalidArgument:
        return None


@reproducible
@given(numeric_bodies(), numeric_dtypes, st.booleans())
def test_fast_path_matches_general_path(
    body_shape: tuple[bytes, tuple[int, ...]], dtype: str, batched: bool
) -> None:
    """On simple numeric bodies the fast path answers when, and what, the general path does."""
    body, shape = body_shape
    sig = signature(x=(dtype, (None, *shape[1:]) if batched else shape))
    fast, general = fast_decode_numeric(body, sig), general_or_none(body, sig)
    assert (fast is None) == (general is None)
    if fast is not None and general is not None:
        assert_same_request(fast, general)
        assert_same_request(decode(body, sig), general)


MUTATIONS = st.lists(
    st.tuples(
        st.integers(0, 10**6),
        st.sampled_from(list('[],0123456789.eE+- \t\n\f"{}:Nat')),
        st.sampled_from(["insert", "replace", "delete"]),
    ),
    min_size=1,
    max_size=3,
)


def mutate(body: bytes, mutations: list[tuple[int, str, str]]) -> bytes:
    for position, char, how in mutations:
        i = position % (len(body) + 1)
        if how == "insert":
            body = body[:i] + char.encode() + body[i:]
        elif i < len(body):
            body = body[:i] + (char.encode() if how == "replace" else b"") + body[i + 1 :]
    return body


@reproducible
@given(numeric_bodies(), numeric_dtypes, MUTATIONS)
def test_fast_path_never_contradicts_general_path(
    body_shape: tuple[bytes, tuple[int, ...]], dtype: str, mutations: list[tuple[int, str, str]]
) -> None:
    """On damaged bodies, whenever the fast path answers, the general path agrees."""
    body = mutate(body_shape[0], mutations)
    sig = signature(x=(dtype, None))
    fast = fast_decode_numeric(body, sig)
    if fast is not None:
        assert_same_request(fast, decode_general(body, sig))


FLOAT = signature(x=("DT_FLOAT", None))
DECLINED = {
    "NaN token": (b'{"instances": [1.0, NaN]}', FLOAT),
    "Infinity token": (b'{"instances": [Infinity]}', FLOAT),
    "strings": (b'{"instances": ["1.0"]}', FLOAT),
    "b64": (b'{"instances": [{"b64": "YQ=="}]}', STRINGS),
    "named instances": (b'{"instances": [{"x": [1.0]}]}', FLOAT),
    "booleans": (b'{"instances": [true, false]}', signature(x=("DT_BOOL", None))),
    "null": (b'{"instances": [1, null]}', FLOAT),
    "ragged": (b'{"instances": [[1, 2], [3]]}', FLOAT),
    "ragged depth": (b'{"instances": [[1, 2], 3]}', FLOAT),
    "empty": (b'{"instances": []}', FLOAT),
    "empty rows": (b'{"inputs": [[], []]}', FLOAT),
    "scalar": (b'{"inputs": 1.5}', FLOAT),
    "extra key": (b'{"instances": [1], "foo": 1}', FLOAT),
    "both formats": (b'{"instances": [1], "inputs": [1]}', FLOAT),
    "escaped signature_name": (b'{"signature_name": "a\\u0062", "instances": [1]}', FLOAT),
    "signature_name twice": (
        b'{"signature_name": "a", "instances": [1], "signature_name": "b"}',
        FLOAT,
    ),
    "signature_name not a string": (b'{"signature_name": 1, "instances": [1]}', FLOAT),
    "leading plus": (b'{"instances": [+1]}', FLOAT),
    "leading dot": (b'{"instances": [.5]}', FLOAT),
    "trailing dot": (b'{"instances": [1.]}', FLOAT),
    "leading zero": (b'{"instances": [01]}', FLOAT),
    "missing comma": (b'{"instances": [1 2]}', FLOAT),
    "number after ]": (b'{"instances": [[1]2]}', FLOAT),
    "number before [": (b'{"instances": [3[]]}', FLOAT),
    "empty element": (b'{"instances": [1,,2]}', FLOAT),
    "leading comma": (b'{"instances": [,1]}', FLOAT),
    "form feed": (b'{"instances":\f[1]}', FLOAT),
    "trailing garbage": (b'{"instances": [1]} x', FLOAT),
    "too deep": (b'{"inputs": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}", FLOAT),
    "two inputs": (b'{"inputs": [1.0]}', TWO_INPUTS),
    "string input": (b'{"inputs": [1]}', STRINGS),
    "wrong shape": (b'{"instances": [1, 2]}', FLOAT_ROWS),
    "too large for float32": (b'{"instances": [1e39]}', FLOAT),
    "fraction for int": (b'{"instances": [1.5]}', INT32),
    "int32 overflow": (b'{"instances": [2147483648]}', INT32),
}


@pytest.mark.parametrize(("body", "sig"), DECLINED.values(), ids=DECLINED.keys())
def test_fast_path_declines_what_it_does_not_handle(body: bytes, sig: Signature) -> None:
    """Anything but a valid rectangular list of numbers that fits the signature gets None."""
    assert fast_decode_numeric(body, sig) is None


def test_fast_path_reads_pretty_printed_bodies() -> None:
    """Indented JSON with a signature_name is still the fast path's case."""
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    body = json.dumps({"signature_name": "s", "inputs": array.tolist()}, indent=2).encode()
    fast = fast_decode_numeric(body, signature(x=("DT_FLOAT", (2, 3, 4))))
    assert fast is not None
    assert (fast.row_format, fast.signature_name) == (False, "s")
    assert_same_array(fast.inputs["x"], array)


@pytest.mark.parametrize("piece_bytes", [1, 3, 8])
@pytest.mark.parametrize(
    "text",
    [b"1", b" 1 , 2.5 ,-3e2,  4 ", b"0,1,2,3,4,5,6,7,8,9,10,11,12", b"  1,2  ,  3  "],
)
def test_numbers_parsed_in_pieces_are_the_numbers_parsed_whole(
    monkeypatch: pytest.MonkeyPatch, piece_bytes: int, text: bytes
) -> None:
    """Parsed in pieces cut at commas, valid numbers read exactly as one orjson call reads them."""
    monkeypatch.setattr(codec, "NUMBERS_PIECE_BYTES", piece_bytes)
    assert codec._parse_numbers(text) == orjson.loads(b"[" + text + b"]")


@pytest.mark.parametrize("piece_bytes", [1, 3, 8])
@pytest.mark.parametrize("text", [b"1,2,", b"1,2,   ", b"1,,2", b",1,2", b"1, ,2", b"1,2 3"])
def test_numbers_parsed_in_pieces_refuse_what_the_whole_refuses(
    monkeypatch: pytest.MonkeyPatch, piece_bytes: int, text: bytes
) -> None:
    """A stray comma or a missing one is a JSONDecodeError in pieces too, wherever the cuts fall."""
    monkeypatch.setattr(codec, "NUMBERS_PIECE_BYTES", piece_bytes)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(b"[" + text + b"]")
    with pytest.raises(orjson.JSONDecodeError):
        codec._parse_numbers(text)
