"""TensorFlow's ``TensorProto`` and numpy arrays, both ways, the way TensorFlow reads them.

A request's tensor may come in ``tensor_content`` (the raw little-endian bytes, what
``tf.make_tensor_proto`` writes for numbers) or in the typed repeated field of its dtype
(``float_val``, ``int_val``, ``string_val``, …, what other clients write). ``to_array``
reads both: ``tensor_content`` becomes an array over the proto's own bytes with
``np.frombuffer`` (no copy), a typed field is copied once. As in TensorFlow's
``Tensor::FromProto``, a typed field with fewer values than the shape holds is filled up
with its last value (a single value fills the whole tensor), and an empty one with zeros.
``DT_HALF`` values travel in ``half_val`` as their 16-bit patterns. An 8- or 16-bit integer
in ``int_val`` outside its dtype's range is refused (TensorFlow would wrap it silently).

``to_proto`` writes numbers as ``tensor_content`` and strings as ``string_val``, which
``tf.make_ndarray`` and TF Serving's own clients read. Everything wrong with a proto is an
``InvalidArgument`` naming the tensor, never an exception of numpy's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from service.errors import InvalidArgument
from service.signature import DTYPES

#: The typed field each dtype's values travel in when not in ``tensor_content``.
_FIELDS = {
    "DT_FLOAT": "float_val",
    "DT_DOUBLE": "double_val",
    "DT_HALF": "half_val",
    "DT_INT8": "int_val",
    "DT_INT16": "int_val",
    "DT_INT32": "int_val",
    "DT_UINT8": "int_val",
    "DT_UINT16": "int_val",
    "DT_INT64": "int64_val",
    "DT_UINT32": "uint32_val",
    "DT_UINT64": "uint64_val",
    "DT_BOOL": "bool_val",
    "DT_STRING": "string_val",
}
_NARROW = {"DT_INT8", "DT_INT16", "DT_UINT8", "DT_UINT16"}  # carried in int_val (int32)
_BY_NUMPY = {dtype: name for name, dtype in DTYPES.items()}
#: The most elements a tensor may claim: more than any body could carry (the message size is
#: bounded), so a shape past it is a lie, refused before numpy tries to allocate it.
MAX_ELEMENTS = 2**40


#: The ``DT_*`` name of each DataType number the server can hold.
_SUPPORTED = {types_pb2.DataType.Value(name): name for name in _FIELDS}


def dtype_name(proto: tensor_pb2.TensorProto) -> str:
    """The proto's ``DT_*`` name; InvalidArgument for one the server cannot hold."""
    name = _SUPPORTED.get(proto.dtype)
    if name is None:
        name = (
            types_pb2.DataType.Name(proto.dtype)
            if proto.dtype in types_pb2.DataType.values()
            else ""
        )
        shown = name or str(proto.dtype)
        raise InvalidArgument(
            f"tensor dtype {shown} is not supported; use one of {', '.join(sorted(_FIELDS))}"
        )
    return name


def to_array(proto: tensor_pb2.TensorProto, name: str) -> np.ndarray:
    """The array ``proto`` holds (input ``name`` is named in errors)."""
    dtype_key = dtype_name(proto)
    dtype = DTYPES[dtype_key]
    if proto.tensor_shape.unknown_rank:
        raise InvalidArgument(f"input {name!r}: the tensor's shape has an unknown rank")
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    if any(size < 0 for size in shape):
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} has a negative dimension")
    count = 1
    for size in shape:
        count *= size
        if count > MAX_ELEMENTS:
            raise InvalidArgument(f"input {name!r}: shape {list(shape)} is too large")
    if proto.tensor_content and dtype_key != "DT_STRING":
        content = proto.tensor_content
        if len(content) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input {name!r}: tensor_content has {len(content)} bytes, but shape "
                f"{list(shape)} of {dtype_key} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(content, dtype=dtype.newbyteorder("<")).reshape(shape)
    values: Sequence[object] = getattr(proto, _FIELDS[dtype_key])
    if len(values) > count:
        raise InvalidArgument(
            f"input {name!r}: {len(values)} values in {_FIELDS[dtype_key]}, but shape "
            f"{list(shape)} holds {count}"
        )
    if dtype_key == "DT_HALF":
        typed = np.array(values, dtype=np.uint16).view(np.float16)
    elif dtype_key == "DT_STRING":
        typed = np.empty(len(values), dtype=object)
        typed[:] = list(values)  # type: ignore[assignment]
    elif dtype_key in _NARROW:
        # int_val holds int32s; TensorFlow would wrap 300 into an int8's 44 silently.
        wide = np.array(values, dtype=np.int64)
        limits = np.iinfo(dtype)
        if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
            raise InvalidArgument(
                f"input {name!r}: a value of int_val does not fit in {dtype_key} "
                f"({limits.min}..{limits.max})"
            )
        typed = wide.astype(dtype)
    else:
        typed = np.array(values, dtype=dtype)
    if len(typed) == count:
        return typed.reshape(shape)
    filled = np.full(count, b"" if dtype_key == "DT_STRING" else 0, dtype=dtype)
    if len(typed):
        filled[: len(typed)] = typed
        filled[len(typed) :] = typed[-1]
    return filled.reshape(shape)


def to_proto(array: np.ndarray, name: str = "") -> tensor_pb2.TensorProto:
    """``array`` as a TensorProto: numbers in ``tensor_content``, strings in ``string_val``."""
    array = np.asarray(array)
    if array.dtype.kind in "US":  # text the model made as numpy str: TF strings are bytes
        array = np.char.encode(array.astype(str), "utf-8").astype(object)
    key = _BY_NUMPY.get(array.dtype)
    if key is None:
        raise InvalidArgument(f"output {name!r} has dtype {array.dtype}, which has no TensorProto")
    proto = tensor_pb2.TensorProto(
        dtype=types_pb2.DataType.Value(key),
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in array.shape]
        ),
    )
    if key == "DT_STRING":
        proto.string_val.extend(
            v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)
        )
    else:
        proto.tensor_content = np.ascontiguousarray(
            array, dtype=array.dtype.newbyteorder("<")
        ).tobytes()
    return proto
