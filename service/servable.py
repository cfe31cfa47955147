"""One loaded model version, and the only module of the request path that imports TensorFlow.

Every method here blocks and must run on the servable's own inference thread
(``service.repository`` sees to that): loading, warming up, running and closing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.signature import Signature, TensorInfo

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of logs

import tensorflow as tf  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402

DEFAULT_SIGNATURE = "serving_default"
LABEL_FILES = ("labels.txt", "assets/labels.txt")


@attrs.define(eq=False)
class Servable:
    """A TF2 SavedModel version: its signatures as plain data, and the functions that run them."""

    name: str
    version: int
    path: Path
    signatures: Mapping[str, Signature]
    signature_defs: Mapping[str, Any]  # the SignatureDef protos as TF Serving's metadata JSON
    labels: tuple[str, ...] | None
    _functions: Mapping[str, Any]
    _loaded: Any  # keeps the restored object (and its variables) alive; None once closed

    @classmethod
    def load(cls, name: str, version: int, path: Path) -> Servable:
        """Load ``path``: a SavedModel folder, or a TF1 frozen graph (``service.frozen_graph``).

        Blocking: call on the inference thread.
        """
        pb = path / "saved_model.pb"
        if not pb.is_file():
            from service.frozen_graph import GRAPH_FILES, FrozenGraphServable, has_frozen_graph

            if has_frozen_graph(path):
                return FrozenGraphServable.load(name, version, path)
            raise FailedPrecondition(
                f"{path} holds no saved_model.pb (nor a frozen graph: {', '.join(GRAPH_FILES)})"
            )
        saved = saved_model_pb2.SavedModel()
        saved.ParseFromString(pb.read_bytes())
        defs = {
            key: sig
            for key, sig in saved.meta_graphs[0].signature_def.items()
            if not key.startswith("__")  # __saved_model_init_op is not callable
        }
        loaded = tf.saved_model.load(str(path))
        functions = dict(loaded.signatures)
        signatures = {key: _signature(key, defs[key]) for key in functions if key in defs}
        if not signatures:
            raise FailedPrecondition(f"{path} has no serving signatures")
        return cls(
            name=name,
            version=version,
            path=path,
            signatures=signatures,
            signature_defs={
                key: json_format.MessageToDict(sig, preserving_proto_field_name=True)
                for key, sig in defs.items()
            },
            labels=_read_labels(path),
            functions=functions,
            loaded=loaded,
        )

    def signature(self, name: str | None) -> Signature:
        key = name or DEFAULT_SIGNATURE
        try:
            return self.signatures[key]
        except KeyError:
            known = ", ".join(sorted(self.signatures))
            raise InvalidArgument(
                f"serving signature name: {key!r} not found in signature def; "
                f"model {self.name!r} version {self.version} has: {known}"
            ) from None

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one (batched) call of a signature. Blocking: inference thread only."""
        fn = self._open_functions()[signature_name]
        try:
            outputs = fn(**{name: tf.constant(value) for name, value in inputs.items()})
        except tf.errors.InvalidArgumentError as e:
            raise InvalidArgument(e.message) from None
        return {name: tensor.numpy() for name, tensor in outputs.items()}

    def close(self) -> None:
        """Drop every TensorFlow object of this version, so that unloading it frees its memory.

        Whoever still holds the servable afterwards (a batching queue, a request in flight)
        then keeps only plain data: the signatures, signature defs and labels stay readable,
        ``run`` raises FailedPrecondition. The restored object and its functions hold
        reference cycles, so their memory returns at the next ``gc.collect`` (see
        ``service.memory.release_memory``). Idempotent. Call once no call is running.
        """
        self._loaded = None  # first: run() checks it after reading _functions
        self._functions = {}

    @property
    def closed(self) -> bool:
        return self._loaded is None

    def _open_functions(self) -> Mapping[str, Any]:
        """The callables to run, or FailedPrecondition once closed."""
        functions = self._functions  # read before the check, so a concurrent close() is seen
        if self._loaded is None:
            raise FailedPrecondition(
                f"model {self.name!r} version {self.version} is unloaded: it runs no more calls"
            )
        return functions

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Run every batchable signature once per batch size, so no request pays the first call."""
        for key, signature in self.signatures.items():
            if not signature.batchable or any(
                t.dtype == "DT_STRING" for t in signature.inputs.values()
            ):
                continue
            for size in batch_sizes or (1,):
                inputs = {
                    name: np.zeros((size, *(d or 1 for d in t.shape[1:])), t.np_dtype)  # type: ignore[index]
                    for name, t in signature.inputs.items()
                }
                self.run(key, inputs)


def _signature(key: str, sig: Any) -> Signature:
    def info(name: str, tensor: Any) -> TensorInfo:
        from tensorflow.core.framework import types_pb2

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


def _read_labels(path: Path, names: Sequence[str] = LABEL_FILES) -> tuple[str, ...] | None:
    for name in names:
        file = path / name
        if file.is_file():
            # Line N is class N: blank lines inside count, only trailing ones are dropped.
            return tuple(line.strip() for line in file.read_text().rstrip().splitlines())
    return None


def find_versions(base_path: Path) -> list[int]:
    """Numeric version folders under a model's base path, ascending (TF Serving's layout)."""
    if not base_path.is_dir():
        raise NotFound(f"model base path {base_path} does not exist")
    return sorted(int(p.name) for p in base_path.iterdir() if p.is_dir() and p.name.isdigit())
