"""Which kind of model a version folder holds, and loading it.

The kinds are tried in order; the first whose files the folder holds decides: a folder with
both a ``saved_model.pb`` and a frozen graph is a SavedModel. A new kind is a module with a
``load(name, version, path)`` and an entry in ``KINDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs

from service.errors import FailedPrecondition
from service.servables import frozen_graph, saved_model
from service.servables.base import Servable


@attrs.frozen
class Kind:
    """One kind of model folder."""

    name: str
    load_files: tuple[str, ...]  # a load reads the first of these the folder holds
    scan_files: tuple[str, ...]  # any of these marks a folder of this kind to a scan
    complete: Callable[[Path], bool]  # given a scan file: whether the rest is there too
    load: Callable[[str, int, Path], Servable]

    def loads(self, path: Path) -> bool:
        return any((path / name).is_file() for name in self.load_files)

    def marks(self, path: Path) -> bool:
        return any((path / name).is_file() for name in self.scan_files)


SAVED_MODEL = Kind(
    name="SavedModel",
    load_files=(saved_model.SAVED_MODEL_FILE,),
    scan_files=saved_model.SAVED_MODEL_FILES,
    complete=saved_model.complete,
    load=saved_model.SavedModelServable.load,
)
FROZEN_GRAPH = Kind(
    name="frozen graph",
    load_files=frozen_graph.GRAPH_FILES,
    scan_files=frozen_graph.GRAPH_FILES,
    complete=lambda path: True,  # one file is the whole model
    load=frozen_graph.FrozenGraphServable.load,
)
KINDS = (SAVED_MODEL, FROZEN_GRAPH)


def load_servable(name: str, version: int, path: Path, *, warmup_iterations: int = 1) -> Servable:
    """Load the version folder ``path`` with the loader of its kind, then replay its TF Serving
    warm-up file (``service.warmup``) ``warmup_iterations`` times per record (0: not at all).

    Blocking: call on the inference thread. FailedPrecondition if no kind matches; a warm-up
    that fails closes the servable and fails the load with its error.
    """
    from service.warmup import replay_warmup_requests

    for kind in KINDS:
        if kind.loads(path):
            servable = kind.load(name, version, path)
            if warmup_iterations > 0:
                try:
                    replay_warmup_requests(servable, path, warmup_iterations)
                except BaseException:
                    servable.close()
                    raise
            return servable
    kinds = "; ".join(f"{kind.name}: {' or '.join(kind.load_files)}" for kind in KINDS)
    raise FailedPrecondition(f"{path} holds no model file ({kinds})")


def folder_complete(path: Path) -> bool:
    """Whether a version folder holds all its kind's loader reads (a scan's first check)."""
    for kind in KINDS:
        if kind.marks(path):
            return kind.complete(path)
    return False
