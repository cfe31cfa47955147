"""TensorFlow's SignatureDef protos as the server's plain ``Signature`` and as metadata JSON."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from tensorflow.core.framework import types_pb2

from service.signature import Signature, TensorInfo


def signature_from_def(key: str, sig: Any) -> Signature:
    """The ``Signature`` a SignatureDef describes: names, DT_* dtypes, static shapes."""

    def info(name: str, tensor: Any) -> TensorInfo:
        shape = tensor.tensor_shape
        dims = (
            None if shape.unknown_rank else tuple(None if d.size < 0 else d.size for d in shape.dim)
        )
        return TensorInfo(
            name=name,
            dtype=types_pb2.DataType.Name(tensor.dtype),
            shape=dims,
            tensor_name=tensor.name,
        )

    return Signature(
        name=key,
        inputs={name: info(name, t) for name, t in sorted(sig.inputs.items())},
        outputs={name: info(name, t) for name, t in sorted(sig.outputs.items())},
        method_name=sig.method_name,
    )


def signature_def_json(sig: Any) -> dict[str, Any]:
    """A SignatureDef as TF Serving's ``/metadata`` writes it: with the fields at their
    default values too (``"unknown_rank": false``, a dimension's ``"name": ""``, an empty
    ``"defaults"``), as its JSON printer's ``always_print_primitive_fields`` does."""
    return json_format.MessageToDict(
        sig, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
