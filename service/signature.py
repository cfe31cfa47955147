"""What a model signature looks like to the rest of the server: names, dtypes, shapes.

Built from TensorFlow objects in ``service.servables``; everything else (codec,
batching, HTTP) reads these plain frozen objects and never imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from types import MappingProxyType

import attrs
import numpy as np

from service.errors import InvalidArgument
from wire.dtypes import DEFAULT_SIGNATURE, NUMPY_NAMES

#: TensorFlow's DataType enum names (as TF Serving's metadata writes them) and the numpy
#: dtype a tensor of that type is held in (``wire.dtypes``, the table the client reads too).
DTYPES: Mapping[str, np.dtype] = MappingProxyType(
    {name: np.dtype(numpy_name) for name, numpy_name in NUMPY_NAMES.items()}
)

Shape = tuple[int | None, ...] | None
"""A static shape: ``None`` for an unknown rank, ``None`` entries for unknown dimensions."""


@attrs.frozen
class TensorInfo:
    """One named input or output of a signature."""

    name: str  # the key clients use, e.g. "image"
    dtype: str  # a key of DTYPES, e.g. "DT_FLOAT"
    shape: Shape
    tensor_name: str = ""  # the graph tensor, e.g. "serving_default_image:0"

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def batched(self) -> bool:
        """Whether the first dimension is a free batch dimension."""
        return self.shape is not None and len(self.shape) > 0 and self.shape[0] is None


@attrs.frozen
class Signature:
    """A callable entry point of a servable, as TF Serving's SignatureDef describes it."""

    name: str
    inputs: Mapping[str, TensorInfo]
    outputs: Mapping[str, TensorInfo]
    method_name: str = "tensorflow/serving/predict"

    @property
    def batchable(self) -> bool:
        """Whether requests can be merged along the first axis of every input and output."""
        return all(t.batched for t in (*self.inputs.values(), *self.outputs.values()))


def check_inputs(
    signature: Signature,
    inputs: Mapping[str, np.ndarray],
    dtype_names: Mapping[str, str] | None = None,
) -> None:
    """InvalidArgument unless ``inputs`` are exactly the signature's inputs, each of its
    dtype and of a shape its static shape allows (what a front door that takes typed tensors,
    gRPC or the Open Inference Protocol, cannot know before the model is looked up).

    A wrong dtype is named as the front door's protocol names it: ``dtype_names`` maps
    ``DT_*`` names to the protocol's (the Open Inference Protocol's ``FP32``, …); without
    it, TensorFlow's ``DT_*`` names, as TF Serving writes them.
    """
    check_names(inputs, list(signature.inputs), "inputs")
    for name, array in inputs.items():
        info = signature.inputs[name]
        if array.dtype != info.np_dtype:
            given = _DT_NAMES.get(array.dtype, str(array.dtype))
            if dtype_names is not None:
                expected, given = (
                    dtype_names.get(info.dtype, info.dtype),
                    dtype_names.get(given, given),
                )
            else:
                expected = info.dtype
            raise InvalidArgument(f"input {name!r}: expects {expected} but {given} was provided")
        check_shape(array, info)


_DT_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def check_names(given: Collection[str], names: list[str], where: str) -> None:
    """InvalidArgument naming the missing and unknown inputs, if any."""
    missing = [name for name in names if name not in given]
    unknown = [name for name in given if name not in names]
    problems = []
    if missing:
        problems.append(f"missing input(s) {quoted(missing)}")
    if unknown:
        problems.append(f"unknown input(s) {quoted(unknown)}")
    if problems:
        raise InvalidArgument(
            f"{where}: {'; '.join(problems)} (the signature's inputs are {quoted(names)})"
        )


def check_shape(array: np.ndarray, info: TensorInfo) -> None:
    """Compare against the signature's static shape: its rank and every known dimension."""
    expected = info.shape
    if expected is None:
        return
    got = f"got shape {shape_text(array.shape)}"
    want = f"the signature expects {shape_text(expected)} (? is any size)"
    if array.ndim != len(expected):
        raise InvalidArgument(
            f"input {info.name!r}: {got} (rank {array.ndim}), but {want} (rank {len(expected)})"
        )
    for axis, (size, expected_size) in enumerate(zip(array.shape, expected, strict=True)):
        if expected_size is not None and size != expected_size:
            raise InvalidArgument(
                f"input {info.name!r}: {got}, but {want}: "
                f"dimension {axis} is {size}, expected {expected_size}"
            )


def quoted(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


def shape_text(shape: Shape | tuple[int, ...]) -> str:
    assert shape is not None
    return "[" + ", ".join("?" if size is None else str(size) for size in shape) + "]"


def find_signature(
    signatures: Mapping[str, Signature], name: str | None, model: str, version: int
) -> Signature:
    """The named signature (the default one for None) of a model version, or InvalidArgument."""
    key = name or DEFAULT_SIGNATURE
    try:
        return signatures[key]
    except KeyError:
        known = ", ".join(sorted(signatures))
        raise InvalidArgument(
            f"serving signature name: {key!r} not found in signature def; "
            f"model {model!r} version {version} has: {known}"
        ) from None
