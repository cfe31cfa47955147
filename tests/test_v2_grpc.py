"""``service.v2_grpc.decode_inputs``: a ModelInfer request's tensors, and every way one is bad."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.grpc import service_pb2

from service.errors import InvalidArgument
from service.v2_grpc import decode_inputs
from wire.v2_tensors import NUMPY_DTYPES, tensor_bytes

NUMERIC = [d for d in NUMPY_DTYPES if d != "BYTES"]


def raw_request(arrays: dict[str, tuple[str, np.ndarray]]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="m")
    for name, (datatype, array) in arrays.items():
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(tensor_bytes(array))
    return request


@given(
    st.sampled_from(NUMERIC).flatmap(
        lambda d: st.tuples(
            st.just(d), hnp.arrays(NUMPY_DTYPES[d], hnp.array_shapes(min_dims=0, max_side=4))
        )
    )
)
def test_any_numeric_array_round_trips_as_raw_contents(case: tuple[str, np.ndarray]) -> None:
    datatype, array = case
    (got,) = decode_inputs(raw_request({"x": (datatype, array)})).values()
    assert got.dtype == array.dtype and got.shape == array.shape
    assert got.tobytes() == array.tobytes()  # bit for bit: NaNs too


def test_bytes_raw_and_typed() -> None:
    text = np.array([b"a", b"", b"\xff"], dtype=object)
    (raw,) = decode_inputs(raw_request({"t": ("BYTES", text)})).values()
    assert raw.tolist() == text.tolist()
    typed = service_pb2.ModelInferRequest(model_name="m")
    tensor = typed.inputs.add(name="t", datatype="BYTES", shape=[3])
    tensor.contents.bytes_contents.extend(text.tolist())
    assert decode_inputs(typed)["t"].tolist() == text.tolist()


@pytest.mark.parametrize(
    ("datatype", "field", "values", "want"),
    [
        ("INT8", "int_contents", [-128, 127], np.array([-128, 127], np.int8)),
        ("UINT64", "uint64_contents", [2**64 - 1, 0], np.array([2**64 - 1, 0], np.uint64)),
        ("BOOL", "bool_contents", [True, False], np.array([True, False])),
        ("FP32", "fp32_contents", [0.5, -1.0], np.array([0.5, -1.0], np.float32)),
        ("FP64", "fp64_contents", [1e300, 0.0], np.array([1e300, 0.0])),
    ],
)
def test_typed_contents(datatype: str, field: str, values: list, want: np.ndarray) -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2])
    getattr(tensor.contents, field).extend(values)
    got = decode_inputs(request)["x"]
    assert got.dtype == want.dtype and got.tolist() == want.tolist()


def bad(request: service_pb2.ModelInferRequest) -> str:
    with pytest.raises(InvalidArgument) as raised:
        decode_inputs(request)
    return raised.value.message


def typed(
    datatype: str, shape: list[int], field: str, values: list
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return request


def test_every_bad_input_is_invalid_argument_saying_why() -> None:
    assert "unknown datatype 'FP8'" in bad(typed("FP8", [1], "fp32_contents", [1.0]))
    assert "non-negative" in bad(typed("FP32", [-1], "fp32_contents", [1.0]))
    assert "at most 32" in bad(typed("FP32", [1] * 33, "fp32_contents", [1.0]))
    assert "has 1 elements, but shape [2] holds 2" in bad(typed("FP32", [2], "fp32_contents", [1]))
    assert "outside INT8's range [-128, 127]" in bad(typed("INT8", [1], "int_contents", [200]))
    assert "has no typed contents: send it raw" in bad(typed("FP16", [1], "fp32_contents", [1]))
    short = raw_request({"x": ("FP32", np.zeros(2, np.float32))})
    short.raw_input_contents[0] = b"\0" * 7
    assert "binary_data_size is 7" in bad(short)
    extra = raw_request({"x": ("FP32", np.zeros(2, np.float32))})
    extra.raw_input_contents.append(b"")
    assert "raw_input_contents has 2 entries for 1 inputs" in bad(extra)
    twice = raw_request({"x": ("FP32", np.zeros(1, np.float32))})
    twice.inputs.add(name="x", datatype="FP32", shape=[1])
    twice.raw_input_contents.append(b"\0" * 4)
    assert "given more than once" in bad(twice)
    bools = raw_request({"x": ("BOOL", np.zeros(1, np.bool_))})
    bools.raw_input_contents[0] = b"\x02"
    assert "each element must be a byte 0 or 1" in bad(bools)
