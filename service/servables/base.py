"""What the server needs of a loaded model version, and the part every kind shares.

Every method that touches TensorFlow blocks and must run on the version's own inference
thread (``service.repository`` sees to that): loading, warming up, running and closing.
After ``close`` a servable keeps only plain data (signatures, signature defs, labels) for
status and metadata; ``run`` then raises FailedPrecondition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import attrs
import numpy as np

from service.errors import FailedPrecondition
from service.signature import Signature, find_signature

#: Where a version's class names are read from: line N is class N.
LABEL_FILES = ("labels.txt", "assets/labels.txt")


class Servable(Protocol):
    """A loaded model version, as the repository, batching queues and routes use it."""

    name: str
    version: int
    path: Path
    signatures: Mapping[str, Signature]
    signature_defs: Mapping[str, Any]  # the SignatureDef protos as TF Serving's metadata JSON
    labels: tuple[str, ...] | None
    #: The kind of model, as the Open Inference Protocol's model metadata names it.
    platform: ClassVar[str]

    @property
    def closed(self) -> bool: ...

    def signature(self, name: str | None) -> Signature:
        """The named signature (the default one for None), or InvalidArgument."""
        ...

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One (batched) call of a signature. Blocking: inference thread only."""
        ...

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Run every batchable signature once per batch size, so no request pays a first call."""
        ...

    def close(self) -> None:
        """Drop every TensorFlow object, so unloading frees the memory. Idempotent."""
        ...


@attrs.define(eq=False)
class ServableBase:
    """The plain data of a loaded version and what follows from it alone; a kind adds
    ``run``, ``close`` and ``closed`` over its own TensorFlow objects."""

    platform: ClassVar[str] = "tensorflow_savedmodel"

    name: str
    version: int
    path: Path
    signatures: Mapping[str, Signature]
    signature_defs: Mapping[str, Any]
    labels: tuple[str, ...] | None

    def signature(self, name: str | None) -> Signature:
        return find_signature(self.signatures, name, self.name, self.version)

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
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

    def unloaded(self) -> FailedPrecondition:
        """The error of a call to a closed version."""
        return FailedPrecondition(
            f"model {self.name!r} version {self.version} is unloaded: it runs no more calls"
        )


def output_array(value: Any) -> np.ndarray:
    """A model's output as the rest of the server holds it: strings as an object array of
    ``bytes`` (TensorFlow hands a scalar string back as bare ``bytes``, which numpy would
    make a fixed-width ``S`` array), everything else as the numpy array it is."""
    if isinstance(value, bytes):
        array = np.empty((), dtype=object)
        array[()] = value
        return array
    return np.asarray(value)


def read_labels(path: Path, names: Sequence[str] = LABEL_FILES) -> tuple[str, ...] | None:
    """The class names of the first of ``names`` found in ``path``, or None."""
    for name in names:
        file = path / name
        if file.is_file():
            # Line N is class N: blank lines inside count, only trailing ones are dropped.
            return tuple(line.strip() for line in file.read_text().rstrip().splitlines())
    return None
