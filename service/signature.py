"""What a model signature looks like to the rest of the server: names, dtypes, shapes.

Built from TensorFlow objects in ``service.servable``; everything else (codec,
batching, HTTP) reads these plain frozen objects and never imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import numpy as np

#: TensorFlow's DataType enum names (as TF Serving's metadata writes them) and the
#: numpy dtype a tensor of that type is held in. Strings are numpy object arrays of bytes.
DTYPES: Mapping[str, np.dtype] = {
    "DT_FLOAT": np.dtype(np.float32),
    "DT_DOUBLE": np.dtype(np.float64),
    "DT_HALF": np.dtype(np.float16),
    "DT_INT8": np.dtype(np.int8),
    "DT_INT16": np.dtype(np.int16),
    "DT_INT32": np.dtype(np.int32),
    "DT_INT64": np.dtype(np.int64),
    "DT_UINT8": np.dtype(np.uint8),
    "DT_UINT16": np.dtype(np.uint16),
    "DT_UINT32": np.dtype(np.uint32),
    "DT_UINT64": np.dtype(np.uint64),
    "DT_BOOL": np.dtype(np.bool_),
    "DT_STRING": np.dtype(object),
}

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
