"""TF2 SavedModels: the version folder's ``saved_model.pb`` restored with ``tf.saved_model.load``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from service.errors import FailedPrecondition, InvalidArgument
from service.servables.base import ServableBase, output_array, read_labels
from service.servables.protos import signature_def_json, signature_from_def

#: The file a SavedModel load reads; a scan also takes the text form as a SavedModel folder.
SAVED_MODEL_FILE = "saved_model.pb"
SAVED_MODEL_FILES = (SAVED_MODEL_FILE, "saved_model.pbtxt")


@attrs.frozen
class _Restored:
    """What runs calls: the restored object (it keeps the variables alive) and its functions."""

    restored: Any
    functions: Mapping[str, Any]


@attrs.define(eq=False)
class SavedModelServable(ServableBase):
    """A SavedModel version: its signatures as plain data, and the functions that run them."""

    _open: _Restored | None  # None once closed

    @classmethod
    def load(cls, name: str, version: int, path: Path) -> SavedModelServable:
        """Restore ``path``. Blocking: call on the inference thread."""
        saved = saved_model_pb2.SavedModel()
        saved.ParseFromString((path / SAVED_MODEL_FILE).read_bytes())
        defs = {
            key: sig
            for key, sig in saved.meta_graphs[0].signature_def.items()
            if not key.startswith("__")  # __saved_model_init_op is not callable
        }
        restored = tf.saved_model.load(str(path))
        functions = dict(restored.signatures)
        signatures = {key: signature_from_def(key, defs[key]) for key in functions if key in defs}
        if not signatures:
            raise FailedPrecondition(f"{path} has no serving signatures")
        return cls(
            name=name,
            version=version,
            path=path,
            signatures=signatures,
            signature_defs={key: signature_def_json(sig) for key, sig in defs.items()},
            labels=read_labels(path),
            open=_Restored(restored, functions),
        )

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one (batched) call of a signature. Blocking: inference thread only."""
        opened = self._open  # one read: a concurrent close() either came before or after it
        if opened is None:
            raise self.unloaded()
        fn = opened.functions[signature_name]
        try:
            outputs = fn(**{name: tf.constant(value) for name, value in inputs.items()})
        except tf.errors.InvalidArgumentError as e:
            raise InvalidArgument(e.message) from None
        return {name: output_array(tensor.numpy()) for name, tensor in outputs.items()}

    def close(self) -> None:
        """Drop the restored object and its functions, so that unloading frees their memory.

        They hold reference cycles, so their memory returns at the next ``gc.collect``
        (``service.memory.release_memory``). Call once no call is running.
        """
        self._open = None

    @property
    def closed(self) -> bool:
        return self._open is None


def complete(path: Path) -> bool:
    """Whether a folder holding a SavedModel file holds all a load reads: with a
    ``variables/`` folder, the ``variables.index`` that ``tf.saved_model.save`` writes last."""
    variables = path / "variables"
    return not variables.is_dir() or (variables / "variables.index").is_file()
