"""Tensors as the Open Inference Protocol's binary data carries them (Triton's binary extension).

Written once for both sides: the server reads request inputs and writes outputs with these
functions, the client writes inputs and reads outputs. A body is a JSON object followed by
raw tensor bytes; ``Inference-Header-Content-Length`` gives the JSON's length, and every
tensor sent as bytes carries ``parameters.binary_data_size``. The layout: little-endian,
row-major, BOOL one byte (0 or 1) per element, BYTES per element a 4-byte little-endian length
then the bytes.

The one module of ``wire`` that needs numpy (both sides hold tensors as numpy arrays, and
numpy is a dependency of both); nothing else outside the standard library.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

from wire.dtypes import NUMPY_NAMES, V2_DATATYPES

__all__ = [
    "BINARY_DATA_SIZE",
    "HEADER_LENGTH",
    "NUMPY_DTYPES",
    "TensorDataError",
    "array_from_bytes",
    "datatype_of",
    "tensor_bytes",
]

#: The header giving the length of the JSON at the start of a body with binary data.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: The tensor parameter giving the length of its bytes after the JSON.
BINARY_DATA_SIZE = "binary_data_size"

#: v2 datatype name -> numpy dtype (BYTES: object arrays of ``bytes``).
NUMPY_DTYPES: Mapping[str, np.dtype] = MappingProxyType(
    {v2: np.dtype(NUMPY_NAMES[dt]) for v2, dt in V2_DATATYPES.items()}
)
_V2_OF_NUMPY: Mapping[np.dtype, str] = MappingProxyType(
    {dtype: v2 for v2, dtype in NUMPY_DTYPES.items()}
)
_LENGTH = struct.Struct("<I")
_LITTLE = sys.byteorder == "little"


class TensorDataError(ValueError):
    """Tensor bytes that do not fit their datatype and shape; the message says how."""


def datatype_of(dtype: np.dtype) -> str | None:
    """The v2 datatype of arrays of ``dtype`` (either byte order), or None if it has none."""
    return _V2_OF_NUMPY.get(dtype.newbyteorder("="))


def tensor_bytes(array: np.ndarray) -> bytes:
    """A tensor in the binary extension's layout: little-endian, row-major, BYTES elements
    each as a 4-byte little-endian length and the bytes (``str`` elements as UTF-8)."""
    if array.dtype.kind == "O":
        parts = []
        for value in array.ravel().tolist():
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            parts += [_LENGTH.pack(len(data)), data]
        return b"".join(parts)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(little).tobytes()


def array_from_bytes(
    binary: memoryview, offset: int, size: int, datatype: str, shape: tuple[int, ...], where: str
) -> np.ndarray:
    """A tensor read from ``size`` bytes at ``offset`` of ``binary``.

    Numeric tensors are ``np.frombuffer`` views of ``binary`` (no copy; a copy only when the
    bytes do not start at a multiple of the item size in memory, so the array is aligned),
    read-only when ``binary`` is. ``TensorDataError`` (its message begins with ``where``)
    when the bytes do not fit the datatype and shape.
    """
    count = math.prod(shape)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind == "O":
        return _bytes_elements(binary[offset : offset + size], count, where).reshape(shape)
    if size != count * dtype.itemsize:
        raise TensorDataError(
            f"{where}: binary_data_size is {size}, but shape {list(shape)} of {datatype} takes "
            f"{count} x {dtype.itemsize} = {count * dtype.itemsize} bytes"
        )
    if dtype.kind == "b":
        raw = np.frombuffer(binary, np.uint8, count, offset)
        if raw.size and raw.max() > 1:
            raise TensorDataError(f"{where} (BOOL): each element must be a byte 0 or 1")
        return raw.view(np.bool_).reshape(shape)
    array = np.frombuffer(binary, dtype.newbyteorder("<"), count, offset)
    if not _LITTLE:
        array = array.astype(dtype)
    elif not array.flags.aligned:
        array = array.copy()  # a copy only here, so the model gets an aligned array
    return array.reshape(shape)


def _bytes_elements(data: memoryview, count: int, where: str) -> np.ndarray:
    """BYTES elements, each a 4-byte little-endian length and that many bytes."""
    elements = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(data):
            raise TensorDataError(
                f"{where} (BYTES): its {len(data)} bytes end before element {i} of {count}"
            )
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise TensorDataError(
                f"{where} (BYTES): element {i} says {length} bytes, but only "
                f"{len(data) - offset} of its binary_data_size are left"
            )
        elements[i] = bytes(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise TensorDataError(
            f"{where} (BYTES): its shape holds {count} elements, which take {offset} bytes, "
            f"but its binary_data_size is {len(data)}"
        )
    return elements
