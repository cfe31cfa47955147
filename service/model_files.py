"""Side files in a model's folders (preprocessing.json, frozen_graph.json): one way to find them.

A file in the version folder wins over one in the model's base folder, so a version can
override what its model declares. No TensorFlow here: image preprocessing reads these too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.errors import FailedPrecondition


def read_model_json(version_path: Path, name: str) -> tuple[Path, Any] | None:
    """The JSON side file ``name``: the version folder's, else the base folder's, else None.

    Blocking (reads files): call it on a pool thread. Invalid JSON is a FailedPrecondition
    naming the file.
    """
    for folder in (version_path, version_path.parent):
        file = folder / name
        if file.is_file():
            try:
                return file, json.loads(file.read_text())
            except (ValueError, OSError) as e:
                raise FailedPrecondition(f"{file}: not valid JSON: {e}") from None
    return None
