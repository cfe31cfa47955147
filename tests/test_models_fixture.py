"""The test SavedModels of tests/models.py and the demo exporter keep their contracts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests import models

EXPORTER = Path(__file__).resolve().parent.parent / "scripts" / "export_demo_model.py"

Spec = dict[str, tuple[tf.DType, tuple[int | None, ...]]]


def load_signature(path: Path, name: str = "serving_default") -> Any:
    """Load a SavedModel folder and return one of its signature functions."""
    return tf.saved_model.load(str(path)).signatures[name]


def specs(signature: Any) -> tuple[Spec, Spec]:
    """A signature function's inputs and outputs as {name: (dtype, shape)}."""
    _, inputs = signature.structured_input_signature
    return (
        {k: (v.dtype, tuple(v.shape)) for k, v in inputs.items()},
        {k: (v.dtype, tuple(v.shape)) for k, v in signature.structured_outputs.items()},
    )


def test_linear(tmp_path: Path) -> None:
    """make_linear writes base/<version> computing x @ W * scale + b, with labels.txt."""
    path = models.make_linear(tmp_path, version=3, scale=2.0)
    assert path == tmp_path / "3"
    assert (path / "labels.txt").read_text() == "neg\npos\n"
    serve = load_signature(path)
    assert specs(serve) == (
        {"x": (tf.float32, (None, 3))},
        {"y": (tf.float32, (None, 2))},
    )
    y = serve(x=tf.constant([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))["y"].numpy()
    np.testing.assert_array_equal(y, [[18.5, 23.5], [0.5, -0.5]])


def test_multi_io(tmp_path: Path) -> None:
    """make_multi_io has serving_default (a, b -> sum, count) and double (a -> twice)."""
    path = models.make_multi_io(tmp_path)
    serve = load_signature(path)
    assert specs(serve) == (
        {"a": (tf.float32, (None, 2)), "b": (tf.int64, (None,))},
        {"sum": (tf.float32, (None, 2)), "count": (tf.int64, (None,))},
    )
    out = serve(a=tf.constant([[1.0, 2.0], [3.0, 4.0]]), b=tf.constant([10, -1], tf.int64))
    np.testing.assert_array_equal(out["sum"].numpy(), [[11.0, 12.0], [2.0, 3.0]])
    np.testing.assert_array_equal(out["count"].numpy(), [20, -2])

    double = load_signature(path, "double")
    assert specs(double) == ({"a": (tf.float32, (None, 2))}, {"twice": (tf.float32, (None, 2))})
    np.testing.assert_array_equal(double(a=tf.constant([[1.5, -2.0]]))["twice"].numpy(), [[3, -4]])


def test_strings(tmp_path: Path) -> None:
    """make_strings returns each string's byte length and its ASCII upper case."""
    serve = load_signature(models.make_strings(tmp_path))
    assert specs(serve) == (
        {"text": (tf.string, (None,))},
        {"length": (tf.int32, (None,)), "upper_bytes": (tf.string, (None,))},
    )
    out = serve(text=tf.constant([b"abc", b"", "h\u00e9!".encode()]))
    np.testing.assert_array_equal(out["length"].numpy(), [3, 0, 4])
    assert list(out["upper_bytes"].numpy()) == [b"ABC", b"", "H\u00e9!".encode()]


def test_fixed_batch(tmp_path: Path) -> None:
    """make_fixed_batch takes exactly one row of 3 and returns its sum."""
    serve = load_signature(models.make_fixed_batch(tmp_path))
    assert specs(serve) == ({"x": (tf.float32, (1, 3))}, {"y": (tf.float32, (1,))})
    np.testing.assert_array_equal(serve(x=tf.constant([[1.0, 2.0, 3.5]]))["y"].numpy(), [6.5])


def test_slow(tmp_path: Path) -> None:
    """make_slow returns x unchanged, and not before `seconds` have passed (a lower bound)."""
    serve = load_signature(models.make_slow(tmp_path, seconds=0.3))
    assert specs(serve) == ({"x": (tf.float32, (None, 3))}, {"y": (tf.float32, (None, 3))})
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    started = time.monotonic()
    y = serve(x=tf.constant(x))["y"].numpy()
    # The loop waits on tf.timestamp() (wall clock); allow for it and monotonic() differing slightly.
    assert time.monotonic() - started >= 0.25
    np.testing.assert_array_equal(y, x)


def test_exporter_publish_replaces(tmp_path: Path) -> None:
    """publish() swaps a finished folder into place, replacing the old one and leaving nothing else."""
    exporter = models.load_exporter()
    staged, target = tmp_path / ".1.tmp-x", tmp_path / "1"
    staged.mkdir()
    (staged / "new").touch()
    target.mkdir()
    (target / "old").touch()
    exporter.publish(staged, target)
    assert [p.name for p in tmp_path.iterdir()] == ["1"]
    assert [p.name for p in target.iterdir()] == ["new"]


SKIP_CHECK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("export_demo_model", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
status = module.main(sys.argv[2:])
print("tensorflow imported:", "tensorflow" in sys.modules)
sys.exit(status)
"""


@pytest.mark.integration
def test_exporter_skips_existing_without_tensorflow(tmp_path: Path) -> None:
    """Rerunning the exporter when its outputs exist exits 0 without importing TensorFlow."""
    output, samples = tmp_path / "digits", tmp_path / "samples"
    (output / "1").mkdir(parents=True)
    (output / "1" / "saved_model.pb").touch()
    samples.mkdir()
    for name in models.load_exporter().SAMPLE_NAMES:
        (samples / f"{name}.png").touch()
    args = [str(EXPORTER), "--output", str(output), "--samples", str(samples)]
    run = subprocess.run(
        [sys.executable, "-c", SKIP_CHECK, *args], capture_output=True, text=True, check=True
    )
    assert "nothing to do" in run.stdout
    assert "tensorflow imported: False" in run.stdout


@pytest.mark.integration
def test_demo_exporter(tmp_path: Path) -> None:
    """The demo model scores >= 0.9, has its serving signature, and its sample PNGs decode to the
    arrays it was tested on, with the same predictions."""
    exporter = models.load_exporter()
    output, samples = tmp_path / "digits", tmp_path / "samples"
    accuracy = exporter.export(output, samples)
    assert accuracy >= 0.9

    assert [p.name for p in output.iterdir()] == ["1"]  # no staging folder left behind
    version = output / "1"
    assert (version / "labels.txt").read_text().split("\n") == [*map(str, range(10)), ""]
    serve = load_signature(version)
    assert specs(serve) == (
        {"image": (tf.float32, (None, 28, 28, 1))},
        {"probabilities": (tf.float32, (None, 10))},
    )

    split = exporter.load_split()
    indices = exporter.sample_indices(split.y_test)
    assert sorted(p.name for p in samples.iterdir()) == sorted(f"{n}.png" for n in indices)
    for digit, (name, index) in enumerate(indices.items()):
        assert split.y_test[index] == digit
        with Image.open(samples / f"{name}.png") as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28))
            decoded = (np.asarray(image, dtype=np.float32) / 255)[..., None]
        original = split.x_test[index]
        np.testing.assert_allclose(decoded, original, rtol=0, atol=1e-6)
        probabilities = serve(image=tf.constant(np.stack([decoded, original])))["probabilities"]
        from_png, from_array = probabilities.numpy().argmax(axis=1)
        assert from_png == from_array, name
