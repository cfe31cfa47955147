"""Image uploads to real SavedModels in-process: a model that decodes the bytes itself, and one
that takes no images. The routes run through StubTreq with synchronous executors, so the
SavedModel runs in the test thread.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.servables import Servable
from service.servables.registry import load_servable
from tests import models
from tests.test_frozen_graph import call, multipart, serve


def png(gray: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (6, 5), gray).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def image_bytes_model(tmp_path_factory) -> Servable:
    return load_servable("bytes", 1, models.make_image_bytes(tmp_path_factory.mktemp("bytes")))


def test_string_batch_input_gets_the_files_unchanged_in_one_run(image_bytes_model) -> None:
    """A [None] string input receives k uploads' bytes as one request of k rows, unchanged."""
    treq, runs = serve(image_bytes_model)
    files = [png(255), png(51), png(0)]
    code, doc = call(treq, "POST", "/v1/models/flowers:classify_image", *multipart(*files))
    assert code == 200 and runs == [{"image_bytes": (3,)}]
    expected = image_bytes_model.run(
        "serving_default", {"image_bytes": np.array(files, dtype=object)}
    )["probabilities"]
    for result, row in zip(doc["results"], expected, strict=True):
        # No labels file: class indices as strings, best first.
        order = np.argsort(-row, kind="stable")
        assert [p["label"] for p in result["predictions"]] == [str(i) for i in order]
        assert [np.float32(p["score"]) for p in result["predictions"]] == [row[i] for i in order]
    assert [r["predictions"][0]["label"] for r in doc["results"]] == ["1", "0", "0"]


def test_a_savedmodel_without_image_input_is_400(tmp_path: Path) -> None:
    """classify_image on make_linear (x float [None, 3]) is a 400 saying it takes no images."""
    treq, runs = serve(load_servable("linear", 1, models.make_linear(tmp_path)))
    code, doc = call(treq, "POST", "/", *multipart(png(10)))
    assert code == 400 and "does not take image uploads" in doc["error"] and runs == []
