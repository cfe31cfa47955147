"""Train the demo handwritten-digit CNN and export it in TF Serving's layout.

    <output>/1/saved_model.pb, variables/   TF2 SavedModel, signature "serving_default":
                                            image  float32 [None, 28, 28, 1] in [0, 1]
                                         -> probabilities  float32 [None, 10] (softmax)
    <output>/1/labels.txt                   "0" .. "9", one a line, in output order
    <samples>/zero.png .. nine.png          28x28 8-bit grayscale PNGs from the test split

The data is scikit-learn's ``load_digits`` (1797 images, 8x8, values 0..16), so it needs
no download. Each image goes through exactly what the server does to an uploaded PNG, so a
picture sent to the server is seen the way the training data was (see ``to_model_input``):

    1. 8x8 values 0..16 -> 8-bit grayscale: ``round(v * 255 / 16)`` (training data only;
       an upload already is 8-bit);
    2. Pillow ``convert("L")``, then ``resize((28, 28), Image.Resampling.BILINEAR)`` on the
       8-bit image (a no-op for an image that is already 28x28);
    3. ``float32(pixels) / 255`` -> [0, 1], shape (28, 28, 1).

The sample PNGs are the 8-bit images of step 2 itself, so decoding one and dividing by 255
gives bit for bit the array the model was tested on.

Training is seeded and runs with TensorFlow's op determinism on, so two runs give the same
weights and the same test accuracy. Rerunning when the outputs exist does nothing (and does
not import TensorFlow); ``--force`` rebuilds. The version folder is written beside its final
place under a hidden name and renamed into place, so a watcher never sees half a model.

Run through ``scripts/export-demo-model``; tests load this file by path and call ``export``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real imports are inside the functions: a no-op rerun stays fast
    import numpy as np
    from PIL.Image import Image

ROOT = Path(__file__).resolve().parent.parent
VERSION = 1
SIZE = 28
EPOCHS = 12
SEED = 20240607
TEST_FRACTION = 0.25
LABELS = tuple(str(d) for d in range(10))
SAMPLE_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Split:
    """The fixed train/test split, already preprocessed: x is float32 (n, 28, 28, 1) in [0, 1]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    pixels_test: np.ndarray  # uint8 (n, 28, 28): what the sample PNGs hold


def to_pixels(image: Image) -> np.ndarray:
    """Steps 1-2 of the preprocessing: any PIL image -> uint8 (28, 28) grayscale."""
    import numpy as np
    from PIL import Image as PILImage

    return np.asarray(image.convert("L").resize((SIZE, SIZE), PILImage.Resampling.BILINEAR))


def to_model_input(image: Image) -> np.ndarray:
    """The whole preprocessing the server must repeat: PIL image -> float32 (28, 28, 1) in [0, 1]."""
    import numpy as np

    return (to_pixels(image).astype(np.float32) / np.float32(255))[..., None]


def load_split() -> Split:
    """Load ``load_digits``, preprocess it, and split it 75/25, stratified, with a fixed seed."""
    import numpy as np
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    eight_bit = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    pixels = np.stack([to_pixels(PILImage.fromarray(img)) for img in eight_bit])
    x = (pixels.astype(np.float32) / np.float32(255))[..., None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test, _, pixels_test = train_test_split(
        x, y, pixels, test_size=TEST_FRACTION, random_state=0, stratify=y
    )
    return Split(x_train, y_train, x_test, y_test, pixels_test)


def sample_indices(y_test: np.ndarray) -> dict[str, int]:
    """For each digit, the index of its first example in the test split, keyed by sample name."""
    import numpy as np

    return {
        name: int(np.flatnonzero(y_test == digit)[0]) for digit, name in enumerate(SAMPLE_NAMES)
    }


def train(split: Split, epochs: int) -> Any:
    """Fit a small CNN (about 20k weights; seconds on two CPU cores) and return the Keras model."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(split.x_train, split.y_train, batch_size=32, epochs=epochs, shuffle=True, verbose=0)
    return model


def save_servable(model: Any, path: Path) -> None:
    """Write ``model`` as a SavedModel whose signature has exactly the names clients use."""
    import tensorflow as tf

    module = tf.Module()
    module.model = model  # tracked, so its variables are saved

    @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 1], tf.float32, name="image")])
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": model(image, training=False)}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    (path / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))


def describe_signature(path: Path) -> Any:
    """Load the SavedModel back, print its serving signature, and return the signature function."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    print(f"serving_default inputs:  {serve.structured_input_signature}")
    print(f"serving_default outputs: {serve.structured_outputs}")
    return serve


def write_png(pixels: np.ndarray, path: Path) -> None:
    """Write a uint8 (28, 28) array as an 8-bit grayscale PNG, atomically."""
    from PIL import Image as PILImage

    tmp = path.with_name(f".{path.name}.tmp")
    PILImage.fromarray(pixels).save(tmp, format="PNG")
    os.replace(tmp, path)


def publish(staged: Path, target: Path) -> None:
    """Rename the finished ``staged`` folder to ``target``, replacing (--force) an old one.

    A rename cannot replace a non-empty folder, so an old version is first renamed aside:
    for that instant there is no version folder, which a watcher sees as "not yet exported"
    rather than as a half-written model.
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        target.rename(old)
    staged.rename(target)
    if old is not None:
        shutil.rmtree(old)


def export(output: Path, samples: Path | None, epochs: int = EPOCHS) -> float:
    """Train, export ``output/1`` (replacing it), write the samples, and return the test accuracy.

    Training runs with TensorFlow's op determinism on; the setting the process had is restored
    afterwards, so a caller's later TensorFlow work (tests, benchmarks) is not affected.
    """
    from tensorflow.python.framework import config as tf_config  # the only way to turn it off

    was_deterministic = tf_config.is_op_determinism_enabled()
    try:
        return _export(output, samples, epochs)
    finally:
        if not was_deterministic:
            tf_config.disable_op_determinism()


def _export(output: Path, samples: Path | None, epochs: int) -> float:
    import keras
    import numpy as np
    import tensorflow as tf
    from PIL import Image as PILImage

    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()

    started = time.monotonic()
    split = load_split()
    model = train(split, epochs)
    print(
        f"trained {epochs} epochs on {len(split.y_train)} images in {time.monotonic() - started:.1f} s"
    )

    output.mkdir(parents=True, exist_ok=True)
    # Hidden and not a number, so neither TF Serving nor our repository takes it for a version.
    staged = Path(tempfile.mkdtemp(prefix=f".{VERSION}.tmp-", dir=output))
    staged.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server run as another user
    try:
        save_servable(model, staged)
        serve = describe_signature(staged)
        probabilities = serve(image=tf.constant(split.x_test))["probabilities"].numpy()
        accuracy = float(np.mean(probabilities.argmax(axis=1) == split.y_test))
        print(f"test accuracy: {accuracy:.4f} ({len(split.y_test)} images)")

        if samples is not None:
            samples.mkdir(parents=True, exist_ok=True)
            for digit, (name, index) in enumerate(sample_indices(split.y_test).items()):
                png = samples / f"{name}.png"
                write_png(split.pixels_test[index], png)
                with PILImage.open(png) as image:
                    decoded = to_model_input(image)
                p = serve(image=tf.constant(decoded[None]))["probabilities"].numpy()[0]
                verdict = "correct" if p.argmax() == digit else "WRONG"
                print(f"{png}: digit {digit}, predicted {p.argmax()} (p={p.max():.3f}) {verdict}")

        publish(staged, output / str(VERSION))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    print(f"exported {output / str(VERSION)}")
    return accuracy


def up_to_date(output: Path, samples: Path | None) -> bool:
    """Whether every output exists already (the version folder, and the samples if wanted)."""
    if not (output / str(VERSION) / "saved_model.pb").is_file():
        return False
    return samples is None or all((samples / f"{name}.png").is_file() for name in SAMPLE_NAMES)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "models" / "digits",
        help="model base folder; the version written is 1 (default: %(default)s)",
    )
    parser.add_argument(
        "--samples",
        type=Path,
        default=ROOT / "samples",
        help="folder for zero.png .. nine.png (default: %(default)s)",
    )
    parser.add_argument("--no-samples", action="store_true", help="do not write sample PNGs")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="default: %(default)s")
    parser.add_argument("--force", action="store_true", help="rebuild even if the outputs exist")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    samples = None if args.no_samples else args.samples

    if not args.force and up_to_date(args.output, samples):
        print(f"{args.output / str(VERSION)} exists; nothing to do (--force rebuilds it)")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TF's INFO chatter on import
    started = time.monotonic()
    export(args.output, samples, args.epochs)
    print(f"done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
