"""What a model signature looks like to the rest of the server: names, dtypes, shapes.

Built from TensorFlow objects in ``service.servables``; everything else (codec,
batching, HTTP) reads these plain frozen objects and never imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import attrs
import numpy as np

from wire.dtypes import NUMPY_NAMES

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
