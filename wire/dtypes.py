"""TensorFlow's dtype names, as TF Serving's metadata writes them, and how arrays hold them.

Plain names on both sides of the table, so this module needs nothing but the standard
library; ``np.dtype(NUMPY_NAMES[name])`` gives the array dtype. Strings are numpy object
arrays of ``bytes``, as TensorFlow holds them.
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
