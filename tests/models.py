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
=================  ===============  =====================================  ===================================

``make_linear`` uses W = [[1, 2], [3, 4], [5, 6]] and b = [0.5, -0.5], held in variables
(so loading exercises variable restore), and writes ``labels.txt`` ("neg", "pos") next to
``saved_model.pb``. Its ``scale`` tells versions apart: x = [1, 1, 1] gives
y = [9 scale + 0.5, 12 scale - 0.5].

``make_slow`` cannot sleep: ``tf.py_function`` is not saved in a SavedModel. It spins in a
``tf.while_loop`` reading ``tf.timestamp()`` until ``seconds`` have passed, so each call
(whatever its batch size) keeps one CPU core busy for that long.

TensorFlow is imported inside the makers, so importing this module (from conftest, say)
costs nothing until a model is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

W = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
B = [0.5, -0.5]
LINEAR_LABELS = ("neg", "pos")


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
