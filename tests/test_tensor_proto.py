"""TensorProto <-> numpy (service.tensor_proto), checked against TensorFlow's own converters."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from service.errors import InvalidArgument
from service.tensor_proto import to_array, to_proto

NUMERIC = [
    np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64, np.bool_,
]  # fmt: skip
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from([*NUMERIC, object]))
    shape = draw(shapes)
    if dtype is object:
        values = draw(st.lists(st.binary(max_size=8), min_size=1, max_size=1)) * int(np.prod(shape))
        array = np.empty(int(np.prod(shape)), dtype=object)
        array[:] = [draw(st.binary(max_size=8)) for _ in values]
        return array.reshape(shape)
    return draw(hnp.arrays(dtype, shape))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        return a.tobytes() == b.tobytes()  # exact, NaN payloads and -0.0 included
    return a.tolist() == b.tolist()


@given(arrays())
def test_what_tensorflow_writes_reads_back_exactly(array: np.ndarray) -> None:
    """tf.make_tensor_proto (tensor_content for numbers) -> to_array is the same array."""
    assert same(to_array(tf.make_tensor_proto(array), "x"), array)


@given(arrays())
def test_what_we_write_tensorflow_reads_back_exactly(array: np.ndarray) -> None:
    """to_proto -> tf.make_ndarray is the same array, and so is to_array."""
    proto = to_proto(array, "y")
    assert same(tf.make_ndarray(proto), array)
    assert same(to_array(proto, "y"), array)


def shaped(dtype: int, dims: list[int], **fields: object) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(
        dtype=dtype,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims]
        ),
        **fields,
    )


def test_typed_fields_fill_up_with_their_last_value_and_empty_ones_with_zeros() -> None:
    """As TensorFlow's Tensor::FromProto: [1, 2] for shape [4] is [1, 2, 2, 2]."""
    assert to_array(shaped(types_pb2.DT_INT32, [4], int_val=[1, 2]), "x").tolist() == [1, 2, 2, 2]
    assert to_array(shaped(types_pb2.DT_FLOAT, [2, 2]), "x").tolist() == [[0, 0], [0, 0]]
    strings = to_array(shaped(types_pb2.DT_STRING, [3], string_val=[b"a"]), "x")
    assert strings.tolist() == [b"a", b"a", b"a"]
    half = np.array([1.5, -2.0], np.float16)
    got = to_array(shaped(types_pb2.DT_HALF, [2], half_val=half.view(np.uint16).tolist()), "x")
    assert got.dtype == np.float16 and got.tolist() == [1.5, -2.0]


@pytest.mark.parametrize(
    ("proto", "words"),
    [
        (shaped(types_pb2.DT_FLOAT, [2], float_val=[1, 2, 3]), "3 values in float_val"),
        (shaped(types_pb2.DT_FLOAT, [2], tensor_content=b"\0" * 7), "tensor_content has 7 bytes"),
        (shaped(types_pb2.DT_FLOAT, [-1]), "negative dimension"),
        (shaped(types_pb2.DT_FLOAT, [2**30, 2**30, 2**30]), "too large"),
        (shaped(types_pb2.DT_COMPLEX64, [1]), "DT_COMPLEX64 is not supported"),
        (shaped(types_pb2.DT_INT8, [1], int_val=[300]), "does not fit in DT_INT8"),
        (tensor_pb2.TensorProto(dtype=999), "tensor dtype 999 is not supported"),
        (
            tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT,
                tensor_shape=tensor_shape_pb2.TensorShapeProto(unknown_rank=True),
            ),
            "unknown rank",
        ),
    ],
)
def test_a_malformed_proto_is_invalid_argument_naming_the_input(
    proto: tensor_pb2.TensorProto, words: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        to_array(proto, "x")
    assert words in caught.value.message
    assert "'x'" in caught.value.message or "not supported" in caught.value.message
