"""TF1 frozen graphs in-process: loading, signatures, labels, tensor names, running, routes.

The graphs are made by ``tests.models`` in the image-retraining tutorial's layout; every
answer is compared with running the same ``output_graph.pb`` in a Session of the test's own.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from treq.testing import StubTreq
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from service.batching import BatchingParameters, BatchingQueue
from service.errors import FailedPrecondition, InvalidArgument
from service.http import InferenceAPI, InferenceSite
from service.images import ImageDecoder
from service.metrics import Metrics
from service.repository import AVAILABLE, LoadedVersion, ModelConfig, ModelRepository
from service.servables.frozen_graph import FrozenGraphServable
from service.servables.registry import load_servable
from tests import models


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """The two frozen graphs, made once: a JPEG-string input and a float image input."""
    root = tmp_path_factory.mktemp("frozen")
    return {
        "jpeg": models.make_frozen_jpeg_graph(root / "flowers"),
        "float": models.make_frozen_float_graph(root / "floats"),
    }


def session_run(graph_file: Path, fetch: str, feeds: dict[str, Any]) -> np.ndarray:
    """Run a frozen graph in a fresh Session of the test's own: the reference answer."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph_file.read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        return session.run(fetch, feeds)


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (20, 14)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG", quality=90)
    return out.getvalue()


def scalar_bytes(data: bytes) -> np.ndarray:
    array = np.empty((), dtype=object)
    array[()] = data
    return array


def test_servable_load_dispatches_on_the_graph_file(graphs, tmp_path: Path) -> None:
    """load_servable gives a FrozenGraphServable for output_graph.pb or frozen_graph.pb."""
    assert isinstance(load_servable("flowers", 1, graphs["jpeg"]), FrozenGraphServable)
    renamed = tmp_path / "1"
    shutil.copytree(graphs["float"], renamed)
    (renamed / "output_graph.pb").rename(renamed / "frozen_graph.pb")
    assert isinstance(load_servable("floats", 1, renamed), FrozenGraphServable)
    (tmp_path / "2").mkdir()
    with pytest.raises(FailedPrecondition, match="saved_model.pb.*output_graph.pb"):
        load_servable("none", 2, tmp_path / "2")


def test_retraining_defaults_build_the_signature(graphs) -> None:
    """DecodeJpeg/contents:0 is input "image", final_result:0 output "scores", with their dtypes and shapes."""
    jpeg_model = load_servable("flowers", 1, graphs["jpeg"])
    sig = jpeg_model.signature(None)
    assert (sig.inputs["image"].dtype, sig.inputs["image"].shape) == ("DT_STRING", ())
    assert sig.inputs["image"].tensor_name == "DecodeJpeg/contents:0"
    assert (sig.outputs["scores"].dtype, sig.outputs["scores"].tensor_name) == (
        "DT_FLOAT",
        "final_result:0",
    )
    assert not sig.batchable  # a scalar string: the queue runs each request alone
    float_model = load_servable("floats", 1, graphs["float"])
    sig = float_model.signature("serving_default")
    assert sig.inputs["image"].shape == (None, 8, 8, 3) and sig.batchable
    assert sig.inputs["image"].tensor_name == "input:0"


def test_metadata_is_tf_serving_signature_def_json(graphs) -> None:
    """signature_defs is the SignatureDef as TF Serving's metadata JSON: names, dtypes, dims,
    and the fields at their defaults, which TF Serving's JSON printer writes too."""
    defs = load_servable("floats", 1, graphs["float"]).signature_defs
    assert defs == {
        "serving_default": {
            "inputs": {
                "image": {
                    "name": "input:0",
                    "dtype": "DT_FLOAT",
                    "tensor_shape": {
                        "dim": [
                            {"size": "-1", "name": ""},
                            {"size": "8", "name": ""},
                            {"size": "8", "name": ""},
                            {"size": "3", "name": ""},
                        ],
                        "unknown_rank": False,
                    },
                }
            },
            "outputs": {
                "scores": {
                    "name": "final_result:0",
                    "dtype": "DT_FLOAT",
                    "tensor_shape": {
                        "dim": [{"size": "-1", "name": ""}, {"size": "3", "name": ""}],
                        "unknown_rank": False,
                    },
                }
            },
            "method_name": "tensorflow/serving/predict",
            "defaults": {},
        }
    }


def test_labels_from_output_labels_then_labels_txt_then_the_base_folder(graphs, tmp_path) -> None:
    """output_labels.txt in the version folder, else labels.txt, else the base folder's."""
    assert load_servable("flowers", 1, graphs["jpeg"]).labels == models.FLOWER_LABELS
    version = tmp_path / "1"
    shutil.copytree(graphs["jpeg"], version)
    (version / "output_labels.txt").unlink()
    assert load_servable("flowers", 1, version).labels is None
    (tmp_path / "output_labels.txt").write_text("a\nb\nc\n")
    assert load_servable("flowers", 1, version).labels == ("a", "b", "c")
    (version / "labels.txt").write_text("x\ny\nz\n")
    assert load_servable("flowers", 1, version).labels == ("x", "y", "z")


def test_run_answers_what_a_session_answers(graphs) -> None:
    """run() feeds and fetches the named tensors: the same numbers as a Session in the test."""
    data = jpeg((200, 30, 40))
    served = load_servable("flowers", 1, graphs["jpeg"]).run(
        "serving_default", {"image": scalar_bytes(data)}
    )
    expected = session_run(
        graphs["jpeg"] / "output_graph.pb", "final_result:0", {"DecodeJpeg/contents:0": data}
    )
    np.testing.assert_array_equal(served["scores"], expected)
    assert int(expected.argmax()) == 0  # red: daisy
    pixels = np.random.default_rng(3).random((5, 8, 8, 3), dtype=np.float32)
    served = load_servable("floats", 1, graphs["float"]).run("serving_default", {"image": pixels})
    expected = session_run(
        graphs["float"] / "output_graph.pb", "final_result:0", {"input:0": pixels}
    )
    np.testing.assert_array_equal(served["scores"], expected)


def test_bad_bytes_for_decode_jpeg_are_invalid_argument(graphs) -> None:
    """An input TensorFlow refuses (bytes that are no JPEG) is a 400, and the Session keeps working."""
    model = load_servable("flowers", 1, graphs["jpeg"])
    with pytest.raises(InvalidArgument, match="DecodeJpeg|JPEG|image"):
        model.run("serving_default", {"image": scalar_bytes(b"\xff\xd8\xffnot really")})
    assert model.run("serving_default", {"image": scalar_bytes(jpeg((0, 0, 255)))})[
        "scores"
    ].shape == (1, 3)


def test_warm_up_runs_float_graphs_and_skips_string_inputs(graphs) -> None:
    """warm_up runs a batchable float graph once per batch size; a string graph is left alone."""
    load_servable("floats", 1, graphs["float"]).warm_up((1, 4))
    load_servable("flowers", 1, graphs["jpeg"]).warm_up((1, 4))


def test_frozen_graph_json_names_the_tensors(tmp_path: Path) -> None:
    """frozen_graph.json (version or base folder) maps names to tensors, ":0" optional."""
    path = models.make_frozen_float_graph(tmp_path, input_name="pixels", output_name="probs")
    with pytest.raises(FailedPrecondition, match="final_result:0.*frozen_graph.json"):
        load_servable("floats", 1, path)
    (tmp_path / "frozen_graph.json").write_text(
        json.dumps({"inputs": {"x": "pixels:0"}, "outputs": {"probabilities": "probs"}})
    )
    sig = load_servable("floats", 1, path).signature(None)
    assert list(sig.inputs) == ["x"] and list(sig.outputs) == ["probabilities"]
    assert sig.outputs["probabilities"].tensor_name == "probs:0"
    (path / "frozen_graph.json").write_text(json.dumps({"outputs": {"p": "probs:0"}}))
    sig = load_servable("floats", 1, path).signature(None)  # inputs default: the one Placeholder
    assert (list(sig.inputs), list(sig.outputs)) == (["image"], ["p"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"inputs": {"x": 3}}', "must map names to tensor names"),
        ('{"tensors": {}}', '"inputs" and/or "outputs"'),
        ('{"outputs": {"y": "nope:0"}}', "no tensor 'nope:0'"),
    ],
)
def test_bad_frozen_graph_json_fails_the_load(graphs, tmp_path, content, message) -> None:
    """A bad frozen_graph.json fails loading with the file and the problem named."""
    version = tmp_path / "1"
    shutil.copytree(graphs["float"], version)
    (version / "frozen_graph.json").write_text(content)
    with pytest.raises(FailedPrecondition, match=message):
        load_servable("floats", 1, version)


def test_a_graph_with_several_placeholders_needs_the_json(tmp_path: Path) -> None:
    """Without DecodeJpeg/contents and with two Placeholders the default input is ambiguous."""
    graph = tf.Graph()
    with graph.as_default():
        a = tf.compat.v1.placeholder(tf.float32, [None, 2], name="a")
        b = tf.compat.v1.placeholder(tf.float32, [None, 2], name="b")
        tf.identity(a + b, name="final_result")
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "output_graph.pb").write_bytes(graph.as_graph_def().SerializeToString())
    with pytest.raises(FailedPrecondition, match="2 placeholders \\(a, b\\)"):
        load_servable("sum", 1, tmp_path / "1")
    (tmp_path / "1" / "output_graph.pb").write_bytes(b"this is not a GraphDef")
    with pytest.raises(FailedPrecondition, match="GraphDef|imported"):
        load_servable("sum", 1, tmp_path / "1")


# -- through the routes, in-process --------------------------------------------------------------


def serve(servable: Any) -> tuple[StubTreq, list]:
    """The Klein app over one AVAILABLE version of ``servable``; model calls are recorded."""
    runs: list = []

    def run(inputs):
        runs.append({k: np.shape(v) for k, v in inputs.items()})
        return servable.run("serving_default", inputs)

    repository = ModelRepository([ModelConfig("flowers", Path("/nonexistent"))], reactor=Clock())
    version = LoadedVersion("flowers", 1, state=AVAILABLE, servable=servable)
    version.queues["serving_default"] = BatchingQueue(
        run, BatchingParameters(max_batch_size=8), clock=Clock(), executor=maybeDeferred
    )
    repository.add_version(version)
    api = InferenceAPI(
        repository,
        metrics=Metrics(),
        images=ImageDecoder(reactor=Clock(), executor=maybeDeferred),
    )
    treq = StubTreq(api.resource())
    treq._agent._serverFactory = InferenceSite(api, max_body_bytes=10**6)  # as twistd serves it
    return treq, runs


def call(treq: StubTreq, method: str, path: str, body: bytes = b"", ctype: str = "") -> Any:
    results: list = []
    headers = {"content-type": [ctype]} if ctype else {}
    d = treq.request(method, "http://server" + path, data=body or None, headers=headers)
    d.addCallback(lambda r: r.content().addCallback(lambda c: results.append((r.code, c))))
    d.addErrback(results.append)
    assert results and not hasattr(results[0], "raiseException"), results
    code, content = results[0]
    return code, json.loads(content)


def multipart(*files: bytes) -> tuple[bytes, str]:
    parts = b"".join(
        b'--B\r\nContent-Disposition: form-data; name="data"; filename="f.jpg"\r\n\r\n'
        + data
        + b"\r\n"
        for data in files
    )
    return parts + b"--B--\r\n", "multipart/form-data; boundary=B"


def test_jpeg_graph_classifies_each_upload_in_its_own_run(graphs) -> None:
    """A scalar-string graph gets each file's bytes unchanged, one Session run per file."""
    treq, runs = serve(load_servable("flowers", 1, graphs["jpeg"]))
    files = [jpeg((20, 220, 30)), jpeg((10, 20, 230))]
    code, doc = call(treq, "POST", "/v1/models/flowers:classify_image", *multipart(*files))
    assert code == 200 and runs == [{"image": ()}, {"image": ()}]
    graph_file = graphs["jpeg"] / "output_graph.pb"
    for result, data in zip(doc["results"], files, strict=True):
        expected = session_run(graph_file, "final_result:0", {"DecodeJpeg/contents:0": data})[0]
        top = result["predictions"]
        assert [p["label"] for p in top] == [
            models.FLOWER_LABELS[i] for i in np.argsort(-expected, kind="stable")
        ]
        assert [np.float32(p["score"]) for p in top] == sorted(expected.tolist(), reverse=True)
    assert [r["predictions"][0]["label"] for r in doc["results"]] == ["rose", "tulip"]


def test_jpeg_graph_predict_with_b64_and_metadata(graphs) -> None:
    """:predict takes the JPEG as {"b64": …} in the columnar format; metadata names the tensors."""
    treq, _ = serve(load_servable("flowers", 1, graphs["jpeg"]))
    data = jpeg((230, 200, 10))
    body = json.dumps({"inputs": {"image": {"b64": base64.b64encode(data).decode()}}}).encode()
    code, doc = call(treq, "POST", "/v1/models/flowers:predict", body, "application/json")
    expected = session_run(
        graphs["jpeg"] / "output_graph.pb", "final_result:0", {"DecodeJpeg/contents:0": data}
    )
    assert code == 200
    np.testing.assert_array_equal(np.array(doc["outputs"], np.float32), expected)
    code, doc = call(treq, "GET", "/v1/models/flowers/metadata")
    image = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["image"]
    assert code == 200 and (image["name"], image["dtype"]) == ("DecodeJpeg/contents:0", "DT_STRING")


def test_float_graph_batches_uploads_after_preprocessing(graphs) -> None:
    """A float-input graph gets k decoded images as one run of k rows: RGB, 8x8, [0, 1]."""
    treq, runs = serve(load_servable("floats", 1, graphs["float"]))
    images = [Image.new("RGB", (30, 20), (250, 5, 5)), Image.new("L", (8, 8), 200)]
    files = []
    for img in images:
        out = io.BytesIO()
        img.save(out, format="PNG")
        files.append(out.getvalue())
    code, doc = call(treq, "POST", "/v1/models/flowers:classify_image?top_k=2", *multipart(*files))
    assert code == 200 and runs == [{"image": (2, 8, 8, 3)}]
    pixels = np.stack(
        [
            np.asarray(img.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR), np.float32)
            / np.float32(255)
            for img in images
        ]
    )
    expected = session_run(
        graphs["float"] / "output_graph.pb", "final_result:0", {"input:0": pixels}
    )
    for result, row in zip(doc["results"], expected, strict=True):
        assert [np.float32(p["score"]) for p in result["predictions"]] == sorted(
            row.tolist(), reverse=True
        )[:2]
    assert doc["results"][0]["predictions"][0]["label"] == "daisy"
