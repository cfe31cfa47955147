"""TensorFlow's dtype names, as TF Serving's metadata writes them, and how arrays hold them.

Plain names on both sides of the table, so this module needs nothing but the standard
library; ``np.dtype(NUMPY_NAMES[name])`` gives the array dtype. Strings are numpy object
arrays of ``bytes``, as TensorFlow holds them. ``V2_DATATYPES`` maps the Open Inference
Protocol's (KServe v2, Triton) datatype names onto the same ``DT_*`` names.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

#: ``DT_*`` name -> numpy dtype name.
NUMPY_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "DT_FLOAT": "float32",
        "DT_DOUBLE": "float64",
        "DT_HALF": "float16",
        "DT_INT8": "int8",
        "DT_INT16": "int16",
        "DT_INT32": "int32",
        "DT_INT64": "int64",
        "DT_UINT8": "uint8",
        "DT_UINT16": "uint16",
        "DT_UINT32": "uint32",
        "DT_UINT64": "uint64",
        "DT_BOOL": "bool",
        "DT_STRING": "object",
    }
)

#: The signature a request names when it names none (TF Serving's default).
DEFAULT_SIGNATURE = "serving_default"

#: The Open Inference Protocol's (KServe v2) datatype names -> ``DT_*`` name. Every v2
#: datatype that TensorFlow has; BF16 is left out (numpy has no bfloat16). BYTES tensors
#: are numpy object arrays of ``bytes``, as DT_STRING ones.
V2_DATATYPES: Mapping[str, str] = MappingProxyType(
    {
        "BOOL": "DT_BOOL",
        "UINT8": "DT_UINT8",
        "UINT16": "DT_UINT16",
        "UINT32": "DT_UINT32",
        "UINT64": "DT_UINT64",
        "INT8": "DT_INT8",
        "INT16": "DT_INT16",
        "INT32": "DT_INT32",
        "INT64": "DT_INT64",
        "FP16": "DT_HALF",
        "FP32": "DT_FLOAT",
        "FP64": "DT_DOUBLE",
        "BYTES": "DT_STRING",
    }
)

#: ``DT_*`` name -> the v2 datatype name (the inverse of ``V2_DATATYPES``).
V2_NAMES: Mapping[str, str] = MappingProxyType({dt: v2 for v2, dt in V2_DATATYPES.items()})
