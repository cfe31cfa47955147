"""The servables registry: which kind a version folder holds, and whether it is whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import FailedPrecondition
from service.servables.registry import folder_complete, load_servable
from service.servables.saved_model import SavedModelServable
from tests import models


@pytest.mark.parametrize(
    ("files", "complete"),
    [
        ((), False),
        (("saved_model.pb",), True),
        (("saved_model.pbtxt",), True),
        (("saved_model.pb", "variables/other"), False),
        (("saved_model.pb", "variables/variables.index"), True),
        (("output_graph.pb",), True),
        (("frozen_graph.pb",), True),
        (("saved_model.pb", "variables/other", "output_graph.pb"), False),
        (("labels.txt",), False),
    ],
)
def test_folder_complete_follows_the_first_kind_the_folder_holds(
    tmp_path: Path, files: tuple[str, ...], complete: bool
) -> None:
    """A SavedModel file decides by its variables index, else a frozen graph file suffices."""
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert folder_complete(tmp_path) is complete


def test_a_saved_model_wins_over_a_frozen_graph_in_the_same_folder(tmp_path: Path) -> None:
    """A folder with saved_model.pb and output_graph.pb loads as a SavedModel."""
    version = models.make_linear(tmp_path)
    (version / "output_graph.pb").write_bytes(b"not a graph")
    servable = load_servable("m", 1, version)
    try:
        assert isinstance(servable, SavedModelServable)
    finally:
        servable.close()


def test_a_folder_of_no_kind_names_every_kind_it_looked_for(tmp_path: Path) -> None:
    """Loading a folder without a model file is a FailedPrecondition listing the files sought."""
    with pytest.raises(
        FailedPrecondition, match="saved_model.pb.*output_graph.pb or frozen_graph.pb"
    ):
        load_servable("m", 1, tmp_path)
