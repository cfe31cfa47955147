"""Tiny SavedModels for tests, built in code (no training) in TF Serving's layout.

Each maker writes ``base/<version>/`` (a TF2 SavedModel, from ``tf.saved_model.save`` of a
``tf.Module``) and returns that version folder. Each takes well under a second.

=================  ===============  =====================================  ===================================
maker              signature        inputs                                 outputs
=================  ===============  =====================================  ===================================
make_linear        serving_default  x float32 [None, 3]                    y float32 [None, 2]
                                                                           = x @ W * scale + b
make_multi_io      serving_default  a float32 [None, 2], b int64 [None]    sum float32 [None, 2]
                                                                           = a + float(b)[:, None];
                                                                           count int64 [None] = 2 b
make_multi_io      double           a float32 [None, 2]                    twice float32 [None, 2] = 2 a
make_strings       serving_default  text string [None]                     length int32 [None]
                                                                           (bytes, tf.strings.length);
                                                                           upper_bytes string [None]
                                                                           (tf.strings.upper)
make_fixed_batch   serving_default  x float32 [1, 3] (not batchable)       y float32 [1] = sum of x's row
make_slow          serving_default  x float32 [None, 3]                    y float32 [None, 3] = x, after
                                                                           busy-waiting ``seconds``
make_image_bytes   serving_default  image_bytes string [None] (PNG/JPEG)   probabilities float32 [None, 2]
                                                                           (dark, light) from mean gray
make_wide          serving_default  x float32 [None, 2048]                 y float32 [None, 2048]: three relu
                                                                           dense layers, 16 MiB of weights each
make_example_      serving_default  inputs string [None]: serialized       classes string [None, 2], scores
classifier         and 4 more       tf.Examples (x, kind, count)           float32 [None, 2]; all: see below
=================  ===============  =====================================  ===================================

TF1 frozen graphs (``tf.compat.v1`` graph, variables frozen to constants with
``convert_variables_to_constants``), written as ``base/<version>/output_graph.pb`` with
``output_labels.txt`` (``FLOWER_LABELS``) beside it, the image-retraining tutorial's layout:

=======================  ==================================================  ======================
maker                    input                                               output
=======================  ==================================================  ======================
make_frozen_jpeg_graph   ``DecodeJpeg/contents:0`` string [] (JPEG bytes)    ``final_result:0``
                         -> decode_jpeg -> bilinear 8x8 -> /255 -> dense     float32 [None, 3]
make_frozen_float_graph  ``input:0`` float32 [None, 8, 8, 3] in [0, 1]       ``final_result:0``
                         -> dense (names configurable)                       float32 [None, 3]
=======================  ==================================================  ======================

Both share the dense layer ``FROZEN_WEIGHTS`` (a variable before freezing): class c scores the
mean of colour channel c, plus a little fixed noise, so a red picture is "daisy", green "rose",
blue "tulip".

``make_linear`` uses W = [[1, 2], [3, 4], [5, 6]] and b = [0.5, -0.5], held in variables
(so loading exercises variable restore), and writes ``labels.txt`` ("neg", "pos") next to
``saved_model.pb``. Its ``scale`` tells versions apart: x = [1, 1, 1] gives
y = [9 scale + 0.5, 12 scale - 0.5].

``make_wide`` is for memory tests: its 48 MiB of weights (fixed random values, seed 0) make one
version left behind after an unload show in the process's RSS at once. It is the model
``scripts/memory_cycles.py --make wide`` measures.

``make_example_classifier`` is for ``:classify`` and ``:regress``. Every signature takes
``inputs`` string [None], serialized ``tf.Example`` s, parsed with ``tf.io.parse_example``
(``x``: 2 floats, required; ``kind``: a string, default ""; ``count``: an int64, default 0)
into z = x[0] + 2 x[1] + 10 [kind == "big"] + count + version (so versions answer
differently), and p = sigmoid(z / 10):

===================================  ==========================  ==============================
signature                            method_name                 outputs
===================================  ==========================  ==============================
serving_default, classify            tensorflow/serving/classify classes string [None, 2]
                                                                 ("neg", "pos");
                                                                 scores float32 [None, 2]
                                                                 = (1 - p, p)
scores_only                          tensorflow/serving/classify scores float32 [None, 2]
regress                              tensorflow/serving/regress  outputs float32 [None] = z
predict                              tensorflow/serving/predict  z float32 [None]
===================================  ==========================  ==============================

``tf.saved_model.save`` writes every method_name as ``tensorflow/serving/predict``; the maker
rewrites ``saved_model.pb`` (the ``saved_model_pb2`` proto) to give the classify and regress
signatures TF Serving's method names, which ``load_servable`` reads into
``Signature.method_name``.

``make_slow`` cannot sleep: ``tf.py_function`` is not saved in a SavedModel. It spins in a
``tf.while_loop`` reading ``tf.timestamp()`` until ``seconds`` have passed, so each call
(whatever its batch size) keeps one CPU core busy for that long.

TensorFlow is imported inside the makers, so importing this module (from conftest, say)
costs nothing until a model is made.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

W = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
B = [0.5, -0.5]
LINEAR_LABELS = ("neg", "pos")
FLOWER_LABELS = ("daisy", "rose", "tulip")
FROZEN_SIZE = 8


def _save(module: Any, base: Path, version: int, signatures: dict[str, Any]) -> Path:
    """Save ``module`` as ``base/<version>`` with ``signatures`` and return that folder."""
    import tensorflow as tf

    path = Path(base) / str(version)
    tf.saved_model.save(module, str(path), signatures=signatures)
    return path


def make_linear(base: Path, version: int = 1, scale: float = 1.0) -> Path:
    """``y = x @ W * scale + b``, with a labels.txt."""
    import tensorflow as tf

    module = tf.Module()
    module.w = tf.Variable(W, dtype=tf.float32, name="w")
    module.b = tf.Variable(B, dtype=tf.float32, name="b")

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": tf.matmul(x, module.w) * scale + module.b}

    path = _save(module, base, version, {"serving_default": serve})
    (path / "labels.txt").write_text("".join(f"{label}\n" for label in LINEAR_LABELS))
    return path


def make_multi_io(base: Path, version: int = 1) -> Path:
    """Two inputs of different dtypes, two outputs, and a second signature ``double``."""
    import tensorflow as tf

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 2], tf.float32, name="a"),
            tf.TensorSpec([None], tf.int64, name="b"),
        ]
    )
    def serve(a: tf.Tensor, b: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"sum": a + tf.cast(b, tf.float32)[:, None], "count": b * 2}

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="a")])
    def double(a: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"twice": 2.0 * a}

    return _save(tf.Module(), base, version, {"serving_default": serve, "double": double})


def make_strings(base: Path, version: int = 1) -> Path:
    """String in, an int32 and a string out."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(text: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"length": tf.strings.length(text), "upper_bytes": tf.strings.upper(text)}

    return _save(tf.Module(), base, version, {"serving_default": serve})


def make_fixed_batch(base: Path, version: int = 1) -> Path:
    """A batch dimension fixed at 1, so requests cannot be merged."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 3], tf.float32, name="x")])
    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": tf.reduce_sum(x, axis=1)}

    return _save(tf.Module(), base, version, {"serving_default": serve})


#: The dtypes of ``make_all_dtypes``'s inputs (TensorFlow's names, without DT_).
ALL_DTYPES = (
    "float32", "float64", "float16", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool", "string",
)  # fmt: skip


#: The Open Inference Protocol's datatype of each of ``ALL_DTYPES``.
V2_DATATYPES = {
    "float32": "FP32", "float64": "FP64", "float16": "FP16", "int8": "INT8", "int16": "INT16",
    "int32": "INT32", "int64": "INT64", "uint8": "UINT8", "uint16": "UINT16",
    "uint32": "UINT32", "uint64": "UINT64", "bool": "BOOL", "string": "BYTES",
}  # fmt: skip


def edge_sample(dtype: str, first_float: float = 0.1) -> Any:
    """A [2, 2] numpy array of ``dtype`` (one of ``ALL_DTYPES``) with values at the edges of
    its range, for ``make_all_dtypes``' inputs."""
    import numpy as np  # here, as TensorFlow: the module's imports stay light

    if dtype == "string":
        return np.array([[b"a", b""], ["é".encode(), b"zz"]], dtype=object)
    if dtype == "bool":
        return np.array([[True, False], [False, True]])
    if dtype.startswith("float"):
        info = np.finfo(dtype)
        return np.array([[first_float, -2.5], [info.max, info.tiny]], dtype=dtype)
    iinfo = np.iinfo(dtype)
    return np.array([[iinfo.min, iinfo.max], [0, 1]], dtype=dtype)


def make_all_dtypes(base: Path, version: int = 1) -> Path:
    """One input per dtype (``in_<dtype>``, shape [None, 2]), each echoed as ``out_<dtype>``."""
    import tensorflow as tf

    specs = [tf.TensorSpec([None, 2], tf.as_dtype(d), name=f"in_{d}") for d in ALL_DTYPES]

    @tf.function(input_signature=specs)
    def serve(*tensors: tf.Tensor) -> dict[str, tf.Tensor]:
        return {f"out_{d}": tf.identity(t) for d, t in zip(ALL_DTYPES, tensors, strict=True)}

    return _save(tf.Module(), base, version, {"serving_default": serve})


def make_scalar_string(base: Path, version: int = 1) -> Path:
    """A scalar string in, echoed, and its length: no batch dimension anywhere."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="text")])
    def serve(text: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"echo": tf.identity(text), "length": tf.strings.length(text)}

    return _save(tf.Module(), base, version, {"serving_default": serve})


def make_batch_echo(base: Path, version: int = 1) -> Path:
    """``y = x * 2`` and ``rows``: the size of the batch each row ran in."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        rows = tf.shape(x)[0]
        return {"y": x * 2.0, "rows": tf.fill([rows], rows)}

    return _save(tf.Module(), base, version, {"serving_default": serve})


def make_slow(base: Path, version: int = 1, seconds: float = 0.2) -> Path:
    """Identity that takes ``seconds`` per call, burning a CPU core meanwhile (see above)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        start = tf.timestamp()
        (waited,) = tf.while_loop(
            lambda now: now - start < seconds, lambda now: (tf.timestamp(),), (start,)
        )
        with tf.control_dependencies([waited]):  # y is not ready before the loop ends
            return {"y": tf.identity(x)}

    return _save(tf.Module(), base, version, {"serving_default": serve})


def make_hanging(base: Path, version: int = 1) -> Path:
    """Identity, except that a batch with a negative ``x[:, 0]`` never returns: it waits on an
    empty queue (no CPU burnt) — an inference thread stuck in the model, made on purpose."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        def hang() -> tf.Tensor:
            queue = tf.raw_ops.FIFOQueueV2(component_types=[tf.float32], shapes=[[]])
            return tf.raw_ops.QueueDequeueV2(handle=queue, component_types=[tf.float32])[0]

        stuck = tf.cond(tf.reduce_any(x[:, 0] < 0), hang, lambda: tf.constant(0.0))
        with tf.control_dependencies([stuck]):
            return {"y": tf.identity(x)}

    return _save(tf.Module(), base, version, {"serving_default": serve})


def make_image_bytes(base: Path, version: int = 1) -> Path:
    """Encoded images in (a batch of strings), two class probabilities out."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        def gray(data: tf.Tensor) -> tf.Tensor:
            pixels = tf.io.decode_image(data, channels=1, expand_animations=False)
            return tf.reduce_mean(tf.cast(pixels, tf.float32)) / 255.0

        light = tf.map_fn(gray, image_bytes, fn_output_signature=tf.float32)
        return {"probabilities": tf.stack([1.0 - light, light], axis=1)}

    return _save(tf.Module(), base, version, {"serving_default": serve})


def make_wide(base: Path, version: int = 1, units: int = 2048, layers: int = 3) -> Path:
    """``layers`` relu dense layers of ``units`` x ``units`` float32 (16 MiB each at 2048)."""
    import numpy as np
    import tensorflow as tf

    module = tf.Module()
    rng = np.random.default_rng(0)
    module.weights = [
        tf.Variable(rng.standard_normal((units, units), np.float32) / units) for _ in range(layers)
    ]

    @tf.function(input_signature=[tf.TensorSpec([None, units], tf.float32, name="x")])
    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        for w in module.weights:
            x = tf.nn.relu(tf.matmul(x, w))
        return {"y": x}

    return _save(module, base, version, {"serving_default": serve})


EXAMPLE_LABELS = ("neg", "pos")
EXAMPLE_METHODS = {
    "serving_default": "tensorflow/serving/classify",
    "classify": "tensorflow/serving/classify",
    "scores_only": "tensorflow/serving/classify",
    "regress": "tensorflow/serving/regress",
    "predict": "tensorflow/serving/predict",
}


def make_example_classifier(base: Path, version: int = 1) -> Path:
    """Serialized tf.Examples in: classify, regress and predict signatures (see above)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    features = {
        "x": tf.io.FixedLenFeature([2], tf.float32),
        "kind": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "count": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    }
    examples = tf.TensorSpec([None], tf.string, name="inputs")

    def z_of(inputs: tf.Tensor) -> tf.Tensor:
        parsed = tf.io.parse_example(inputs, features)
        big = tf.cast(tf.equal(parsed["kind"], "big"), tf.float32)
        count = tf.cast(parsed["count"], tf.float32)
        return parsed["x"][:, 0] + 2.0 * parsed["x"][:, 1] + 10.0 * big + count + float(version)

    def scores_of(inputs: tf.Tensor) -> tf.Tensor:
        p = tf.sigmoid(z_of(inputs) / 10.0)
        return tf.stack([1.0 - p, p], axis=1)

    @tf.function(input_signature=[examples])
    def classify(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        classes = tf.tile(tf.constant([EXAMPLE_LABELS]), [tf.shape(inputs)[0], 1])
        return {"classes": classes, "scores": scores_of(inputs)}

    @tf.function(input_signature=[examples])
    def scores_only(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"scores": scores_of(inputs)}

    @tf.function(input_signature=[examples])
    def regress(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"outputs": z_of(inputs)}

    @tf.function(input_signature=[examples])
    def predict(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"z": z_of(inputs)}

    signatures = {
        "serving_default": classify,
        "classify": classify,
        "scores_only": scores_only,
        "regress": regress,
        "predict": predict,
    }
    path = _save(tf.Module(), base, version, signatures)
    pb = path / "saved_model.pb"
    saved = saved_model_pb2.SavedModel.FromString(pb.read_bytes())
    for key, method in EXAMPLE_METHODS.items():
        saved.meta_graphs[0].signature_def[key].method_name = method
    pb.write_bytes(saved.SerializeToString())
    return path


def frozen_weights() -> Any:
    """The dense layer of the frozen graphs: [8 * 8 * 3, 3], class c reads colour channel c."""
    import numpy as np

    pixels = FROZEN_SIZE * FROZEN_SIZE
    weights = np.zeros((pixels, 3, 3), np.float32)
    for channel in range(3):
        weights[:, channel, channel] = 8.0 / pixels
    noise = np.random.default_rng(7).normal(0.0, 0.01, weights.shape).astype(np.float32)
    return (weights + noise).reshape(pixels * 3, 3)


def _write_frozen(graph: Any, output: str, base: Path, version: int) -> Path:
    """Freeze ``graph``'s variables into constants and write the retraining layout."""
    import tensorflow as tf

    v1 = tf.compat.v1
    with v1.Session(graph=graph) as session:
        session.run(v1.global_variables_initializer())
        frozen = v1.graph_util.convert_variables_to_constants(
            session, graph.as_graph_def(), [output]
        )
    path = Path(base) / str(version)
    path.mkdir(parents=True, exist_ok=True)
    (path / "output_graph.pb").write_bytes(frozen.SerializeToString())
    (path / "output_labels.txt").write_text("".join(f"{label}\n" for label in FLOWER_LABELS))
    return path


def _dense_softmax(pixels: Any, output: str) -> Any:
    """[n, 8, 8, 3] floats in [0, 1] -> softmax over the three classes, named ``output``."""
    import tensorflow as tf

    v1 = tf.compat.v1
    weights = v1.get_variable("final_weights", initializer=frozen_weights())
    flat = tf.reshape(pixels, [-1, FROZEN_SIZE * FROZEN_SIZE * 3])
    return tf.nn.softmax(tf.matmul(flat, weights), name=output)


def make_frozen_jpeg_graph(base: Path, version: int = 1) -> Path:
    """The retraining tutorial's shape: a scalar JPEG string in, final_result out."""
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        contents = v1.placeholder(tf.string, shape=[], name="DecodeJpeg/contents")
        decoded = tf.io.decode_jpeg(contents, channels=3, name="DecodeJpeg")
        batch = tf.expand_dims(tf.cast(decoded, tf.float32), 0)
        resized = tf.image.resize(batch, [FROZEN_SIZE, FROZEN_SIZE], method="bilinear")
        _dense_softmax(resized / 255.0, "final_result")
    return _write_frozen(graph, "final_result", base, version)


def make_frozen_float_graph(
    base: Path, version: int = 1, input_name: str = "input", output_name: str = "final_result"
) -> Path:
    """A float image placeholder [None, 8, 8, 3] in [0, 1] in, class probabilities out."""
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        pixels = v1.placeholder(
            tf.float32, shape=[None, FROZEN_SIZE, FROZEN_SIZE, 3], name=input_name
        )
        _dense_softmax(pixels, output_name)
    return _write_frozen(graph, output_name, base, version)


def load_exporter() -> ModuleType:
    """``scripts/export_demo_model.py``, imported only when a test needs it."""
    from scripts import export_demo_model

    return export_demo_model
