"""Real ``twistd -n inference`` servers for TF1 frozen graphs in the image-retraining layout.

Two graphs made by the test (``tests.models``): one takes ``DecodeJpeg/contents:0`` (JPEG
bytes), one a float image placeholder. Every answer, through ``:classify_image`` and
``:predict``, is compared with running the same ``output_graph.pb`` in a Session here.
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness.twistd import TwistdServer
from tests import models
from tests.test_images_integration import curl, upload

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> Any:
    """Both graphs, each served by its own twistd (started together), and a reference Session."""
    if shutil.which("curl") is None:
        pytest.skip("the curl binary is not installed")
    import tensorflow as tf

    root = tmp_path_factory.mktemp("frozen")
    models.make_frozen_jpeg_graph(root / "flowers")
    models.make_frozen_float_graph(root / "floats")
    servers = {
        name: TwistdServer(
            [f"--model_name={name}", f"--model_base_path={root / name}", "--enable_batching"], root
        ).start()
        for name in ("flowers", "floats")
    }

    def run(name: str, feeds: dict[str, Any]) -> np.ndarray:
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString((root / name / "1" / "output_graph.pb").read_bytes())
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            return session.run("final_result:0", feeds)

    try:
        for server in servers.values():
            server.wait_ready()
        yield servers, run, root
    finally:
        for server in servers.values():
            server.stop()


def picture(color: tuple[int, int, int], fmt: str = "JPEG", size=(40, 30)) -> bytes:
    """A photo-like picture: a colour with a little noise, encoded."""
    rng = np.random.default_rng(sum(color))
    pixels = np.clip(np.array(color) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format=fmt)
    return out.getvalue()


def ranked(scores: np.ndarray, k: int = 5) -> list[tuple[str, np.float32]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [(models.FLOWER_LABELS[i], scores[i]) for i in order]


def answered(predictions: list[dict[str, Any]]) -> list[tuple[str, np.float32]]:
    return [(p["label"], np.float32(p["score"])) for p in predictions]


def test_jpeg_graph_classifies_uploads_as_a_session_does(frozen, tmp_path: Path) -> None:
    """curl -F data=@flower.jpg answers the labels and scores a Session computes on those bytes."""
    servers, run, _ = frozen
    for color, label in [((230, 20, 20), "daisy"), ((20, 220, 20), "rose")]:
        data = picture(color)
        path = tmp_path / f"{label}.jpg"
        path.write_bytes(data)
        code, doc = curl(
            "-F", f"data=@{path}", "-F", "top_k=3",
            f"{servers['flowers'].url}/v1/models/flowers:classify_image",
        )  # fmt: skip
        assert code == 200 and (doc["model"], doc["version"]) == ("flowers", "1")
        expected = run("flowers", {"DecodeJpeg/contents:0": data})[0]
        assert answered(doc["predictions"]) == ranked(expected, 3)
        assert doc["predictions"][0]["label"] == label


def test_jpeg_graph_several_files_and_default_route(frozen) -> None:
    """Several JPEGs in one POST / each get their own answer, in order (one Session run each)."""
    servers, run, _ = frozen
    files = [picture((20, 20, 240)), picture((240, 30, 30)), picture((20, 200, 40), "PNG")]
    status, _, doc = upload(
        servers["flowers"], "/", [("data", f"{i}.jpg", data) for i, data in enumerate(files)]
    )
    assert status == 200
    for result, data in zip(doc["results"], files, strict=True):
        assert answered(result["predictions"]) == ranked(
            run("flowers", {"DecodeJpeg/contents:0": data})[0]
        )
    assert [r["predictions"][0]["label"] for r in doc["results"]] == ["tulip", "daisy", "rose"]


def test_jpeg_graph_predict_with_b64_and_metadata(frozen) -> None:
    """:predict takes {"b64": …} for the scalar string input; metadata shows the tensors."""
    servers, run, _ = frozen
    data = picture((200, 190, 20))
    status, doc = servers["flowers"].post_json(
        "/v1/models/flowers:predict",
        {"inputs": {"image": {"b64": base64.b64encode(data).decode()}}},
    )
    assert status == 200
    np.testing.assert_array_equal(
        np.array(doc["outputs"], np.float32), run("flowers", {"DecodeJpeg/contents:0": data})
    )
    status, doc = servers["flowers"].get("/v1/models/flowers/metadata")
    sig = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert status == 200
    assert sig["inputs"]["image"] == {
        "name": "DecodeJpeg/contents:0",
        "dtype": "DT_STRING",
        "tensor_shape": {"dim": [], "unknown_rank": False},  # a scalar, every field written
    }
    assert sig["outputs"]["scores"]["name"] == "final_result:0"
    assert servers["flowers"].get("/v1/models/flowers")[1]["model_version_status"][0]["state"] == (
        "AVAILABLE"
    )


def test_jpeg_graph_refuses_bytes_tensorflow_cannot_decode(frozen) -> None:
    """A JPEG that Pillow can open but TensorFlow cannot decode is a 400; the server keeps serving."""
    servers, _, _ = frozen
    broken = picture((10, 10, 10))[:400]
    status, _, doc = upload(servers["flowers"], "/", [("data", "broken.jpg", broken)])
    assert status == 400 and doc["error"]
    status, _, doc = upload(servers["flowers"], "/", [("data", "notes.txt", b"not a picture")])
    assert status == 415 and "not an image" in doc["error"]
    assert upload(servers["flowers"], "/", [("data", "ok.jpg", picture((5, 5, 250)))])[0] == 200


def test_float_graph_classifies_preprocessed_uploads(frozen) -> None:
    """A float-input graph gets RGB, resized to 8x8, /255 pixels: as a Session on the same array."""
    servers, run, _ = frozen
    files = [picture((240, 10, 10), "PNG", (30, 20)), picture((10, 10, 240), "PNG", (8, 8))]
    status, _, doc = upload(
        servers["floats"],
        "/v1/models/floats:classify_image",
        [("image", f"{i}.png", data) for i, data in enumerate(files)],
    )
    assert status == 200
    pixels = []
    for data in files:
        with Image.open(io.BytesIO(data)) as img:
            resized = img.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR)
        pixels.append(np.asarray(resized, np.float32) / np.float32(255))
    expected = run("floats", {"input:0": np.stack(pixels)})
    for result, row in zip(doc["results"], expected, strict=True):
        assert answered(result["predictions"]) == ranked(row)
    assert [r["predictions"][0]["label"] for r in doc["results"]] == ["daisy", "tulip"]


def test_float_graph_predict_row_format(frozen) -> None:
    """:predict with float instances runs the frozen graph on the batch as a Session does."""
    servers, run, _ = frozen
    batch = np.random.default_rng(5).random((3, 8, 8, 3), dtype=np.float32)
    status, doc = servers["floats"].post_json(
        "/v1/models/floats:predict", {"instances": batch.tolist()}
    )
    assert status == 200
    np.testing.assert_array_equal(
        np.array(doc["predictions"], np.float32), run("floats", {"input:0": batch})
    )
    log = servers["floats"].log() + servers["flowers"].log()
    assert "unexpected error" not in log and "Unhandled" not in log, log[-3000:]
