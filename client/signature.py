"""A model's signatures as its ``/metadata`` describes them: names, dtypes, shapes.

The client reads TF Serving's metadata JSON (``metadata.signature_def.signature_def``,
each tensor with a ``DT_*`` dtype and a ``tensor_shape``) so that inputs are sent and
outputs come back with the dtypes the model declares: float32 stays float32. The dtype
table is the server's own (``wire.dtypes``, shared by both sides).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from attrs import field, frozen

from wire.dtypes import DEFAULT_SIGNATURE, NUMPY_NAMES

__all__ = ["DEFAULT_SIGNATURE", "DTYPES", "ModelMetadata", "SignatureSpec", "TensorSpec"]

#: ``DT_*`` name -> the numpy dtype the client sends and returns tensors of that type in.
DTYPES: Mapping[str, np.dtype] = MappingProxyType(
    {name: np.dtype(numpy_name) for name, numpy_name in NUMPY_NAMES.items()}
)


def _frozen(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


@frozen
class TensorSpec:
    """One input or output: its key, numpy dtype (``None`` if unknown) and static shape."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | None, ...] | None  # None: unknown rank; None entries: free dimensions


@frozen
class SignatureSpec:
    name: str
    inputs: Mapping[str, TensorSpec] = field(converter=_frozen)
    outputs: Mapping[str, TensorSpec] = field(converter=_frozen)


@frozen
class ModelMetadata:
    """A model version's signatures, from its metadata document."""

    name: str
    version: int | None
    signatures: Mapping[str, SignatureSpec] = field(converter=_frozen)

    def signature(self, name: str | None) -> SignatureSpec | None:
        """The named signature (the default one for ``None``), or None if the model lacks it."""
        return self.signatures.get(name or DEFAULT_SIGNATURE)

    @classmethod
    def parse(cls, doc: Any) -> ModelMetadata:
        """Read ``GET /v1/models/<name>/metadata``; ``ValueError`` if it is not that document."""
        try:
            spec = doc["model_spec"]
            defs = doc["metadata"]["signature_def"]["signature_def"]
            if not isinstance(defs, dict):
                raise TypeError("signature_def is not an object")
            version = spec.get("version")
            return cls(
                name=str(spec.get("name", "")),
                version=int(version) if version not in (None, "") else None,
                signatures={key: _signature(key, sig) for key, sig in defs.items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not a TF Serving metadata document: {e!r}") from None


def _signature(key: str, sig: Any) -> SignatureSpec:
    return SignatureSpec(
        name=key,
        inputs={name: _tensor(name, info) for name, info in (sig.get("inputs") or {}).items()},
        outputs={name: _tensor(name, info) for name, info in (sig.get("outputs") or {}).items()},
    )


def _tensor(name: str, info: Any) -> TensorSpec:
    shape_doc = info.get("tensor_shape") or {}
    shape: tuple[int | None, ...] | None
    if shape_doc.get("unknown_rank"):
        shape = None
    else:
        sizes = (int(dim.get("size", -1)) for dim in shape_doc.get("dim") or [])
        shape = tuple(None if size < 0 else size for size in sizes)
    return TensorSpec(name, DTYPES.get(str(info.get("dtype"))), shape)


def named_inputs(inputs: Any, signature: SignatureSpec | None) -> Mapping[str, Any]:
    """``inputs`` as a mapping of input name to value: a mapping as it is, one bare value as
    the signature's only input; TypeError when a bare value cannot be named."""
    if isinstance(inputs, Mapping):
        return inputs
    specs = signature.inputs if signature is not None else {}
    if len(specs) != 1:
        raise TypeError(
            "give the inputs as a dict of named arrays: the signature has "
            f"{len(specs) or 'unknown'} inputs"
        )
    return {next(iter(specs)): inputs}
